//! Equalization: per-channel rescaling of two consecutive weighted layers that
//! leaves the network's function unchanged and makes it easier to quantize.
//!
//! A pair is a layer L1 (Conv or Gemm, output channel i) whose output reaches a
//! layer L2 (Conv or Gemm, input channel i) directly or through per-channel,
//! positively homogeneous ops f, f(x / s) = f(x) / s for s > 0 (Relu,
//! LeakyRelu, PRelu with a constant slope, Clip with min 0 and no max, max and
//! average pools, Identity), with no other reader on the way. For
//! scales s_i > 0,
//!
//!   W1[i, ..] <- W1[i, ..] / s_i,  b1[i] <- b1[i] / s_i,  W2[.., i, ..] <- W2[.., i, ..] s_i
//!
//! gives the same L2 output exactly (Nagel et al., 2019, "Data-Free Quantization
//! Through Weight Equalization and Bias Correction", section 4.1). With
//! `streams = true`, a residual stream is scaled as one: every layer producing a
//! value of the stream (values joined by Adds, read only by those Adds and by
//! layers' data inputs) divides its rows by s, every layer reading it multiplies
//! its columns by s, and every Add then carries x / s (r1 and r2 below are then
//! maxima over the producers and over the consumers). ReLU6,
//! Clip(x, 0, c), is not homogeneous: Clip(x / s, 0, c) != Clip(x, 0, c) / s.
//! `across_clip` says what to do there:
//! - `min` (default): rewrite it as Relu followed by Min(x, c / s) with one
//!   bound per channel (a [C, 1, .., 1] constant), which is exact (the score
//!   counts Relu + Min as Clip's two operations per element, plus C constants);
//! - `relu`: replace it by Relu, dropping the upper bound (the DFQ paper's
//!   choice; this changes the function wherever an activation exceeded c, and
//!   the report says so);
//! - `no`: leave such pairs alone.
//!
//! How the scales are chosen (`mode`):
//! - `cle`, data-free: r1_i = max |W1[i, ..]|, r2_i = max |W2[.., i, ..]|,
//!   s_i = sqrt(r1_i / r2_i), so both ranges become sqrt(r1_i r2_i) (Nagel et
//!   al., eq. 7), repeated over all pairs until no scale moves by more than
//!   0.01% (layers in chains, such as Conv -> depthwise -> Conv, take part in two
//!   pairs). Best for per-tensor weight grids;
//! - `smoothquant:A` (A in [0, 1], the migration strength; needs --calib):
//!   a_i = max |x_i| of the activation between the layers on the calibration
//!   images, s_i = a_i^A / r2_i^(1 - A) (Xiao et al., 2023, "SmoothQuant",
//!   eq. 4), scaled so that the largest a_i / s_i is the old max a_i; the
//!   activation's channel ranges move toward each other, which is what a
//!   per-tensor activation grid needs. When L2 is depthwise (each input channel
//!   feeds only its own output channels) and weights get one grid per output
//!   channel, its column scale costs nothing and A = 1 is used;
//! - `auto` (default): smoothquant:0.5 with calibration images and per-channel
//!   (or no) weight quantization, else cle.
//!
//! Scales are clamped to [1e-3, 1e3] (a dead channel, max 0, keeps scale 1).
//! The pass runs after BN folding and before pruning and quantization; it is
//! lossless, so bias correction measures the later passes against its output.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

use ndarray::{ArrayD, Axis, IxDyn};
use serde::{Deserialize, Serialize};

use super::select;
use super::{Context, Pass, PassReport};
use crate::error::{Error, Result};
use crate::graph::layers::{bias_input, weight_axis};
use crate::graph::{set_initializer, Graph, Namer};
use crate::onnx::attr::NodeAttrs;
use crate::onnx::proto::NodeProto;
use crate::onnx::{DataType, Model, TensorData};

/// How scales are chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Auto,
    /// Cross-layer equalization of weight ranges (data-free).
    Cle,
    /// SmoothQuant's activation-to-weight migration with strength alpha.
    SmoothQuant(f64),
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::Auto => f.write_str("auto"),
            Mode::Cle => f.write_str("cle"),
            Mode::SmoothQuant(a) => write!(f, "smoothquant:{a}"),
        }
    }
}

impl FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Mode> {
        let t = s.trim().to_ascii_lowercase();
        let bad = || {
            Error::Usage(format!(
                "--equalize '{s}': expected auto, cle or smoothquant[:A] with 0 <= A <= 1 (e.g. smoothquant:0.5)"
            ))
        };
        match t.as_str() {
            "auto" | "" => Ok(Mode::Auto),
            "cle" => Ok(Mode::Cle),
            "smoothquant" => Ok(Mode::SmoothQuant(0.5)),
            _ => {
                let a: f64 = t
                    .strip_prefix("smoothquant:")
                    .ok_or_else(bad)?
                    .parse()
                    .map_err(|_| bad())?;
                if !(0.0..=1.0).contains(&a) {
                    return Err(bad());
                }
                Ok(Mode::SmoothQuant(a))
            }
        }
    }
}

/// What to do with a Clip(x, 0, c) between the two layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcrossClip {
    /// Relu + per-channel Min: exact.
    Min,
    /// Relu: drops the upper bound (changes the function).
    Relu,
    /// Leave the pair alone.
    No,
}

/// The `[equalize]` recipe section.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EqualizeSection {
    /// auto | cle | smoothquant:A
    pub mode: Option<String>,
    /// min (default) | relu | no
    pub across_clip: Option<String>,
    /// Glob patterns on node or weight names: pairs touching them are left alone.
    #[serde(default)]
    pub skip: Vec<String>,
    /// Most CLE sweeps over all pairs (default 50).
    pub iterations: Option<usize>,
    /// Also scale residual streams (producers and consumers joined by Adds) and
    /// fan-outs (default false: on MobileNetV2 W8A8 it measured 89.8% agreement
    /// against 90.5% without).
    pub streams: Option<bool>,
}

impl EqualizeSection {
    /// `per_channel_weights`: the weight quantization that follows gives each output
    /// channel its own grid (or there is none).
    pub fn config(&self, per_channel_weights: bool) -> Result<EqualizeConfig> {
        let mode = match &self.mode {
            Some(m) => m.parse()?,
            None => Mode::Auto,
        };
        let across_clip = match self.across_clip.as_deref() {
            None | Some("min") => AcrossClip::Min,
            Some("relu") => AcrossClip::Relu,
            Some("no") => AcrossClip::No,
            Some(o) => {
                return Err(Error::Usage(format!(
                    "equalize across_clip '{o}': expected min (exact: Relu + per-channel Min), relu (drops the upper bound) or no"
                )))
            }
        };
        Ok(EqualizeConfig {
            mode,
            across_clip,
            skip: self.skip.clone(),
            iterations: self.iterations.unwrap_or(50).max(1),
            streams: self.streams.unwrap_or(false),
            per_channel_weights,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct EqualizeConfig {
    pub mode: Mode,
    pub across_clip: AcrossClip,
    pub skip: Vec<String>,
    pub iterations: usize,
    pub streams: bool,
    pub per_channel_weights: bool,
}

/// Why smoothquant needs `--calib`.
pub const NEEDS_CALIB: &str = "--equalize smoothquant needs calibration images (--calib DATA): \
its scales come from each activation's per-channel range on them (cle is data-free)";

/// The activation between the two layers.
#[derive(Debug, Clone, PartialEq)]
enum Act {
    /// L1 feeds L2 directly.
    Identity,
    /// Through positively homogeneous per-channel ops only (Relu, LeakyRelu,
    /// PRelu, Clip(0, inf), pools, Identity).
    Homogeneous,
    /// Through one Clip(x, 0, c) (and homogeneous ops).
    Clip { node: usize, max: f32 },
}

/// A layer whose output channels a pair scales down (rows / s).
#[derive(Debug, Clone)]
struct Producer {
    node: usize,
    w: String,
    b: Option<String>,
    /// The output-channel axis of w.
    axis: usize,
}

/// A layer whose input channels a pair scales up (columns x s).
#[derive(Debug, Clone)]
struct Consumer {
    node: usize,
    w: String,
    /// Input channel i only feeds output channels of group i.
    depthwise: bool,
}

/// Layers scaled together: one producer feeding one consumer through
/// homogeneous ops, or the producers and consumers of a residual stream (values
/// joined by Adds, every reader an Add of the stream or a consumer).
#[derive(Debug, Clone)]
struct Pair {
    producers: Vec<Producer>,
    consumers: Vec<Consumer>,
    act: Act,
    /// The values between them (all scaled by 1 / s).
    values: Vec<String>,
    /// Adds on the stream.
    adds: usize,
    channels: usize,
    /// For the report: 'producers' -> 'consumers'.
    label: String,
}

struct Finder<'a, 'g> {
    g: &'a Graph<'g>,
}

impl Finder<'_, '_> {
    fn shape_of(&self, name: &str) -> Vec<usize> {
        self.g
            .initializer(name)
            .map(|t| t.dims.iter().map(|&d| d.max(0) as usize).collect())
            .unwrap_or_default()
    }

    /// Why `name` cannot be rescaled in place (None: it can).
    fn fixed_f32(&self, name: &str) -> Option<String> {
        let g = self.g;
        let Some(t) = g.initializer(name) else {
            return Some(format!("'{name}' is not an initializer"));
        };
        if let Some(why) = g.not_fixed(name) {
            return Some(why);
        }
        if t.data_type() != DataType::Float as i32 {
            return Some(format!("'{name}' is not float32"));
        }
        if g.use_count(name) != 1 || g.is_output(name) {
            return Some(format!("'{name}' is also read elsewhere"));
        }
        None
    }

    /// The only reader of `v` (reading it once), if it has exactly one and `v` is no graph output.
    fn single_reader(&self, v: &str) -> Option<usize> {
        let g = self.g;
        if g.is_output(v) {
            return None;
        }
        match g.consumers(v) {
            [c] if g.node(*c).input.iter().filter(|s| *s == v).count() == 1 => Some(*c),
            _ => None,
        }
    }

    /// Node `i` as a producer, with its channel count, or why not.
    fn producer(&self, i: usize) -> Result<std::result::Result<(Producer, usize), String>> {
        let g = self.g;
        let n = g.node(i);
        if !matches!(n.op_type(), "Conv" | "Gemm") || n.input.len() < 2 {
            return Ok(Err(format!("'{}' is not a Conv or Gemm", g.node_name(i))));
        }
        let w = n.input[1].clone();
        if let Some(why) = self.fixed_f32(&w) {
            return Ok(Err(why));
        }
        let shape = self.shape_of(&w);
        let Some(axis) = weight_axis(n, &shape)?.0 else {
            return Ok(Err(format!("'{w}' has no output-channel axis")));
        };
        let channels = shape[axis];
        if n.op_type() == "Gemm" && n.float_or("alpha", 1.0)? <= 0.0 {
            return Ok(Err("Gemm alpha is not positive".into()));
        }
        let b = bias_input(n).filter(|b| !b.is_empty()).map(str::to_string);
        if let Some(b) = &b {
            if let Some(why) = self.fixed_f32(b) {
                return Ok(Err(why));
            }
            let numel: usize = self.shape_of(b).iter().product();
            if numel != channels || (n.op_type() == "Gemm" && n.float_or("beta", 1.0)? <= 0.0) {
                return Ok(Err(format!(
                    "bias '{b}' is not one positive-scaled value per output channel"
                )));
            }
        }
        Ok(Ok((
            Producer {
                node: i,
                w,
                b,
                axis,
            },
            channels,
        )))
    }

    /// Node `l2` reading `value` as its data input, as a consumer of `channels`
    /// channels, or why not.
    fn consumer(
        &self,
        l2: usize,
        value: &str,
        channels: usize,
    ) -> Result<std::result::Result<Consumer, String>> {
        let g = self.g;
        let m = g.node(l2);
        if !matches!(m.op_type(), "Conv" | "Gemm")
            || m.input.first().map(String::as_str) != Some(value)
            || m.input.iter().filter(|s| *s == value).count() != 1
            || m.input.len() < 2
        {
            return Ok(Err(format!(
                "'{}' ({}) reads '{value}' other than as a layer's data input",
                g.node_name(l2),
                m.op_type()
            )));
        }
        let w = m.input[1].clone();
        if let Some(why) = self.fixed_f32(&w) {
            return Ok(Err(why));
        }
        let s2 = self.shape_of(&w);
        let (inputs, depthwise) = match m.op_type() {
            "Conv" => {
                let group = m.int_or("group", 1)?.max(1) as usize;
                let cin = s2.get(1).copied().unwrap_or(0) * group;
                let cout = s2.first().copied().unwrap_or(0);
                (cin, group == cin && cout % group.max(1) == 0)
            }
            _ => {
                if m.int_or("transA", 0)? != 0 || m.float_or("alpha", 1.0)? <= 0.0 {
                    return Ok(Err("Gemm with transA or a non-positive alpha".into()));
                }
                let k = if m.int_or("transB", 0)? != 0 {
                    s2.get(1)
                } else {
                    s2.first()
                };
                (k.copied().unwrap_or(0), false)
            }
        };
        if inputs != channels || channels == 0 {
            return Ok(Err(format!(
                "{channels} output channels feed {inputs} input channels of '{}'",
                g.node_name(l2)
            )));
        }
        Ok(Ok(Consumer {
            node: l2,
            w,
            depthwise,
        }))
    }

    /// From producer `i`'s output through homogeneous ops to one reader layer:
    /// (the ops' kind, the value the reader reads, the reader), or why the walk
    /// stopped at a node that refuses (None: it just does not reach a layer).
    #[allow(clippy::type_complexity)]
    fn chain(
        &self,
        out: &str,
    ) -> Result<std::result::Result<(Act, String, usize), Option<(usize, String)>>> {
        let g = self.g;
        let mut value = out.to_string();
        let mut via = 0usize;
        let mut clip: Option<(usize, f32)> = None;
        loop {
            let Some(a) = self.single_reader(&value) else {
                return Ok(Err(None));
            };
            let an = g.node(a);
            match an.op_type() {
                "Conv" | "Gemm" => {
                    let act = match clip {
                        Some((node, max)) => Act::Clip { node, max },
                        None if via == 0 => Act::Identity,
                        None => Act::Homogeneous,
                    };
                    return Ok(Ok((act, value, a)));
                }
                "Relu" | "LeakyRelu" | "MaxPool" | "AveragePool" | "GlobalAveragePool"
                | "GlobalMaxPool" | "Identity" => {}
                "PRelu" => {
                    if an
                        .input
                        .get(1)
                        .is_none_or(|s| g.constant_proto(s).is_none())
                    {
                        return Ok(Err(Some((a, "PRelu slope is not a constant".into()))));
                    }
                }
                "Clip" => match clip_bounds(g, an)? {
                    Some((lo, hi)) if lo == 0.0 && hi == f32::INFINITY => {}
                    Some((lo, hi)) if lo == 0.0 && hi > 0.0 && hi.is_finite() && clip.is_none() => {
                        clip = Some((a, hi));
                    }
                    _ => return Ok(Err(Some((
                        a,
                        "Clip without a constant lower bound of 0 is not positively homogeneous"
                            .into(),
                    )))),
                },
                _ => return Ok(Err(None)),
            }
            via += 1;
            let Some(u) = an.output.first() else {
                return Ok(Err(None));
            };
            value = u.clone();
        }
    }

    /// The residual stream (or fan-out) from producer `i`: producers, consumers,
    /// values and Adds, or why it cannot be scaled as one.
    #[allow(clippy::type_complexity)]
    fn stream(
        &self,
        i: usize,
        taken: &HashSet<usize>,
    ) -> Result<std::result::Result<(Vec<usize>, Vec<usize>, Vec<String>, usize), String>> {
        let g = self.g;
        let out = g.node(i).output[0].clone();
        let mut producers = vec![i];
        let mut consumers: Vec<usize> = Vec::new();
        let mut values = vec![out.clone()];
        let mut seen: HashSet<String> = HashSet::from([out.clone()]);
        let mut stack = vec![out];
        let mut adds = 0;
        while let Some(v) = stack.pop() {
            if g.is_output(&v) {
                return Ok(Err(format!("'{v}' is a graph output")));
            }
            for &c in g.consumers(&v) {
                let n = g.node(c);
                match n.op_type() {
                    "Add" if n.input.len() == 2 => {
                        for inp in &n.input {
                            if seen.contains(inp) {
                                continue;
                            }
                            match g.producer(inp) {
                                Some((p, 0))
                                    if matches!(g.node(p).op_type(), "Conv" | "Gemm")
                                        && !taken.contains(&p) =>
                                {
                                    producers.push(p);
                                    seen.insert(inp.clone());
                                    values.push(inp.clone());
                                    stack.push(inp.clone());
                                }
                                _ => {
                                    return Ok(Err(format!(
                                    "Add '{}' also adds '{inp}', which no weighted layer produces",
                                    g.node_name(c)
                                )))
                                }
                            }
                        }
                        let o = n.output[0].clone();
                        if seen.insert(o.clone()) {
                            adds += 1;
                            values.push(o.clone());
                            stack.push(o);
                        }
                    }
                    "Conv" | "Gemm" if n.input.first() == Some(&v) => {
                        if !consumers.contains(&c) {
                            consumers.push(c);
                        }
                    }
                    op => return Ok(Err(format!("'{}' ({op}) reads '{v}'", g.node_name(c)))),
                }
            }
        }
        if consumers.is_empty() {
            return Ok(Err("no layer reads it".into()));
        }
        Ok(Ok((producers, consumers, values, adds)))
    }
}

/// The pairs and streams of the graph, and the candidates left alone with the reason.
/// (target, why) of a candidate left alone.
type Left = Vec<(String, String)>;

fn find_pairs(g: &Graph, cfg: &EqualizeConfig) -> Result<(Vec<Pair>, Left)> {
    let f = Finder { g };
    let mut pairs: Vec<Pair> = Vec::new();
    let mut left = Vec::new();
    let mut taken: HashSet<usize> = HashSet::new();
    for &i in g.topo_order() {
        let n = g.node(i);
        if !matches!(n.op_type(), "Conv" | "Gemm") || n.input.len() < 2 || taken.contains(&i) {
            continue;
        }
        let Some(out) = n.output.first() else {
            continue;
        };
        let (act, producers, readers, values, adds) = match f.chain(out)? {
            Ok((act, value, l2)) => (act, vec![i], vec![(l2, value.clone())], vec![value], 0),
            Err(Some((a, why))) => {
                left.push((g.node_name(a).to_string(), why));
                continue;
            }
            Err(None) if !cfg.streams => continue,
            Err(None) => {
                // A residual stream or a fan-out: only through Adds and layers.
                let readers_ok = !g.consumers(out).is_empty()
                    && g.consumers(out)
                        .iter()
                        .all(|&c| matches!(g.node(c).op_type(), "Add" | "Conv" | "Gemm"));
                if !readers_ok {
                    continue;
                }
                match f.stream(i, &taken)? {
                    Ok((p, c, values, adds)) => {
                        let readers = c
                            .iter()
                            .map(|&l2| (l2, g.node(l2).input[0].clone()))
                            .collect();
                        (Act::Identity, p, readers, values, adds)
                    }
                    Err(why) => {
                        left.push((format!("'{}'", g.node_name(i)), why));
                        continue;
                    }
                }
            }
        };
        // Layers, checked.
        let mut ps = Vec::new();
        let mut channels = None;
        let mut why: Option<String> = None;
        for &p in &producers {
            match f.producer(p)? {
                Ok((prod, c)) if channels.is_none_or(|x| x == c) => {
                    channels = Some(c);
                    ps.push(prod);
                }
                Ok(_) => why = Some("its producers differ in channel count".into()),
                Err(e) => why = Some(e),
            }
            if why.is_some() {
                break;
            }
        }
        let channels = channels.unwrap_or(0);
        let mut cs = Vec::new();
        if why.is_none() {
            for (l2, value) in &readers {
                match f.consumer(*l2, value, channels)? {
                    Ok(c) => cs.push(c),
                    Err(e) => {
                        why = Some(e);
                        break;
                    }
                }
            }
        }
        let label = {
            let names = |v: &[usize]| {
                v.iter()
                    .map(|&n| format!("'{}'", g.node_name(n)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let l2s: Vec<usize> = readers.iter().map(|r| r.0).collect();
            format!("{} -> {}", names(&producers), names(&l2s))
        };
        if let Some(why) = why {
            left.push((label, why));
            continue;
        }
        let mut names: Vec<&str> = Vec::new();
        for (node, w) in ps
            .iter()
            .map(|p| (p.node, &p.w))
            .chain(cs.iter().map(|c| (c.node, &c.w)))
        {
            names.push(g.node_name(node));
            names.push(w);
            names.extend(select::origin(g, w));
        }
        if let Some(p) = select::first_match(&cfg.skip, &names) {
            left.push((label, format!("matches skip pattern '{p}'")));
            continue;
        }
        if matches!(act, Act::Clip { .. }) && cfg.across_clip == AcrossClip::No {
            left.push((
                label,
                "a Clip with an upper bound (ReLU6) between them, and across_clip = no".into(),
            ));
            continue;
        }
        taken.extend(ps.iter().map(|p| p.node));
        pairs.push(Pair {
            producers: ps,
            consumers: cs,
            act,
            values,
            adds,
            channels,
            label,
        });
    }
    Ok((pairs, left))
}

/// The constant (min, max) of a Clip (attributes before opset 11, inputs from
/// it); `None` when a bound given is not a constant. A missing bound is infinite.
fn clip_bounds(g: &Graph, n: &NodeProto) -> Result<Option<(f32, f32)>> {
    let mut lo = n.get_float("min")?.unwrap_or(f32::NEG_INFINITY);
    let mut hi = n.get_float("max")?.unwrap_or(f32::INFINITY);
    for (slot, bound) in [(1, &mut lo), (2, &mut hi)] {
        let Some(name) = n.input.get(slot).filter(|s| !s.is_empty()) else {
            continue;
        };
        match g.constant_f32(name)? {
            Some(a) if a.len() == 1 => *bound = a.iter().next().copied().expect("one"),
            _ => return Ok(None),
        }
    }
    Ok(Some((lo, hi)))
}

/// A standard-layout tensor seen along one axis: (outer, len, inner), so that
/// element (o, c, i) sits at `(o * len + c) * inner + i` of the flat data.
fn split_at_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    let outer = shape[..axis].iter().product();
    let inner = shape[axis + 1..].iter().product();
    (outer, shape[axis], inner)
}

/// The flat data of a weight loaded by this pass (always standard layout).
fn flat(w: &ArrayD<f32>) -> &[f32] {
    w.as_slice().expect("weights are loaded in standard layout")
}

fn flat_mut(w: &mut ArrayD<f32>) -> &mut [f32] {
    w.as_slice_mut()
        .expect("weights are loaded in standard layout")
}

fn max_abs(m: f64, xs: &[f32]) -> f64 {
    m.max(slice_max_abs(xs) as f64)
}

/// max |x| of a slice (0 when empty; NaNs ignored, as f32::max does), over 8
/// independent running maxima so that the loop is vector code rather than one
/// chain of dependent max operations.
fn slice_max_abs(xs: &[f32]) -> f32 {
    let mut m = [0f32; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for j in 0..8 {
            m[j] = m[j].max(c[j].abs());
        }
    }
    let tail = chunks.remainder().iter().fold(0f32, |a, x| a.max(x.abs()));
    m.iter().fold(tail, |a, b| a.max(*b))
}

/// Max |w| of each output row (axis `axis`) of a weight.
fn row_ranges(w: &ArrayD<f32>, axis: usize) -> Vec<f64> {
    let (outer, n, inner) = split_at_axis(w.shape(), axis);
    let data = flat(w);
    let mut r = vec![0f64; n];
    for o in 0..outer {
        for (c, rc) in r.iter_mut().enumerate() {
            let at = (o * n + c) * inner;
            *rc = max_abs(*rc, &data[at..at + inner]);
        }
    }
    r
}

/// The L2 weight's input-channel axis and group layout: (axis, channels per group,
/// output rows per group), for Conv; Gemm reads along its K axis.
fn input_layout(l2: &NodeProto, w: &ArrayD<f32>) -> Result<(usize, usize, usize)> {
    Ok(match l2.op_type() {
        "Conv" => {
            let group = l2.int_or("group", 1)?.max(1) as usize;
            (1, w.shape()[1], w.shape()[0] / group)
        }
        _ => {
            let axis = if l2.int_or("transB", 0)? != 0 { 1 } else { 0 };
            (axis, w.shape()[axis], w.shape()[1 - axis])
        }
    })
}

/// The input channel (of L2's whole input) that flat lane (o, j) of L2's weight
/// multiplies: for a grouped Conv, output row o reads its group's channels.
fn input_channel(conv: bool, o: usize, j: usize, per_group: usize, rows: usize) -> usize {
    if conv {
        (o / rows.max(1)) * per_group + j
    } else {
        j
    }
}

/// Max |w| over everything input channel c of L2 multiplies.
fn column_ranges(l2: &NodeProto, w: &ArrayD<f32>, channels: usize) -> Result<Vec<f64>> {
    let (axis, per_group, rows) = input_layout(l2, w)?;
    let conv = l2.op_type() == "Conv";
    let (outer, n, inner) = split_at_axis(w.shape(), axis);
    let data = flat(w);
    let mut r = vec![0f64; channels];
    for o in 0..outer {
        for j in 0..n {
            let c = input_channel(conv, o, j, per_group, rows);
            if c < channels {
                let at = (o * n + j) * inner;
                r[c] = max_abs(r[c], &data[at..at + inner]);
            }
        }
    }
    Ok(r)
}

/// W2[.., c, ..] *= s[c].
fn scale_columns(l2: &NodeProto, w: &mut ArrayD<f32>, s: &[f64]) -> Result<()> {
    let (axis, per_group, rows) = input_layout(l2, w)?;
    let conv = l2.op_type() == "Conv";
    let (outer, n, inner) = split_at_axis(w.shape(), axis);
    let data = flat_mut(w);
    for o in 0..outer {
        for j in 0..n {
            let f = s[input_channel(conv, o, j, per_group, rows)] as f32;
            let at = (o * n + j) * inner;
            data[at..at + inner].iter_mut().for_each(|v| *v *= f);
        }
    }
    Ok(())
}

/// W1[c, ..] /= s[c] (along `axis`), and the bias likewise.
fn scale_rows(w: &mut ArrayD<f32>, axis: usize, b: Option<&mut ArrayD<f32>>, s: &[f64]) {
    let (outer, n, inner) = split_at_axis(w.shape(), axis);
    let data = flat_mut(w);
    for o in 0..outer {
        for (c, f) in s.iter().enumerate().take(n) {
            let f = *f as f32;
            let at = (o * n + c) * inner;
            data[at..at + inner].iter_mut().for_each(|v| *v /= f);
        }
    }
    if let Some(b) = b {
        for (v, f) in b.iter_mut().zip(s) {
            *v /= *f as f32;
        }
    }
}

const MIN_SCALE: f64 = 1e-3;
const MAX_SCALE: f64 = 1e3;

fn clamp_scale(s: f64) -> f64 {
    if s.is_finite() && s > 0.0 {
        s.clamp(MIN_SCALE, MAX_SCALE)
    } else {
        1.0
    }
}

/// The equalization pass.
pub struct Equalize(pub EqualizeConfig);

impl Pass for Equalize {
    fn name(&self) -> &'static str {
        "equalize"
    }

    fn lossless(&self) -> bool {
        self.0.across_clip != AcrossClip::Relu
    }

    /// Even when lossy (a Relu6 rescaled as Relu), the reference is the rescaled
    /// model: bias correction compares each layer's weights with its rescaled ones.
    fn reference_after(&self) -> bool {
        true
    }

    fn run(&self, model: &mut Model, cx: &Context) -> Result<PassReport> {
        let cfg = &self.0;
        let mut report = PassReport::new(self.name());
        let calib = cx.calib.filter(|d| !d.is_empty());
        let mode = match cfg.mode {
            Mode::Auto if calib.is_some() && cfg.per_channel_weights => Mode::SmoothQuant(0.5),
            Mode::Auto => Mode::Cle,
            m => m,
        };
        if matches!(mode, Mode::SmoothQuant(_)) && calib.is_none() {
            return Err(Error::Usage(NEEDS_CALIB.into()));
        }
        if model.opset() < 8 {
            report.skipped(
                "model",
                format!(
                    "opset {} (per-channel Min needs broadcasting, opset 8)",
                    model.opset()
                ),
            );
            return Ok(report);
        }
        let (pairs, left) = {
            let view = Graph::of(model)?;
            find_pairs(&view, cfg)?
        };
        for (t, why) in left {
            report.skipped(t, why);
        }
        if pairs.is_empty() {
            return Ok(report);
        }

        // The weights, by name, as they change.
        let mut weights: HashMap<String, ArrayD<f32>> = HashMap::new();
        {
            let g = model.graph();
            for p in &pairs {
                let names = p
                    .producers
                    .iter()
                    .flat_map(|x| std::iter::once(&x.w).chain(x.b.as_ref()))
                    .chain(p.consumers.iter().map(|c| &c.w));
                for name in names {
                    if weights.contains_key(name) {
                        continue;
                    }
                    let t = g
                        .initializer
                        .iter()
                        .find(|t| t.name() == name.as_str())
                        .expect("checked");
                    let w = TensorData::from_proto(t)?.into_f32();
                    let w = if w.is_standard_layout() {
                        w
                    } else {
                        w.as_standard_layout().into_owned()
                    };
                    weights.insert(name.clone(), w);
                }
            }
        }
        let nodes: Vec<NodeProto> = model.graph().node.clone();
        let mut total: Vec<Vec<f64>> = pairs.iter().map(|p| vec![1.0; p.channels]).collect();
        let apply =
            |weights: &mut HashMap<String, ArrayD<f32>>, p: &Pair, s: &[f64]| -> Result<()> {
                for x in &p.producers {
                    let mut b = x.b.as_ref().map(|b| weights.remove(b).expect("loaded"));
                    let w1 = weights.get_mut(&x.w).expect("loaded");
                    scale_rows(w1, x.axis, b.as_mut(), s);
                    if let (Some(name), Some(b)) = (&x.b, b) {
                        weights.insert(name.clone(), b);
                    }
                }
                for c in &p.consumers {
                    let w2 = weights.get_mut(&c.w).expect("loaded");
                    scale_columns(&nodes[c.node], w2, s)?;
                }
                Ok(())
            };
        // Elementwise max over the producers' rows / the consumers' columns.
        let ranges = |weights: &HashMap<String, ArrayD<f32>>,
                      p: &Pair|
         -> Result<(Vec<f64>, Vec<f64>)> {
            let mut r1 = vec![0f64; p.channels];
            for x in &p.producers {
                for (a, b) in r1.iter_mut().zip(row_ranges(&weights[&x.w], x.axis)) {
                    *a = a.max(b);
                }
            }
            let mut r2 = vec![0f64; p.channels];
            for c in &p.consumers {
                for (a, b) in
                    r2.iter_mut()
                        .zip(column_ranges(&nodes[c.node], &weights[&c.w], p.channels)?)
                {
                    *a = a.max(b);
                }
            }
            Ok((r1, r2))
        };

        let mut act_ranges: Vec<Option<(f64, f64)>> = vec![None; pairs.len()];
        match mode {
            Mode::Cle | Mode::Auto => {
                let mut sweeps = 0;
                for _ in 0..cfg.iterations {
                    sweeps += 1;
                    let mut moved = 0f64;
                    for (k, p) in pairs.iter().enumerate() {
                        let (r1, r2) = ranges(&weights, p)?;
                        let s: Vec<f64> = r1
                            .iter()
                            .zip(&r2)
                            .zip(&total[k])
                            .map(|((a, b), t)| {
                                if *a > 0.0 && *b > 0.0 {
                                    // Keep the cumulative scale inside the clamp.
                                    clamp_scale(t * (a / b).sqrt()) / t
                                } else {
                                    1.0
                                }
                            })
                            .collect();
                        moved = s.iter().fold(moved, |m, v| m.max(v.ln().abs()));
                        apply(&mut weights, p, &s)?;
                        for (t, v) in total[k].iter_mut().zip(&s) {
                            *t *= v;
                        }
                    }
                    if moved < 1e-4 {
                        break;
                    }
                }
                report.changed(
                    "cle",
                    format!("{} pairs, {sweeps} sweeps over all pairs", pairs.len()),
                );
            }
            Mode::SmoothQuant(alpha) => {
                let data = calib.expect("checked");
                let amax = channel_ranges(model, cx, data, &pairs)?;
                for (k, p) in pairs.iter().enumerate() {
                    let a = &amax[k];
                    let (_, r2) = ranges(&weights, p)?;
                    let al = if p.consumers.iter().all(|c| c.depthwise) && cfg.per_channel_weights {
                        1.0
                    } else {
                        alpha
                    };
                    let raw: Vec<f64> = a
                        .iter()
                        .zip(&r2)
                        .map(|(&ai, &wi)| {
                            if ai > 0.0 && wi > 0.0 {
                                ai.powf(al) / wi.powf(1.0 - al)
                            } else {
                                f64::NAN
                            }
                        })
                        .collect();
                    let top = a.iter().cloned().fold(0f64, f64::max);
                    let worst = a
                        .iter()
                        .zip(&raw)
                        .filter(|(_, r)| r.is_finite())
                        .map(|(ai, r)| ai / r)
                        .fold(0f64, f64::max);
                    if top <= 0.0 || worst <= 0.0 {
                        continue;
                    }
                    let c = worst / top;
                    let s: Vec<f64> = raw.iter().map(|r| clamp_scale(r * c)).collect();
                    let after = a.iter().zip(&s).map(|(ai, si)| ai / si).collect::<Vec<_>>();
                    act_ranges[k] = Some((spread(a), spread(&after)));
                    apply(&mut weights, p, &s)?;
                    total[k] = s;
                }
                report.changed(
                    "smoothquant",
                    format!(
                        "{} pairs, migration strength {alpha} (1 where every consumer is depthwise and weights are per channel); per-channel activation ranges from {} images",
                        pairs.len(),
                        data.len()
                    ),
                );
            }
        }

        // Write back: weights, then the Clips.
        let g = model.graph_mut();
        for (name, w) in &weights {
            set_initializer(g, name, &TensorData::F32(w.clone()));
        }
        let mut names = Namer::of(g);
        let mut after: HashMap<usize, NodeProto> = HashMap::new();
        for (k, p) in pairs.iter().enumerate() {
            let s = &total[k];
            let (lo, hi) = s
                .iter()
                .fold((f64::INFINITY, 0f64), |(a, b), v| (a.min(*v), b.max(*v)));
            let mut what = format!("{} channels, scales in [{lo:.3e}, {hi:.3e}]", p.channels);
            if p.adds > 0 || p.producers.len() > 1 || p.consumers.len() > 1 {
                what.push_str(&format!(
                    " (a stream of {} values through {} Adds: every producer's rows / s, every consumer's columns x s)",
                    p.values.len(),
                    p.adds
                ));
            }
            if let Some((before, now)) = act_ranges[k] {
                what.push_str(&format!(
                    "; activation channel ranges max/median {before:.1} -> {now:.1}"
                ));
            }
            if let Act::Clip { node, max } = p.act {
                let clip = &mut g.node[node];
                let x = clip.input[0].clone();
                let out = clip.output[0].clone();
                clip.op_type = Some("Relu".into());
                clip.input = vec![x];
                clip.attribute.clear();
                match cfg.across_clip {
                    AcrossClip::Min => {
                        let relu_out = names.fresh(&format!("{out}_relu"));
                        clip.output[0] = relu_out.clone();
                        let base = clip.name().to_string();
                        // [C, 1, .., 1] against an [N, C, spatial..] activation.
                        let x = &p.producers[0];
                        let rank = if nodes[x.node].op_type() == "Conv" {
                            weights[&x.w].ndim()
                        } else {
                            2
                        };
                        let mut shape = vec![p.channels];
                        shape.extend(std::iter::repeat_n(1, rank.saturating_sub(2)));
                        let bound = ArrayD::from_shape_vec(
                            IxDyn(&shape),
                            s.iter().map(|v| max / *v as f32).collect(),
                        )
                        .expect("C values");
                        let cname = names.fresh(&format!("{base}_max"));
                        set_initializer(g, &cname, &TensorData::F32(bound));
                        let min = NodeProto {
                            name: Some(names.fresh(&format!("{base}_min"))),
                            op_type: Some("Min".into()),
                            input: vec![relu_out, cname],
                            output: vec![out],
                            ..Default::default()
                        };
                        after.insert(node, min);
                        what.push_str(&format!(
                            "; Clip(0, {max}) '{base}' rewritten as Relu + Min with one bound per channel (exact)"
                        ));
                    }
                    AcrossClip::Relu => {
                        what.push_str(&format!(
                            "; Clip(0, {max}) '{}' replaced by Relu: CHANGES THE FUNCTION where an activation exceeded {max}",
                            clip.name()
                        ));
                    }
                    AcrossClip::No => unreachable!("pairs across a Clip were left out"),
                }
            }
            report.changed(&p.label, what);
        }
        if !after.is_empty() {
            let old = std::mem::take(&mut g.node);
            for (i, n) in old.into_iter().enumerate() {
                g.node.push(n);
                if let Some(m) = after.remove(&i) {
                    g.node.push(m);
                }
            }
        }
        Ok(report)
    }
}

/// max / median of channel ranges (0 excluded).
fn spread(a: &[f64]) -> f64 {
    let mut v: Vec<f64> = a.iter().copied().filter(|x| *x > 0.0).collect();
    if v.is_empty() {
        return 1.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() - 1] / v[v.len() / 2]
}

/// Per pair, max |x_c| over the calibration images of the value L2 reads (channel axis 1).
fn channel_ranges(
    model: &Model,
    cx: &Context,
    data: &crate::data::Dataset,
    pairs: &[Pair],
) -> Result<Vec<Vec<f64>>> {
    let input_shape = cx.input_shape_for(data);
    // Every value of every pair, and which pair it belongs to.
    let mut values: Vec<String> = Vec::new();
    let mut owner: Vec<usize> = Vec::new();
    for (k, p) in pairs.iter().enumerate() {
        for v in &p.values {
            values.push(v.clone());
            owner.push(k);
        }
    }
    let channels: Vec<usize> = owner.iter().map(|&k| pairs[k].channels).collect();
    let mut per_value: Vec<Vec<f64>> = channels.iter().map(|&c| vec![0.0; c]).collect();
    crate::engine::capture(
        model,
        &input_shape,
        &values,
        data.images.view(),
        cx.threads.max(1),
        4,
        || channels.iter().map(|&c| vec![0f64; c]).collect::<Vec<_>>(),
        |acc: &mut Vec<Vec<f64>>, _i, views| {
            for (a, v) in acc.iter_mut().zip(views) {
                if v.ndim() < 2 || v.shape()[1] != a.len() {
                    continue;
                }
                for (c, lane) in v.axis_iter(Axis(1)).enumerate() {
                    a[c] = match lane.as_slice() {
                        Some(xs) => max_abs(a[c], xs),
                        None => lane.iter().fold(a[c], |m, x| m.max(x.abs() as f64)),
                    };
                }
            }
        },
        |acc| {
            for (o, a) in per_value.iter_mut().zip(acc) {
                for (x, y) in o.iter_mut().zip(a) {
                    *x = x.max(y);
                }
            }
        },
    )
    .map_err(|e| Error::Usage(format!("equalize calibration: {e}")))?;
    let mut out: Vec<Vec<f64>> = pairs.iter().map(|p| vec![0.0; p.channels]).collect();
    for (v, &k) in per_value.iter().zip(&owner) {
        for (x, y) in out[k].iter_mut().zip(v) {
            *x = x.max(*y);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 8-way maximum is the plain one: the largest |x| wherever it sits
    /// (in the vector part or the tail), NaNs ignored, 0 for no element.
    #[test]
    fn slice_max_abs_by_hand() {
        assert_eq!(slice_max_abs(&[]), 0.0);
        assert_eq!(slice_max_abs(&[-3.0, 2.0, f32::NAN]), 3.0);
        // 17 elements: 16 in two runs of 8, one in the tail.
        let mut xs: Vec<f32> = (0..17).map(|i| i as f32 * 0.25).collect();
        assert_eq!(slice_max_abs(&xs), 4.0); // 16 * 0.25, the tail
        xs[16] = 0.0;
        xs[5] = -7.5;
        xs[9] = f32::NAN;
        assert_eq!(slice_max_abs(&xs), 7.5);
        assert_eq!(max_abs(8.0, &xs), 8.0);
        assert_eq!(max_abs(1.0, &xs), 7.5);
    }
}
