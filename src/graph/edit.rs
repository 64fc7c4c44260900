//! Editing helpers for passes. They act on the `GraphProto`; build a new view
//! after. [`Namer`] is the one allocator of fresh value and initializer names.

use std::collections::HashSet;

use super::subgraph_free_values;
use crate::onnx::proto::{GraphProto, TensorProto};
use crate::onnx::TensorData;

/// Replaces the initializer `name` by `data` (keeping its doc string and
/// metadata), or adds it when absent.
pub fn set_initializer(g: &mut GraphProto, name: &str, data: &TensorData) {
    set_initializer_proto(g, name, data.to_proto(name));
}

/// [`set_initializer`] with the tensor already encoded (its name is set here).
pub fn set_initializer_proto(g: &mut GraphProto, name: &str, mut t: TensorProto) {
    t.name = Some(name.to_string());
    if let Some(old) = g.initializer.iter_mut().find(|t| t.name() == name) {
        t.doc_string = old.doc_string.take();
        t.metadata_props = std::mem::take(&mut old.metadata_props);
        *old = t;
    } else {
        g.initializer.push(t);
    }
}

/// Removes the nodes at these indices.
pub fn remove_nodes(g: &mut GraphProto, idxs: &HashSet<usize>) {
    let mut i = 0;
    g.node.retain(|_| {
        let keep = !idxs.contains(&i);
        i += 1;
        keep
    });
}

/// Removes initializers nothing reads (nodes, subgraphs, graph outputs); returns their names.
pub fn remove_unused_initializers(g: &mut GraphProto) -> Vec<String> {
    let mut used: HashSet<String> = HashSet::new();
    for n in &g.node {
        used.extend(n.input.iter().cloned());
        used.extend(subgraph_free_values(n));
    }
    used.extend(g.output.iter().map(|o| o.name().to_string()));
    let mut removed = Vec::new();
    g.initializer.retain(|t| {
        let keep = used.contains(t.name());
        if !keep {
            removed.push(t.name().to_string());
        }
        keep
    });
    // Before IR 4 initializers are listed as inputs too: drop those entries with them.
    let gone: HashSet<&str> = removed.iter().map(String::as_str).collect();
    g.input.retain(|i| !gone.contains(i.name()));
    removed
}

/// Removes the `Constant` nodes, and the initializers named in `candidates`, that
/// nothing reads any more (nodes, subgraphs, graph outputs); returns how many.
pub fn remove_dead_constants(g: &mut GraphProto, candidates: &HashSet<String>) -> usize {
    let mut used: HashSet<String> = HashSet::new();
    for n in &g.node {
        used.extend(n.input.iter().cloned());
        used.extend(subgraph_free_values(n));
    }
    used.extend(g.output.iter().map(|o| o.name().to_string()));
    let before = g.node.len() + g.initializer.len();
    g.node
        .retain(|n| n.op_type() != "Constant" || n.output.iter().any(|o| used.contains(o)));
    g.initializer
        .retain(|t| !candidates.contains(t.name()) || used.contains(t.name()));
    g.input
        .retain(|i| !candidates.contains(i.name()) || used.contains(i.name()));
    before - g.node.len() - g.initializer.len()
}

/// Fresh names: every name it hands out is new to the graph it was made from
/// and to every name handed out before. `base` itself when free, else `base_1`,
/// `base_2`, ... (the first free one).
#[derive(Debug, Clone, Default)]
pub struct Namer {
    taken: HashSet<String>,
}

impl Namer {
    /// The names a graph defines: initializers, node outputs and graph inputs.
    pub fn of(g: &GraphProto) -> Namer {
        let taken = g
            .initializer
            .iter()
            .map(|t| t.name().to_string())
            .chain(g.node.iter().flat_map(|n| n.output.iter().cloned()))
            .chain(g.input.iter().map(|i| i.name().to_string()))
            .collect();
        Namer { taken }
    }

    /// [`Namer::of`] plus the node names (for names that also name nodes).
    pub fn with_node_names(g: &GraphProto) -> Namer {
        let mut n = Namer::of(g);
        n.taken.extend(g.node.iter().map(|n| n.name().to_string()));
        n
    }

    /// Whether a name is taken.
    pub fn is_taken(&self, name: &str) -> bool {
        self.taken.contains(name)
    }

    /// Marks a name as taken (made elsewhere).
    pub fn take(&mut self, name: impl Into<String>) {
        self.taken.insert(name.into());
    }

    /// Gives a name back (a tentative name that was not used).
    pub fn release(&mut self, name: &str) {
        self.taken.remove(name);
    }

    /// How many names are taken.
    pub fn len(&self) -> usize {
        self.taken.len()
    }

    /// Whether no name is taken.
    pub fn is_empty(&self) -> bool {
        self.taken.is_empty()
    }

    /// Whether any taken name starts with `prefix`.
    pub fn any_starts_with(&self, prefix: &str) -> bool {
        self.taken.iter().any(|t| t.starts_with(prefix))
    }

    /// A fresh name derived from `base`, now taken.
    pub fn fresh(&mut self, base: &str) -> String {
        let name = if !self.taken.contains(base) {
            base.to_string()
        } else {
            (1..)
                .map(|k| format!("{base}_{k}"))
                .find(|n| !self.taken.contains(n.as_str()))
                .expect("some name is free")
        };
        self.taken.insert(name.clone());
        name
    }
}

/// Keeps the IR 3 rule after a pass changed the initializers: before IR 4 every
/// initializer must also be listed as a graph input (onnx `checker.cc`,
/// `check_graph`). Initializers the pass added are appended to the inputs (with
/// their element type and shape); inputs that named an initializer the pass
/// removed (`before`: the initializer names before it ran) are dropped, so no
/// dangling required input is left. Returns how many inputs were added and removed.
pub fn keep_initializers_listed(g: &mut GraphProto, before: &HashSet<String>) -> (usize, usize) {
    use crate::onnx::proto::{
        tensor_shape_proto::{dimension::Value as Dim, Dimension},
        type_proto, TensorShapeProto, TypeProto, ValueInfoProto,
    };
    let now: HashSet<String> = g.initializer.iter().map(|t| t.name().to_string()).collect();
    let len = g.input.len();
    g.input
        .retain(|i| !before.contains(i.name()) || now.contains(i.name()));
    let removed = len - g.input.len();
    let listed: HashSet<String> = g.input.iter().map(|i| i.name().to_string()).collect();
    let mut added = 0;
    for t in &g.initializer {
        if listed.contains(t.name()) {
            continue;
        }
        g.input.push(ValueInfoProto {
            name: Some(t.name().to_string()),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: Some(t.data_type()),
                    shape: Some(TensorShapeProto {
                        dim: t
                            .dims
                            .iter()
                            .map(|d| Dimension {
                                value: Some(Dim::DimValue(*d)),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        });
        added += 1;
    }
    (added, removed)
}
