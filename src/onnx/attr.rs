//! Typed access to node attributes, written once (after tract's
//! `onnx/src/pb_helpers.rs`): every getter checks the attribute's declared type
//! and names the node and the attribute in its error.
//!
//! An attribute whose `type` field is unset (some old exporters) is read by the
//! field that holds its value; one that is set must match what the getter reads
//! (`INT` for [`NodeAttrs::get_int`], `FLOAT` for [`NodeAttrs::get_float`], ...).
//! Absent attributes are `Ok(None)`; the `*_or` getters supply the operator's
//! default.

use super::proto::{AttributeProto, GraphProto, NodeProto, TensorProto};
use super::AttributeType;
use crate::error::{Error, Result};

/// How a node is named in errors: its name, else its op type.
pub fn node_label(n: &NodeProto) -> String {
    if n.name().is_empty() {
        n.op_type().to_string()
    } else {
        format!("{} ({})", n.name(), n.op_type())
    }
}

fn type_name(t: AttributeType) -> &'static str {
    match t {
        AttributeType::Undefined => "UNDEFINED",
        AttributeType::Float => "FLOAT",
        AttributeType::Int => "INT",
        AttributeType::String => "STRING",
        AttributeType::Tensor => "TENSOR",
        AttributeType::Graph => "GRAPH",
        AttributeType::SparseTensor => "SPARSE_TENSOR",
        AttributeType::TypeProto => "TYPE_PROTO",
        AttributeType::Floats => "FLOATS",
        AttributeType::Ints => "INTS",
        AttributeType::Strings => "STRINGS",
        AttributeType::Tensors => "TENSORS",
        AttributeType::Graphs => "GRAPHS",
        AttributeType::SparseTensors => "SPARSE_TENSORS",
        AttributeType::TypeProtos => "TYPE_PROTOS",
    }
}

/// The attribute's declared type, or (when unset) the type its filled field implies.
fn declared(a: &AttributeProto) -> AttributeType {
    match a.r#type.and_then(|t| AttributeType::try_from(t).ok()) {
        Some(t) if t != AttributeType::Undefined => t,
        _ => {
            if a.f.is_some() {
                AttributeType::Float
            } else if a.i.is_some() {
                AttributeType::Int
            } else if a.s.is_some() {
                AttributeType::String
            } else if a.t.is_some() {
                AttributeType::Tensor
            } else if a.g.is_some() {
                AttributeType::Graph
            } else if !a.floats.is_empty() {
                AttributeType::Floats
            } else if !a.ints.is_empty() {
                AttributeType::Ints
            } else if !a.strings.is_empty() {
                AttributeType::Strings
            } else if !a.graphs.is_empty() {
                AttributeType::Graphs
            } else {
                AttributeType::Undefined
            }
        }
    }
}

/// Attribute getters on a node.
pub trait NodeAttrs {
    /// The attribute of that name, whatever its type.
    fn attr(&self, name: &str) -> Option<&AttributeProto>;
    /// The attribute checked to be of type `want` (an empty list attribute whose
    /// type is unset passes for any list type).
    fn typed_attr(&self, name: &str, want: AttributeType) -> Result<Option<&AttributeProto>>;

    fn get_int(&self, name: &str) -> Result<Option<i64>> {
        Ok(self
            .typed_attr(name, AttributeType::Int)?
            .map(|a| a.i.unwrap_or(0)))
    }
    fn get_float(&self, name: &str) -> Result<Option<f32>> {
        Ok(self
            .typed_attr(name, AttributeType::Float)?
            .map(|a| a.f.unwrap_or(0.0)))
    }
    fn get_ints(&self, name: &str) -> Result<Option<Vec<i64>>> {
        Ok(self
            .typed_attr(name, AttributeType::Ints)?
            .map(|a| a.ints.clone()))
    }
    fn get_floats(&self, name: &str) -> Result<Option<Vec<f32>>> {
        Ok(self
            .typed_attr(name, AttributeType::Floats)?
            .map(|a| a.floats.clone()))
    }
    /// A STRING attribute as UTF-8 (lossy).
    fn get_string(&self, name: &str) -> Result<Option<String>> {
        Ok(self
            .typed_attr(name, AttributeType::String)?
            .map(|a| String::from_utf8_lossy(a.s()).into_owned()))
    }
    fn get_tensor(&self, name: &str) -> Result<Option<&TensorProto>> {
        Ok(self
            .typed_attr(name, AttributeType::Tensor)?
            .and_then(|a| a.t.as_ref()))
    }
    fn get_graph(&self, name: &str) -> Result<Option<&GraphProto>> {
        Ok(self
            .typed_attr(name, AttributeType::Graph)?
            .and_then(|a| a.g.as_ref()))
    }
    /// An INT attribute, or `default` when absent.
    fn int_or(&self, name: &str, default: i64) -> Result<i64> {
        Ok(self.get_int(name)?.unwrap_or(default))
    }
    /// A FLOAT attribute, or `default` when absent.
    fn float_or(&self, name: &str, default: f32) -> Result<f32> {
        Ok(self.get_float(name)?.unwrap_or(default))
    }
}

impl NodeAttrs for NodeProto {
    fn attr(&self, name: &str) -> Option<&AttributeProto> {
        self.attribute.iter().find(|a| a.name() == name)
    }

    fn typed_attr(&self, name: &str, want: AttributeType) -> Result<Option<&AttributeProto>> {
        let Some(a) = self.attr(name) else {
            return Ok(None);
        };
        let got = declared(a);
        let list = matches!(
            want,
            AttributeType::Ints | AttributeType::Floats | AttributeType::Strings
        );
        if got == want || (list && got == AttributeType::Undefined) {
            return Ok(Some(a));
        }
        Err(Error::Attribute {
            node: node_label(self),
            attribute: name.to_string(),
            message: format!("is {}, expected {}", type_name(got), type_name(want)),
        })
    }
}

/// Builders for the attributes passes write.
pub fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

pub fn float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(v),
        ..Default::default()
    }
}

pub fn ints(name: &str, v: Vec<i64>) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v,
        ..Default::default()
    }
}

pub fn string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::String as i32),
        s: Some(v.as_bytes().to_vec()),
        ..Default::default()
    }
}

pub fn tensor(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Tensor as i32),
        t: Some(t),
        ..Default::default()
    }
}
