//! Activation forms: how an activation's bit width is represented in the file,
//! read ([`ActBits`]) and built ([`build`]), in one place.
//!
//! - `DequantizeLinear(QuantizeLinear(x, s, zp))`: the bits of the quantized type
//!   (the zero point's; uint8 when absent); a DequantizeLinear of a constant
//!   integer tensor: that tensor's bits;
//! - the float fake-quant chain `Mul|Div(Clip(Round(Mul|Div(x, s)), lo, hi), s')`:
//!   ceil(log2(hi - lo + 1)) bits;
//! - `Cast(Cast(x, to = FLOAT16), to = FLOAT)`: 16 bits (float16 rounding);
//! - ops that only move or select values (Relu, MaxPool, Reshape, ...) keep their
//!   input's bits; `Concat` the widest of its inputs; an integer graph input its
//!   type's bits; everything else is float (`None`).
//!
//! The conversion nodes themselves (Q/DQ, the chain, the casts) are free in the
//! score (micronet-rules.md section 3.1: conversions between formats exactly
//! representable in float32 are not tallied).

use std::collections::{HashMap, HashSet};

use crate::graph::{declared_elem_type, Graph, Namer};
use crate::onnx::attr::{self, NodeAttrs};
use crate::onnx::proto::{GraphProto, NodeProto};
use crate::onnx::tensor::elem_bits;
use crate::onnx::{DataType, TensorData};

/// Ops whose output holds only values of their (first) input: bits pass through.
const PASSTHROUGH: &[&str] = &[
    "Relu",
    "MaxPool",
    "GlobalMaxPool",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Transpose",
    "Identity",
    "Dropout",
    "Slice",
    "Split",
    "Pad",
    "Gather",
    "Expand",
    "Tile",
    "SpaceToDepth",
    "DepthToSpace",
];

/// Activation bit widths, computed once per value.
pub struct ActBits<'g> {
    g: &'g Graph<'g>,
    memo: HashMap<String, Option<u32>>,
    /// Nodes that only convert between formats (Q/DQ, fake-quant chains): free.
    pub conversion_nodes: HashSet<usize>,
}

impl<'g> ActBits<'g> {
    pub fn new(g: &'g Graph<'g>) -> Self {
        let mut s = ActBits {
            g,
            memo: HashMap::new(),
            conversion_nodes: HashSet::new(),
        };
        for &i in g.topo_order() {
            let n = g.node(i);
            if matches!(n.op_type(), "QuantizeLinear" | "DequantizeLinear") {
                s.conversion_nodes.insert(i);
            }
            if n.op_type() == "Round" {
                if let Some((nodes, _)) = s.fake_quant_around(i) {
                    s.conversion_nodes.extend(nodes);
                }
            }
            if let Some(first) = half_round_trip(g, i) {
                s.conversion_nodes.extend([first, i]);
            }
            // Dequantizing an integer accumulator (onnxruntime's dynamic
            // quantization): Mul(Cast(ConvInteger | MatMulInteger, to float), scale).
            if n.op_type() == "Mul" {
                let from_integer = n.input.iter().any(|v| {
                    g.producer(v).is_some_and(|(c, _)| {
                        let cn = g.node(c);
                        cn.op_type() == "Cast"
                            && cn
                                .input
                                .first()
                                .and_then(|x| g.producer(x))
                                .is_some_and(|(p, _)| {
                                    matches!(g.node(p).op_type(), "ConvInteger" | "MatMulInteger")
                                })
                    })
                });
                if from_integer {
                    s.conversion_nodes.insert(i);
                }
            }
        }
        s
    }

    /// Bits of an activation value; `None` for float.
    pub fn of(&mut self, value: &str) -> Option<u32> {
        if let Some(b) = self.memo.get(value) {
            return *b;
        }
        let b = self.compute(value);
        self.memo.insert(value.to_string(), b);
        b
    }

    fn compute(&mut self, value: &str) -> Option<u32> {
        let g = self.g;
        let Some((idx, _)) = g.producer(value) else {
            // A graph input: integer types count their bits.
            let input = g.proto().input.iter().find(|i| i.name() == value)?;
            let t = declared_elem_type(input)?;
            let is_float = [
                DataType::Float,
                DataType::Double,
                DataType::Float16,
                DataType::Bfloat16,
            ]
            .iter()
            .any(|d| *d as i32 == t);
            return if is_float {
                None
            } else {
                elem_bits(t).map(|b| b as u32)
            };
        };
        let n = g.node(idx);
        match n.op_type() {
            "DequantizeLinear" => {
                let x = &n.input[0];
                if let Some(q) = g.constant_proto(x) {
                    return elem_bits(q.data_type()).map(|b| b as u32);
                }
                // The bits of the quantized value it reads (QuantizeLinear, a QLinear
                // op, DynamicQuantizeLinear).
                self.of(&x.clone())
            }
            // The quantized type is the zero point's (uint8 when absent).
            "QuantizeLinear" => Some(zp_bits(g, n, 2).unwrap_or(8)),
            "DynamicQuantizeLinear" => Some(8),
            // Integer accumulators.
            "ConvInteger" | "MatMulInteger" => Some(32),
            op if quantized_output_zp(op).is_some() => {
                let slot = quantized_output_zp(op).expect("checked");
                Some(zp_bits(g, n, slot).unwrap_or(8))
            }
            "Mul" | "Div" => {
                // The end of a fake-quant chain: Mul(Clip(Round(.)), s).
                for inp in &n.input {
                    if let Some((c, _)) = g.producer(inp) {
                        if g.node(c).op_type() == "Clip" {
                            if let Some((r, _)) =
                                g.node(c).input.first().and_then(|v| g.producer(v))
                            {
                                if g.node(r).op_type() == "Round" {
                                    return self.fake_quant_around(r).map(|(_, bits)| bits);
                                }
                            }
                        }
                    }
                }
                None
            }
            "Cast" => half_round_trip(g, idx).map(|_| 16),
            op if PASSTHROUGH.contains(&op) => self.of(&n.input[0].clone()),
            "Concat" => {
                let bits: Vec<Option<u32>> = n.input.clone().iter().map(|v| self.of(v)).collect();
                bits.into_iter().try_fold(0, |acc, b| b.map(|b| acc.max(b)))
            }
            _ => None,
        }
    }

    /// A fake-quant chain centred on the Round node `r`: Mul|Div(x, s) -> Round ->
    /// Clip(lo, hi) -> Mul|Div(., s'). Returns its nodes and its bit width.
    fn fake_quant_around(&self, r: usize) -> Option<(Vec<usize>, u32)> {
        let g = self.g;
        let round = g.node(r);
        let (pre, _) = g.producer(&round.input[0])?;
        let pre_n = g.node(pre);
        if !matches!(pre_n.op_type(), "Mul" | "Div")
            || !pre_n.input.iter().any(|v| g.constant_proto(v).is_some())
        {
            return None;
        }
        let [clip] = g.consumers(&round.output[0]) else {
            return None;
        };
        let clip_n = g.node(*clip);
        if clip_n.op_type() != "Clip" || clip_n.input.len() < 3 {
            return None;
        }
        let lo = g
            .constant_f32(&clip_n.input[1])
            .ok()??
            .iter()
            .next()
            .copied()?;
        let hi = g
            .constant_f32(&clip_n.input[2])
            .ok()??
            .iter()
            .next()
            .copied()?;
        let [post] = g.consumers(&clip_n.output[0]) else {
            return None;
        };
        let post_n = g.node(*post);
        if !matches!(post_n.op_type(), "Mul" | "Div")
            || !post_n.input.iter().any(|v| g.constant_proto(v).is_some())
        {
            return None;
        }
        let levels = (hi - lo).round() as f64 + 1.0;
        if levels < 2.0 {
            return None;
        }
        let bits = levels.log2().ceil() as u32;
        Some((vec![pre, r, *clip, *post], bits))
    }
}

/// `Cast(Cast(x, to = FLOAT16), to = FLOAT)` ending at node `i`: the first Cast.
fn half_round_trip(g: &Graph, i: usize) -> Option<usize> {
    let to = |n: &NodeProto| n.int_or("to", 0).ok();
    let n = g.node(i);
    if n.op_type() != "Cast" || to(n)? != DataType::Float as i64 {
        return None;
    }
    let (p, _) = g.producer(n.input.first()?)?;
    let pn = g.node(p);
    (pn.op_type() == "Cast" && to(pn)? == DataType::Float16 as i64).then_some(p)
}

/// The input holding the output zero point of onnxruntime's quantized ops (its
/// element type is the output's): QLinearConv 7, QLinearMatMul 7, QGemm 8,
/// QLinearAdd/Mul 7, the unary ones 4, QLinearConcat 1.
pub fn quantized_output_zp(op: &str) -> Option<usize> {
    Some(match op {
        "QLinearConv" | "QLinearMatMul" | "QLinearAdd" | "QLinearMul" => 7,
        "QGemm" => 8,
        "QLinearGlobalAveragePool"
        | "QLinearAveragePool"
        | "QLinearSigmoid"
        | "QLinearLeakyRelu"
        | "QLinearSoftmax" => 4,
        "QLinearConcat" => 1,
        _ => return None,
    })
}

/// The inputs of a node that are activation scales and zero points (values a
/// runtime needs to quantize or dequantize activations), by op: Q/DQ 1 and 2,
/// the QLinear ops their input and output scales and zero points (not the
/// weight's, which belong to the weight).
pub fn activation_param_inputs(g: &Graph, n: &NodeProto) -> Vec<usize> {
    match n.op_type() {
        "QuantizeLinear" => vec![1, 2],
        // A weight's DequantizeLinear (of a constant or packed codes) is the weight's.
        "DequantizeLinear" => {
            let weight = n.input.first().is_some_and(|x| {
                g.constant_proto(x).is_some()
                    || g.producer(x)
                        .is_some_and(|(p, _)| g.node(p).op_type() == "Cast")
            });
            if weight {
                vec![]
            } else {
                vec![1, 2]
            }
        }
        "QLinearConv" | "QLinearMatMul" => vec![1, 2, 6, 7],
        "QGemm" => vec![1, 2, 7, 8],
        "QLinearAdd" | "QLinearMul" => vec![1, 2, 4, 5, 6, 7],
        "QLinearGlobalAveragePool"
        | "QLinearAveragePool"
        | "QLinearSigmoid"
        | "QLinearLeakyRelu"
        | "QLinearSoftmax" => vec![1, 2, 3, 4],
        "QLinearConcat" => (0..n.input.len())
            .filter(|i| *i < 2 || i % 3 != 2)
            .collect(),
        _ => vec![],
    }
}

/// Bits of the element type of a node's constant input `slot` (a zero point).
fn zp_bits(g: &Graph, n: &NodeProto, slot: usize) -> Option<u32> {
    n.input
        .get(slot)
        .filter(|s| !s.is_empty())
        .and_then(|z| g.constant_proto(z))
        .and_then(|z| elem_bits(z.data_type()))
        .map(|b| b as u32)
}

/// How an activation is quantized in the file.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Form {
    /// `QuantizeLinear -> DequantizeLinear` at 8 bits, int8 (`signed`) or uint8,
    /// with this zero point.
    Qdq { signed: bool, zero_point: i32 },
    /// `Mul(Clip(Round(Div(x, s)), lo, hi), s)`: round(x / s) clipped to [lo, hi]
    /// (a signed or unsigned grid, the zero point taken out of [lo, hi]).
    FakeQuant { signed: bool, lo: f64, hi: f64 },
    /// `Cast(Cast(x, FLOAT16), FLOAT)`: float16 rounding.
    Half,
}

impl Form {
    /// In words, for reports.
    pub fn describe(&self) -> &'static str {
        match self {
            Form::Qdq { signed: true, .. } => "int8 Q/DQ",
            Form::Qdq { signed: false, .. } => "uint8 Q/DQ",
            Form::FakeQuant { signed: true, .. } => "signed fake-quant",
            Form::FakeQuant { signed: false, .. } => "unsigned fake-quant",
            Form::Half => "float16 cast",
        }
    }
}

fn node(op: &str, name: String, inputs: Vec<String>, output: String) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(name),
        input: inputs,
        output: vec![output],
        ..Default::default()
    }
}

/// Builds the quantizer of `value` (`scale` unused for [`Form::Half`]): pushes its
/// constants to `g.initializer` and returns its nodes, in order, and the value
/// they write. Names come from `names`, derived from `value`.
///
/// `scale` holds one scale (per tensor) or one per channel of axis 1 of a value
/// of rank `rank` >= 2, written as a constant of shape [C, 1, ..., 1] (rank - 1
/// dims) that broadcasts against [N, C, ...] (ONNX multidirectional
/// broadcasting); per-channel scales take [`Form::FakeQuant`] only.
///
/// Panics when per-channel scales come with [`Form::Qdq`] or `rank` < 2: the
/// pass never asks for either.
pub fn build(
    g: &mut GraphProto,
    names: &mut Namer,
    value: &str,
    form: Form,
    scale: &[f32],
    rank: usize,
) -> (Vec<NodeProto>, String) {
    let base = value.replace(['/', ':'], "_");
    let base = base.trim_start_matches('_');
    let mut nodes = Vec::new();
    if form == Form::Half {
        let h = names.fresh(&format!("{base}_f16"));
        let out = names.fresh(&format!("{base}_f16_f32"));
        let mut c1 = node(
            "Cast",
            format!("{h}_node"),
            vec![value.to_string()],
            h.clone(),
        );
        c1.attribute.push(attr::int("to", DataType::Float16 as i64));
        let mut c2 = node("Cast", format!("{out}_node"), vec![h], out.clone());
        c2.attribute.push(attr::int("to", DataType::Float as i64));
        return (vec![c1, c2], out);
    }
    let s_name = names.fresh(&format!("{base}_act_scale"));
    let scale_tensor = match scale {
        [s] => ndarray::arr0(*s).into_dyn(),
        _ => {
            assert!(
                rank >= 2 && !matches!(form, Form::Qdq { .. }),
                "per-channel activation scales need the fake-quant chain and a channel axis"
            );
            let mut shape = vec![1; rank - 1];
            shape[0] = scale.len();
            ndarray::ArrayD::from_shape_vec(shape, scale.to_vec()).expect("C scales")
        }
    };
    g.initializer
        .push(TensorData::F32(scale_tensor).to_proto(&s_name));
    let out;
    match form {
        Form::Qdq { signed, zero_point } => {
            let zp_name = names.fresh(&format!("{base}_act_zp"));
            let zp = if signed {
                TensorData::I8(ndarray::arr0(zero_point as i8).into_dyn())
            } else {
                TensorData::U8(ndarray::arr0(zero_point as u8).into_dyn())
            };
            g.initializer.push(zp.to_proto(&zp_name));
            let q = names.fresh(&format!("{base}_q"));
            out = names.fresh(&format!("{base}_dq"));
            nodes.push(node(
                "QuantizeLinear",
                format!("{q}_node"),
                vec![value.to_string(), s_name.clone(), zp_name.clone()],
                q.clone(),
            ));
            nodes.push(node(
                "DequantizeLinear",
                format!("{out}_node"),
                vec![q, s_name, zp_name],
                out.clone(),
            ));
        }
        Form::FakeQuant { lo, hi, .. } => {
            let lo_name = names.fresh(&format!("{base}_act_lo"));
            let hi_name = names.fresh(&format!("{base}_act_hi"));
            g.initializer
                .push(TensorData::F32(ndarray::arr0(lo as f32).into_dyn()).to_proto(&lo_name));
            g.initializer
                .push(TensorData::F32(ndarray::arr0(hi as f32).into_dyn()).to_proto(&hi_name));
            let d = names.fresh(&format!("{base}_fq_div"));
            let r = names.fresh(&format!("{base}_fq_round"));
            let c = names.fresh(&format!("{base}_fq_clip"));
            out = names.fresh(&format!("{base}_fq"));
            nodes.push(node(
                "Div",
                format!("{d}_node"),
                vec![value.to_string(), s_name.clone()],
                d.clone(),
            ));
            nodes.push(node("Round", format!("{r}_node"), vec![d], r.clone()));
            nodes.push(node(
                "Clip",
                format!("{c}_node"),
                vec![r, lo_name, hi_name],
                c.clone(),
            ));
            nodes.push(node(
                "Mul",
                format!("{out}_node"),
                vec![c, s_name],
                out.clone(),
            ));
        }
        Form::Half => unreachable!("built above"),
    }
    (nodes, out)
}
