//! Paired capture: the model being compressed and the original model run side by
//! side on the same images, and each calibrated layer's two inputs (x~ from the
//! compressed model, x from the original) concatenated per group into one input
//! row [x~, x] of twice the dimension. Its Gram matrix holds, per group,
//!
//!   [ H~  C ]      H~ = X~^T X~   (the compressed model's inputs)
//!   [ C^T H ]      C  = X~^T X    (their cross products with the original's)
//!                  H  = X^T X     (the original's)
//!
//! which is what fitting the compressed layer to the original's output needs:
//! ||X~ w' - X w||^2 = w'^T H~ w' - 2 w'^T C w + w^T H w. Its minimizer
//! w* = H~^-1 C w (damped: [`targets`]) gives, for any w',
//! ||X~ w' - X w||^2 = (w' - w*)^T H~ (w' - w*) + const, so GPTQ or SparseGPT run on
//! w* with H~ minimize the error against the original's output ("asymmetric
//! calibration": Li et al., 2025, "GPTAQ: Efficient Finetuning-Free Quantization
//! for Asymmetric Calibration"; the same least squares as channel reconstruction).
//!
//! The pairing is a calibration-only model: the original's nodes keep their
//! names, the compressed model's are renamed, and every paired input gets a
//! Concat (of [x~, x] along the channels for a Conv, group by group when the
//! conv is grouped; along K for Gemm/MatMul).

use std::collections::HashSet;

use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::onnx::proto::{NodeProto, TensorProto};
use crate::onnx::Model;

use faer::linalg::solvers::Solve;

use super::gram::{Geom, Stats};

/// The name a value or node of the compressed model takes in the paired model.
pub fn current_name(v: &str) -> String {
    format!("{v}\u{1}current")
}

/// The paired input's value name for key `key`.
pub fn paired_name(key: &str) -> String {
    format!("\u{1}paired\u{1}{key}")
}

/// One input to pair: the geometry of the layer reading it (in the original
/// model), the rank of that input (a Conv's weight rank), and a key naming the
/// pair (unique among the pairs).
pub struct Pair<'a> {
    pub key: String,
    pub geom: &'a Geom,
    pub rank: usize,
    /// The value the original model's layer reads (the geometry's input, unless
    /// a pass inserted nodes before the layer: [`original_value`]).
    pub original: String,
}

/// The value of the original model that `value` of the compressed model stands
/// for, as a layer reading it sees it:
/// 1. the data input of the same layer in the original, when the layers of the
///    compressed model reading `value` (at slot 0) are found there (a node of
///    the same type writing the same output) and all read one value: this holds
///    whatever a pass inserted or removed before the layer (an activation
///    quantizer that absorbed a ReLU6 reads the value before the Clip, and
///    following it back would pair the quantized activation with the
///    pre-activation);
/// 2. else `value` itself when the original has it, else the first input of its
///    producer, followed back (activation quantizers inserted before a layer:
///    QuantizeLinear -> DequantizeLinear, or a fake-quant chain), at most 16
///    steps.
///
/// `None` when the readers' layers in the original read different values, or
/// the walk back finds nothing.
pub fn original_value(current: &Graph, original: &Graph, value: &str) -> Option<String> {
    let mut same_layer: Option<&str> = None;
    for &c in current.consumers(value) {
        let n = current.node(c);
        if n.input.first().map(String::as_str) != Some(value)
            || !crate::graph::layers::is_weighted(n)
        {
            continue;
        }
        let Some((o, _)) = n.output.first().and_then(|out| original.producer(out)) else {
            continue;
        };
        let on = original.node(o);
        let Some(input) = on.input.first().filter(|_| on.op_type() == n.op_type()) else {
            continue;
        };
        match same_layer {
            None => same_layer = Some(input),
            Some(s) if s == input => {}
            Some(_) => return None,
        }
    }
    if let Some(v) = same_layer {
        return Some(v.to_string());
    }
    let mut v = value.to_string();
    for _ in 0..16 {
        if original.producer(&v).is_some() || original.inputs().any(|i| i.name() == v) {
            return Some(v);
        }
        let (p, _) = current.producer(&v)?;
        v = current.node(p).input.first()?.clone();
    }
    None
}

/// The geometry of a pair's doubled input row: twice the input channels per
/// group (Conv) or twice K (Gemm/MatMul), read from the pair's Concat.
pub fn doubled_geom(pair: &Pair) -> Geom {
    let mut g = pair.geom.clone();
    match &mut g {
        Geom::Conv(c) => c.cin_per_group *= 2,
        Geom::Dense { k, .. } => *k *= 2,
    }
    g.set_input(&paired_name(&pair.key));
    g
}

/// The original and the compressed model side by side (see the module), with one
/// Concat per pair. `Err` when the compressed model has subgraphs (their free
/// values would need renaming inside them).
pub fn side_by_side(original: &Model, current: &Model, pairs: &[Pair]) -> Result<Model> {
    let mut out = original.clone();
    let inputs: HashSet<String> = Graph::of(current)?
        .inputs()
        .map(|i| i.name().to_string())
        .collect();
    let rename = |v: &str| {
        if v.is_empty() || inputs.contains(v) {
            v.to_string()
        } else {
            current_name(v)
        }
    };
    let cg = current.graph();
    if cg.node.iter().any(|n| {
        !crate::graph::subgraph_free_values(n).is_empty()
            || n.attribute
                .iter()
                .any(|a| a.g.is_some() || !a.graphs.is_empty())
    }) {
        return Err(Error::Usage(
            "calibration against the original model (sequential channel pruning, asymmetric GPTQ/SparseGPT) does not handle subgraphs (If/Loop/Scan); use calib_mode = \"parallel\"".into(),
        ));
    }
    let g = out.graph_mut();
    for n in &cg.node {
        let mut n = n.clone();
        n.name = Some(current_name(n.name()));
        n.input.iter_mut().for_each(|v| *v = rename(v));
        n.output.iter_mut().for_each(|v| *v = rename(v));
        g.node.push(n);
    }
    for t in &cg.initializer {
        let mut t = t.clone();
        t.name = Some(current_name(t.name()));
        g.initializer.push(t);
    }
    for p in pairs {
        let input = p.geom.input();
        // A graph input is the same value in both models.
        let (cur, orig, out) = (rename(input), p.original.clone(), paired_name(&p.key));
        let node = |op: &str, suffix: &str, inputs: Vec<String>, output: String| NodeProto {
            op_type: Some(op.into()),
            name: Some(format!("\u{1}paired\u{1}{}\u{1}{suffix}", p.key)),
            input: inputs,
            output: vec![output],
            ..Default::default()
        };
        let concat = |axis: i64, inputs: Vec<String>, output: String| {
            let mut c = node("Concat", "concat", inputs, output);
            c.attribute.push(crate::onnx::attr::int("axis", axis));
            c
        };
        match p.geom {
            Geom::Conv(c) if c.groups > 1 => {
                // [N, C, ...] -> [N, g, C/g, ...], concatenated along the channels of
                // each group, back to [N, 2C, ...]: group k's channels are then its
                // x~ channels followed by its x channels, as the doubled geometry reads.
                // The spatial sizes are not known here: the shapes are built from
                // Shape(x~) (N and the spatial dims gathered, the channels split).
                let spatial = p.rank.saturating_sub(2) as i64;
                let ints = |name: String, dims: Vec<i64>| TensorProto {
                    name: Some(name),
                    data_type: Some(crate::onnx::DataType::Int64 as i32),
                    dims: vec![dims.len() as i64],
                    int64_data: dims,
                    ..Default::default()
                };
                let v = |s: &str| format!("{out}\u{1}{s}");
                g.initializer.push(ints(v("i0"), vec![0]));
                g.initializer
                    .push(ints(v("isp"), (2..2 + spatial).collect()));
                g.initializer
                    .push(ints(v("gm1"), vec![c.groups as i64, -1]));
                g.initializer.push(ints(v("m1"), vec![-1]));
                g.node
                    .push(node("Shape", "shape", vec![cur.clone()], v("shape")));
                g.node
                    .push(node("Gather", "n", vec![v("shape"), v("i0")], v("n")));
                g.node
                    .push(node("Gather", "sp", vec![v("shape"), v("isp")], v("sp")));
                let mut c1 = concat(0, vec![v("n"), v("gm1"), v("sp")], v("split_shape"));
                c1.name = Some(format!("{}\u{1}split_shape", c1.name()));
                g.node.push(c1);
                let mut c2 = concat(0, vec![v("n"), v("m1"), v("sp")], v("back_shape"));
                c2.name = Some(format!("{}\u{1}back_shape", c2.name()));
                g.node.push(c2);
                let (split_shape, back_shape) = (v("split_shape"), v("back_shape"));
                let (rc, ro, cat) = (
                    format!("{out}\u{1}cur"),
                    format!("{out}\u{1}orig"),
                    format!("{out}\u{1}cat"),
                );
                g.node.push(node(
                    "Reshape",
                    "split_cur",
                    vec![cur, split_shape.clone()],
                    rc.clone(),
                ));
                g.node.push(node(
                    "Reshape",
                    "split_orig",
                    vec![orig, split_shape],
                    ro.clone(),
                ));
                g.node.push(concat(2, vec![rc, ro], cat.clone()));
                g.node
                    .push(node("Reshape", "back", vec![cat, back_shape], out.clone()));
            }
            Geom::Conv(_) => g.node.push(concat(1, vec![cur, orig], out)),
            Geom::Dense { trans_a, .. } => {
                g.node
                    .push(concat(if *trans_a { 0 } else { -1 }, vec![cur, orig], out))
            }
        }
    }
    Ok(out)
}

/// Captures the `wanted` layers (key, one geometry per reading node, as in
/// [`super::capture`]) of `current` beside `original`: every input paired with
/// the original's value it stands for ([`original_value`]), one model run.
/// `rank(key)` is the layer's weight rank, `name(key)` its name for errors.
/// Returns the doubled statistics by key (dimension 2d: [`blocks`] splits
/// them), the layers left out with the reason, and the seconds taken.
/// `Err` when an input has no counterpart in the original model, or the
/// models hold subgraphs.
#[allow(clippy::type_complexity)]
pub fn capture(
    original: &Model,
    current: &Model,
    cx: &crate::passes::Context,
    wanted: &[(usize, Vec<Geom>)],
    rank: &dyn Fn(usize) -> usize,
    name: &dyn Fn(usize) -> String,
    folds: bool,
) -> Result<(
    std::collections::HashMap<usize, super::Calibrated>,
    Vec<(usize, String)>,
    f64,
)> {
    let cur = Graph::of(current)?;
    let orig = Graph::of(original)?;
    let mut pairs = Vec::new();
    let mut doubled: Vec<(usize, Vec<Geom>)> = Vec::new();
    for (key, geoms) in wanted {
        let mut gs = Vec::new();
        for (k, geom) in geoms.iter().enumerate() {
            let Some(o) = original_value(&cur, &orig, geom.input()) else {
                return Err(Error::Graph(format!(
                    "calibration against the float model: the input '{}' of layer '{}' has no counterpart in the float model",
                    geom.input(),
                    name(*key)
                )));
            };
            let pair = Pair {
                key: format!("{key}.{k}"),
                geom,
                rank: rank(*key),
                original: o,
            };
            gs.push(doubled_geom(&pair));
            pairs.push(pair);
        }
        doubled.push((*key, gs));
    }
    let both = side_by_side(original, current, &pairs)?;
    super::capture_folds(&both, cx, &doubled, folds)
}

/// A paired layer's statistics reduced to the original model's inputs alone
/// (the H block of each group), as a plain capture of the original would give.
/// `d` is the layer's own input dimension; `Err` when the statistics are not
/// of dimension 2d.
pub fn original_only(
    cal: &super::Calibrated,
    d: usize,
) -> std::result::Result<super::Calibrated, String> {
    if cal.dim != 2 * d {
        return Err(format!(
            "paired calibration of dimension {} for rows of {d}",
            cal.dim
        ));
    }
    let own = |stats: &[Stats]| -> Vec<Stats> {
        stats
            .iter()
            .map(|st| Stats::Gram(blocks(st, d).2))
            .collect()
    };
    Ok(super::Calibrated {
        stats: own(&cal.stats),
        means: Vec::new(),
        dim: d,
        groups: cal.groups,
        rows: cal.rows,
        scale: cal.scale,
        folds: cal.folds.iter().map(|f| own(f)).collect(),
    })
}

/// The asymmetric targets of every row of a layer ([`targets`] per group), as a
/// tensor of the shape of `w0`; `reference` is the float model's weight (same
/// shape), `None` when it is `w0`. `Err` as [`targets`].
pub fn layer_targets(
    layer: &super::obs::Layer,
    blocks: &[(Vec<f64>, Vec<f64>, Vec<f64>)],
    w0: &[f32],
    reference: Option<&[f32]>,
    damp: f64,
) -> std::result::Result<Vec<f32>, String> {
    use rayon::prelude::*;
    let per: Vec<(Vec<Vec<f64>>, Vec<usize>)> =
        (0..blocks.len()).map(|g| layer.rows_of(w0, g)).collect();
    let refs: Option<Vec<Vec<Vec<f64>>>> =
        reference.map(|r| (0..blocks.len()).map(|g| layer.rows_of(r, g).0).collect());
    let solved: Vec<Vec<Vec<f64>>> = per
        .par_iter()
        .zip(blocks)
        .enumerate()
        .map(|(g, ((old, _), b))| targets(b, old, refs.as_ref().map(|r| r[g].as_slice()), damp))
        .collect::<std::result::Result<_, _>>()?;
    let mut out = w0.to_vec();
    for (rows, (_, ids)) in solved.into_iter().zip(&per) {
        for (row, &r) in rows.into_iter().zip(ids) {
            for (j, v) in row.into_iter().enumerate() {
                out[layer.rows.index(r, j)] = v as f32;
            }
        }
    }
    Ok(out)
}

/// The float model's values of weight `name` (the layer's weight in the model
/// the compressed one is fit to), when `original` holds it as a float
/// initializer of `len` elements; `None` otherwise (the fit then uses the
/// layer's current weights as the float ones).
pub fn reference_weight(original: &Model, name: &str, len: usize) -> Option<Vec<f32>> {
    let t = original
        .graph()
        .initializer
        .iter()
        .find(|t| t.name() == name)?;
    let v: Vec<f32> = crate::onnx::TensorData::from_proto(t)
        .ok()?
        .into_f32()
        .iter()
        .copied()
        .collect();
    (v.len() == len).then_some(v)
}

/// The blocks (H~, C, H) of a pair's Gram matrix of dimension 2d (see the module),
/// each d x d row-major.
pub fn blocks(stats: &Stats, d: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let big = super::obs::hessian(stats, 2 * d);
    let block = |r0: usize, c0: usize| -> Vec<f64> {
        let mut m = vec![0.0; d * d];
        for i in 0..d {
            m[i * d..(i + 1) * d]
                .copy_from_slice(&big[(r0 + i) * 2 * d + c0..(r0 + i) * 2 * d + c0 + d]);
        }
        m
    };
    (block(0, 0), block(0, d), block(d, d))
}

/// One group's blocks (H~, C, H), each d x d row-major ([`blocks`]).
pub type Blocks = (Vec<f64>, Vec<f64>, Vec<f64>);

/// A paired layer's blocks, group by group, and the factors of their H~ (what
/// GPTQ and SparseGPT sweep with: `damp` x mean(diag H~), act-order or not).
/// `Err` when the statistics are not of dimension 2d (`d`: the layer's own
/// inputs) or an H~ cannot be factored.
pub fn split(
    cal: &super::Calibrated,
    d: usize,
    damp: f64,
    act_order: bool,
) -> std::result::Result<(Vec<Blocks>, Vec<super::obs::Factor>), String> {
    if cal.dim != 2 * d {
        return Err(format!(
            "paired calibration of dimension {} for rows of {d}",
            cal.dim
        ));
    }
    let blocks: Vec<Blocks> = cal.stats.iter().map(|st| blocks(st, d)).collect();
    let factors = blocks
        .iter()
        .map(|b| super::obs::Factor::new(&b.0, d, damp, act_order))
        .collect::<std::result::Result<_, _>>()?;
    Ok((blocks, factors))
}

/// Row-major `rows` (each of length d) as a matrix.
fn mat(rows: &[Vec<f64>], d: usize) -> faer::Mat<f64> {
    faer::Mat::from_fn(rows.len(), d, |i, j| rows[i][j])
}

/// The asymmetric targets of one group's rows: per row w (the layer's weights
/// now) and w_ref (the same row in the float model: `reference`, or w itself when
/// `None`), the minimizer of ||X~ w' - X w_ref||^2 + lambda ||w' - w||^2, the
/// ridge pulling towards the layer's own weights (so X~ = X and w_ref = w give
/// w' = w):
///
///   w* = w + (H~ + lambda I)^-1 (C w_ref - H~ w)
///
/// with lambda = `damp` x the larger of the mean diagonals of H~ and H
/// (`blocks` = (H~, C, H)). The ridge is scaled by the float model's inputs too:
/// an input the compressed model has all but lost (H~ near 0 on it, a channel a
/// pruned layer silenced) would otherwise be "compensated" by weights scaled up
/// without bound, fitting noise (measured: a depthwise conv of MobileNetV2
/// at 1100% output error on the float inputs after 50% SparseGPT).
/// `Err` when the damped H~ cannot be factored.
pub fn targets(
    blocks: &(Vec<f64>, Vec<f64>, Vec<f64>),
    rows: &[Vec<f64>],
    reference: Option<&[Vec<f64>]>,
    damp: f64,
) -> std::result::Result<Vec<Vec<f64>>, String> {
    let d = rows.first().map_or(0, Vec::len);
    if rows.is_empty() || d == 0 {
        return Ok(rows.to_vec());
    }
    let (ht, c, h) = (&blocks.0, &blocks.1, &blocks.2);
    let mean = |m: &[f64]| (0..d).map(|i| m[i * d + i]).sum::<f64>() / d as f64;
    let scale = mean(ht).max(mean(h));
    let lambda = damp.max(1e-12) * if scale > 0.0 { scale } else { 1.0 };
    let m = faer::Mat::from_fn(d, d, |i, j| {
        ht[i * d + j] + if i == j { lambda } else { 0.0 }
    });
    let m_of = |v: &[f64]| faer::Mat::from_fn(d, d, |i, j| v[i * d + j]);
    // C W_ref^T - H~ W^T: one column per row, all rows at once.
    let rhs = match reference {
        None => {
            let diff = faer::Mat::from_fn(d, d, |i, j| c[i * d + j] - ht[i * d + j]);
            &diff * mat(rows, d).transpose()
        }
        Some(r) => m_of(c) * mat(r, d).transpose() - m_of(ht) * mat(rows, d).transpose(),
    };
    let step = m
        .llt(faer::Side::Lower)
        .map_err(|_| {
            "the damped Gram matrix of the compressed inputs is not positive definite".to_string()
        })?
        .solve(&rhs);
    Ok(rows
        .iter()
        .enumerate()
        .map(|(r, w)| {
            w.iter()
                .enumerate()
                .map(|(j, v)| v + step[(j, r)])
                .collect()
        })
        .collect())
}

/// Sums over one group's rows of ||X~ w' - X w||^2 (the error of the new rows
/// `new` against the original's output with the old rows `old`) and of
/// ||X w||^2, from the blocks (H~, C, H) of [`blocks`].
pub fn fit_error(
    blocks: &(Vec<f64>, Vec<f64>, Vec<f64>),
    d: usize,
    old: &[Vec<f64>],
    new: &[Vec<f64>],
) -> (f64, f64) {
    if old.is_empty() {
        return (0.0, 0.0);
    }
    let m = |v: &[f64]| faer::Mat::from_fn(d, d, |i, j| v[i * d + j]);
    let (ht, c, ho) = (m(&blocks.0), m(&blocks.1), m(&blocks.2));
    let (wo, wn) = (mat(old, d), mat(new, d));
    let (a, b, e) = (&wn * &ht, &wn * &c, &wo * &ho);
    let (mut num, mut den) = (0.0, 0.0);
    for r in 0..old.len() {
        let (mut q1, mut q2, mut q3) = (0.0, 0.0, 0.0);
        for j in 0..d {
            q1 += a[(r, j)] * wn[(r, j)];
            q2 += b[(r, j)] * wo[(r, j)];
            q3 += e[(r, j)] * wo[(r, j)];
        }
        num += (q1 - 2.0 * q2 + q3).max(0.0);
        den += q3;
    }
    (num, den)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three input rows of the compressed model (X~) and of the original (X):
    ///   X~ = [[1,0],[0,1],[1,1]]   X = [[1,0],[0,2],[0,1]]
    /// stored as the doubled rows [x~, x] (column-major by input, as
    /// `Stats::Rows` keeps them).
    fn example() -> Stats {
        Stats::Rows {
            x: vec![
                1.0, 0.0, 1.0, // x~0
                0.0, 1.0, 1.0, // x~1
                1.0, 0.0, 0.0, // x0
                0.0, 2.0, 1.0, // x1
            ],
            n: 3,
        }
    }

    fn op(ty: &str, inputs: &[&str], output: &str) -> NodeProto {
        NodeProto {
            name: Some(format!("{ty}_{output}")),
            op_type: Some(ty.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            ..Default::default()
        }
    }

    /// The nodes, with every value no node writes (x, weights, bounds) as a
    /// graph input.
    fn graph_of(nodes: Vec<NodeProto>) -> crate::onnx::proto::GraphProto {
        let written: HashSet<&String> = nodes.iter().flat_map(|n| &n.output).collect();
        let mut free: Vec<String> = nodes
            .iter()
            .flat_map(|n| &n.input)
            .filter(|v| !written.contains(v))
            .cloned()
            .collect();
        free.sort();
        free.dedup();
        crate::onnx::proto::GraphProto {
            input: free
                .into_iter()
                .map(|v| crate::onnx::proto::ValueInfoProto {
                    name: Some(v),
                    ..Default::default()
                })
                .collect(),
            node: nodes,
            ..Default::default()
        }
    }

    #[test]
    fn the_original_value_is_what_the_same_layer_reads() {
        // Original: x -> Conv -> a -> Clip(0, 6) -> r -> Conv -> y, and a
        // second branch r -> Conv -> z. The compressed model's activation
        // quantizer absorbed the ReLU6: a -> Div -> Round -> Clip -> Mul -> r_fq,
        // read by both layers. Their counterpart is r (what the same layers read in
        // the original), not a, where following the chain back ends.
        let orig = graph_of(vec![
            op("Conv", &["x", "w1"], "a"),
            op("Clip", &["a", "lo", "hi"], "r"),
            op("Conv", &["r", "w2"], "y"),
            op("Conv", &["r", "w3"], "z"),
            op("Conv", &["x", "w4"], "v"),
        ]);
        let chain = |tail: Vec<NodeProto>| {
            let mut n = vec![
                op("Conv", &["x", "w1"], "a"),
                op("Div", &["a", "s"], "a_div"),
                op("Round", &["a_div"], "a_round"),
                op("Clip", &["a_round", "qlo", "qhi"], "a_clip"),
                op("Mul", &["a_clip", "s"], "r_fq"),
            ];
            n.extend(tail);
            graph_of(n)
        };
        let cur = chain(vec![
            op("Conv", &["r_fq", "w2"], "y"),
            op("Conv", &["r_fq", "w3"], "z"),
        ]);
        let (o, c) = (Graph::new(&orig).unwrap(), Graph::new(&cur).unwrap());
        assert_eq!(original_value(&c, &o, "r_fq").as_deref(), Some("r"));
        // A value no layer reads: the walk back through the chain.
        assert_eq!(original_value(&c, &o, "a_clip").as_deref(), Some("a"));
        // A value the original has, read by the same layer: itself.
        assert_eq!(original_value(&c, &o, "x").as_deref(), Some("x"));
        // Two readers whose layers read different values in the original: no
        // counterpart (y's layer reads r, v's reads x).
        let cur2 = chain(vec![
            op("Conv", &["r_fq", "w2"], "y"),
            op("Conv", &["r_fq", "w4"], "v"),
        ]);
        let c2 = Graph::new(&cur2).unwrap();
        assert_eq!(original_value(&c2, &o, "r_fq"), None);
        // A reader of another type in the original (a Gemm writing y there) is
        // not the same layer: the walk back decides.
        let orig3 = graph_of(vec![
            op("Conv", &["x", "w1"], "a"),
            op("Clip", &["a", "lo", "hi"], "r"),
            op("Gemm", &["r", "w2"], "y"),
        ]);
        let cur3 = chain(vec![op("Conv", &["r_fq", "w2"], "y")]);
        let (o3, c3) = (Graph::new(&orig3).unwrap(), Graph::new(&cur3).unwrap());
        assert_eq!(original_value(&c3, &o3, "r_fq").as_deref(), Some("a"));
    }

    #[test]
    fn blocks_are_the_gram_and_cross_products() {
        // H~ = X~^T X~ = [[2,1],[1,2]]; C = X~^T X = [[x~0.x0, x~0.x1], [x~1.x0,
        // x~1.x1]] = [[1,1],[0,3]] (not symmetric: C^T would differ);
        // H = X^T X = [[1,0],[0,5]].
        let (ht, c, h) = blocks(&example(), 2);
        assert_eq!(ht, vec![2.0, 1.0, 1.0, 2.0]);
        assert_eq!(c, vec![1.0, 1.0, 0.0, 3.0]);
        assert_eq!(h, vec![1.0, 0.0, 0.0, 5.0]);
        // The float model's statistics alone: H.
        let cal = super::super::Calibrated {
            stats: vec![example()],
            means: Vec::new(),
            dim: 4,
            groups: 1,
            rows: 3,
            scale: 1.0,
            folds: Vec::new(),
        };
        let own = original_only(&cal, 2).unwrap();
        assert_eq!(own.dim, 2);
        assert_eq!(
            super::super::obs::hessian(&own.stats[0], 2),
            vec![1.0, 0.0, 0.0, 5.0]
        );
    }

    #[test]
    fn fit_error_is_the_error_against_the_original_output() {
        // w = [1,1]: X w = (1,2,1), ||X w||^2 = 6. w' = [1,0]: X~ w' = (1,0,1);
        // X~ w' - X w = (0,-2,0), squared norm 4. From the blocks:
        // w'^T H~ w' - 2 w'^T C w + w^T H w = 2 - 2*2 + 6 = 4.
        let b = blocks(&example(), 2);
        let (num, den) = fit_error(&b, 2, &[vec![1.0, 1.0]], &[vec![1.0, 0.0]]);
        assert!((num - 4.0).abs() < 1e-12, "{num}");
        assert!((den - 6.0).abs() < 1e-12, "{den}");
    }

    #[test]
    fn targets_solve_the_damped_fit_by_hand() {
        // w* = w + (H~ + lambda I)^-1 (C w - H~ w), lambda = 0.01 * max(mean diag
        // H~, mean diag H) = 0.01 * max(2, 3) = 0.03. (C - H~) w = [[-1,0],[-1,1]]
        // [1,1] = [-1,0]; H~ + 0.03 I = [[2.03,1],[1,2.03]], det = 2.03^2 - 1 =
        // 3.1209, its inverse times [-1,0] = [-2.03, 1] / 3.1209 =
        // [-0.6504534, 0.3204204]; w* = [0.3495466, 1.3204204] (the undamped
        // least squares H~^-1 C w = H~^-1 [2,3] is [1/3, 4/3]).
        let b = blocks(&example(), 2);
        let t = targets(&b, &[vec![1.0, 1.0]], None, 0.01).unwrap();
        let want = [1.0 - 2.03 / 3.1209, 1.0 + 1.0 / 3.1209];
        for (got, want) in t[0].iter().zip(want) {
            assert!((got - want).abs() < 1e-12, "{t:?}");
        }
        // The target fits the original's output better than the layer's own
        // weights on the compressed inputs: X~ w = (1,1,2) against X w = (1,2,1):
        // ||(0,-1,1)||^2 = 2.
        let (own, _) = fit_error(&b, 2, &[vec![1.0, 1.0]], &[vec![1.0, 1.0]]);
        let (fit, _) = fit_error(&b, 2, &[vec![1.0, 1.0]], &t);
        assert!((own - 2.0).abs() < 1e-12, "{own}");
        // X~ w* = (0.34955, 1.32042, 1.66997) against (1,2,1): 1.33377; the
        // undamped optimum's is ||(-2/3, -2/3, 2/3)||^2 = 4/3.
        assert!(fit > 4.0 / 3.0 && fit < 1.3340, "{fit}");
        // The float model's row differs (pruned w = [1,0], float w_ref = [1,1]):
        // w* = w + (H~ + 0.03 I)^-1 (C w_ref - H~ w) = [1,0] + M^-1 ([2,3] - [2,1])
        // = [1,0] + [-2, 4.06] / 3.1209 = [0.3591592, 1.3009068].
        let t = targets(&b, &[vec![1.0, 0.0]], Some(&[vec![1.0, 1.0]]), 0.01).unwrap();
        let want = [1.0 - 2.0 / 3.1209, 4.06 / 3.1209];
        for (got, want) in t[0].iter().zip(want) {
            assert!((got - want).abs() < 1e-12, "{t:?}");
        }
        // Equal inputs (C = H~) leave the weights as they are, exactly.
        let same = (b.0.clone(), b.0.clone(), b.0.clone());
        let t = targets(&same, &[vec![0.25, -3.0]], None, 0.01).unwrap();
        assert_eq!(t, vec![vec![0.25, -3.0]]);
        // An input the compressed model lost (x~1 = 0: H~ = [[2,0],[0,0]],
        // C = [[2,1],[0,0]]) with the float model's H = [[2,1],[1,5]]: lambda =
        // 0.01 * 3.5 = 0.035; (C - H~) w = [1, 0]; w* = [1 + 1/2.035, 1 + 0]: the
        // lost input's weight is left alone.
        let lost = (
            vec![2.0, 0.0, 0.0, 0.0],
            vec![2.0, 1.0, 0.0, 0.0],
            vec![2.0, 1.0, 1.0, 5.0],
        );
        let t = targets(&lost, &[vec![1.0, 1.0]], None, 0.01).unwrap();
        assert!((t[0][0] - (1.0 + 1.0 / 2.035)).abs() < 1e-12, "{t:?}");
        assert_eq!(t[0][1], 1.0);
    }
}
