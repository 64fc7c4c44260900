//! The weighted layers, written once: the default-domain nodes that multiply a
//! weight (their input 1), grouped by weight, each weight once with every node
//! that reads it, in topological order of first use. BatchNorm folding, pruning,
//! weight and activation quantization, packing and the score all start from
//! [`weighted_layers`], and read a layer's geometry from [`weight_axis`] and
//! [`bias_input`].
//!
//! The weight's output-channel axis (per-channel grids, BN folding, N:M rows and
//! the score's per-channel counts run along it) and fan-in (inputs per output):
//!
//! | op | weight | axis | fan-in |
//! |---|---|---|---|
//! | Conv | W [Cout, Cin/g, k...] | 0 | Cin/g x prod(k) |
//! | ConvTranspose | W [Cin, Cout/g, k...] | 1 (within a group) | Cout/g x prod(k) |
//! | Gemm, transB = 0 | B [K, N] | 1 | K |
//! | Gemm, transB = 1 | B [N, K] | 0 | K |
//! | MatMul | B [..., K, N] | rank - 1 | K |
//! | MatMul, 1-D B | B [K] | 0 | K |
//!
//! (ONNX operator specs: Conv, ConvTranspose, Gemm, MatMul.)

use super::Graph;
use crate::error::Result;
use crate::onnx::attr::NodeAttrs;
use crate::onnx::{DataType, NodeProto};

/// The ops that carry a weight (their second input): the layers the MicroNet
/// counts, the passes quantize and pack, and BatchNormalization folds into.
pub const WEIGHTED_OPS: &[&str] = &["Conv", "ConvTranspose", "Gemm", "MatMul"];

/// Quantized layers other tools write (onnxruntime's QOperator and dynamic
/// formats), as (op, the float op it computes, weight input, bias input): the
/// score counts them as that op; no pass rewrites them.
pub const QUANTIZED_WEIGHTED_OPS: &[(&str, &str, usize, Option<usize>)] = &[
    ("QLinearConv", "Conv", 3, Some(8)),
    ("ConvInteger", "Conv", 1, None),
    ("QLinearMatMul", "MatMul", 3, None),
    ("MatMulInteger", "MatMul", 1, None),
    ("QGemm", "Gemm", 3, Some(6)),
];

/// Whether a node is a float weighted layer: one of [`WEIGHTED_OPS`] in the
/// default domain, with a weight input (the layers passes rewrite).
pub fn is_weighted(n: &NodeProto) -> bool {
    let standard = n.domain().is_empty() || n.domain() == "ai.onnx";
    standard && WEIGHTED_OPS.contains(&n.op_type()) && n.input.get(1).is_some_and(|w| !w.is_empty())
}

/// The op a weighted layer computes (its float equivalent for quantized layers),
/// and its weight input, for any weighted layer, float or quantized.
pub fn layer_kind(n: &NodeProto) -> Option<(&'static str, usize)> {
    if is_weighted(n) {
        let op = WEIGHTED_OPS.iter().find(|o| **o == n.op_type())?;
        return Some((op, 1));
    }
    let (_, f, w, _) = QUANTIZED_WEIGHTED_OPS
        .iter()
        .find(|(q, ..)| *q == n.op_type())?;
    n.input.get(*w).filter(|v| !v.is_empty())?;
    Some((f, *w))
}

/// The weight's output-channel axis and the layer's fan-in, for a weight of this
/// shape read by this node (table in the module doc). `None` axis: the rank does
/// not fit the op. Errors: a `transB` attribute of the wrong type.
pub fn weight_axis(node: &NodeProto, shape: &[usize]) -> Result<(Option<usize>, usize)> {
    let rank = shape.len();
    let numel: usize = shape.iter().product();
    let op = layer_kind(node).map_or(node.op_type(), |(op, _)| op);
    Ok(match op {
        "Conv" if rank >= 1 => (Some(0), numel / shape[0].max(1)),
        "ConvTranspose" if rank >= 2 => (Some(1), numel / shape[0].max(1)),
        "Gemm" if rank == 2 => {
            if node.int_or("transB", 0)? != 0 {
                (Some(0), shape[1])
            } else {
                (Some(1), shape[0])
            }
        }
        "MatMul" if rank >= 2 => (Some(rank - 1), shape[rank - 2]),
        "MatMul" if rank == 1 => (Some(0), shape[0]),
        _ => (None, numel.max(1)),
    })
}

/// The bias input of a Conv, ConvTranspose or Gemm (input 2), or of a quantized
/// layer that has one (QLinearConv input 8, QGemm input 6), when present.
pub fn bias_input(node: &NodeProto) -> Option<&str> {
    let slot = match node.op_type() {
        "Conv" | "ConvTranspose" | "Gemm" => 2,
        op => QUANTIZED_WEIGHTED_OPS
            .iter()
            .find(|(q, ..)| *q == op)
            .and_then(|(.., b)| *b)?,
    };
    node.input
        .get(slot)
        .map(String::as_str)
        .filter(|b| !b.is_empty())
}

/// Where a layer's weight comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightSource {
    /// An initializer of the graph.
    Initializer,
    /// An initializer that is also a graph input (IR 4 and later): a default value
    /// a caller may replace, not a constant.
    Overridable,
    /// The output of a node (DequantizeLinear, a Constant, a decoder, ...): its op type.
    Computed(String),
    /// A graph input (or a value of an enclosing graph).
    GraphInput,
}

/// One weight and the layers that read it.
#[derive(Debug, Clone)]
pub struct WeightedLayer {
    /// The weight value (the weight input of every node in `nodes`: input 1 of a
    /// float layer).
    pub weight: String,
    /// The weighted nodes that read it as their weight, in topological order.
    pub nodes: Vec<usize>,
    pub source: WeightSource,
}

impl WeightedLayer {
    /// Why the weight is not a float32 initializer, the form a pass rewrites in
    /// place (`None` when it is one).
    pub fn not_float_initializer(&self, g: &Graph) -> Option<String> {
        let w = &self.weight;
        match &self.source {
            WeightSource::Computed(op) if op == "DequantizeLinear" => {
                Some("weight comes through DequantizeLinear (already quantized)".to_string())
            }
            WeightSource::Computed(op) => Some(format!(
                "weight '{w}' is computed by a {op} node, not an initializer"
            )),
            WeightSource::GraphInput => {
                Some(format!("weight '{w}' is a graph input, not an initializer"))
            }
            WeightSource::Overridable => Some(format!(
                "weight {}: left as is",
                g.not_fixed(w).expect("overridable")
            )),
            WeightSource::Initializer => {
                let t = g.initializer(w).expect("an initializer");
                (t.data_type() != DataType::Float as i32).then(|| {
                    format!(
                        "weight '{w}' is {}, not float32",
                        crate::onnx::tensor::dtype_name(t.data_type())
                    )
                })
            }
        }
    }
}

/// Every weighted layer of the graph, float or quantized ([`layer_kind`]), one
/// entry per weight value, in topological order of the weight's first use.
pub fn weighted_layers(g: &Graph) -> Vec<WeightedLayer> {
    let mut out: Vec<WeightedLayer> = Vec::new();
    let mut pos: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for &idx in g.topo_order() {
        let node = g.node(idx);
        let Some((_, slot)) = layer_kind(node) else {
            continue;
        };
        let w = node.input[slot].as_str();
        if let Some(&i) = pos.get(w) {
            out[i].nodes.push(idx);
            continue;
        }
        let source = if g.is_overridable(w) {
            WeightSource::Overridable
        } else if g.initializer(w).is_some() {
            WeightSource::Initializer
        } else {
            match g.producer(w) {
                Some((p, _)) => WeightSource::Computed(g.node(p).op_type().to_string()),
                None => WeightSource::GraphInput,
            }
        };
        pos.insert(w, out.len());
        out.push(WeightedLayer {
            weight: w.to_string(),
            nodes: vec![idx],
            source,
        });
    }
    out
}
