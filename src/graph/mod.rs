//! A read-only view of an ONNX graph: who produces and who consumes each value,
//! the constants (initializers and `Constant` nodes) as typed arrays, a
//! topological order, and a unique name for every node (exporters leave many
//! unnamed). Building the view checks the graph: every value a node uses is
//! defined (graph input, initializer or node output, or the outer scope for a
//! subgraph), no value is defined twice, and there is no cycle.
//!
//! Passes read the graph through this view and edit the `GraphProto` with the
//! helpers in [`edit`]; after an edit, build a new view. [`layers`] is the one
//! table of weighted layers (weight, bias, output-channel axis, fan-in) every
//! pass and the score use.

pub mod channels;
pub mod edit;
pub mod layers;

pub use edit::{
    remove_nodes, remove_unused_initializers, set_initializer, set_initializer_proto, Namer,
};
pub use layers::{weighted_layers, WeightedLayer, WEIGHTED_OPS};

use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use crate::onnx::proto::{GraphProto, NodeProto, TensorProto, ValueInfoProto};
use crate::onnx::TensorData;

/// Checks a top-level graph: every value used is defined, none twice, no cycle.
pub fn check(proto: &GraphProto) -> Result<()> {
    Graph::new(proto).map(|_| ())
}

/// The view. Node indices are positions in `GraphProto::node`.
#[derive(Debug)]
pub struct Graph<'g> {
    proto: &'g GraphProto,
    /// value name -> (producing node, output slot)
    producer: HashMap<&'g str, (usize, usize)>,
    /// value name -> consuming nodes (a node appears once per use, explicit or
    /// through one of its subgraphs)
    consumers: HashMap<&'g str, Vec<usize>>,
    /// (value, node) where a node's subgraph reads the value by name
    implicit_uses: Vec<(&'g str, usize)>,
    initializers: HashMap<&'g str, &'g TensorProto>,
    /// Initializers also listed as graph inputs, from IR 4 on (see [`Graph::of`]).
    overridable: HashSet<&'g str>,
    order: Vec<usize>,
    names: Vec<String>,
}

impl<'g> Graph<'g> {
    /// Builds and checks the view of a top-level graph, by the rules of IR 4 and
    /// later (an initializer also listed as a graph input is an overridable default).
    pub fn new(proto: &'g GraphProto) -> Result<Graph<'g>> {
        Self::with_outer_scope(proto, &HashSet::new())
    }

    /// The view of a model's main graph, by the rules of its IR version: before IR
    /// 4 every initializer is listed as a graph input and is a constant; from IR 4
    /// on, an initializer that is also a graph input is a default a caller may
    /// replace at run time ([`Graph::is_overridable`]).
    pub fn of(model: &'g crate::onnx::Model) -> Result<Graph<'g>> {
        let mut g = Self::new(model.graph())?;
        if model.proto.ir_version() < 4 {
            g.overridable.clear();
        }
        Ok(g)
    }

    /// Builds the view of a subgraph that may read `outer` values of its parent.
    pub fn with_outer_scope(proto: &'g GraphProto, outer: &HashSet<String>) -> Result<Graph<'g>> {
        let graph_name = proto.name();
        let where_ = |what: String| {
            if graph_name.is_empty() {
                what
            } else {
                format!("graph '{graph_name}': {what}")
            }
        };
        let names = unique_names(&proto.node);

        let mut defined: HashMap<&str, String> = HashMap::new();
        let mut initializers = HashMap::new();
        for t in &proto.initializer {
            initializers.insert(t.name(), t);
            defined.insert(t.name(), "an initializer".into());
        }
        for s in &proto.sparse_initializer {
            if let Some(v) = s.values.as_ref() {
                defined.insert(v.name(), "a sparse initializer".into());
            }
        }
        let mut overridable = HashSet::new();
        for i in &proto.input {
            // Before IR 4, initializers are listed as inputs too: not a redefinition.
            if initializers.contains_key(i.name()) {
                overridable.insert(i.name());
            }
            defined
                .entry(i.name())
                .or_insert_with(|| "a graph input".into());
        }
        let mut producer = HashMap::new();
        for (idx, node) in proto.node.iter().enumerate() {
            for (slot, out) in node.output.iter().enumerate() {
                if out.is_empty() {
                    continue;
                }
                if let Some(prev) = defined.get(out.as_str()) {
                    return Err(Error::Graph(where_(format!(
                        "node '{}' ({}) writes value '{out}', which is already {prev}",
                        names[idx],
                        node.op_type()
                    ))));
                }
                defined.insert(out, format!("the output of node '{}'", names[idx]));
                producer.insert(out.as_str(), (idx, slot));
            }
        }

        // Every use, explicit or through a subgraph's free variables, must be defined.
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut implicit_uses: Vec<(&str, usize)> = Vec::new();
        let mut deps: Vec<Vec<usize>> = vec![Vec::new(); proto.node.len()];
        for (idx, node) in proto.node.iter().enumerate() {
            let implicit = subgraph_free_values(node);
            let uses = node
                .input
                .iter()
                .filter(|s| !s.is_empty())
                .map(String::as_str);
            for value in uses.chain(implicit.iter().map(String::as_str)) {
                if !defined.contains_key(value) && !outer.contains(value) {
                    return Err(Error::Graph(where_(format!(
                        "node '{}' ({}) uses value '{value}', which nothing defines",
                        names[idx],
                        node.op_type()
                    ))));
                }
                if let Some(&(p, _)) = producer.get(value) {
                    deps[idx].push(p);
                }
            }
            for value in node.input.iter().filter(|s| !s.is_empty()) {
                consumers.entry(value.as_str()).or_default().push(idx);
            }
            // A subgraph's read of an outer value is a use by the node that holds it.
            for value in &implicit {
                if let Some((k, _)) = defined.get_key_value(value.as_str()) {
                    consumers.entry(*k).or_default().push(idx);
                    implicit_uses.push((*k, idx));
                }
            }
        }
        for o in &proto.output {
            if !defined.contains_key(o.name()) && !outer.contains(o.name()) {
                return Err(Error::Graph(where_(format!(
                    "graph output '{}' is not defined by any node, input or initializer",
                    o.name()
                ))));
            }
        }

        let order = topological_order(&deps).map_err(|stuck| {
            Error::Graph(where_(format!(
                "the graph has a cycle through node '{}' ({})",
                names[stuck],
                proto.node[stuck].op_type()
            )))
        })?;

        Ok(Graph {
            proto,
            producer,
            consumers,
            implicit_uses,
            initializers,
            overridable,
            order,
            names,
        })
    }

    pub fn proto(&self) -> &'g GraphProto {
        self.proto
    }

    pub fn nodes(&self) -> &'g [NodeProto] {
        &self.proto.node
    }

    pub fn node(&self, idx: usize) -> &'g NodeProto {
        &self.proto.node[idx]
    }

    /// A name for the node that is unique in this graph: its own name when it has
    /// a unique one, otherwise `<op_type>_<index>`.
    pub fn node_name(&self, idx: usize) -> &str {
        &self.names[idx]
    }

    /// Node indices in an order where every node comes after the producers of its inputs.
    pub fn topo_order(&self) -> &[usize] {
        &self.order
    }

    /// The node that writes `value`, and the output slot.
    pub fn producer(&self, value: &str) -> Option<(usize, usize)> {
        self.producer.get(value).copied()
    }

    /// The nodes that read `value` (once per use), including nodes whose
    /// subgraphs (If/Loop/Scan bodies) read it by name.
    pub fn consumers(&self, value: &str) -> &[usize] {
        self.consumers.get(value).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Whether node `node` reads `value` inside one of its subgraphs.
    pub fn reads_in_subgraph(&self, node: usize, value: &str) -> bool {
        self.implicit_uses
            .iter()
            .any(|(v, n)| *n == node && *v == value)
    }

    /// The readers of `value` in words: `'a' (Conv), 'b' (If, inside its subgraph), the graph output`.
    pub fn describe_uses(&self, value: &str) -> String {
        let mut parts: Vec<String> = self
            .consumers(value)
            .iter()
            .map(|&c| {
                let inside = if self.reads_in_subgraph(c, value) {
                    ", inside its subgraph"
                } else {
                    ""
                };
                format!(
                    "'{}' ({}{inside})",
                    self.node_name(c),
                    self.node(c).op_type()
                )
            })
            .collect();
        if self.is_output(value) {
            parts.push("the graph output".into());
        }
        parts.join(", ")
    }

    /// Whether `value` is one of the graph's outputs.
    pub fn is_output(&self, value: &str) -> bool {
        self.proto.output.iter().any(|o| o.name() == value)
    }

    /// Uses of `value` by nodes plus by the graph outputs.
    pub fn use_count(&self, value: &str) -> usize {
        self.consumers(value).len()
            + self
                .proto
                .output
                .iter()
                .filter(|o| o.name() == value)
                .count()
    }

    pub fn initializer(&self, name: &str) -> Option<&'g TensorProto> {
        self.initializers.get(name).copied()
    }

    /// Whether `name` is an initializer a caller may replace at run time (also a
    /// graph input, IR 4 and later): its values are a default, not a constant, so
    /// no pass may fold or rewrite it.
    pub fn is_overridable(&self, name: &str) -> bool {
        self.overridable.contains(name)
    }

    /// Why a value cannot be rewritten or folded as a constant, if it cannot: an
    /// overridable initializer.
    pub fn not_fixed(&self, name: &str) -> Option<String> {
        self.is_overridable(name).then(|| {
            format!(
                "'{name}' is an initializer also listed as a graph input (from IR 4 on, a default a caller may replace at run time)"
            )
        })
    }

    /// Graph inputs that are real inputs (not initializers listed as inputs).
    pub fn inputs(&self) -> impl Iterator<Item = &'g ValueInfoProto> + '_ {
        self.proto
            .input
            .iter()
            .filter(|i| !self.initializers.contains_key(i.name()))
    }

    /// The tensor behind a constant value: an initializer, or the `value` of a
    /// `Constant` node. `None` when the value is computed.
    pub fn constant_proto(&self, value: &str) -> Option<&'g TensorProto> {
        if let Some(t) = self.initializer(value) {
            return Some(t);
        }
        let (idx, _) = self.producer(value)?;
        let node = self.node(idx);
        if node.op_type() != "Constant" {
            return None;
        }
        node.attribute
            .iter()
            .find(|a| a.name() == "value")
            .and_then(|a| a.t.as_ref())
    }

    /// A constant value as a typed array: an initializer or any form of `Constant`
    /// node (`value`, `value_float(s)`, `value_int(s)`).
    pub fn constant(&self, value: &str) -> Result<Option<TensorData>> {
        if let Some(t) = self.constant_proto(value) {
            return TensorData::from_proto(t).map(Some);
        }
        let Some((idx, _)) = self.producer(value) else {
            return Ok(None);
        };
        let node = self.node(idx);
        if node.op_type() != "Constant" {
            return Ok(None);
        }
        use ndarray::{arr0, ArrayD};
        for a in &node.attribute {
            let data = match a.name() {
                "value_float" => TensorData::F32(arr0(a.f()).into_dyn()),
                "value_int" => TensorData::I64(arr0(a.i()).into_dyn()),
                "value_floats" => TensorData::F32(
                    ArrayD::from_shape_vec(vec![a.floats.len()], a.floats.clone()).expect("1-D"),
                ),
                "value_ints" => TensorData::I64(
                    ArrayD::from_shape_vec(vec![a.ints.len()], a.ints.clone()).expect("1-D"),
                ),
                _ => continue,
            };
            return Ok(Some(data));
        }
        Ok(None)
    }

    /// A constant's values in f32 (see [`TensorData::to_f32`]).
    pub fn constant_f32(&self, value: &str) -> Result<Option<ndarray::ArrayD<f32>>> {
        Ok(self.constant(value)?.map(TensorData::into_f32))
    }

    /// The nodes of one op type, in topological order.
    pub fn nodes_of_type<'a>(&'a self, op_type: &'a str) -> impl Iterator<Item = usize> + 'a {
        self.order
            .iter()
            .copied()
            .filter(move |&i| self.node(i).op_type() == op_type)
    }
}

/// Node names made unique: a node keeps a non-empty name no other node has; the
/// others become `<op_type>_<index>` (with a suffix if that is taken too).
pub fn unique_names(nodes: &[NodeProto]) -> Vec<String> {
    let mut count: HashMap<&str, usize> = HashMap::new();
    for n in nodes {
        *count.entry(n.name()).or_default() += 1;
    }
    let mut taken: HashSet<String> = nodes
        .iter()
        .filter(|n| !n.name().is_empty() && count[n.name()] == 1)
        .map(|n| n.name().to_string())
        .collect();
    nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            if !n.name().is_empty() && count[n.name()] == 1 {
                return n.name().to_string();
            }
            let base = format!("{}_{i}", n.op_type());
            let mut name = base.clone();
            let mut k = 1;
            while taken.contains(&name) {
                name = format!("{base}_{k}");
                k += 1;
            }
            taken.insert(name.clone());
            name
        })
        .collect()
}

/// Values that a node's subgraphs (If/Loop/Scan bodies) read from the enclosing scope.
pub fn subgraph_free_values(node: &NodeProto) -> Vec<String> {
    let mut out = Vec::new();
    for a in &node.attribute {
        for g in a.g.iter().chain(a.graphs.iter()) {
            free_values(g, &mut out);
        }
    }
    out
}

fn free_values(g: &GraphProto, out: &mut Vec<String>) {
    let mut defined: HashSet<&str> = HashSet::new();
    defined.extend(g.input.iter().map(|i| i.name()));
    defined.extend(g.initializer.iter().map(|t| t.name()));
    defined.extend(
        g.sparse_initializer
            .iter()
            .filter_map(|s| s.values.as_ref())
            .map(|v| v.name()),
    );
    defined.extend(
        g.node
            .iter()
            .flat_map(|n| n.output.iter().map(String::as_str)),
    );
    for n in &g.node {
        let inner = subgraph_free_values(n);
        for v in n.input.iter().filter(|s| !s.is_empty()).chain(inner.iter()) {
            if !defined.contains(v.as_str()) && !out.contains(v) {
                out.push(v.clone());
            }
        }
    }
    for o in &g.output {
        if !defined.contains(o.name()) && !out.iter().any(|v| v == o.name()) {
            out.push(o.name().to_string());
        }
    }
}

/// Kahn's algorithm over `deps[i]` = producers node `i` waits for. Stable: among
/// ready nodes, the lowest index goes first, so a graph already in order keeps it.
/// On a cycle, returns a node that is on or behind it.
fn topological_order(deps: &[Vec<usize>]) -> std::result::Result<Vec<usize>, usize> {
    let n = deps.len();
    let mut waiting = vec![0usize; n];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, ds) in deps.iter().enumerate() {
        for &d in ds {
            waiting[i] += 1;
            dependents[d].push(i);
        }
    }
    let mut ready: std::collections::BinaryHeap<std::cmp::Reverse<usize>> = (0..n)
        .filter(|&i| waiting[i] == 0)
        .map(std::cmp::Reverse)
        .collect();
    let mut order = Vec::with_capacity(n);
    while let Some(std::cmp::Reverse(i)) = ready.pop() {
        order.push(i);
        for &j in &dependents[i] {
            waiting[j] -= 1;
            if waiting[j] == 0 {
                ready.push(std::cmp::Reverse(j));
            }
        }
    }
    if order.len() < n {
        let stuck = (0..n).find(|&i| waiting[i] > 0).expect("some node is left");
        return Err(stuck);
    }
    Ok(order)
}

/// Tensor shape of a value as declared in the graph's type information (inputs,
/// outputs, value_info): `Some(dim)` for a fixed dim, `None` for a symbolic or
/// unknown one. `None` overall when the value has no declared tensor shape.
pub fn declared_shape(info: &ValueInfoProto) -> Option<Vec<Option<i64>>> {
    use crate::onnx::proto::{tensor_shape_proto::dimension::Value as Dim, type_proto::Value};
    let Some(Value::TensorType(t)) = info.r#type.as_ref()?.value.as_ref() else {
        return None;
    };
    Some(
        t.shape
            .as_ref()?
            .dim
            .iter()
            .map(|d| match d.value {
                Some(Dim::DimValue(v)) => Some(v),
                _ => None,
            })
            .collect(),
    )
}

/// Human-readable shape: fixed dims as numbers, symbolic ones by name, unknown as `?`.
pub fn shape_string(info: &ValueInfoProto) -> String {
    use crate::onnx::proto::{tensor_shape_proto::dimension::Value as Dim, type_proto::Value};
    let Some(Value::TensorType(t)) = info.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return "(not a tensor)".into();
    };
    let Some(shape) = t.shape.as_ref() else {
        return "(unknown rank)".into();
    };
    let dims: Vec<String> = shape
        .dim
        .iter()
        .map(|d| match &d.value {
            Some(Dim::DimValue(v)) => v.to_string(),
            Some(Dim::DimParam(p)) => p.clone(),
            None => "?".into(),
        })
        .collect();
    format!("[{}]", dims.join(", "))
}

/// Element type of a tensor value as declared, if any.
pub fn declared_elem_type(info: &ValueInfoProto) -> Option<i32> {
    use crate::onnx::proto::type_proto::Value;
    match info.r#type.as_ref()?.value.as_ref()? {
        Value::TensorType(t) => t.elem_type,
        _ => None,
    }
}
