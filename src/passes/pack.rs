//! Packed storage: the file holds what the MicroNet score counts.
//!
//! A pruned or quantized weight W (n elements, nnz nonzeros, a verified k-bit
//! claim or plain float32) is replaced by initializers holding
//!   mask  n bits (when W has zeros; always for ternary)
//!   values  nnz (masked) or n (dense) of: float32 (32 bits), k-bit affine codes
//!           ((u - zp) * scale, scale/zp per tensor or per channel), or k-bit codes
//!           into a codebook of <= 2^k floats (ternary: 1 bit into [w_n, w_p])
//! and a decoding subgraph of standard ops whose output keeps W's name (see
//! `repr::packed` for the encoding and the decoder). Per tensor:
//!   payload bits = [n] + m * k (+ 32 per scale, zero point, codebook entry)
//! against the score's storage nnz * k + n (masked) or n * k. A quantized weight
//! takes the mask only when n + nnz*k < n*k, i.e. sparsity > 1/k; an unquantized
//! one whenever it has a zero (k = 32). Codes are written at the claimed width k,
//! so the score reads back the same bits from the structure.
//!
//! A tensor is packed only when its encoded initializers and decoder nodes take
//! fewer protobuf bytes than the float initializer, and only after the decoder,
//! evaluated by the score's reader, gives back every value bit for bit (-0.0
//! comes back as +0.0, the same number); otherwise it is left alone, with why.
//! Candidates are the float32 initializers read only by Conv, ConvTranspose,
//! Gemm and MatMul nodes. Quantized values come from the claims the quantizer
//! writes (`repr::claim`), verified first; each scheme says how it is stored
//! (`WeightScheme::storage`): affine codes when every value is exactly
//! ((u - zp) as f32) * scale, float16 values, ternary signs, else a codebook.

use std::collections::{BTreeSet, HashMap, HashSet};

use rayon::prelude::*;

use prost::Message;

use super::{Context, Pass, PassReport};
use crate::error::Result;
use crate::graph::{Graph, Namer, WEIGHTED_OPS};
use crate::onnx::proto::{GraphProto, TensorProto};
use crate::onnx::{DataType, Model, TensorData};
use crate::repr::claim::{self, Claim, META_AXIS, META_STEP, META_ZERO_POINT};
use crate::repr::packed::{self as format, Packed, Shared, Store, MAX_CODE_BITS};
use crate::repr::round;
use crate::repr::scheme::Storage;

/// The packing pass.
#[derive(Debug, Clone, Default)]
pub struct Pack;

/// Chooses the representation of one float32 weight, given its verified claim
/// and the model's default opset: affine claims become codes dequantized by
/// DequantizeLinear (per channel from opset 13, its `axis`; before that, the
/// float decoder). `Err` says why it stays float.
pub fn choose(
    t: &TensorProto,
    values: &[f32],
    shape: &[usize],
    claim: Option<&Claim>,
    opset: i64,
) -> std::result::Result<Packed, String> {
    let n = values.len();
    let mask: Vec<bool> = values.iter().map(|v| *v != 0.0).collect();
    let nnz = mask.iter().filter(|b| **b).count();
    let shape = shape.to_vec();
    if nnz == 0 {
        return Ok(Packed {
            shape,
            mask: None,
            store: None,
        });
    }
    let Some(c) = claim else {
        if nnz == n {
            return Err("dense float32 without zeros: nothing to pack".into());
        }
        let v = values.iter().copied().filter(|v| *v != 0.0).collect();
        return Ok(Packed {
            shape,
            mask: Some(mask),
            store: Some(Store::Float(v)),
        });
    };
    let (k, storage) = (c.bits, c.storage());
    if storage == Storage::Ternary {
        let neg = values.iter().copied().find(|v| *v < 0.0);
        let pos = values.iter().copied().find(|v| *v > 0.0);
        let (neg, pos) = match (neg, pos) {
            (Some(a), Some(b)) => (a, b),
            (Some(a), None) => (a, -a),
            (None, Some(b)) => (-b, b),
            (None, None) => unreachable!("nnz > 0"),
        };
        let codes = values
            .iter()
            .filter(|v| **v != 0.0)
            .map(|v| u32::from(*v > 0.0))
            .collect();
        return Ok(Packed {
            shape,
            mask: Some(mask),
            store: Some(Store::Codebook {
                k: 1,
                codes,
                book: vec![neg, pos],
            }),
        });
    }
    if k > MAX_CODE_BITS {
        return Err(format!(
            "{k}-bit claim: codes wider than {MAX_CODE_BITS} bits are not packed"
        ));
    }
    let use_mask = nnz < n && (n as u64 + nnz as u64 * k as u64) < n as u64 * k as u64;
    // The stored values with their element index, iterated (not collected: one
    // pair per element of a 67M-element tensor is 1 GiB).
    let stored = || {
        values
            .iter()
            .copied()
            .enumerate()
            .filter(move |(_, v)| !use_mask || *v != 0.0)
    };
    let m = if use_mask { nnz } else { n };
    if storage == Storage::Half {
        return Ok(Packed {
            shape,
            mask: use_mask.then_some(mask),
            store: Some(Store::Half(stored().map(|(_, v)| v).collect())),
        });
    }
    let affine_store = match storage {
        Storage::Affine { offset } => match affine(t, stored(), m, &shape, k, offset) {
            Some(Store::Affine {
                k,
                codes,
                scale,
                zp,
                axis,
            }) if axis.is_none() || opset >= 13 => Some(Store::Codes {
                k,
                codes,
                scale,
                zp,
                axis,
            }),
            other => other,
        },
        _ => None,
    };
    let store = affine_store
        .or_else(|| codebook(stored, k))
        .ok_or_else(|| {
            format!("its {k}-bit claim fits neither affine codes nor a {k}-bit codebook")
        })?;
    Ok(Packed {
        shape,
        mask: use_mask.then_some(mask),
        store: Some(store),
    })
}

fn parse_list(s: &str) -> Option<Vec<f32>> {
    s.split(',').map(|x| x.trim().parse::<f32>().ok()).collect()
}

/// Affine codes from an affine claim (linear, minmax), when they reproduce every
/// value exactly; stored codes are the claimed ones shifted by `offset`.
fn affine(
    t: &TensorProto,
    stored: impl Iterator<Item = (usize, f32)>,
    m: usize,
    shape: &[usize],
    k: u32,
    offset: i64,
) -> Option<Store> {
    let meta = |key| claim::meta(t, key);
    let scale = parse_list(meta(META_STEP)?)?;
    let zp = match meta(META_ZERO_POINT) {
        Some(z) => parse_list(z)?,
        None => vec![0.0; scale.len()],
    };
    if zp.len() != scale.len() || zp.iter().any(|z| z.fract() != 0.0) {
        return None;
    }
    let axis = if scale.len() > 1 {
        let a: i64 = meta(META_AXIS).map_or(Some(0), |a| a.trim().parse().ok())?;
        let a = if a < 0 { a + shape.len() as i64 } else { a };
        if !(0..shape.len() as i64).contains(&a) || shape[a as usize] != scale.len() {
            return None;
        }
        Some(a as usize)
    } else {
        None
    };
    let zp: Vec<f32> = zp.iter().map(|z| z + offset as f32).collect();
    let inner: usize = axis.map_or(1, |a| shape[a + 1..].iter().product());
    let max = (1u64 << k) as f32;
    let mut codes = Vec::with_capacity(m);
    for (i, v) in stored {
        let c = axis.map_or(0, |_| (i / inner) % scale.len());
        let (s, z) = (scale[c], zp[c]);
        if s == 0.0 || !s.is_finite() {
            return None;
        }
        let u = round::round_f32(v / s) + z;
        if !(0.0..max).contains(&u) {
            return None;
        }
        let back = (u - z) * s;
        if back.to_bits() != v.to_bits() && !(back == 0.0 && v == 0.0) {
            return None;
        }
        codes.push(u as u32);
    }
    Some(Store::Affine {
        k,
        codes,
        scale,
        zp,
        axis,
    })
}

/// A codebook of the distinct stored values (sorted), when there are at most 2^k.
fn codebook<I: Iterator<Item = (usize, f32)>>(stored: impl Fn() -> I, k: u32) -> Option<Store> {
    let mut distinct: BTreeSet<u32> = BTreeSet::new();
    for (_, v) in stored() {
        distinct.insert(if v == 0.0 { 0 } else { v.to_bits() });
        if distinct.len() as u64 > 1u64 << k {
            return None;
        }
    }
    if distinct.len() as u64 > 1u64 << k {
        return None;
    }
    let mut book: Vec<f32> = distinct.into_iter().map(f32::from_bits).collect();
    book.sort_by(|a, b| a.total_cmp(b));
    let index: HashMap<u32, u32> = book
        .iter()
        .enumerate()
        .map(|(i, b)| (b.to_bits(), i as u32))
        .collect();
    let codes = stored()
        .map(|(_, v)| index[&(if v == 0.0 { 0.0f32 } else { v }).to_bits()])
        .collect();
    Some(Store::Codebook { k, codes, book })
}

impl Pass for Pack {
    fn name(&self) -> &'static str {
        "pack"
    }

    fn run(&self, model: &mut Model, _cx: &Context) -> Result<PassReport> {
        let mut report = PassReport::new(self.name());
        let opset = model.opset();
        if opset >= 13 {
            quantize_biases(model, &mut report)?;
        }
        // Plan on a read-only view, every tensor on its own core (rayon), the
        // outcomes collected in initializer order.
        let mut plans: Vec<Plan> = Vec::new();
        {
            let g = Graph::of(model)?;
            if opset < 11 {
                for t in &model.graph().initializer {
                    if candidate(&g, t).is_ok() {
                        report.skipped(
                            t.name(),
                            format!("opset {opset} < 11 has no BitShift/CumSum: left as float"),
                        );
                    }
                }
                return Ok(report);
            }
            let outcomes: Vec<Option<std::result::Result<Plan, String>>> = model
                .graph()
                .initializer
                .par_iter()
                .map(|t| plan(&g, t, opset))
                .collect();
            for (t, o) in model.graph().initializer.iter().zip(outcomes) {
                match o {
                    None => {}
                    Some(Ok(p)) => plans.push(p),
                    Some(Err(why)) => report.skipped(t.name(), why),
                }
            }
        }
        if plans.is_empty() {
            return Ok(report);
        }
        // Build the decoders in order (the shared constants and fresh names make
        // this sequential), then check every decoder on all cores. A tensor whose
        // check fails is left float and the decoders are built again without it,
        // so the names in the file never depend on a failed attempt.
        let mut failed: HashMap<String, String> = HashMap::new();
        let index: HashMap<&str, &TensorProto> = model
            .graph()
            .initializer
            .iter()
            .map(|t| (t.name(), t))
            .collect();
        let built = loop {
            let built = build_all(model.graph(), &index, &plans, &failed, opset);
            let checks: Vec<Result<std::result::Result<(), String>>> = built
                .decoders
                .par_iter()
                .map(|(i, dec, _)| {
                    let p = &plans[*i];
                    verify(
                        index[p.name.as_str()],
                        dec,
                        &built.shared.inits,
                        &p.name,
                        p.claimed,
                    )
                })
                .collect();
            let mut again = false;
            for ((i, _, _), c) in built.decoders.iter().zip(checks) {
                if let Err(why) = c? {
                    failed.insert(plans[*i].name.clone(), why);
                    again = true;
                }
            }
            if !again {
                break built;
            }
        };
        let Built {
            shared,
            decoders,
            too_big,
        } = built;
        let mut removed: HashSet<String> = HashSet::new();
        let mut new_nodes = Vec::new();
        let mut new_inits = Vec::new();
        let mut decoders = decoders.into_iter().peekable();
        for (i, p) in plans.iter().enumerate() {
            if let Some(why) = failed.get(&p.name) {
                report.skipped(
                    &p.name,
                    format!("decoder check failed ({why}): left as float"),
                );
            } else if let Some(why) = too_big.get(&i) {
                report.skipped(&p.name, why.clone());
            } else if decoders.peek().is_some_and(|(j, _, _)| *j == i) {
                let (_, dec, what) = decoders.next().expect("peeked");
                report.changed(&p.name, what);
                removed.insert(p.name.clone());
                new_nodes.extend(dec.nodes);
                new_inits.extend(dec.inits);
            }
        }
        let graph = model.graph_mut();
        if removed.is_empty() {
            return Ok(report);
        }
        graph.initializer.retain(|t| !removed.contains(t.name()));
        // Shared constants no kept decoder reads (made for a tensor later left float).
        let read: HashSet<&str> = new_nodes
            .iter()
            .flat_map(|n| n.input.iter().map(String::as_str))
            .collect();
        let shared_inits: Vec<TensorProto> = shared
            .inits
            .into_iter()
            .filter(|t| read.contains(t.name()))
            .collect();
        graph.initializer.extend(shared_inits);
        graph.initializer.extend(new_inits);
        // Decoders read initializers only: they go first, ahead of every consumer.
        let rest = std::mem::take(&mut graph.node);
        graph.node = new_nodes;
        graph.node.extend(rest);
        Ok(report)
    }
}

/// Biases of layers that read a dequantized activation (a DequantizeLinear with one
/// scale s_x) through an affine-claimed weight (steps s_w, per tensor or per output
/// channel) become int32 codes q = round(b / (s_x s_w)) (ties to even) feeding
/// DequantizeLinear(q, s_x s_w, axis 0): the bias onnxruntime computes with, since
/// its default session re-quantizes such a float bias itself (WeightBiasQuantization:
/// the scale s_x s_w is a float32 product, the division float32, as there). Written
/// into the file, tract and onnxruntime run the same bias. Only a float32 bias
/// initializer read by that layer alone, from opset 13 (DequantizeLinear's axis).
fn quantize_biases(model: &mut Model, report: &mut PassReport) -> Result<()> {
    use crate::graph::layers::{bias_input, is_weighted, weight_axis};
    use crate::onnx::proto::NodeProto;
    struct Plan {
        bias: String,
        q: Vec<i32>,
        scale: Vec<f32>,
        change: f32,
    }
    let mut plans = Vec::new();
    {
        let g = Graph::of(model)?;
        for &i in g.topo_order() {
            let n = g.node(i);
            if !is_weighted(n) || !matches!(n.op_type(), "Conv" | "ConvTranspose" | "Gemm") {
                continue;
            }
            let Some(b) = bias_input(n) else { continue };
            let Some(bt) = g.initializer(b) else { continue };
            if bt.data_type() != DataType::Float as i32 {
                continue;
            }
            let Some((dq, _)) = g.producer(&n.input[0]) else {
                continue;
            };
            let dqn = g.node(dq);
            if dqn.op_type() != "DequantizeLinear" {
                continue;
            }
            let Some(sx) = dqn
                .input
                .get(1)
                .and_then(|v| g.constant_f32(v).ok().flatten())
                .filter(|a| a.len() == 1)
                .and_then(|a| a.iter().next().copied())
            else {
                continue;
            };
            let Ok(Some(w)) = crate::repr::weight(&g, &n.input[1]) else {
                continue;
            };
            let Some(c) = w.claim.as_ref() else { continue };
            if !matches!(c.storage(), Storage::Affine { .. }) {
                continue;
            }
            // From here on a runtime would quantize this bias itself: say why we do not.
            let left = |why: String| {
                format!("bias left float32 ({why}); onnxruntime's default session may quantize it to int32 itself")
            };
            let why = if let Some(why) = g.not_fixed(b) {
                Some(why)
            } else if g.is_output(b) {
                Some(format!("'{b}' is also a graph output"))
            } else if g.consumers(b) != [i] {
                Some(format!("'{b}' is also read by {}", g.describe_uses(b)))
            } else {
                None
            };
            if let Some(why) = why {
                report.skipped(b, left(why));
                continue;
            }
            let Some(steps) = g
                .initializer(&n.input[1])
                .and_then(|t| claim::meta(t, META_STEP))
                .and_then(parse_list)
            else {
                continue;
            };
            let bias = TensorData::from_proto(bt)?.into_f32();
            let channels = bias.len();
            let (axis, _) = weight_axis(n, w.values.shape())?;
            let per_channel = steps.len() > 1;
            if per_channel && (c.axis != axis || steps.len() != channels) {
                continue;
            }
            let scale: Vec<f32> = (0..channels)
                .map(|k| sx * steps[if per_channel { k } else { 0 }])
                .collect();
            if let Some(k) = scale.iter().position(|s| !(s.is_normal() && *s > 0.0)) {
                report.skipped(
                    b,
                    left(format!(
                        "channel {k}: input scale x weight step = {:e} is not a normal float32",
                        scale[k]
                    )),
                );
                continue;
            }
            let mut change = 0f32;
            let q: Vec<i32> = bias
                .iter()
                .zip(&scale)
                .map(|(b, s)| {
                    let q = (b / s)
                        .round_ties_even()
                        .clamp(i32::MIN as f32, i32::MAX as f32) as i32;
                    change = change.max((q as f32 * s - b).abs());
                    q
                })
                .collect();
            plans.push(Plan {
                bias: b.to_string(),
                q,
                scale,
                change,
            });
        }
    }
    let g = model.graph_mut();
    let mut names = Namer::with_node_names(g);
    for p in plans {
        let c = p.q.len();
        let q_name = names.fresh(&format!("{}_quantized", p.bias));
        let s_name = names.fresh(&format!("{}_quantized_scale", p.bias));
        g.initializer.retain(|t| t.name() != p.bias);
        g.initializer.push(
            TensorData::I32(ndarray::ArrayD::from_shape_vec(vec![c], p.q).expect("1-D"))
                .to_proto(&q_name),
        );
        g.initializer.push(
            TensorData::F32(ndarray::ArrayD::from_shape_vec(vec![c], p.scale).expect("1-D"))
                .to_proto(&s_name),
        );
        let node = NodeProto {
            op_type: Some("DequantizeLinear".into()),
            name: Some(names.fresh(&format!("{}_dequantize", p.bias))),
            input: vec![q_name, s_name],
            output: vec![p.bias.clone()],
            attribute: vec![crate::onnx::attr::int("axis", 0)],
            ..Default::default()
        };
        g.node.insert(0, node);
        report.changed(
            &p.bias,
            format!(
                "int32 codes x (input scale x weight scale) into DequantizeLinear, as onnxruntime re-quantizes it at load; largest change {:.3e}",
                p.change
            ),
        );
    }
    Ok(())
}

/// One tensor the pass will try to pack.
struct Plan {
    name: String,
    packed: Packed,
    /// The verified claim's (bits, ternary) of the float tensor, as the score reads it.
    claimed: (u32, bool),
}

/// What planning says of one initializer: `None` not a weight (not reported),
/// `Some(Err(why))` left alone, `Some(Ok(plan))` to pack.
fn plan(g: &Graph, t: &TensorProto, opset: i64) -> Option<std::result::Result<Plan, String>> {
    match candidate(g, t) {
        Err(None) => return None,
        Err(Some(why)) => return Some(Err(why)),
        Ok(()) => {}
    }
    let w = match crate::repr::weight(g, t.name()) {
        Ok(Some(w)) => w,
        Ok(None) => return None,
        Err(e) => return Some(Err(format!("left as float: {e}"))),
    };
    let owned: Vec<f32>;
    let values = match w.values.as_slice() {
        Some(v) => v,
        None => {
            owned = w.values.iter().copied().collect();
            &owned
        }
    };
    Some(
        choose(t, values, w.values.shape(), w.claim.as_ref(), opset).map(|packed| Plan {
            name: t.name().to_string(),
            packed,
            claimed: (w.bits, w.ternary),
        }),
    )
}

/// The decoders of one attempt: (plan index, decoder, report line) in plan order,
/// the shared constants they read, and the plans whose encoding is not smaller.
struct Built {
    shared: Shared,
    decoders: Vec<(usize, format::Decoder, String)>,
    too_big: HashMap<usize, String>,
}

/// `index`: the graph's initializers by name.
fn build_all(
    graph: &GraphProto,
    index: &HashMap<&str, &TensorProto>,
    plans: &[Plan],
    failed: &HashMap<String, String>,
    opset: i64,
) -> Built {
    let mut shared = Shared::with_names(Namer::with_node_names(graph));
    let mut decoders = Vec::new();
    let mut too_big = HashMap::new();
    for (i, p) in plans.iter().enumerate() {
        if failed.contains_key(&p.name) {
            continue;
        }
        let old_bytes = index[p.name.as_str()].encoded_len();
        let prefix = shared.prefix();
        let shared_before = shared.inits.len();
        let dec = format::build(&p.packed, &p.name, &prefix, opset, &mut shared);
        let new_bytes: usize = dec.inits.iter().map(|t| t.encoded_len()).sum::<usize>()
            + dec.nodes.iter().map(|n| n.encoded_len()).sum::<usize>();
        if new_bytes >= old_bytes {
            // Constants created only for this tensor are not needed.
            shared_rollback(&mut shared, shared_before);
            too_big.insert(
                i,
                format!(
                    "{} would take {new_bytes} bytes, not fewer than the {old_bytes} of float32: left as float",
                    p.packed.describe()
                ),
            );
            continue;
        }
        let payload = p.packed.payload_bits().div_ceil(8);
        let what = format!(
            "{}: {new_bytes} bytes (payload {} bytes + decoder {} bytes) instead of {old_bytes}, {:.1}x smaller",
            p.packed.describe(),
            payload,
            new_bytes.saturating_sub(payload as usize),
            old_bytes as f64 / new_bytes as f64
        );
        decoders.push((i, dec, what));
    }
    Built {
        shared,
        decoders,
        too_big,
    }
}

fn shared_rollback(shared: &mut Shared, keep: usize) {
    shared.truncate(keep);
}

/// Whether an initializer is a packing candidate: `Err(None)` not a weight at all
/// (not reported), `Err(Some(why))` a weight left alone.
fn candidate(g: &Graph, t: &TensorProto) -> std::result::Result<(), Option<String>> {
    let consumers = g.consumers(t.name());
    if consumers.is_empty() {
        return Err(None);
    }
    if let Some(&c) = consumers
        .iter()
        .find(|&&c| !WEIGHTED_OPS.contains(&g.node(c).op_type()))
    {
        return if consumers
            .iter()
            .any(|&c| WEIGHTED_OPS.contains(&g.node(c).op_type()))
        {
            Err(Some(format!(
                "also read by '{}' ({}): only weights of Conv/ConvTranspose/Gemm/MatMul are packed",
                g.node_name(c),
                g.node(c).op_type()
            )))
        } else {
            Err(None)
        };
    }
    if g.is_overridable(t.name()) || g.is_output(t.name()) {
        return Err(Some(
            "a graph input or output: a runtime may override it".into(),
        ));
    }
    if t.data_type() != DataType::Float as i32 {
        return Err(Some(format!(
            "stored as {}: only float32 weights are packed",
            crate::onnx::tensor::dtype_name(t.data_type())
        )));
    }
    if crate::onnx::tensor::is_external(t) {
        return Err(Some(
            "external data: load the model with its data inline first".into(),
        ));
    }
    Ok(())
}

/// Decodes the packed tensor with the score's reader, in a scratch graph, and
/// compares with the float values and with `claimed`, the (bits, ternary) the
/// score reads from the float tensor's verified claim.
fn verify(
    old: &TensorProto,
    dec: &format::Decoder,
    shared: &[TensorProto],
    name: &str,
    claimed: (u32, bool),
) -> Result<std::result::Result<(), String>> {
    // The decoder reads its own initializers and some of the shared ones.
    let reads: HashSet<&str> = dec
        .nodes
        .iter()
        .flat_map(|n| n.input.iter().map(String::as_str))
        .collect();
    let scratch = GraphProto {
        node: dec.nodes.clone(),
        initializer: dec
            .inits
            .iter()
            .chain(shared.iter().filter(|t| reads.contains(t.name())))
            .cloned()
            .collect(),
        ..Default::default()
    };
    let g = Graph::new(&scratch)?;
    let Some(w) = crate::repr::weight(&g, name)? else {
        return Ok(Err("the reader does not recognize it".into()));
    };
    let orig = TensorData::from_proto(old)?.into_f32();
    if w.values.shape() != orig.shape() {
        return Ok(Err(format!(
            "shape {:?} instead of {:?}",
            w.values.shape(),
            orig.shape()
        )));
    }
    if let Some((i, (a, b))) = w
        .values
        .iter()
        .zip(orig.iter())
        .enumerate()
        .find(|(_, (a, b))| a.to_bits() != b.to_bits() && !(**a == 0.0 && **b == 0.0))
    {
        return Ok(Err(format!("element {i} decodes to {a}, not {b}")));
    }
    let (bits, ternary) = claimed;
    if bits != w.bits || ternary != w.ternary {
        return Ok(Err(format!(
            "reads as {} bits{} instead of the claimed {}{}",
            w.bits,
            if w.ternary { " ternary" } else { "" },
            bits,
            if ternary { " ternary" } else { "" }
        )));
    }
    Ok(Ok(()))
}
