//! Weight quantization: every weighted layer's constant weight (Conv,
//! ConvTranspose, Gemm, MatMul input 1, a float32 initializer) is replaced by
//! float32 values exactly on a k-bit grid, and the grid is stated in the
//! tensor's `metadata_props` (the contract in `score/bits.rs`, which the score
//! verifies and packing relies on). Schemes, one file each:
//!
//! - `linear` and `minmax` ([`linear`]): seed 000's fixed point with a
//!   power-of-two step d = 2^-sf, sf = k - 1 - ceil(log2(v + 1e-12)), v the |w|
//!   at the overflow rank; and a uniform grid over [min, max] nudged to hold 0;
//!   both per tensor or, with `per_channel`, per output channel;
//! - `log` ([`log`]): signed powers of two, exponents on k - 1 bits;
//! - `tanh` ([`tanh`]): tanh(w) quantized uniformly, mapped back by artanh;
//! - `ternary` ([`ternary`]): rules twn, msu (seed 001), ec2t (seed 002).
//!
//! The math of each is in its file's header. Exact zeros (pruned weights) stay
//! exactly 0.0 under every scheme.
//!
//! Layer order: the weighted layers with a constant initializer weight, in the
//! graph's topological order, each weight tensor once (at its first use). A QBN
//! vector (seed 000's per-layer bit list) is indexed in this order and must have
//! exactly one entry per layer; 32 (or more) leaves that layer float. Per-layer
//! rules (glob on node or initializer name, later rules win) set bits, scheme or
//! skip after the QBN vector.
//!
//! Biases stay float unless `bias_bits` is set: then each quantized layer's bias
//! (Conv/ConvTranspose/Gemm input 2, a float32 initializer) gets `linear` at
//! that width, per tensor, with the same overflow rate.
//!
//! A tensor that already carries a verified claim of the same scheme, bits,
//! rule and granularity is left as is (re-quantizing is a no-op), so running a
//! recipe twice changes nothing.
//!
//! The report gives, per layer, its index in the layer order, the scheme, bits,
//! step or scale, the SQNR of the weight, 10 log10(sum w^2 / sum (w - Xq)^2) dB,
//! and the clipped fraction (values whose code left the grid's range).

pub mod linear;
pub mod log;
pub mod tanh;
pub mod ternary;

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use ndarray::{ArrayD, Axis, IxDyn};
use serde::{Deserialize, Serialize};

use super::prune::glob_match;
use super::{Context, Pass, PassReport};
use crate::error::{Error, Result};
use crate::graph::{set_initializer, Graph};
use crate::onnx::proto::{NodeProto, StringStringEntryProto, TensorProto};
use crate::onnx::{DataType, Model, TensorData};
use crate::score::bits::{
    verify_claim, META_AXIS, META_BITS, META_RULE, META_SCHEME, META_STEP, META_ZERO_POINT,
};

/// MSUNet-v3's threshold on the normalized weights (seed 001, --alpha).
pub const MSU_ALPHA: f64 = 0.67749;
/// Default entropy weight of ec2t.
pub const EC2T_LAMBDA: f64 = 0.1;

/// A ternary rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TernaryRule {
    Twn,
    Msu,
    Ec2t,
}

/// A weight quantization scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Linear,
    MinMax,
    Log,
    Tanh,
    Ternary(TernaryRule),
}

impl Scheme {
    pub const HELP: &'static str =
        "linear, minmax, log, tanh, or ternary:twn | ternary:msu | ternary:ec2t (twn, msu, ec2t for short)";

    /// The name written in `onnx_micronet.scheme`.
    pub fn claim_name(&self) -> &'static str {
        match self {
            Scheme::Linear => "linear",
            Scheme::MinMax => "minmax",
            Scheme::Log => "log",
            Scheme::Tanh => "tanh",
            Scheme::Ternary(_) => "ternary",
        }
    }

    fn rule(&self) -> Option<&'static str> {
        match self {
            Scheme::Ternary(TernaryRule::Twn) => Some("twn"),
            Scheme::Ternary(TernaryRule::Msu) => Some("msu"),
            Scheme::Ternary(TernaryRule::Ec2t) => Some("ec2t"),
            _ => None,
        }
    }

    /// The bit widths the scheme takes.
    pub fn bit_range(&self) -> std::ops::RangeInclusive<u32> {
        match self {
            Scheme::Linear => 2..=24,
            Scheme::MinMax | Scheme::Tanh | Scheme::Log => 2..=16,
            Scheme::Ternary(_) => 2..=2,
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rule() {
            Some(r) => write!(f, "ternary:{r}"),
            None => f.write_str(self.claim_name()),
        }
    }
}

impl FromStr for Scheme {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "linear" => Scheme::Linear,
            "minmax" | "min_max" | "min-max" => Scheme::MinMax,
            "log" => Scheme::Log,
            "tanh" => Scheme::Tanh,
            "ternary" | "ternary:twn" | "twn" => Scheme::Ternary(TernaryRule::Twn),
            "ternary:msu" | "msu" => Scheme::Ternary(TernaryRule::Msu),
            "ternary:ec2t" | "ec2t" => Scheme::Ternary(TernaryRule::Ec2t),
            _ => {
                return Err(Error::Usage(format!(
                    "unknown quantization scheme '{s}': expected {}",
                    Scheme::HELP
                )))
            }
        })
    }
}

/// Parses `--quantize SCHEME:BITS` (`linear:8`, `minmax:6`, `ternary:twn`, `msu`).
/// Ternary takes no bits (2); the others need them.
pub fn parse_spec(spec: &str) -> Result<(Scheme, u32)> {
    let s = spec.trim();
    if let Ok(t @ Scheme::Ternary(_)) = s.parse::<Scheme>() {
        return Ok((t, 2));
    }
    let bad = || {
        Error::Usage(format!(
            "--quantize '{spec}': expected SCHEME:BITS (linear:8, minmax:6, log:6, tanh:6) or ternary:twn|msu|ec2t"
        ))
    };
    let (name, bits) = s.rsplit_once(':').ok_or_else(bad)?;
    let scheme: Scheme = name.parse()?;
    let bits: u32 = bits.trim().parse().map_err(|_| bad())?;
    Ok((scheme, bits))
}

/// Parses `--qbn 9,8,8,...`.
pub fn parse_qbn(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(|x| {
            x.trim().parse::<u32>().map_err(|_| {
                Error::Usage(format!(
                    "--qbn: '{}' is not a bit width (a comma-separated list like 9,8,8,6)",
                    x.trim()
                ))
            })
        })
        .collect()
}

/// Parses `--layer-bits NAME=BITS,...` into rules (NAME is a glob).
pub fn parse_layer_bits(s: &str) -> Result<Vec<LayerSection>> {
    s.split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| {
            let (name, bits) = x.rsplit_once('=').ok_or_else(|| {
                Error::Usage(format!(
                    "--layer-bits '{x}': expected NAME=BITS (NAME a node or weight name, globs allowed)"
                ))
            })?;
            let bits: u32 = bits.trim().parse().map_err(|_| {
                Error::Usage(format!("--layer-bits '{x}': '{bits}' is not a bit width"))
            })?;
            Ok(LayerSection {
                pattern: name.trim().to_string(),
                bits: Some(bits),
                ..Default::default()
            })
        })
        .collect()
}

/// The `[quantize]` recipe section.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizeSection {
    /// linear | minmax | log | tanh | ternary (with `rule`), or twn | msu | ec2t.
    pub scheme: String,
    /// Bits per weight (not for ternary).
    pub bits: Option<u32>,
    /// Ternary rule: twn | msu | ec2t (default twn).
    pub rule: Option<String>,
    /// One grid per output channel (linear, minmax).
    pub per_channel: Option<bool>,
    /// Fraction of |w| allowed to clip (linear, log); default 0 as in seed 000.
    pub overflow_rate: Option<f64>,
    /// Quantize biases too, linear at this width.
    pub bias_bits: Option<u32>,
    /// Bits per layer in layer order (32 = leave float).
    pub qbn: Option<Vec<u32>>,
    /// Glob patterns (node or initializer names) left float.
    #[serde(default)]
    pub skip: Vec<String>,
    /// msu threshold on the normalized weights.
    pub msu_alpha: Option<f64>,
    /// ec2t entropy weight.
    pub ec2t_lambda: Option<f64>,
    #[serde(default, rename = "layer")]
    pub layers: Vec<LayerSection>,
}

/// A `[[quantize.layer]]` rule.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSection {
    #[serde(rename = "match")]
    pub pattern: String,
    pub bits: Option<u32>,
    pub scheme: Option<String>,
    pub skip: Option<bool>,
}

impl QuantizeSection {
    /// The `--quantize SCHEME:BITS` shorthand.
    pub fn from_flag(spec: &str) -> Result<QuantizeSection> {
        let (scheme, bits) = parse_spec(spec)?;
        Ok(QuantizeSection {
            scheme: scheme.claim_name().to_string(),
            rule: scheme.rule().map(str::to_string),
            bits: if matches!(scheme, Scheme::Ternary(_)) {
                None
            } else {
                Some(bits)
            },
            ..Default::default()
        })
    }

    /// Checks the section and makes the pass's configuration.
    pub fn config(&self) -> Result<QuantConfig> {
        let scheme = match (self.scheme.parse::<Scheme>()?, &self.rule) {
            (Scheme::Ternary(_), Some(r)) => {
                format!("ternary:{r}").parse::<Scheme>().map_err(|_| {
                    Error::Usage(format!("quantize rule '{r}': expected twn, msu or ec2t"))
                })?
            }
            (s, Some(r)) => {
                return Err(Error::Usage(format!(
                    "quantize rule '{r}' is for scheme 'ternary', not '{s}'"
                )))
            }
            (s, None) => s,
        };
        let bits = match (scheme, self.bits) {
            (Scheme::Ternary(_), None | Some(2)) => 2,
            (Scheme::Ternary(_), Some(b)) => {
                return Err(Error::Usage(format!(
                    "quantize bits {b}: ternary weights take 2 bits"
                )))
            }
            (_, Some(b)) => b,
            (s, None) => {
                return Err(Error::Usage(format!(
                    "quantize scheme '{s}' needs bits (e.g. {s}:8)"
                )))
            }
        };
        check_bits(scheme, bits, "quantize bits")?;
        let overflow_rate = self.overflow_rate.unwrap_or(0.0);
        if !(0.0..1.0).contains(&overflow_rate) {
            return Err(Error::Usage(format!(
                "quantize overflow rate {overflow_rate}: must be in [0, 1) (the fraction of values allowed to clip)"
            )));
        }
        if let Some(b) = self.bias_bits {
            check_bits(Scheme::Linear, b, "--bias-bits")?;
        }
        let per_channel = self.per_channel.unwrap_or(false);
        if per_channel && !matches!(scheme, Scheme::Linear | Scheme::MinMax) {
            return Err(Error::Usage(format!(
                "--per-channel is for linear and minmax, not {scheme}"
            )));
        }
        let mut rules = Vec::new();
        for l in &self.layers {
            let s = l
                .scheme
                .as_deref()
                .map(|s| {
                    s.parse::<Scheme>()
                        .map_err(|e| Error::Usage(format!("quantize layer '{}': {e}", l.pattern)))
                })
                .transpose()?;
            rules.push(LayerRule {
                pattern: l.pattern.clone(),
                bits: l.bits,
                scheme: s,
                skip: l.skip.unwrap_or(false),
            });
        }
        let msu_alpha = self.msu_alpha.unwrap_or(MSU_ALPHA);
        let ec2t_lambda = self.ec2t_lambda.unwrap_or(EC2T_LAMBDA);
        if !(msu_alpha >= 0.0
            && msu_alpha.is_finite()
            && ec2t_lambda >= 0.0
            && ec2t_lambda.is_finite())
        {
            return Err(Error::Usage(format!(
                "quantize msu_alpha {msu_alpha} / ec2t_lambda {ec2t_lambda}: must be finite and >= 0"
            )));
        }
        Ok(QuantConfig {
            scheme,
            bits,
            per_channel,
            overflow_rate,
            bias_bits: self.bias_bits,
            qbn: self.qbn.clone().unwrap_or_default(),
            rules,
            skip: self.skip.clone(),
            msu_alpha,
            ec2t_lambda,
        })
    }
}

fn check_bits(scheme: Scheme, bits: u32, what: &str) -> Result<()> {
    let r = scheme.bit_range();
    if !r.contains(&bits) {
        return Err(Error::Usage(format!(
            "{what} {bits}: {scheme} takes {} to {} bits",
            r.start(),
            r.end()
        )));
    }
    Ok(())
}

/// A per-layer rule: later rules win.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerRule {
    pub pattern: String,
    pub bits: Option<u32>,
    pub scheme: Option<Scheme>,
    pub skip: bool,
}

/// What to quantize and how.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantConfig {
    pub scheme: Scheme,
    pub bits: u32,
    pub per_channel: bool,
    pub overflow_rate: f64,
    pub bias_bits: Option<u32>,
    /// Bits per layer in layer order (empty: none).
    pub qbn: Vec<u32>,
    pub rules: Vec<LayerRule>,
    pub skip: Vec<String>,
    pub msu_alpha: f64,
    pub ec2t_lambda: f64,
}

impl Default for QuantConfig {
    fn default() -> Self {
        QuantConfig {
            scheme: Scheme::Linear,
            bits: 8,
            per_channel: false,
            overflow_rate: 0.0,
            bias_bits: None,
            qbn: Vec::new(),
            rules: Vec::new(),
            skip: Vec::new(),
            msu_alpha: MSU_ALPHA,
            ec2t_lambda: EC2T_LAMBDA,
        }
    }
}

/// One tensor quantized.
#[derive(Debug, Clone)]
pub struct Quantized {
    pub values: ArrayD<f32>,
    /// `metadata_props` to write (the claim).
    pub meta: Vec<(&'static str, String)>,
    /// Step, scale or levels, for the report.
    pub grid: String,
    pub clipped: usize,
}

fn fmt_f32(x: f32) -> String {
    format!("{x:?}")
}

fn fmt_step(d: f32) -> String {
    let e = d.log2();
    if e.fract() == 0.0 {
        format!("2^{} = {}", e as i32, fmt_f32(d))
    } else {
        fmt_f32(d)
    }
}

/// Quantizes one tensor. `axis`: the output-channel axis (per-channel grids and
/// msu's fan-in); `fan_in`: the inputs per output (msu).
pub fn quantize_tensor(
    w: &ArrayD<f32>,
    scheme: Scheme,
    bits: u32,
    cfg: &QuantConfig,
    axis: Option<usize>,
    fan_in: usize,
) -> Quantized {
    let flat: Vec<f32> = w.iter().copied().collect();
    let shape = w.shape().to_vec();
    let arr = |v: Vec<f32>| ArrayD::from_shape_vec(IxDyn(&shape), v).expect("same shape");
    let mut meta = vec![
        (META_SCHEME, scheme.claim_name().to_string()),
        (META_BITS, bits.to_string()),
    ];
    let per_channel = cfg.per_channel && matches!(scheme, Scheme::Linear | Scheme::MinMax);
    if let (true, Some(ax)) = (per_channel, axis) {
        let mut out = w.clone();
        let mut steps = Vec::new();
        let mut zps = Vec::new();
        let mut clipped = 0;
        for mut lane in out.axis_iter_mut(Axis(ax)) {
            let v: Vec<f32> = lane.iter().copied().collect();
            let q = match scheme {
                Scheme::Linear => {
                    let (q, d, _, c) = linear::linear(&v, bits, cfg.overflow_rate);
                    steps.push(d);
                    clipped += c;
                    q
                }
                _ => {
                    let (q, s, z, c) = linear::minmax(&v, bits);
                    steps.push(s);
                    zps.push(z);
                    clipped += c;
                    q
                }
            };
            for (dst, src) in lane.iter_mut().zip(q) {
                *dst = src;
            }
        }
        let list = |v: Vec<String>| v.join(",");
        meta.push((META_AXIS, ax.to_string()));
        meta.push((META_STEP, list(steps.iter().map(|s| fmt_f32(*s)).collect())));
        if scheme == Scheme::MinMax {
            meta.push((
                META_ZERO_POINT,
                list(zps.iter().map(|z| z.to_string()).collect()),
            ));
        }
        let (lo, hi) = steps
            .iter()
            .fold((f32::INFINITY, 0f32), |(a, b), s| (a.min(*s), b.max(*s)));
        return Quantized {
            values: out,
            meta,
            grid: format!(
                "per-channel (axis {ax}, {} channels), step {} .. {}",
                steps.len(),
                fmt_f32(lo),
                fmt_f32(hi)
            ),
            clipped,
        };
    }
    match scheme {
        Scheme::Linear => {
            let (q, d, sf, c) = linear::linear(&flat, bits, cfg.overflow_rate);
            meta.push((META_STEP, fmt_f32(d)));
            Quantized {
                values: arr(q),
                meta,
                grid: format!("step {} (sf {sf})", fmt_step(d)),
                clipped: c,
            }
        }
        Scheme::MinMax => {
            let (q, s, z, c) = linear::minmax(&flat, bits);
            meta.push((META_STEP, fmt_f32(s)));
            meta.push((META_ZERO_POINT, z.to_string()));
            Quantized {
                values: arr(q),
                meta,
                grid: format!("scale {}, zero point {z}", fmt_f32(s)),
                clipped: c,
            }
        }
        Scheme::Log => {
            let (q, emax, emin, c) = log::log(&flat, bits, cfg.overflow_rate);
            Quantized {
                values: arr(q),
                meta,
                grid: format!("+-2^{emin} .. +-2^{emax} and 0"),
                clipped: c,
            }
        }
        Scheme::Tanh => {
            let (q, c) = tanh::tanh(&flat, bits);
            Quantized {
                values: arr(q),
                meta,
                grid: format!("artanh of {} levels", (1u64 << bits) - 2),
                clipped: c,
            }
        }
        Scheme::Ternary(rule) => {
            let (q, grid) = match rule {
                TernaryRule::Twn => {
                    let (q, delta, alpha) = ternary::twn(&flat);
                    (q, format!("delta {delta:.6e}, alpha {alpha:.6e}"))
                }
                TernaryRule::Msu => {
                    let (q, m) = ternary::msu(&flat, fan_in, cfg.msu_alpha);
                    let mean_abs =
                        flat.iter().map(|x| x.abs() as f64).sum::<f64>() / flat.len().max(1) as f64;
                    (
                        q,
                        format!(
                            "threshold {} std, multiplier {m:.6e} ({:.2}x mean|w|)",
                            cfg.msu_alpha,
                            if mean_abs > 0.0 { m / mean_abs } else { 0.0 }
                        ),
                    )
                }
                TernaryRule::Ec2t => {
                    let (q, wn, wp, rounds) = ternary::ec2t(&flat, cfg.ec2t_lambda);
                    (
                        q,
                        format!(
                            "w_n {wn:.6e}, w_p {wp:.6e}, lambda {}, {rounds} rounds",
                            cfg.ec2t_lambda
                        ),
                    )
                }
            };
            meta.push((META_RULE, scheme.rule().unwrap_or("twn").to_string()));
            Quantized {
                values: arr(q),
                meta,
                grid,
                clipped: 0,
            }
        }
    }
}

/// SQNR in dB of `q` against `w` (infinite when exact).
pub fn sqnr_db(w: &ArrayD<f32>, q: &ArrayD<f32>) -> f64 {
    let (mut s, mut n) = (0f64, 0f64);
    for (a, b) in w.iter().zip(q.iter()) {
        s += (*a as f64).powi(2);
        n += (*a as f64 - *b as f64).powi(2);
    }
    if n == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (s / n).log10()
    }
}

/// Writes the values and the claim into the initializer (other metadata kept).
fn write_tensor(g: &mut crate::onnx::proto::GraphProto, name: &str, q: &Quantized) {
    set_initializer(g, name, &TensorData::F32(q.values.clone()));
    let t = g
        .initializer
        .iter_mut()
        .find(|t| t.name() == name)
        .expect("just set");
    let ours = [
        META_SCHEME,
        META_BITS,
        META_STEP,
        META_ZERO_POINT,
        META_AXIS,
        META_RULE,
    ];
    t.metadata_props.retain(|p| !ours.contains(&p.key()));
    for (k, v) in &q.meta {
        t.metadata_props.push(StringStringEntryProto {
            key: Some(k.to_string()),
            value: Some(v.clone()),
        });
    }
}

fn attr_i(n: &NodeProto, name: &str, default: i64) -> i64 {
    n.attribute
        .iter()
        .find(|a| a.name() == name)
        .map_or(default, |a| a.i())
}

/// The output-channel axis of a layer's weight, and its fan-in (inputs per output).
pub fn weight_axis(node: &NodeProto, shape: &[usize]) -> (Option<usize>, usize) {
    let rank = shape.len();
    let numel: usize = shape.iter().product();
    match node.op_type() {
        "Conv" if rank >= 1 => (Some(0), numel / shape[0].max(1)),
        "ConvTranspose" if rank >= 2 => (Some(1), numel / shape[0].max(1)),
        "Gemm" if rank == 2 => {
            if attr_i(node, "transB", 0) != 0 {
                (Some(0), shape[1])
            } else {
                (Some(1), shape[0])
            }
        }
        "MatMul" if rank >= 2 => (Some(rank - 1), shape[rank - 2]),
        "MatMul" if rank == 1 => (Some(0), shape[0]),
        _ => (None, numel.max(1)),
    }
}

/// The weighted layers in layer order: (weight initializer, consuming node indices).
/// Layers whose weight is not a constant float32 initializer are reported and left out.
pub fn layer_order(graph: &Graph, report: Option<&mut PassReport>) -> Vec<(String, Vec<usize>)> {
    let mut order: Vec<(String, Vec<usize>)> = Vec::new();
    let mut pos: HashMap<String, usize> = HashMap::new();
    let mut notes = Vec::new();
    for &idx in graph.topo_order() {
        let node = graph.node(idx);
        let standard = node.domain().is_empty() || node.domain() == "ai.onnx";
        if !crate::graph::WEIGHTED_OPS.contains(&node.op_type()) || !standard {
            continue;
        }
        let Some(w) = node.input.get(1).filter(|s| !s.is_empty()) else {
            continue;
        };
        let Some(t) = graph.initializer(w) else {
            let why = match graph.producer(w).map(|(p, _)| graph.node(p).op_type()) {
                Some("DequantizeLinear") => {
                    "weight comes through DequantizeLinear (already quantized)".to_string()
                }
                Some(op) => format!("weight '{w}' is computed by a {op} node, not an initializer"),
                None => format!("weight '{w}' is a graph input, not an initializer"),
            };
            notes.push((graph.node_name(idx).to_string(), why));
            continue;
        };
        if t.data_type() != DataType::Float as i32 {
            notes.push((
                graph.node_name(idx).to_string(),
                format!(
                    "weight '{w}' is {}, not float32",
                    crate::onnx::tensor::dtype_name(t.data_type())
                ),
            ));
            continue;
        }
        match pos.get(w.as_str()) {
            Some(&i) => order[i].1.push(idx),
            None => {
                pos.insert(w.clone(), order.len());
                order.push((w.clone(), vec![idx]));
            }
        }
    }
    if let Some(r) = report {
        for (t, why) in notes {
            r.skipped(t, why);
        }
    }
    order
}

/// The weight quantization pass.
pub struct Quantize(pub QuantConfig);

impl Pass for Quantize {
    fn name(&self) -> &'static str {
        "quantize"
    }

    fn run(&self, model: &mut Model, _cx: &Context) -> Result<PassReport> {
        let cfg = &self.0;
        let mut report = PassReport::new(self.name());
        // Plan every layer first (read-only), then write.
        struct Job {
            index: usize,
            init: String,
            node: String,
            scheme: Scheme,
            bits: u32,
            axis: Option<usize>,
            fan_in: usize,
            bias: Option<String>,
        }
        let mut jobs = Vec::new();
        let mut bias_users: HashMap<String, usize> = HashMap::new();
        {
            let g = model.graph();
            let view = Graph::new(g)?;
            let layers = layer_order(&view, Some(&mut report));
            if !cfg.qbn.is_empty() && cfg.qbn.len() != layers.len() {
                return Err(Error::Usage(format!(
                    "--qbn has {} entries but the model has {} weighted layers (Conv/ConvTranspose/Gemm/MatMul with a constant weight, in topological order: {})",
                    cfg.qbn.len(),
                    layers.len(),
                    layers
                        .iter()
                        .map(|(_, n)| view.node_name(n[0]))
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            for (_, nodes) in &layers {
                for &n in nodes {
                    let node = view.node(n);
                    if matches!(node.op_type(), "Conv" | "ConvTranspose" | "Gemm") {
                        if let Some(b) = node.input.get(2).filter(|s| !s.is_empty()) {
                            *bias_users.entry(b.clone()).or_default() += 1;
                        }
                    }
                }
            }
            for (index, (init, nodes)) in layers.iter().enumerate() {
                let node = view.node(nodes[0]);
                let node_name = view.node_name(nodes[0]).to_string();
                let names: Vec<&str> = nodes
                    .iter()
                    .map(|&n| view.node_name(n))
                    .chain(std::iter::once(init.as_str()))
                    .collect();
                let matches = |p: &str| names.iter().any(|n| glob_match(p, n));
                let mut scheme = cfg.scheme;
                let mut bits = cfg.qbn.get(index).copied().unwrap_or(cfg.bits);
                let mut skip = cfg
                    .skip
                    .iter()
                    .find(|p| matches(p))
                    .map(|p| format!("matches skip pattern '{p}'"));
                for r in cfg.rules.iter().filter(|r| matches(&r.pattern)) {
                    if let Some(b) = r.bits {
                        bits = b;
                    }
                    if let Some(s) = r.scheme {
                        scheme = s;
                    }
                    skip = r.skip.then(|| format!("rule '{}' says skip", r.pattern));
                }
                let tag = format!("[#{index}] {node_name}");
                if let Some(why) = skip {
                    report.skipped(tag, format!("weight '{init}' left float: {why}"));
                    continue;
                }
                if bits >= 32 {
                    report.skipped(tag, format!("weight '{init}' left float: {bits} bits"));
                    continue;
                }
                if let Scheme::Ternary(_) = scheme {
                    bits = 2;
                }
                check_bits(
                    scheme,
                    bits,
                    &format!("bits of layer #{index} '{node_name}'"),
                )?;
                if nodes.len() > 1 {
                    report.changed(
                        &tag,
                        format!(
                            "weight '{init}' is shared by {} layers; quantized once with this layer's settings",
                            nodes.len()
                        ),
                    );
                }
                let t = view
                    .initializer(init)
                    .expect("layer weights are initializers");
                let values = TensorData::from_proto(t)?.to_f32();
                let per_channel =
                    cfg.per_channel && matches!(scheme, Scheme::Linear | Scheme::MinMax);
                if let Some(c) = verify_claim(t, &values)? {
                    if c.scheme == scheme.claim_name()
                        && c.bits == bits
                        && c.rule.as_deref() == scheme.rule()
                        && c.axis.is_some() == per_channel
                    {
                        report.skipped(
                            tag,
                            format!("weight '{init}' is already {scheme} {bits}-bit (claim verified): left as is"),
                        );
                        continue;
                    }
                }
                let (axis, fan_in) = weight_axis(
                    node,
                    t.dims
                        .iter()
                        .map(|&d| d as usize)
                        .collect::<Vec<_>>()
                        .as_slice(),
                );
                let bias = node
                    .input
                    .get(2)
                    .filter(|s| {
                        !s.is_empty() && matches!(node.op_type(), "Conv" | "ConvTranspose" | "Gemm")
                    })
                    .cloned();
                jobs.push(Job {
                    index,
                    init: init.clone(),
                    node: node_name,
                    scheme,
                    bits,
                    axis,
                    fan_in,
                    bias,
                });
            }
        }

        let g = model.graph_mut();
        for job in &jobs {
            let t = g
                .initializer
                .iter()
                .find(|t| t.name() == job.init)
                .expect("planned");
            let w = TensorData::from_proto(t)?.to_f32();
            let q = quantize_tensor(&w, job.scheme, job.bits, cfg, job.axis, job.fan_in);
            let sqnr = sqnr_db(&w, &q.values);
            let zeros_before = w.iter().filter(|v| **v == 0.0).count();
            let zeros_after = q.values.iter().filter(|v| **v == 0.0).count();
            write_tensor(g, &job.init, &q);
            report.changed(
                format!("[#{}] {}", job.index, job.node),
                format!(
                    "{} {}-bit, {}, SQNR {} dB, clipped {:.2}%, zeros {} -> {} of {} (weight '{}')",
                    job.scheme,
                    job.bits,
                    q.grid,
                    if sqnr.is_finite() {
                        format!("{sqnr:.1}")
                    } else {
                        "inf".into()
                    },
                    100.0 * q.clipped as f64 / w.len().max(1) as f64,
                    zeros_before,
                    zeros_after,
                    w.len(),
                    job.init
                ),
            );
            if let (Some(bb), Some(b)) = (cfg.bias_bits, &job.bias) {
                let Some(bt) = g.initializer.iter().find(|t| t.name() == b.as_str()) else {
                    report.skipped(b, "bias left float: not an initializer");
                    continue;
                };
                if bt.data_type() != DataType::Float as i32 {
                    report.skipped(b, "bias left float: not float32");
                    continue;
                }
                if bias_users.get(b).copied().unwrap_or(0) > 1 {
                    report.skipped(b, "bias left float: shared by several layers");
                    continue;
                }
                let bv = TensorData::from_proto(bt)?.to_f32();
                if let Some(c) = verify_claim(bt, &bv)? {
                    if c.scheme == "linear" && c.bits == bb && c.axis.is_none() {
                        report.skipped(b, format!("bias already linear {bb}-bit: left as is"));
                        continue;
                    }
                }
                let bcfg = QuantConfig {
                    per_channel: false,
                    ..cfg.clone()
                };
                let bq = quantize_tensor(&bv, Scheme::Linear, bb, &bcfg, None, 1);
                let s = sqnr_db(&bv, &bq.values);
                write_tensor(g, b, &bq);
                report.changed(
                    b,
                    format!(
                        "bias linear {bb}-bit, {}, SQNR {} dB, clipped {:.2}%",
                        bq.grid,
                        if s.is_finite() {
                            format!("{s:.1}")
                        } else {
                            "inf".into()
                        },
                        100.0 * bq.clipped as f64 / bv.len().max(1) as f64
                    ),
                );
            }
        }
        Ok(report)
    }
}

/// Reads a tensor's claim keys (for tests and reports).
pub fn claim_keys(t: &TensorProto) -> Vec<(String, String)> {
    t.metadata_props
        .iter()
        .filter(|p| p.key().starts_with("onnx_micronet."))
        .map(|p| (p.key().to_string(), p.value().to_string()))
        .collect()
}
