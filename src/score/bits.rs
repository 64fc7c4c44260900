//! Bit widths, read from what the file holds. This is the one place that knows
//! how a weight or an activation is represented; the passes that write
//! representations must be readable here.
//!
//! Weights (the constant input of a Conv / Gemm / MatMul):
//! - a float initializer counts its storage width (32, or 16 for float16/bfloat16);
//! - a float initializer that *claims* a k-bit scheme in its `metadata_props`
//!   (`onnx_micronet.scheme`, `onnx_micronet.bits`, and the scheme's grid, e.g.
//!   `onnx_micronet.step` for linear) counts k bits, but only when its values prove
//!   it: at most 2^k distinct values, all on the scheme's grid. A claim the values
//!   contradict is an error, never silently believed;
//! - `DequantizeLinear(q, scale, zero_point)` with a constant integer `q` counts
//!   the bits of q's element type (int8 -> 8), its values being (q - zp) * scale;
//! - a packed weight (bitmask + k-bit codes or float32 values + a decoding subgraph,
//!   `passes/pack/format.rs`) counts the width its structure stores: k for codes
//!   (2 and ternary for mask + sign bit + two centroids), 32 for float32 values.
//!
//! The claim contract (written by the `quantize` pass, read here and by packing).
//! Quantized weights stay float32 initializers whose values lie exactly on their
//! grid, computed in f32 as `((code - zp) as f32) * scale`, so a DequantizeLinear
//! of the codes reproduces them bit for bit; exact zeros (pruned weights) stay
//! exactly 0.0 under every scheme (the mask is the zeros). `metadata_props` keys:
//! - `onnx_micronet.scheme` = linear | minmax | log | tanh | ternary, and
//!   `onnx_micronet.bits` = k (ternary: 2, and may be omitted);
//! - linear: `onnx_micronet.step` = scale (2^-sf), zp = 0, signed codes in
//!   [-2^(k-1), 2^(k-1) - 1];
//! - minmax: `onnx_micronet.step` = scale and `onnx_micronet.zero_point` = zp, an
//!   integer; unsigned codes in [0, 2^k - 1] (ONNX uint8 style at k = 8; the grid
//!   is nudged so 0.0 is code zp);
//! - per-channel linear/minmax: `onnx_micronet.axis` = the tensor's output-channel
//!   axis (Conv 0, ConvTranspose 1, Gemm 0 with transB = 1 else 1, MatMul the last),
//!   and step / zero_point as comma-separated lists, one per channel;
//! - log: every nonzero value is a signed power of two, the exponents spanning at
//!   most 2^(k-1) values (an exponent on k - 1 bits plus a sign bit);
//! - tanh: at most 2^k distinct values;
//! - ternary: `onnx_micronet.rule` = twn | msu | ec2t; values in {w_n, 0, w_p},
//!   twn and msu symmetric (w_n = -w_p).
//!
//! Verification: the distinct count (per channel when per-channel) is at most 2^k
//! (ternary 3), and each value is on its stated grid: v / step within 1e-3 of an
//! integer code in range (so values computed a float ulp away still pass; the
//! pass itself writes them exactly). Any contradiction is an error naming the
//! tensor and the claim.
//!
//! Activations: the output of `DequantizeLinear(QuantizeLinear(x))` counts the
//! bits of the quantized type; a float fake-quant chain
//! `Mul(Clip(Round(Mul|Div(x, s)), lo, hi), s')` counts ceil(log2(hi - lo + 1))
//! bits; ops that only move or select values (Relu, MaxPool, Reshape, ...) keep
//! their input's bits; an integer graph input counts its type's bits; everything
//! else is float (`None`).

use std::collections::{BTreeSet, HashMap, HashSet};

use ndarray::{ArrayD, Axis, IxDyn};

use crate::error::{Error, Result};
use crate::graph::{declared_elem_type, Graph};
use crate::onnx::tensor::{dtype_name, elem_bits};
use crate::onnx::{DataType, TensorData, TensorProto};

/// Metadata keys on a `TensorProto` through which passes state a weight's scheme.
pub const META_SCHEME: &str = "onnx_micronet.scheme";
pub const META_BITS: &str = "onnx_micronet.bits";
pub const META_STEP: &str = "onnx_micronet.step";
pub const META_ZERO_POINT: &str = "onnx_micronet.zero_point";
pub const META_AXIS: &str = "onnx_micronet.axis";
pub const META_RULE: &str = "onnx_micronet.rule";

/// A weight as the score sees it.
#[derive(Debug, Clone)]
pub struct Weight {
    /// The values the runtime multiplies with (decoded to float).
    pub values: ArrayD<f32>,
    /// Bits per stored value (per nonzero when stored sparse).
    pub bits: u32,
    /// How the file represents it: "float32", "int8 via DequantizeLinear", "linear", "ternary", ...
    pub scheme: String,
    /// Quantized below 16 bits (cancels the 16-bit freebie for the whole model).
    pub quantized: bool,
    /// Ternary: values in {w_n, 0, w_p}.
    pub ternary: bool,
}

fn meta<'a>(t: &'a TensorProto, key: &str) -> Option<&'a str> {
    t.metadata_props
        .iter()
        .find(|p| p.key() == key)
        .map(|p| p.value())
}

/// The weight feeding a layer through `value`, if `value` is constant (directly or
/// through DequantizeLinear / Identity).
pub fn weight(g: &Graph, value: &str) -> Result<Option<Weight>> {
    if let Some(t) = g.constant_proto(value) {
        return float_weight(t).map(Some);
    }
    if let Some(data) = g.constant(value)? {
        // value_float(s) / value_int(s) Constant nodes.
        let bits = data.elem_bits() as u32;
        return Ok(Some(Weight {
            values: data.to_f32(),
            bits,
            scheme: dtype_name(data.data_type() as i32),
            quantized: false,
            ternary: false,
        }));
    }
    let Some((idx, _)) = g.producer(value) else {
        return Ok(None);
    };
    // Packed storage (mask + codes + decoding subgraph): read by its structure,
    // valued by evaluating its ops (`passes/pack/format.rs` defines the format).
    if let Some(w) = crate::passes::pack::format::read(g, value)? {
        return Ok(Some(w));
    }
    let node = g.node(idx);
    match node.op_type() {
        "Identity" => weight(g, &node.input[0]),
        "DequantizeLinear" => {
            let Some(q) = g.constant(&node.input[0])? else {
                return Ok(None);
            };
            let Some(scale) =
                g.constant_f32(node.input.get(1).map(String::as_str).unwrap_or(""))?
            else {
                return Ok(None);
            };
            let zp = match node.input.get(2).filter(|s| !s.is_empty()) {
                Some(z) => g.constant_f32(z)?,
                None => None,
            };
            let axis = node
                .attribute
                .iter()
                .find(|a| a.name() == "axis")
                .map(|a| a.i())
                .unwrap_or(1);
            let values = dequantize(&q.to_f32(), &scale, zp.as_ref(), axis)
                .map_err(|m| Error::tensor(&node.input[0], m))?;
            let bits = q.elem_bits() as u32;
            Ok(Some(Weight {
                values,
                bits,
                scheme: format!("{} via DequantizeLinear", dtype_name(q.data_type() as i32)),
                quantized: bits < 16,
                ternary: false,
            }))
        }
        _ => Ok(None),
    }
}

/// (q - zp) * scale, per tensor or along `axis`.
fn dequantize(
    q: &ArrayD<f32>,
    scale: &ArrayD<f32>,
    zp: Option<&ArrayD<f32>>,
    axis: i64,
) -> std::result::Result<ArrayD<f32>, String> {
    if scale.len() == 1 {
        let s = scale.iter().next().copied().unwrap_or(1.0);
        let z = zp.and_then(|z| z.iter().next().copied()).unwrap_or(0.0);
        return Ok(q.mapv(|x| (x - z) * s));
    }
    let rank = q.ndim() as i64;
    let axis = if axis < 0 { axis + rank } else { axis };
    if axis < 0 || axis >= rank || q.shape()[axis as usize] != scale.len() {
        return Err(format!(
            "per-axis scale of {} values does not match axis {axis} of {:?}",
            scale.len(),
            q.shape()
        ));
    }
    let mut out = q.clone();
    for (c, mut lane) in out.axis_iter_mut(Axis(axis as usize)).enumerate() {
        let s = scale[IxDyn(&[c])];
        let z = zp.map(|z| z[IxDyn(&[c])]).unwrap_or(0.0);
        lane.mapv_inplace(|x| (x - z) * s);
    }
    Ok(out)
}

fn float_weight(t: &TensorProto) -> Result<Weight> {
    let data = TensorData::from_proto(t)?;
    let storage_bits = data.elem_bits() as u32;
    let values = data.to_f32();
    let Some(c) = verify_claim(t, &values)? else {
        return Ok(Weight {
            values,
            bits: storage_bits,
            scheme: dtype_name(t.data_type()),
            quantized: false,
            ternary: false,
        });
    };
    Ok(Weight {
        values,
        bits: c.bits,
        quantized: c.bits < 16,
        ternary: c.scheme == "ternary",
        scheme: c.scheme,
    })
}

/// A scheme claim on a float tensor, proved by its values.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub scheme: String,
    pub bits: u32,
    /// Ternary: twn | msu | ec2t.
    pub rule: Option<String>,
    /// Per-channel grids (linear, minmax): the output-channel axis.
    pub axis: Option<usize>,
}

/// Parses one number, or a comma-separated list of them, from a metadata value.
fn meta_list(t: &TensorProto, key: &str) -> Option<std::result::Result<Vec<f64>, String>> {
    let raw = meta(t, key)?;
    Some(
        raw.split(',')
            .map(|s| {
                s.trim()
                    .parse::<f64>()
                    .map_err(|_| format!("{key} = '{raw}' is not a number or a list of numbers"))
            })
            .collect(),
    )
}

/// Reads and checks the scheme claim in a tensor's `metadata_props` against its
/// values (see the module doc for the contract). `Ok(None)`: no claim.
pub fn verify_claim(t: &TensorProto, values: &ArrayD<f32>) -> Result<Option<Claim>> {
    let Some(scheme) = meta(t, META_SCHEME) else {
        return Ok(None);
    };
    let name = t.name();
    let claim_err = |m: String| Error::tensor(name, format!("claims {scheme} but {m}"));
    let ternary = scheme == "ternary";
    let bits: u32 = match meta(t, META_BITS) {
        Some(b) => b
            .parse()
            .map_err(|_| claim_err(format!("{META_BITS} = '{b}' is not a number")))?,
        None if ternary => 2,
        None => return Err(claim_err(format!("has no {META_BITS}"))),
    };
    if !(1..=32).contains(&bits) {
        return Err(claim_err(format!("{bits} bits is out of range")));
    }
    let axis = match meta(t, META_AXIS) {
        None => None,
        Some(a) => {
            let a: usize = a
                .parse()
                .map_err(|_| claim_err(format!("{META_AXIS} = '{a}' is not an axis")))?;
            if a >= values.ndim() {
                return Err(claim_err(format!(
                    "{META_AXIS} = {a} is not an axis of a rank-{} tensor",
                    values.ndim()
                )));
            }
            Some(a)
        }
    };
    // The slices that share one grid: the channels along `axis`, or the whole tensor.
    let slices: Vec<Vec<f32>> = match axis {
        Some(a) => values
            .axis_iter(Axis(a))
            .map(|s| s.iter().copied().collect())
            .collect(),
        None => vec![values.iter().copied().collect()],
    };
    // One parameter per slice (or one for all).
    let per_slice = |key: &str| -> Result<Option<Vec<f64>>> {
        let Some(list) = meta_list(t, key) else {
            return Ok(None);
        };
        let list = list.map_err(claim_err)?;
        if list.len() != slices.len() {
            return Err(claim_err(format!(
                "{key} lists {} values for {} {}",
                list.len(),
                slices.len(),
                if axis.is_some() {
                    "channels"
                } else {
                    "tensor (no axis)"
                }
            )));
        }
        Ok(Some(list))
    };
    // Distinct values: the proof every scheme shares (per channel when per-channel).
    let allowed: u64 = if ternary { 3 } else { 1u64 << bits.min(63) };
    for s in &slices {
        let distinct: BTreeSet<u32> = s
            .iter()
            .map(|v| if *v == 0.0 { 0 } else { v.to_bits() })
            .collect();
        if distinct.len() as u64 > allowed {
            return Err(claim_err(format!(
                "holds {} distinct values{} (a {bits}-bit code has at most {allowed})",
                distinct.len(),
                if axis.is_some() {
                    " in one channel"
                } else {
                    ""
                }
            )));
        }
    }
    // k = v / step within 1e-3 of an integer in [lo, hi].
    let on_grid = |v: f32, step: f64, zp: f64, lo: f64, hi: f64| -> bool {
        let k = v as f64 / step;
        (k - k.round()).abs() <= 1e-3 && k.round() + zp >= lo && k.round() + zp <= hi
    };
    let mut rule = None;
    match scheme {
        "linear" | "minmax" => {
            let steps = per_slice(META_STEP)?
                .ok_or_else(|| claim_err(format!("has no valid {META_STEP}")))?;
            let zps = if scheme == "minmax" {
                per_slice(META_ZERO_POINT)?
                    .ok_or_else(|| claim_err(format!("has no valid {META_ZERO_POINT}")))?
            } else {
                vec![0.0; slices.len()]
            };
            // linear: signed codes; minmax: unsigned codes, as ONNX uint8 with a zero point.
            let (lo, hi) = if scheme == "linear" {
                (
                    -(2f64.powi(bits as i32 - 1)),
                    2f64.powi(bits as i32 - 1) - 1.0,
                )
            } else {
                (0.0, 2f64.powi(bits as i32) - 1.0)
            };
            for ((s, &step), &zp) in slices.iter().zip(&steps).zip(&zps) {
                if !(step > 0.0 && step.is_finite()) {
                    return Err(claim_err(format!("{META_STEP} {step} is not positive")));
                }
                if zp.fract() != 0.0 || zp < lo || zp > hi {
                    return Err(claim_err(format!(
                        "{META_ZERO_POINT} {zp} is not an integer code in [{lo}, {hi}]"
                    )));
                }
                if let Some(v) = s.iter().find(|v| !on_grid(**v, step, zp, lo, hi)) {
                    return Err(claim_err(if scheme == "linear" {
                        format!("value {v} is not on the grid k * {step}, k in [{lo}, {hi}]")
                    } else {
                        format!(
                            "value {v} is not on the grid (q - {zp}) * {step}, q in [{lo}, {hi}]"
                        )
                    }));
                }
            }
        }
        "log" => {
            let mut exps = BTreeSet::new();
            for v in values.iter().filter(|v| **v != 0.0) {
                let e = v.abs().log2();
                if (e - e.round()).abs() > 1e-4 {
                    return Err(claim_err(format!("value {v} is not a signed power of two")));
                }
                exps.insert(e.round() as i64);
            }
            if let (Some(lo), Some(hi)) = (exps.first(), exps.last()) {
                let span = (hi - lo + 1) as u64;
                if bits < 2 || span > 1u64 << (bits - 1).min(62) {
                    return Err(claim_err(format!(
                        "its exponents span 2^{lo}..2^{hi} ({span} exponents; {} bits of exponent give {})",
                        bits.saturating_sub(1),
                        1u64 << bits.saturating_sub(1).min(62)
                    )));
                }
            }
        }
        "ternary" => {
            let r = meta(t, META_RULE);
            if let Some(r) = r.filter(|r| !matches!(*r, "twn" | "msu" | "ec2t")) {
                return Err(claim_err(format!(
                    "{META_RULE} = '{r}' is not twn, msu or ec2t"
                )));
            }
            let levels: BTreeSet<u32> = values
                .iter()
                .filter(|v| **v != 0.0)
                .map(|v| v.to_bits())
                .collect();
            let neg: Vec<f32> = levels
                .iter()
                .map(|b| f32::from_bits(*b))
                .filter(|v| *v < 0.0)
                .collect();
            let pos: Vec<f32> = levels
                .iter()
                .map(|b| f32::from_bits(*b))
                .filter(|v| *v > 0.0)
                .collect();
            if neg.len() > 1 || pos.len() > 1 {
                return Err(claim_err(
                    "holds more than one negative or positive level".into(),
                ));
            }
            if let (Some("twn" | "msu"), [n], [p]) = (r, &neg[..], &pos[..]) {
                if *n != -*p {
                    return Err(claim_err(format!(
                        "rule {} is symmetric, yet its levels are {n} and {p}",
                        r.unwrap_or_default()
                    )));
                }
            }
            rule = r.map(str::to_string);
        }
        // tanh and others: proved by the distinct count above.
        _ => {}
    }
    Ok(Some(Claim {
        scheme: scheme.to_string(),
        bits,
        rule,
        axis,
    }))
}

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
                let (p, _) = g.producer(x)?;
                let qn = g.node(p);
                if qn.op_type() != "QuantizeLinear" {
                    return None;
                }
                // The quantized type is the zero point's (uint8 when absent).
                let zp_bits = qn
                    .input
                    .get(2)
                    .filter(|s| !s.is_empty())
                    .and_then(|z| g.constant_proto(z))
                    .and_then(|z| elem_bits(z.data_type()));
                Some(zp_bits.unwrap_or(8) as u32)
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
