//! Walks every `TensorProto` a model holds: graph initializers, sparse initializers,
//! node attributes (Constant values included), subgraphs of control-flow nodes,
//! functions and training graphs. Loading uses it to resolve external data and
//! check sizes; saving uses it to lay tensors out.

use super::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, SparseTensorProto, TensorProto,
};

/// Where a tensor sits in the model, for error messages ("initializer 'w'",
/// "node 'Constant_3' attribute 'value'").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    Initializer,
    SparseInitializer,
    Attribute,
}

/// Calls `f` on every tensor of the model, depth first, in file order.
pub fn tensors_mut<E>(
    model: &mut ModelProto,
    f: &mut impl FnMut(&mut TensorProto, Site) -> Result<(), E>,
) -> Result<(), E> {
    if let Some(g) = model.graph.as_mut() {
        graph_tensors_mut(g, f)?;
    }
    for func in &mut model.functions {
        nodes_tensors_mut(&mut func.node, f)?;
    }
    for ti in &mut model.training_info {
        if let Some(g) = ti.initialization.as_mut() {
            graph_tensors_mut(g, f)?;
        }
        if let Some(g) = ti.algorithm.as_mut() {
            graph_tensors_mut(g, f)?;
        }
    }
    Ok(())
}

/// Calls `f` on every tensor of one graph and of its subgraphs.
pub fn graph_tensors_mut<E>(
    g: &mut GraphProto,
    f: &mut impl FnMut(&mut TensorProto, Site) -> Result<(), E>,
) -> Result<(), E> {
    for t in &mut g.initializer {
        f(t, Site::Initializer)?;
    }
    for s in &mut g.sparse_initializer {
        sparse_mut(s, Site::SparseInitializer, f)?;
    }
    nodes_tensors_mut(&mut g.node, f)
}

fn nodes_tensors_mut<E>(
    nodes: &mut [NodeProto],
    f: &mut impl FnMut(&mut TensorProto, Site) -> Result<(), E>,
) -> Result<(), E> {
    for n in nodes {
        for a in &mut n.attribute {
            attribute_tensors_mut(a, f)?;
        }
    }
    Ok(())
}

fn attribute_tensors_mut<E>(
    a: &mut AttributeProto,
    f: &mut impl FnMut(&mut TensorProto, Site) -> Result<(), E>,
) -> Result<(), E> {
    if let Some(t) = a.t.as_mut() {
        f(t, Site::Attribute)?;
    }
    for t in &mut a.tensors {
        f(t, Site::Attribute)?;
    }
    if let Some(s) = a.sparse_tensor.as_mut() {
        sparse_mut(s, Site::Attribute, f)?;
    }
    for s in &mut a.sparse_tensors {
        sparse_mut(s, Site::Attribute, f)?;
    }
    if let Some(g) = a.g.as_mut() {
        graph_tensors_mut(g, f)?;
    }
    for g in &mut a.graphs {
        graph_tensors_mut(g, f)?;
    }
    Ok(())
}

fn sparse_mut<E>(
    s: &mut SparseTensorProto,
    site: Site,
    f: &mut impl FnMut(&mut TensorProto, Site) -> Result<(), E>,
) -> Result<(), E> {
    if let Some(t) = s.values.as_mut() {
        f(t, site)?;
    }
    if let Some(t) = s.indices.as_mut() {
        f(t, site)?;
    }
    Ok(())
}

/// Every graph of the model: the main graph first, then subgraphs (depth first),
/// then training graphs.
pub fn graphs(model: &ModelProto) -> Vec<&GraphProto> {
    fn walk<'a>(g: &'a GraphProto, out: &mut Vec<&'a GraphProto>) {
        out.push(g);
        for n in &g.node {
            for a in &n.attribute {
                if let Some(sg) = a.g.as_ref() {
                    walk(sg, out);
                }
                for sg in &a.graphs {
                    walk(sg, out);
                }
            }
        }
    }
    let mut out = Vec::new();
    if let Some(g) = model.graph.as_ref() {
        walk(g, &mut out);
    }
    for ti in &model.training_info {
        for g in [ti.initialization.as_ref(), ti.algorithm.as_ref()]
            .into_iter()
            .flatten()
        {
            walk(g, &mut out);
        }
    }
    out
}
