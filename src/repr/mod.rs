//! The file-format contract: how a weight or an activation is represented in an
//! ONNX file, written and read in one place, below both the passes (which write
//! representations) and the score (which reads them back). Neither imports the
//! other; both import this.
//!
//! - [`claim`]: the `onnx_micronet.*` claim keys on float tensors and their proof;
//! - [`scheme`]: the weight grids, one file each, quantizer and verifier together;
//! - [`packed`]: bitmask + k-bit codes decoded by standard ops, both directions;
//! - [`eval`]: the constant evaluator that values packed weights as a runtime would;
//! - [`act`]: activation forms (Q/DQ, fake-quant chains, float16 casts), built and read.
//!
//! A weight (the constant input of a Conv / Gemm / MatMul) as [`weight`] reads it:
//! - a float initializer counts its storage width (32, or 16 for float16/bfloat16);
//! - a float initializer that *claims* a scheme in its `metadata_props` counts the
//!   claimed bits, but only when its values prove it ([`claim::verify`]); a claim
//!   the values contradict is an error, never silently believed;
//! - `DequantizeLinear(q, scale, zero_point)` with a constant integer `q` counts
//!   the bits of q's element type (int8 -> 8), its values being (q - zp) * scale;
//! - `Cast(to = FLOAT)` of a constant counts the constant's width (float16 -> 16);
//! - a packed weight ([`packed`]) counts the width its structure stores: k for
//!   codes (2 and ternary for mask + sign bit + two centroids), 16 for float16
//!   values, 32 for float32 values;
//! - `Identity` passes its input through.

pub mod act;
pub mod claim;
pub mod eval;
pub mod packed;
pub mod round;
pub mod scheme;

use ndarray::{ArrayD, Axis, IxDyn};

use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::onnx::attr::NodeAttrs;
use crate::onnx::tensor::dtype_name;
use crate::onnx::{DataType, TensorData, TensorProto};
use scheme::Storage;

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
    /// The verified claim of a float tensor, when it carries one.
    pub claim: Option<claim::Claim>,
    /// Bits of the values beside the weights a runtime needs to decode them: the
    /// scales (32 bits each, or their type's width) and zero points (at the code
    /// width) of affine grids, per tensor or per channel (micronet-rules.md section
    /// 2.1: any values needed to perform inference).
    pub param_bits: f64,
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
        let scheme = dtype_name(data.data_type() as i32);
        return Ok(Some(Weight {
            values: data.into_f32(),
            bits,
            scheme,
            quantized: false,
            ternary: false,
            claim: None,
            param_bits: 0.0,
        }));
    }
    let Some((idx, _)) = g.producer(value) else {
        return Ok(None);
    };
    // Packed storage (mask + codes + decoding subgraph): read by its structure,
    // valued by evaluating its ops.
    if let Some(w) = packed::read(g, value)? {
        return Ok(Some(w));
    }
    let node = g.node(idx);
    match node.op_type() {
        "Identity" => weight(g, &node.input[0]),
        // A constant reshaped (a bias broadcast to [1, C, 1, 1]): the same values.
        "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" => {
            let Some(w) = weight(g, &node.input[0])? else {
                return Ok(None);
            };
            match g.constant_f32(value)? {
                Some(values) => Ok(Some(Weight { values, ..w })),
                None => Ok(Some(w)),
            }
        }
        "DequantizeLinear" => {
            // The codes: a constant integer tensor, or packed codes decoded to one.
            let (q, bits, scheme) = match g.constant(&node.input[0])? {
                Some(q) => {
                    let bits = q.elem_bits() as u32;
                    let scheme =
                        format!("{} via DequantizeLinear", dtype_name(q.data_type() as i32));
                    (q.to_f32(), bits, scheme)
                }
                None => match packed::read_codes(g, &node.input[0])? {
                    Some((k, q)) => (q, k, format!("{k}-bit codes -> DequantizeLinear (packed)")),
                    None => return Ok(None),
                },
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
            let axis = node.int_or("axis", 1)?;
            let values = dequantize(&q, &scale, zp.as_ref(), axis)
                .map_err(|m| Error::tensor(&node.input[0], m))?;
            // Scales at their width; zero points at the code width (what they need).
            let param_bits = const_bits(g, node.input.get(1)) + zp_bits(g, node.input.get(2), bits);
            Ok(Some(Weight {
                values,
                bits,
                scheme,
                quantized: bits < 16,
                ternary: false,
                claim: None,
                param_bits,
            }))
        }
        "Cast" if node.int_or("to", 0)? == DataType::Float as i64 => Ok(weight(g, &node.input[0])?
            .map(|w| Weight {
                scheme: format!("{} via Cast", w.scheme),
                ..w
            })),
        _ => Ok(None),
    }
}

/// Bits of a constant input (numel x element width), 0 when absent or computed.
fn const_bits(g: &Graph, v: Option<&String>) -> f64 {
    v.filter(|v| !v.is_empty())
        .and_then(|v| g.constant(v).ok().flatten())
        .map_or(0.0, |d| d.len() as f64 * d.elem_bits() as f64)
}

/// Bits of a zero point stored at `bits` each; none when it is all zeros (the
/// default a runtime needs no value for).
fn zp_bits(g: &Graph, v: Option<&String>, bits: u32) -> f64 {
    v.filter(|v| !v.is_empty())
        .and_then(|v| g.constant(v).ok().flatten())
        .filter(|d| d.zeros() < d.len())
        .map_or(0.0, |d| d.len() as f64 * bits as f64)
}

/// The scale and zero-point bits an affine claim needs: one 32-bit step per
/// grid, and a k-bit zero point per grid for minmax.
fn claim_param_bits(t: &TensorProto, c: &claim::Claim) -> f64 {
    if !matches!(c.storage(), Storage::Affine { .. }) {
        return 0.0;
    }
    let count = |key| claim::meta(t, key).map_or(0, |v| v.split(',').count()) as f64;
    count(claim::META_STEP) * 32.0 + count(claim::META_ZERO_POINT) * c.bits as f64
}

/// The weight of weighted layer `idx` (float or quantized, `graph::layers`): for
/// onnxruntime's quantized layers (QLinearConv, QGemm, QLinearMatMul, ConvInteger,
/// MatMulInteger), the integer weight at its stored width with the node's weight
/// zero point taken out (a weight is zero where its code equals the zero point)
/// and its scale applied, and the scale and zero point counted as parameters.
pub fn layer_weight(g: &Graph, idx: usize) -> Result<Option<Weight>> {
    let n = g.node(idx);
    let Some((_, slot)) = crate::graph::layers::layer_kind(n) else {
        return Ok(None);
    };
    if slot == 1 && crate::graph::layers::is_weighted(n) {
        return weight(g, &n.input[1]);
    }
    let Some(q) = g.constant(&n.input[slot])? else {
        return Ok(None);
    };
    // QLinear ops: scale and zero point follow the weight; integer ops: the zero point.
    let (scale_in, zp_in) = if n.op_type().starts_with('Q') {
        (n.input.get(slot + 1), n.input.get(slot + 2))
    } else {
        (None, n.input.get(3))
    };
    let constant = |v: Option<&String>| -> Result<Option<ArrayD<f32>>> {
        match v.filter(|v| !v.is_empty()) {
            Some(v) => g.constant_f32(v),
            None => Ok(None),
        }
    };
    let zp = constant(zp_in)?;
    let scale = constant(scale_in)?
        .unwrap_or_else(|| ArrayD::from_elem(IxDyn(&[zp.as_ref().map_or(1, |z| z.len())]), 1.0));
    let (axis, _) = crate::graph::layers::weight_axis(n, q.shape())?;
    let values = dequantize(&q.to_f32(), &scale, zp.as_ref(), axis.unwrap_or(0) as i64)
        .map_err(|m| Error::tensor(&n.input[slot], m))?;
    let bits = q.elem_bits() as u32;
    Ok(Some(Weight {
        values,
        bits,
        scheme: format!("{} ({})", dtype_name(q.data_type() as i32), n.op_type()),
        quantized: bits < 16,
        ternary: false,
        claim: None,
        param_bits: const_bits(g, scale_in) + zp_bits(g, zp_in, bits),
    }))
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
    let values = data.into_f32();
    let Some(c) = claim::verify(t, &values)? else {
        return Ok(Weight {
            values,
            bits: storage_bits,
            scheme: dtype_name(t.data_type()),
            quantized: false,
            ternary: false,
            claim: None,
            param_bits: 0.0,
        });
    };
    Ok(Weight {
        values,
        bits: c.bits,
        quantized: c.bits < 16,
        ternary: c.storage() == Storage::Ternary,
        scheme: c.scheme.claim_name().to_string(),
        param_bits: claim_param_bits(t, &c),
        claim: Some(c),
    })
}
