//! Fold BatchNormalization into the layer before it.
//!
//! Inference BN computes y = gamma * (x - mean) / sqrt(var + eps) + beta. With
//! f_c = gamma_c / sqrt(var_c + eps) per channel c, a preceding linear layer
//! x = W * in + b absorbs it exactly:
//!
//!   W'[c] = W[c] * f_c            b'_c = (b_c - mean_c) * f_c + beta_c
//!
//! - Conv (any group count): c is axis 0 of W [Cout, Cin/g, kh, kw]; a missing
//!   bias counts as 0 and is added.
//! - ConvTranspose: W is [Cin, Cout/g, kh, kw]; output channel c = group * Cout/g + j
//!   scales W[i, j] for the input channels i of that group.
//! - Gemm with a constant B (BatchNorm1d after Linear): Y = alpha A B + beta C, output
//!   channel n is column n of B (row n when transB = 1): B' = alpha B f, C' = (beta C - mean) f + beta_bn,
//!   then alpha = beta = 1. C must be per-channel ([N], [1, N] or a scalar).
//! - MatMul with a constant 2-D B [K, N]: B' = B f column-wise, and the BN becomes
//!   Add(B' product, -mean f + beta_bn).
//! - The Mul-by-constant then Add-constant form some exporters write after a Conv
//!   (y = x * m + a, m and a per channel): W' = W m, b' = b m + a.
//!
//! A fold happens only when the layer's output feeds nothing but the BN (not a
//! graph output, not read inside a subgraph), every BN input but x is a fixed
//! constant (not an initializer a caller may override, IR 4 and later), the BN
//! runs in inference mode by its own operator-set version (opset 1 and 6:
//! `is_test` = 1; 14 and later: `training_mode` = 0; `spatial` = 1 before 9), and
//! it normalizes the layer's output channels: axis 1 of the BN input is the Conv's
//! channel axis, and for a Gemm/MatMul the last axis of a rank-2 output (a MatMul
//! on a rank-3 input has its features on axis 2, which a BN over axis 1 does not
//! normalize). Constants of the Mul/Add form must broadcast per channel once their
//! shape is right-aligned with the rank-(2+d) output ([C,1,1] or [1,C,1,1]; a [C]
//! constant broadcasts over the width). Otherwise the BN stays and the report says
//! why. Identity and inference Dropout nodes are removed first, so a BN behind
//! them folds in the same run. A folded weight its layer alone reads keeps its
//! initializer's name (rules naming the exported weight still find the layer),
//! with any grid claim dropped; a weight read elsewhere too (by another node, a
//! subgraph or the graph outputs) is never changed in place: the folded one is a
//! new initializer, marked as a copy of it ([`select::META_ORIGIN`], which layer
//! rules also match), as is every folded bias.

use std::collections::HashSet;

use ndarray::{ArrayD, Axis, IxDyn};

use super::select;
use super::{Context, Pass, PassReport};
use crate::error::{Error, Result};
use crate::graph::layers::weight_axis;
use crate::graph::{
    remove_nodes, remove_unused_initializers, set_initializer_proto, Graph, Namer, WEIGHTED_OPS,
};
use crate::onnx::attr::{self, NodeAttrs};
use crate::onnx::proto::{GraphProto, NodeProto, TensorProto};

use crate::onnx::{Model, TensorData};
use rayon::prelude::*;

pub struct FoldBatchNorm;

/// A fold decided on the view, applied afterwards.
struct Fold {
    /// The BN (or Mul) node, for the report.
    name: String,
    /// Node whose weights change.
    layer: usize,
    /// Nodes that disappear (the BN, or the Mul and the Add).
    removed: Vec<usize>,
    /// Value the layer writes afterwards (the BN's output).
    output: String,
    weight: ArrayD<f32>,
    /// The layer alone reads its weight initializer (one use, by node, subgraph
    /// or graph output; not overridable): the folded weight keeps its name.
    own_weight: bool,
    /// The new bias (Conv/ConvTranspose/Gemm input 2), or the Add constant for MatMul.
    bias: ArrayD<f32>,
    kind: Kind,
    note: String,
}

#[derive(PartialEq)]
enum Kind {
    ConvLike,
    Gemm,
    MatMul,
}

fn f32_const(g: &Graph, value: &str) -> Result<Option<ArrayD<f32>>> {
    match g.constant(value)? {
        Some(TensorData::F32(a)) => Ok(Some(a)),
        _ => Ok(None),
    }
}

/// Per-channel values of a constant that broadcasts against a rank-`rank` tensor
/// whose channels are axis 1 (NCHW...), as a [C] vector. Broadcasting aligns
/// shapes on the right ([ONNX broadcasting](https://github.com/onnx/onnx/blob/main/docs/Broadcasting.md)),
/// so the constant is per channel only when, right-aligned, every axis but axis 1
/// is 1: [C, 1, 1] or [1, C, 1, 1] on a 4-D tensor, or a scalar. A [C] constant
/// broadcasts along the last axis (the width), not the channels.
fn per_channel(a: &ArrayD<f32>, c: usize, rank: usize) -> Option<Vec<f32>> {
    if a.ndim() > rank || rank < 2 {
        return None;
    }
    let aligned: Vec<usize> = std::iter::repeat_n(1, rank - a.ndim())
        .chain(a.shape().iter().copied())
        .collect();
    if aligned.iter().enumerate().any(|(i, &d)| i != 1 && d != 1) {
        return None;
    }
    match aligned[1] {
        1 => Some(vec![*a.iter().next()?; c]),
        d if d == c => Some(a.iter().copied().collect()),
        _ => None,
    }
}

impl Pass for FoldBatchNorm {
    fn name(&self) -> &'static str {
        "fold-bn"
    }

    fn lossless(&self) -> bool {
        true
    }

    fn run(&self, model: &mut Model, _cx: &Context) -> Result<PassReport> {
        let mut report = PassReport::new(self.name());
        let opset = model.opset();
        // Normalize first: a BN behind Identity/Dropout folds in this run.
        for (name, kept) in remove_pass_through(model.graph_mut(), opset) {
            match kept {
                None => report.changed(name, "removed (Identity/Dropout at inference)"),
                Some(why) => report.skipped(name, why),
            }
        }
        let shapes = matmul_output_shapes(model);
        let folds = plan(model, opset, shapes.as_ref(), &mut report)?;
        apply(model.graph_mut(), opset, folds, &mut report);
        Ok(report)
    }
}

/// The shapes of every value, when some BatchNormalization follows a MatMul (to
/// tell which axis its output's features are on); `None` otherwise or when tract
/// cannot infer them (those BNs are then left, saying so).
fn matmul_output_shapes(model: &Model) -> Option<std::collections::HashMap<String, Vec<usize>>> {
    let g = Graph::new(model.graph()).ok()?;
    let needed = g.nodes_of_type("BatchNormalization").any(|i| {
        g.node(i)
            .input
            .first()
            .and_then(|x| g.producer(x))
            .is_some_and(|(p, _)| g.node(p).op_type() == "MatMul")
    });
    if !needed {
        return None;
    }
    let inputs = crate::engine::input_shapes(model, &[]).ok()?;
    crate::engine::value_shapes(model, &inputs).ok()
}

type Shapes = std::collections::HashMap<String, Vec<usize>>;

/// Decides every fold on a read-only view.
fn plan(
    model: &Model,
    opset: i64,
    shapes: Option<&Shapes>,
    report: &mut PassReport,
) -> Result<Vec<Fold>> {
    let view = Graph::of(model)?;
    // Each decision reads the view only: one node per core (rayon), reported in
    // topological order.
    let candidates: Vec<usize> = view
        .topo_order()
        .iter()
        .copied()
        .filter(|&i| matches!(view.node(i).op_type(), "BatchNormalization" | "Mul"))
        .collect();
    let decisions: Vec<std::result::Result<Option<Fold>, Skip>> = candidates
        .par_iter()
        .map(|&i| match view.node(i).op_type() {
            "BatchNormalization" => plan_bn(&view, i, opset, shapes).map(Some),
            _ => plan_mul_add(&view, i),
        })
        .collect();
    let mut folds = Vec::new();
    for (&i, decision) in candidates.iter().zip(decisions) {
        let name = view.node_name(i).to_string();
        match decision {
            Ok(Some(f)) => folds.push(f),
            Ok(None) => {}
            Err(Skip(why)) => report.skipped(name, why),
        }
    }
    Ok(folds)
}

/// Why a BN stays.
struct Skip(String);

impl From<Error> for Skip {
    fn from(e: Error) -> Self {
        Skip(e.to_string())
    }
}

/// Whether the node has its first `n` inputs (non-empty) and an output: malformed
/// nodes are left alone, not indexed into.
fn has_inputs(n: &NodeProto, count: usize) -> bool {
    n.input.len() >= count
        && n.input[..count].iter().all(|v| !v.is_empty())
        && n.output.first().is_some_and(|o| !o.is_empty())
}

/// Why a constant input cannot be folded: not a float32 constant, or an
/// initializer a caller may override.
fn fixed_f32(g: &Graph, v: &str) -> std::result::Result<ArrayD<f32>, Skip> {
    if let Some(why) = g.not_fixed(v) {
        return Err(Skip(format!("its input {why}")));
    }
    f32_const(g, v)?.ok_or_else(|| Skip(format!("its input '{v}' is not a float32 constant")))
}

fn plan_bn(
    g: &Graph,
    i: usize,
    opset: i64,
    shapes: Option<&Shapes>,
) -> std::result::Result<Fold, Skip> {
    let bn = g.node(i);
    if !has_inputs(bn, 5) {
        return Err(Skip(format!(
            "has {} inputs; BatchNormalization needs X, scale, B, mean and var",
            bn.input.len()
        )));
    }
    // Inference mode by the node's own operator-set version.
    if opset < 7 && bn.int_or("is_test", 0)? == 0 {
        return Err(Skip(format!(
            "opset {opset} BatchNormalization with is_test = 0 (that version's default) normalizes with the batch's statistics (training mode); export the model in eval mode"
        )));
    }
    if opset < 9 && bn.int_or("spatial", 1)? == 0 {
        return Err(Skip(
            "spatial = 0: statistics per activation, not per channel".into(),
        ));
    }
    if bn.int_or("training_mode", 0)? != 0 || bn.output.iter().skip(1).any(|o| !o.is_empty()) {
        return Err(Skip(
            "runs in training mode (running statistics are outputs)".into(),
        ));
    }
    let x = &bn.input[0];
    let Some((p, _)) = g.producer(x) else {
        return Err(Skip(format!(
            "its input '{x}' is a graph input, not a layer's output"
        )));
    };
    let layer = g.node(p);
    let op = layer.op_type();
    if !WEIGHTED_OPS.contains(&op) {
        return Err(Skip(format!(
            "follows {op} '{}', not a Conv, ConvTranspose, Gemm or MatMul",
            g.node_name(p)
        )));
    }
    if !has_inputs(layer, 2) {
        return Err(Skip(format!(
            "follows {op} '{}', which lacks its weight input",
            g.node_name(p)
        )));
    }
    if g.use_count(x) != 1 {
        return Err(Skip(format!(
            "the output of '{}' is also used elsewhere ({} uses): {}",
            g.node_name(p),
            g.use_count(x),
            g.describe_uses(x)
        )));
    }
    // The BN normalizes axis 1 of x: the layer's output channels for a Conv, the
    // last (feature) axis of a MatMul/Gemm output only when that output is 2-D.
    if op == "MatMul" {
        match shapes.and_then(|s| s.get(x.as_str())) {
            Some(s) if s.len() == 2 => {}
            Some(s) => {
                return Err(Skip(format!(
                    "normalizes axis 1 of the rank-{} output {s:?} of MatMul '{}', whose features are on its last axis: a constant weight cannot scale axis 1",
                    s.len(),
                    g.node_name(p)
                )))
            }
            None => {
                return Err(Skip(format!(
                    "the rank of MatMul '{}''s output is unknown (tract could not infer it), so the BN's axis 1 may not be its feature axis",
                    g.node_name(p)
                )))
            }
        }
    }
    let mut params = Vec::new();
    for v in &bn.input[1..5] {
        params.push(fixed_f32(g, v)?.iter().copied().collect::<Vec<f32>>());
    }
    let eps = bn.float_or("epsilon", 1e-5)? as f64;
    let (gamma, beta, mean, var) = (&params[0], &params[1], &params[2], &params[3]);
    let c = gamma.len();
    if [beta.len(), mean.len(), var.len()].iter().any(|&l| l != c) {
        return Err(Skip(
            "its scale, bias, mean and var have different lengths".into(),
        ));
    }
    let f: Vec<f64> = (0..c)
        .map(|k| gamma[k] as f64 / (var[k] as f64 + eps).sqrt())
        .collect();
    let shift: Vec<f64> = (0..c)
        .map(|k| beta[k] as f64 - mean[k] as f64 * f[k])
        .collect();
    // y = f * (layer + b) + shift  =>  W' = W f, b' = b f + shift.
    fold_into_layer(
        g,
        p,
        i,
        &f,
        &shift,
        vec![i],
        format!("folded into {op} '{}'", g.node_name(p)),
    )
    .map(|fold| Fold {
        name: g.node_name(i).to_string(),
        ..fold
    })
}

/// The Conv -> Mul(m) -> Add(a) form: `Ok(None)` when the Mul is not that form,
/// `Err` when it is but cannot fold (why).
fn plan_mul_add(g: &Graph, mul_idx: usize) -> std::result::Result<Option<Fold>, Skip> {
    let mul = g.node(mul_idx);
    if !has_inputs(mul, 2) {
        return Ok(None);
    }
    let Some((p, _)) = g.producer(&mul.input[0]) else {
        return Ok(None);
    };
    if g.node(p).op_type() != "Conv"
        || !has_inputs(g.node(p), 2)
        || g.use_count(&mul.input[0]) != 1
        || g.use_count(&mul.output[0]) != 1
    {
        return Ok(None);
    }
    let [add_idx] = g.consumers(&mul.output[0]) else {
        return Ok(None);
    };
    let add = g.node(*add_idx);
    if add.op_type() != "Add" || !has_inputs(add, 2) || add.input[0] != mul.output[0] {
        return Ok(None);
    }
    let w = match f32_const(g, &g.node(p).input[1])? {
        Some(w) => w,
        None => return Ok(None),
    };
    let c = w.shape()[0];
    // The conv's output has the weight's rank: [N, C, spatial...].
    let rank = w.ndim();
    if let Some(why) = [&mul.input[1], &add.input[1]]
        .into_iter()
        .find_map(|v| g.not_fixed(v))
    {
        return Err(Skip(format!(
            "Mul '{}' + Add '{}' after Conv '{}' left: {why}",
            g.node_name(mul_idx),
            g.node_name(*add_idx),
            g.node_name(p)
        )));
    }
    let (Some(m), Some(a)) = (f32_const(g, &mul.input[1])?, f32_const(g, &add.input[1])?) else {
        return Ok(None);
    };
    let (Some(mc), Some(ac)) = (per_channel(&m, c, rank), per_channel(&a, c, rank)) else {
        let bad = if per_channel(&m, c, rank).is_none() {
            m.shape()
        } else {
            a.shape()
        };
        return Err(Skip(format!(
            "Mul '{}' + Add '{}' after Conv '{}' left: a constant of shape {bad:?} broadcasts along the right-aligned axes of the rank-{rank} output, not along its channels (axis 1): per-channel constants are [C, 1, 1] or [1, C, 1, 1]",
            g.node_name(mul_idx),
            g.node_name(*add_idx),
            g.node_name(p)
        )));
    };
    let (m, a) = (mc, ac);
    let f: Vec<f64> = m.iter().map(|&x| x as f64).collect();
    let shift: Vec<f64> = a.iter().map(|&x| x as f64).collect();
    let note = format!(
        "Mul '{}' + Add '{}' folded into Conv '{}'",
        g.node_name(mul_idx),
        g.node_name(*add_idx),
        g.node_name(p)
    );
    fold_into_layer(g, p, *add_idx, &f, &shift, vec![mul_idx, *add_idx], note)
        .map(|fold| {
            Some(Fold {
                name: g.node_name(mul_idx).to_string(),
                ..fold
            })
        })
        .map_err(|Skip(why)| {
            Skip(format!(
                "Mul '{}' + Add '{}' after Conv '{}' left: {why}",
                g.node_name(mul_idx),
                g.node_name(*add_idx),
                g.node_name(p)
            ))
        })
}

/// W' = W f along the layer's output channels, b' = b f + shift.
fn fold_into_layer(
    g: &Graph,
    p: usize,
    last: usize,
    f: &[f64],
    shift: &[f64],
    removed: Vec<usize>,
    note: String,
) -> std::result::Result<Fold, Skip> {
    let layer = g.node(p);
    let op = layer.op_type();
    for v in layer.input.iter().skip(1).filter(|v| !v.is_empty()) {
        if let Some(why) = g.not_fixed(v) {
            return Err(Skip(format!("'{}' reads {why}", g.node_name(p))));
        }
    }
    let w = f32_const(g, &layer.input[1])?.ok_or_else(|| {
        Skip(format!(
            "the weight '{}' of '{}' is not a float32 constant",
            layer.input[1],
            g.node_name(p)
        ))
    })?;
    let c = f.len();
    let mut w = w;
    let (kind, old_bias) = match op {
        "Conv" | "ConvTranspose" => {
            let group = layer.int_or("group", 1)?.max(1) as usize;
            let cout = if op == "Conv" {
                w.shape()[0]
            } else {
                w.shape()[1] * group
            };
            if cout != c {
                return Err(Skip(format!("{c} BN channels but the layer has {cout}")));
            }
            if op == "Conv" {
                for (k, mut lane) in w.axis_iter_mut(Axis(0)).enumerate() {
                    lane.mapv_inplace(|v| (v as f64 * f[k]) as f32);
                }
            } else {
                let (cin, per_group) = (w.shape()[0], w.shape()[1]);
                let in_per_group = cin / group;
                for i in 0..cin {
                    let gi = i / in_per_group.max(1);
                    for j in 0..per_group {
                        let k = gi * per_group + j;
                        w.index_axis_mut(Axis(0), i)
                            .index_axis_mut(Axis(0), j)
                            .mapv_inplace(|v| (v as f64 * f[k]) as f32);
                    }
                }
            }
            let bias = match layer.input.get(2).filter(|b| !b.is_empty()) {
                Some(b) => Some(
                    f32_const(g, b)?
                        .ok_or_else(|| Skip(format!("the bias '{b}' is not a float32 constant")))?,
                ),
                None => None,
            };
            (
                Kind::ConvLike,
                bias.map(|b| b.iter().map(|&x| x as f64).collect::<Vec<f64>>()),
            )
        }
        "Gemm" => {
            if w.ndim() != 2 {
                return Err(Skip("the Gemm weight is not 2-D".into()));
            }
            let axis = weight_axis(layer, w.shape())?
                .0
                .expect("a 2-D Gemm weight has one");
            if w.shape()[axis] != c {
                return Err(Skip(format!(
                    "{c} BN channels but the Gemm has {} outputs",
                    w.shape()[axis]
                )));
            }
            let alpha = layer.float_or("alpha", 1.0)? as f64;
            let beta = layer.float_or("beta", 1.0)? as f64;
            for (k, mut lane) in w.axis_iter_mut(Axis(axis)).enumerate() {
                lane.mapv_inplace(|v| (v as f64 * alpha * f[k]) as f32);
            }
            let bias = match layer.input.get(2).filter(|b| !b.is_empty()) {
                Some(b) => {
                    let cb = f32_const(g, b)?.ok_or_else(|| {
                        Skip(format!("the Gemm C '{b}' is not a float32 constant"))
                    })?;
                    let v = if cb.len() == 1 {
                        vec![cb.iter().next().copied().unwrap_or(0.0) as f64 * beta; c]
                    } else if cb.len() == c && cb.shape().last() == Some(&c) {
                        cb.iter().map(|&x| x as f64 * beta).collect()
                    } else {
                        return Err(Skip(format!(
                            "the Gemm C has shape {:?}, not per output channel",
                            cb.shape()
                        )));
                    };
                    Some(v)
                }
                None => None,
            };
            (Kind::Gemm, bias)
        }
        "MatMul" => {
            if w.ndim() != 2 || w.shape()[1] != c {
                return Err(Skip(format!(
                    "the MatMul weight has shape {:?}, not [K, {c}]",
                    w.shape()
                )));
            }
            for (k, mut lane) in w.axis_iter_mut(Axis(1)).enumerate() {
                lane.mapv_inplace(|v| (v as f64 * f[k]) as f32);
            }
            (Kind::MatMul, None)
        }
        _ => unreachable!("checked by the caller"),
    };
    let bias: Vec<f32> = (0..c)
        .map(|k| (old_bias.as_ref().map_or(0.0, |b| b[k]) * f[k] + shift[k]) as f32)
        .collect();
    let w_name = &g.node(p).input[1];
    Ok(Fold {
        name: String::new(),
        layer: p,
        removed,
        output: g.node(last).output[0].clone(),
        weight: w,
        own_weight: g.use_count(w_name) == 1
            && g.initializer(w_name).is_some()
            && !g.is_overridable(w_name),
        bias: ArrayD::from_shape_vec(IxDyn(&[c]), bias).expect("1-D"),
        kind,
        note,
    })
}

/// Applies the folds: new weights and biases, the layer writes the BN's output,
/// the BN (or Mul and Add) goes, then unused initializers and Identity/Dropout go.
fn apply(g: &mut GraphProto, opset: i64, mut folds: Vec<Fold>, report: &mut PassReport) {
    let mut removed = HashSet::new();
    let mut names = Namer::of(g);
    let mut new_nodes = Vec::new();
    // The new tensors encoded on every core; named in order below.
    let encoded: Vec<(TensorProto, TensorProto)> = folds
        .par_iter_mut()
        .map(|f| {
            let w = TensorData::F32(std::mem::take(&mut f.weight)).to_proto("");
            let b = TensorData::F32(std::mem::take(&mut f.bias)).to_proto("");
            (w, b)
        })
        .collect();
    for (f, (w, b)) in folds.into_iter().zip(encoded) {
        let layer_name = g.node[f.layer].name().to_string();
        let base = if layer_name.is_empty() {
            g.node[f.layer].op_type().to_string()
        } else {
            layer_name
        };
        // The folded weight keeps the weight's name when this layer alone reads
        // that initializer (rules naming the exported weight, such as
        // `features.*.conv.1.0.weight`, then still find the layer after the
        // fold); a shared or overridable one stays, and the folded weight gets a
        // fresh name.
        let own = f.own_weight;
        let old_name = g.node[f.layer].input[1].clone();
        let w_name = if own {
            old_name.clone()
        } else {
            names.fresh(&format!("{base}.weight_folded"))
        };
        set_initializer_proto(g, &w_name, w);
        if own {
            // The folded values are on no grid the old tensor may have claimed
            // (a model quantized with folding off): its other metadata stays.
            if let Some(t) = g.initializer.iter_mut().find(|t| t.name() == w_name) {
                crate::repr::claim::write(t, &[]);
            }
        } else {
            // A copy records the weight it was copied from, so that layer
            // rules naming that weight still apply.
            select::mark_copy(g, &w_name, &old_name);
        }
        let b_name = names.fresh(&format!("{base}.bias_folded"));
        set_initializer_proto(g, &b_name, b);
        let node = &mut g.node[f.layer];
        node.input[1] = w_name;
        match f.kind {
            Kind::ConvLike | Kind::Gemm => {
                if node.input.len() > 2 {
                    node.input[2] = b_name;
                } else {
                    node.input.push(b_name);
                }
                node.output[0] = f.output.clone();
                if f.kind == Kind::Gemm {
                    for a in node
                        .attribute
                        .iter_mut()
                        .filter(|a| matches!(a.name(), "alpha" | "beta"))
                    {
                        a.f = Some(1.0);
                    }
                    if node.attr("beta").is_none() {
                        node.attribute.push(attr::float("beta", 1.0));
                    }
                }
            }
            Kind::MatMul => {
                // MatMul has no bias input: the BN becomes an Add of the folded shift.
                let product = node.output[0].clone();
                new_nodes.push((
                    f.layer,
                    NodeProto {
                        input: vec![product, b_name],
                        output: vec![f.output.clone()],
                        name: Some(format!("{base}.bn_shift")),
                        op_type: Some("Add".into()),
                        ..Default::default()
                    },
                ));
            }
        }
        report.changed(f.name, f.note);
        removed.extend(f.removed);
    }
    remove_nodes(g, &removed);
    // Insert the MatMul shift Adds right after their MatMul (indices shift as we go).
    for (layer, add) in new_nodes {
        let pos = g
            .node
            .iter()
            .position(|n| n.output.first() == add.input.first())
            .map_or(layer, |p| p + 1);
        g.node.insert(pos.min(g.node.len()), add);
    }
    for (name, kept) in remove_pass_through(g, opset) {
        if kept.is_none() {
            report.changed(name, "removed (Identity/Dropout at inference)");
        }
    }
    let gone = remove_unused_initializers(g);
    if !gone.is_empty() {
        report.changed(
            format!("{} initializers", gone.len()),
            "removed (no longer used)",
        );
    }
}

/// Removes Identity and inference Dropout nodes by wiring their input straight to
/// their readers. Returns each pass-through node looked at, with `None` when
/// removed or the reason it stays (a Dropout that runs in training mode by its
/// operator-set version: `is_test` = 0 before opset 7, or a `training_mode` input).
fn remove_pass_through(g: &mut GraphProto, opset: i64) -> Vec<(String, Option<String>)> {
    let outputs: HashSet<String> = g.output.iter().map(|o| o.name().to_string()).collect();
    let mut seen = Vec::new();
    let mut i = 0;
    while i < g.node.len() {
        let n = &g.node[i];
        let label = if n.name().is_empty() {
            n.op_type().to_string()
        } else {
            n.name().to_string()
        };
        let kept = match n.op_type() {
            "Identity" => None,
            "Dropout" if n.output.iter().skip(1).any(|o| !o.is_empty()) => {
                Some("its mask output is used".to_string())
            }
            "Dropout" if n.input.len() >= 3 && !n.input[2].is_empty() => {
                Some("has a training_mode input".to_string())
            }
            "Dropout" if opset < 7 && n.int_or("is_test", 0).unwrap_or(0) == 0 => Some(format!(
                "opset {opset} Dropout with is_test = 0 (that version's default) drops activations (training mode)"
            )),
            "Dropout" => None,
            _ => {
                i += 1;
                continue;
            }
        };
        let read_by_subgraph = g
            .node
            .iter()
            .any(|m| crate::graph::subgraph_free_values(m).contains(&n.output[0]));
        if kept.is_some() || outputs.contains(&n.output[0]) || read_by_subgraph {
            if kept.is_some() {
                seen.push((label, kept));
            }
            i += 1;
            continue;
        }
        let (from, to) = (n.output[0].clone(), n.input[0].clone());
        seen.push((label, None));
        g.node.remove(i);
        for m in &mut g.node {
            for inp in &mut m.input {
                if *inp == from {
                    *inp = to.clone();
                }
            }
        }
    }
    seen
}
