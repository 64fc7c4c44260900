//! Weight quantization: every weighted layer's constant weight (Conv,
//! ConvTranspose, Gemm, MatMul input 1, a float32 initializer) is replaced by
//! float32 values exactly on a k-bit grid, and the grid is stated in the
//! tensor's `metadata_props` (the contract in `repr::claim`, which the score
//! verifies and packing relies on). The schemes live in `repr::scheme`, one file
//! each, quantizer and verifier together:
//!
//! - `linear` and `minmax` ([`linear`]): seed 000's fixed point with a
//!   power-of-two step d = 2^-sf, sf = k - 1 - ceil(log2(v + 1e-12)), v the |w|
//!   at the overflow rank; and a uniform grid over [min, max] nudged to hold 0;
//!   both per tensor or, with `per_channel`, per output channel;
//! - `log` ([`log`]): signed powers of two, exponents on k - 1 bits;
//! - `tanh` ([`tanh`]): tanh(w) quantized uniformly, mapped back by artanh;
//! - `ternary` ([`ternary`]): rules twn, msu (seed 001), ec2t (seed 002);
//! - `fp16` ([`fp16`]): IEEE half precision, 16 bits (seeds 001 and 002 keep
//!   their non-ternary layers in FP16).
//!
//! This pass chooses the layers and their settings; the math of each scheme is in
//! its file's header. Exact zeros (pruned weights) stay exactly 0.0 under every
//! scheme.
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

pub use crate::repr::scheme::{fp16, linear, log, tanh, ternary, Quantized, Scheme, TernaryRule};

use std::collections::HashMap;
use std::fmt;

use ndarray::ArrayD;
use serde::{Deserialize, Serialize};

use super::calib;
use super::select::{self, LayerRule as _};
use super::{Context, Pass, PassReport};
use crate::error::{Error, Result};
use crate::graph::layers::{bias_input, weight_axis};
use crate::graph::{set_initializer, weighted_layers, Graph};
use crate::onnx::{DataType, Model, TensorData};
use crate::repr::claim;
use crate::repr::scheme::{self, Params};

/// MSUNet-v3's threshold on the normalized weights (seed 001, --alpha).
pub const MSU_ALPHA: f64 = 0.67749;
/// Default entropy weight of ec2t.
pub const EC2T_LAMBDA: f64 = 0.1;

/// Parses `--quantize SCHEME:BITS` (`linear:8`, `minmax:6`, `ternary:twn`, `msu`,
/// `fp16`). Schemes with a fixed width (ternary 2, fp16 16) take no bits; the
/// others need them.
pub fn parse_spec(spec: &str) -> Result<(Scheme, u32)> {
    let s = spec.trim();
    if let Ok(sc) = s.parse::<Scheme>() {
        if let Some(b) = sc.imp().fixed_bits() {
            return Ok((sc, b));
        }
    }
    let bad = || {
        Error::Usage(format!(
            "--quantize '{spec}': expected SCHEME:BITS (linear:8, minmax:6, log:6, tanh:6), fp16, or ternary:twn|msu|ec2t"
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

/// Parses `--layer-bits NAME=BITS,...` into rules (NAME is a glob). The value may
/// also name a scheme, `NAME=SCHEME[:BITS]` (`fc=fp16`, `fc=minmax:8`).
pub fn parse_layer_bits(s: &str) -> Result<Vec<LayerSection>> {
    s.split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| {
            let (name, value) = x.split_once('=').ok_or_else(|| {
                Error::Usage(format!(
                    "--layer-bits '{x}': expected NAME=BITS (NAME a node or weight name, globs allowed)"
                ))
            })?;
            let pattern = name.trim().to_string();
            if let Ok(bits) = value.trim().parse::<u32>() {
                return Ok(LayerSection {
                    pattern,
                    bits: Some(bits),
                    ..Default::default()
                });
            }
            let (scheme, bits) = parse_spec(value).map_err(|_| {
                Error::Usage(format!(
                    "--layer-bits '{x}': '{value}' is neither a bit width nor SCHEME[:BITS] ({})",
                    Scheme::help()
                ))
            })?;
            Ok(LayerSection {
                pattern,
                bits: Some(bits),
                scheme: Some(scheme.to_string()),
                ..Default::default()
            })
        })
        .collect()
}

/// The `[quantize]` recipe section.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizeSection {
    /// linear | minmax | log | tanh | fp16 | ternary (with `rule`), or twn | msu | ec2t.
    pub scheme: String,
    /// Bits per weight (not for ternary and fp16, whose width is fixed).
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
    /// How values reach the grid: "nearest" (round to nearest) or "gptq" (GPTQ,
    /// with calibration data; default when --calib is given).
    pub rounding: Option<String>,
    /// GPTQ's dampening: "auto" (the default: each layer's by cross-validation,
    /// [`calib::obs::Damp`]) or a fraction of the mean diagonal of H (0.01).
    pub damp: Option<calib::obs::Damp>,
    /// How affine grids (linear, minmax) are chosen: minmax (span the range,
    /// default) or mse (shrunk to minimize the error, as GPTQ's reference does).
    pub range: Option<String>,
    /// Where GPTQ's layer inputs come from: parallel (the float model),
    /// sequential[:K] (the model quantized up to the layer, in K groups) or
    /// asymmetric[:K] (as sequential, each group's first layer fit to the float
    /// model's output: `calib::paired`).
    pub calib_mode: Option<String>,
    /// GPTQ visits the inputs by decreasing diag(H) (default false: the weight's
    /// own column order).
    pub act_order: Option<bool>,
    /// Sequential and asymmetric GPTQ capture each stage on the model with the
    /// activation quantizers of `[act_quant]` in place (default true when both
    /// are asked): the layers are fit on the inputs the deployed model feeds them.
    pub act_aware: Option<bool>,
    /// Per-layer bits chosen by output error under this parameter-weighted mean
    /// width ([`allocate_bits`]; needs calibration).
    pub avg_bits: Option<f64>,
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
    /// nearest | gptq for the matching layers.
    pub rounding: Option<String>,
}

impl QuantizeSection {
    /// The `--quantize SCHEME:BITS` shorthand.
    pub fn from_flag(spec: &str) -> Result<QuantizeSection> {
        let (scheme, bits) = parse_spec(spec)?;
        Ok(QuantizeSection {
            scheme: scheme.claim_name().to_string(),
            rule: scheme.rule().map(str::to_string),
            bits: if scheme.imp().fixed_bits().is_some() {
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
        let bits = match (scheme.imp().fixed_bits(), self.bits) {
            (Some(f), None) => f,
            (Some(f), Some(b)) if b == f => f,
            (Some(f), Some(b)) => {
                return Err(Error::Usage(format!(
                    "quantize bits {b}: {} weights take {f} bits",
                    scheme.claim_name()
                )))
            }
            (None, Some(b)) => b,
            (None, None) => {
                return Err(Error::Usage(format!(
                    "quantize scheme '{scheme}' needs bits (e.g. {scheme}:8)"
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
        if per_channel && !scheme.imp().per_channel() {
            let with: Vec<&str> = Scheme::ALL
                .iter()
                .filter(|s| s.imp().per_channel())
                .map(|s| s.claim_name())
                .collect();
            return Err(Error::Usage(format!(
                "--per-channel is for {}, not {scheme}",
                with.join(" and ")
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
                rounding: l.rounding.as_deref().map(str::parse).transpose()?,
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
        let damp = self.damp.unwrap_or_default();
        if let calib::obs::Damp::Fixed(f) = damp {
            if !(f > 0.0 && f.is_finite()) {
                return Err(Error::Usage(format!(
                "quantize damp {damp}: must be positive (a fraction of the mean diagonal of H, e.g. 0.01)"
            )));
            }
        }
        if let Some(b) = self.avg_bits {
            let lo = *ALLOCATION_BITS.first().expect("candidates");
            if !(b.is_finite() && b >= lo as f64) {
                return Err(Error::Usage(format!(
                    "quantize avg_bits {b}: expected a mean width of at least {lo} bits"
                )));
            }
            if scheme.imp().fixed_bits().is_some() || !scheme.bit_range().contains(&lo) {
                return Err(Error::Usage(format!(
                    "quantize avg_bits: scheme {scheme} has no {lo}..8-bit widths to choose from (use linear or minmax)"
                )));
            }
            if self.qbn.is_some() {
                return Err(Error::Usage(
                    "quantize avg_bits and qbn both set: qbn fixes every layer's bits, avg_bits chooses them; keep one".into(),
                ));
            }
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
            rounding: self.rounding.as_deref().map(str::parse).transpose()?,
            damp,
            act_order: self.act_order.unwrap_or(false),
            act_aware: self.act_aware.unwrap_or(true),
            act_sim: None,
            avg_bits: self.avg_bits,
            calib_mode: match &self.calib_mode {
                Some(m) => m.parse()?,
                None => calib::CalibMode::Parallel,
            },
            mse_grid: match self.range.as_deref() {
                None | Some("minmax") | Some("range") => false,
                Some("mse") => true,
                Some(r) => {
                    return Err(Error::Usage(format!(
                        "quantize range '{r}': expected minmax (the grid spans the weights' range) or mse (the range shrunk to minimize sum |q(w) - w|^2.4)"
                    )))
                }
            },
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

/// How values reach their grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounding {
    /// Each value to its nearest grid point.
    Nearest,
    /// GPTQ: column by column, the rounding error moved onto the columns not yet
    /// rounded by the inverse Hessian of the layer's calibration inputs.
    Gptq,
}

impl std::str::FromStr for Rounding {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "nearest" | "rtn" => Ok(Rounding::Nearest),
            "gptq" => Ok(Rounding::Gptq),
            _ => Err(Error::Usage(format!(
                "rounding '{s}': expected nearest or gptq"
            ))),
        }
    }
}

impl fmt::Display for Rounding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rounding::Nearest => "nearest",
            Rounding::Gptq => "gptq",
        })
    }
}

/// A per-layer rule: later rules win.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerRule {
    pub pattern: String,
    pub bits: Option<u32>,
    pub scheme: Option<Scheme>,
    pub skip: bool,
    pub rounding: Option<Rounding>,
}

impl select::LayerRule for LayerRule {
    fn pattern(&self) -> &str {
        &self.pattern
    }
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
    /// None: GPTQ when calibration data is given, else nearest.
    pub rounding: Option<Rounding>,
    pub damp: calib::obs::Damp,
    pub act_order: bool,
    /// Capture sequential/asymmetric stages with activation quantization simulated
    /// (recipe `act_aware`).
    pub act_aware: bool,
    /// The activation quantization simulated in those captures: the pipeline sets
    /// it from `[act_quant]` when `act_aware`.
    pub act_sim: Option<crate::passes::act_quant::ActQuantConfig>,
    /// Allocate per-layer bits under this mean width ([`allocate_bits`]).
    pub avg_bits: Option<f64>,
    pub calib_mode: calib::CalibMode,
    /// Affine grids chosen by their error (`range = "mse"`), not by the range.
    pub mse_grid: bool,
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
            rounding: None,
            damp: calib::obs::Damp::default(),
            act_order: false,
            act_aware: true,
            act_sim: None,
            avg_bits: None,
            calib_mode: calib::CalibMode::Parallel,
            mse_grid: false,
        }
    }
}

impl QuantConfig {
    /// The knobs the quantizers read.
    pub fn params(&self) -> Params {
        Params {
            overflow_rate: self.overflow_rate,
            msu_alpha: self.msu_alpha,
            ec2t_lambda: self.ec2t_lambda,
            mse_grid: self.mse_grid,
        }
    }
}

/// Quantizes one tensor on `scheme` at `bits` (see [`scheme::quantize`]). `axis`:
/// the output-channel axis (per-channel grids and msu's fan-in); `fan_in`: the
/// inputs per output (msu).
pub fn quantize_tensor(
    w: &ArrayD<f32>,
    scheme: Scheme,
    bits: u32,
    cfg: &QuantConfig,
    axis: Option<usize>,
    fan_in: usize,
) -> Quantized {
    scheme::quantize(
        w,
        scheme,
        bits,
        &cfg.params(),
        cfg.per_channel,
        axis,
        fan_in,
    )
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
    claim::write(t, &q.meta);
}

/// The weighted layers in layer order: (weight initializer, consuming node indices),
/// the layers whose weight is a float32 initializer. The others are reported
/// (once per node, in topological order) and left out.
pub fn layer_order(graph: &Graph, report: Option<&mut PassReport>) -> Vec<(String, Vec<usize>)> {
    let mut order = Vec::new();
    let mut notes: HashMap<usize, String> = HashMap::new();
    for l in weighted_layers(graph) {
        match l.not_float_initializer(graph) {
            Some(why) => {
                for &n in &l.nodes {
                    notes.insert(n, why.clone());
                }
            }
            None => order.push((l.weight, l.nodes)),
        }
    }
    if let Some(r) = report {
        for &i in graph.topo_order() {
            if let Some(why) = notes.remove(&i) {
                r.skipped(graph.node_name(i), why);
            }
        }
    }
    order
}

/// The weight quantization pass.
pub struct Quantize(pub QuantConfig);

/// One layer the pass quantizes, as planned before any write.
struct Job {
    index: usize,
    init: String,
    node: String,
    scheme: Scheme,
    bits: u32,
    axis: Option<usize>,
    fan_in: usize,
    bias: Option<String>,
    nodes: Vec<usize>,
    /// Other readers of the weight (it is quantized as a private copy), in words.
    weight_shared: Option<String>,
    /// Other readers of the bias, or why it stays float.
    bias_shared: Option<String>,
    bias_fixed: Option<String>,
    rounding: Rounding,
    /// Bits fixed by a layer rule or qbn (not chosen by the allocation).
    pinned: bool,
    /// The weight's rows and input geometry for calibration, or why none.
    layout: std::result::Result<(calib::Rows, Vec<calib::Geom>), String>,
    /// The weight's rank (a Conv's input rank).
    rank: usize,
}

impl Pass for Quantize {
    fn name(&self) -> &'static str {
        "quantize"
    }

    fn run(&self, model: &mut Model, cx: &Context) -> Result<PassReport> {
        let cfg = &self.0;
        let mut report = PassReport::new(self.name());
        let calibrating = cx.calib.is_some_and(|d| !d.is_empty());
        if cfg.rounding == Some(Rounding::Gptq) && !calibrating {
            return Err(Error::Usage(GPTQ_NEEDS_CALIB.into()));
        }
        // Plan every layer first (read-only), then write.
        let mut jobs = Vec::new();
        {
            let view = Graph::of(model)?;
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
            // Readers of `value` other than `nodes` reading it at input `slot`, in words.
            let others = |value: &str, nodes: &[usize], slot: usize| -> Option<String> {
                let mut other: Vec<usize> = view
                    .consumers(value)
                    .iter()
                    .copied()
                    .filter(|c| {
                        !nodes.contains(c)
                            || view.reads_in_subgraph(*c, value)
                            || view
                                .node(*c)
                                .input
                                .iter()
                                .enumerate()
                                .any(|(k, v)| v == value && k != slot)
                    })
                    .collect();
                other.dedup();
                let mut parts: Vec<String> = other
                    .iter()
                    .map(|&c| format!("'{}' ({})", view.node_name(c), view.node(c).op_type()))
                    .collect();
                if view.is_output(value) {
                    parts.push("the graph output".into());
                }
                (!parts.is_empty()).then(|| parts.join(", "))
            };
            for (index, (init, nodes)) in layers.iter().enumerate() {
                let node = view.node(nodes[0]);
                let node_name = view.node_name(nodes[0]).to_string();
                let names: Vec<&str> = nodes
                    .iter()
                    .map(|&n| view.node_name(n))
                    .chain(std::iter::once(init.as_str()))
                    .chain(select::origin(&view, init))
                    .collect();
                let mut scheme = cfg.scheme;
                let mut rounding = cfg.rounding.unwrap_or(if calibrating {
                    Rounding::Gptq
                } else {
                    Rounding::Nearest
                });
                let mut bits = cfg.qbn.get(index).copied().unwrap_or(cfg.bits);
                let mut pinned = !cfg.qbn.is_empty();
                let mut skip = select::first_match(&cfg.skip, &names)
                    .map(|p| format!("matches skip pattern '{p}'"));
                for r in select::matching(&cfg.rules, &names) {
                    if let Some(b) = r.bits {
                        bits = b;
                        pinned = true;
                    }
                    if let Some(x) = r.rounding {
                        rounding = x;
                    }
                    match r.scheme {
                        Some(s) => scheme = s,
                        // A layer width of 16 without a scheme of its own: float16.
                        None if r.bits == Some(16) => scheme = Scheme::Fp16,
                        None => {}
                    }
                    skip = r.skip.then(|| format!("rule '{}' says skip", r.pattern()));
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
                if let Some(b) = scheme.imp().fixed_bits() {
                    bits = b;
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
                let values = TensorData::from_proto(t)?.into_f32();
                let per_channel = cfg.per_channel && scheme.imp().per_channel();
                if let Some(c) = claim::verify(t, &values)? {
                    if c.scheme.claim_name() == scheme.claim_name()
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
                )?;
                let bias = bias_input(node).map(str::to_string);
                let weight_shared = others(init, nodes, 1);
                let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
                let layout = if calibrating && rounding == Rounding::Gptq {
                    calib::layout(&view, nodes, &shape)
                } else {
                    Err(String::new())
                };
                if rounding == Rounding::Gptq && !calibrating {
                    rounding = Rounding::Nearest;
                }
                let bias_shared = bias.as_deref().and_then(|b| others(b, nodes, 2));
                let bias_fixed = bias.as_deref().and_then(|b| view.not_fixed(b));
                jobs.push(Job {
                    index,
                    init: init.clone(),
                    node: node_name,
                    scheme,
                    bits,
                    axis,
                    fan_in,
                    bias,
                    nodes: nodes.clone(),
                    weight_shared,
                    bias_shared,
                    bias_fixed,
                    rounding,
                    pinned,
                    layout,
                    rank: shape.len(),
                });
            }
        }

        // Calibration for GPTQ: in parallel, one capture of every layer's inputs
        // on the model as it is; sequentially, the layers in `stages` groups of
        // consecutive layers, each captured on the model whose earlier layers are
        // already quantized (GPTQ's practice: errors do not compound unseen).
        let calibratable: Vec<usize> = (0..jobs.len())
            .filter(|&i| jobs[i].layout.is_ok())
            .collect();
        let stages: Vec<Vec<usize>> = match cfg.calib_mode {
            _ if !calibrating || calibratable.is_empty() => vec![],
            calib::CalibMode::Parallel => vec![calibratable.clone()],
            calib::CalibMode::Sequential(k) | calib::CalibMode::Asymmetric(k) => {
                let k = k.clamp(1, calibratable.len());
                let per = calibratable.len().div_ceil(k);
                calibratable.chunks(per).map(<[usize]>::to_vec).collect()
            }
        };
        let mut no_calib: HashMap<usize, String> = HashMap::new();
        for (i, j) in jobs.iter().enumerate() {
            if let Err(e) = &j.layout {
                if !e.is_empty() {
                    no_calib.insert(i, e.clone());
                }
            }
        }
        // Asymmetric calibration fits each layer to the output of the float model:
        // the model before the first lossy pass (so an earlier pruning's error is
        // compensated too: its weights are the targets' w_ref), else as the pass
        // received it.
        let original = (!stages.is_empty()
            && matches!(cfg.calib_mode, calib::CalibMode::Asymmetric(_)))
        .then(|| match cx.reference {
            // Borrowed: no model-sized copy when the pipeline holds one already.
            Some(r) => std::borrow::Cow::Borrowed(r),
            None => std::borrow::Cow::Owned(model.clone()),
        });
        let paired = original.is_some();
        let mut done = vec![false; jobs.len()];
        let mut capture_secs = 0.0;
        let mut captured = 0usize;
        // One layer in two steps: `compute` reads the model and quantizes (pure, so
        // layers without calibration run on every core), `apply` writes the result
        // and the report lines in layer order (deterministic output).
        let compute = |ji: usize,
                       first: bool,
                       bits: u32,
                       cal: Option<&calib::Calibrated>,
                       no_calib: Option<&String>,
                       cached: Option<&LayerResult>,
                       model: &Model|
         -> Result<Computed> {
            let job = &jobs[ji];
            let g = model.graph();
            let t = g
                .initializer
                .iter()
                .find(|t| t.name() == job.init)
                .expect("planned");
            let w = TensorData::from_proto(t)?.into_f32();
            // Asymmetric: the float model's weight the stage's first layer is fit to.
            let reference = match (&original, first) {
                (Some(o), true) => calib::paired::reference_weight(o, &job.init, w.len()),
                _ => None,
            };
            let mut q = quantize_tensor(&w, job.scheme, bits, cfg, job.axis, job.fan_in);
            // GPTQ, the output errors and the bias shift, where calibrated.
            let mut calib_note = String::new();
            let mut error = None;
            match (cal, &job.layout) {
                (Some(cal), Ok((rows, _))) => {
                    // The allocation's table computed this very rounding already.
                    let result = match cached {
                        Some(r) => r.clone(),
                        None => calibrated_layer(
                            cfg,
                            job.scheme,
                            bits,
                            job.axis,
                            job.fan_in,
                            &w,
                            &q,
                            cal,
                            rows,
                            job.rounding,
                            match paired {
                                false => Inputs::Own,
                                true if first => Inputs::FitOriginal,
                                true => Inputs::Original,
                            },
                            reference.as_deref(),
                        ),
                    };
                    match result {
                        Ok(done) => {
                            error = Some(crate::passes::LayerError {
                                layer: job.node.clone(),
                                method: done.method.clone(),
                                nearest: done.nearest,
                                after: done.after,
                            });
                            // Asymmetric calibration measures against the float
                            // model's output: the error carried in by its inputs too.
                            let what = if done.method.contains("asymmetric") {
                                "error against the float model's output"
                            } else {
                                "output error"
                            };
                            calib_note = format!(
                                ", {}: {what} {:.3}% (nearest {:.3}%)",
                                done.method,
                                100.0 * done.after,
                                100.0 * done.nearest
                            );
                            q.values = done.values;
                        }
                        Err(why) => calib_note = format!(", nearest rounding: {why}"),
                    }
                }
                _ if job.rounding == Rounding::Gptq => {
                    let why = no_calib.cloned().unwrap_or_default();
                    calib_note = format!(", nearest rounding: no calibration ({why})");
                }
                _ => {}
            }
            let zeros_before = w.iter().filter(|v| **v == 0.0).count();
            let zeros_after = q.values.iter().filter(|v| **v == 0.0).count();
            let line = format!(
                "{} {}-bit, {}, zeros {} -> {} of {} (weight '{}'){calib_note}",
                job.scheme,
                bits,
                grid_line(&w, &q),
                zeros_before,
                zeros_after,
                w.len(),
                job.init
            );
            // The bias (another tensor than any layer's weight; a bias shared with
            // other readers gets a private copy, so the original stays as read here).
            let bias = match (cfg.bias_bits, &job.bias) {
                (Some(bb), Some(b)) => Some((b.clone(), compute_bias(g, job, b, bb, cfg)?)),
                _ => None,
            };
            Ok(Computed {
                q,
                error,
                line,
                bias,
            })
        };
        let apply = |ji: usize, c: Computed, model: &mut Model, report: &mut PassReport| {
            let job = &jobs[ji];
            let g = model.graph_mut();
            let mut names = crate::graph::Namer::of(g);
            if let Some(e) = c.error {
                report.errors.push(e);
            }
            // A weight other nodes also read is never changed under them: this layer
            // gets a private copy.
            let target = match &job.weight_shared {
                Some(readers) => {
                    let copy = names.fresh(&format!("{}_q", job.init));
                    for &n in &job.nodes {
                        g.node[n].input[1] = copy.clone();
                    }
                    report.changed(
                        format!("[#{}] {}", job.index, job.node),
                        format!(
                            "weight '{}' is also read by {readers}: quantized as a private copy '{copy}'",
                            job.init
                        ),
                    );
                    copy
                }
                None => job.init.clone(),
            };
            write_tensor(g, &target, &c.q);
            if job.weight_shared.is_some() {
                // A later run's layer rules naming the shared weight find the copy.
                select::mark_copy(g, &target, &job.init);
            }
            report.changed(format!("[#{}] {}", job.index, job.node), c.line);
            match c.bias {
                None => {}
                Some((b, Err(why))) => report.skipped(b, why),
                Some((b, Ok((bq, line)))) => {
                    let (target, copied) = match &job.bias_shared {
                        Some(readers) => {
                            let copy = names.fresh(&format!("{b}_q"));
                            for &n in &job.nodes {
                                g.node[n].input[2] = copy.clone();
                            }
                            (
                                copy.clone(),
                                format!(" (also read by {readers}: a private copy '{copy}')"),
                            )
                        }
                        None => (b.clone(), String::new()),
                    };
                    write_tensor(g, &target, &bq);
                    report.changed(
                        &b,
                        format!(
                            "bias linear {}-bit{copied}, {line}",
                            cfg.bias_bits
                                .expect("a bias is quantized only with bias_bits")
                        ),
                    );
                }
            }
        };
        if cfg.avg_bits.is_some()
            && !(calibrating && matches!(cfg.calib_mode, calib::CalibMode::Parallel))
        {
            return Err(Error::Usage(
                "quantize avg_bits chooses each layer's bits from its output errors on the calibration images: it needs --calib and parallel calibration".into(),
            ));
        }
        let mut chosen: Vec<u32> = jobs.iter().map(|j| j.bits).collect();
        let solving = stages.iter().map(Vec::len).sum::<usize>();
        let mut solved = 0;
        if solving > 0 {
            crate::passes::solve_progress("weight rounding (GPTQ)", 0, solving);
        }
        // An allocation's budget-free work, from an earlier build of the same
        // search (one stage: allocations need parallel calibration).
        let memo_key = match (cfg.avg_bits, cx.memo) {
            (Some(_), Some(_)) if stages.len() == 1 => Some(memo_key(model, cx, cfg)),
            _ => None,
        };
        let hit = memo_key
            .as_ref()
            .and_then(|k| cx.memo.and_then(|m| m.get(k)));
        // Auto dampening cross-validates on two halves of the images (GPTQ only).
        let folds = cfg.damp == calib::obs::Damp::Auto && cfg.rounding != Some(Rounding::Nearest);
        // Sequential and asymmetric stages are captured with the activation
        // quantizers of the act-quant pass in place (ranges measured once, here,
        // on the model as this pass receives it), so each layer is fit on the
        // inputs the deployed model gives it.
        let sim = match &cfg.act_sim {
            Some(ac) if cfg.calib_mode != calib::CalibMode::Parallel && !stages.is_empty() => {
                crate::passes::act_quant::Simulation::calibrate(ac, model, cx)?
                    .filter(|s| !s.is_empty())
            }
            _ => None,
        };
        for stage in &stages {
            let wanted: Vec<(usize, Vec<calib::Geom>)> = stage
                .iter()
                .map(|&i| (i, jobs[i].layout.as_ref().expect("calibratable").1.clone()))
                .collect();
            // The stage's model: as quantized so far, with the simulated activation
            // quantizers, whose outputs its layers then read.
            let simulated = sim.as_ref().map(|s| s.apply(model)).transpose()?;
            let (current, wanted) = match &simulated {
                None => (&*model, wanted),
                Some(s) => (&s.model, s.rebind(wanted)),
            };
            let mut owned = None;
            let mut too_big = Vec::new();
            let calibrated: &HashMap<usize, calib::Calibrated> = match &hit {
                Some(m) => {
                    too_big.clone_from(&m.too_big);
                    &m.calibrated
                }
                None => {
                    let (c, t, secs) = match &original {
                        None => calib::capture_folds(current, cx, &wanted, folds)?,
                        Some(original) => calib::paired::capture(
                            original,
                            current,
                            cx,
                            &wanted,
                            &|ji| jobs[ji].rank,
                            &|ji| jobs[ji].node.clone(),
                            folds,
                        )?,
                    };
                    capture_secs += secs;
                    too_big = t;
                    &*owned.insert(c)
                }
            };
            captured += calibrated.len();
            no_calib.extend(too_big.iter().cloned());
            let mut table = None;
            if let Some(avg) = cfg.avg_bits {
                let start = std::time::Instant::now();
                let (line, fresh) = allocate_jobs(
                    model,
                    cx,
                    cfg,
                    &jobs,
                    calibrated,
                    avg,
                    &mut chosen,
                    hit.as_ref().map(|m| &m.table),
                )?;
                table = fresh;
                report.changed(
                    "allocation",
                    format!(
                        "{line}, {:.2}s{}",
                        start.elapsed().as_secs_f64(),
                        if hit.is_some() {
                            " (capture and candidate table reused from an earlier plan of this search)"
                        } else {
                            ""
                        }
                    ),
                );
            }
            let layers = hit
                .as_ref()
                .map(|m| &m.table.layers)
                .or(table.as_ref().map(|t: &Table| &t.layers));
            // The stage's layers side by side, written in layer order.
            in_order(
                stage,
                model,
                |ji, model| {
                    compute(
                        ji,
                        ji == stage[0],
                        chosen[ji],
                        calibrated.get(&ji),
                        no_calib.get(&ji),
                        layers.and_then(|l| l.get(&(ji, chosen[ji]))),
                        model,
                    )
                },
                |ji, c, model| {
                    apply(ji, c, model, &mut report);
                    done[ji] = true;
                    solved += 1;
                    crate::passes::solve_progress("weight rounding (GPTQ)", solved, solving);
                },
            )?;
            if let (Some(key), Some(memo), Some(calibrated), Some(table)) =
                (memo_key, cx.memo, owned, table)
            {
                memo.insert(
                    key,
                    Memo {
                        calibrated,
                        too_big,
                        table,
                    },
                );
            }
        }
        // The layers without calibration, side by side, written in layer order.
        let left: Vec<usize> = (0..jobs.len()).filter(|&ji| !done[ji]).collect();
        in_order(
            &left,
            model,
            |ji, model| compute(ji, false, chosen[ji], None, no_calib.get(&ji), None, model),
            |ji, c, model| apply(ji, c, model, &mut report),
        )?;
        if !stages.is_empty() {
            report.changed(
                "calibration",
                format!(
                    "{} images: inputs of {captured} layers captured in {capture_secs:.2}s ({}{})",
                    cx.calib.map_or(0, |d| d.len()),
                    match cfg.calib_mode {
                        calib::CalibMode::Parallel =>
                            "parallel: all on the float model".to_string(),
                        calib::CalibMode::Sequential(_) => format!(
                            "sequential: {} stages, each on the model quantized up to it",
                            stages.len()
                        ),
                        calib::CalibMode::Asymmetric(_) => format!(
                            "asymmetric: {} stages, each on the model quantized up to it beside the float model, each stage's first layer fit to the float model's output",
                            stages.len()
                        ),
                    },
                    sim.as_ref().map_or(String::new(), |s| format!("; {}", s.describe()))
                ),
            );
        }
        Ok(report)
    }
}

/// One layer quantized, not yet written.
struct Computed {
    q: Quantized,
    error: Option<crate::passes::LayerError>,
    /// The layer's report line.
    line: String,
    /// The bias: its name and either why it stays float or its quantized values
    /// with the rest of its report line.
    bias: Option<(String, BiasOutcome)>,
}

/// A bias quantized (values, the rest of its report line), or why it stays float.
type BiasOutcome = std::result::Result<(Quantized, String), String>;

/// The bias `b` of `job` on the linear grid of `bb` bits, or why it stays float.
fn compute_bias(
    g: &crate::onnx::proto::GraphProto,
    job: &Job,
    b: &str,
    bb: u32,
    cfg: &QuantConfig,
) -> Result<BiasOutcome> {
    let Some(bt) = g.initializer.iter().find(|t| t.name() == b) else {
        return Ok(Err("bias left float: not an initializer".into()));
    };
    if bt.data_type() != DataType::Float as i32 {
        return Ok(Err("bias left float: not float32".into()));
    }
    if let Some(why) = &job.bias_fixed {
        return Ok(Err(format!("bias left float: {why}")));
    }
    let bv = TensorData::from_proto(bt)?.into_f32();
    if let Some(c) = claim::verify(bt, &bv)? {
        if c.scheme == Scheme::Linear && c.bits == bb && c.axis.is_none() {
            return Ok(Err(format!("bias already linear {bb}-bit: left as is")));
        }
    }
    let bcfg = QuantConfig {
        per_channel: false,
        ..cfg.clone()
    };
    let bq = quantize_tensor(&bv, Scheme::Linear, bb, &bcfg, None, 1);
    let line = grid_line(&bv, &bq);
    Ok(Ok((bq, line)))
}

/// "GRID, SQNR X dB, clipped Y%" of `q` against the values `w` it quantized.
fn grid_line(w: &ArrayD<f32>, q: &Quantized) -> String {
    let s = sqnr_db(w, &q.values);
    format!(
        "{}, SQNR {} dB, clipped {:.2}%",
        q.grid,
        if s.is_finite() {
            format!("{s:.1}")
        } else {
            "inf".into()
        },
        100.0 * q.clipped as f64 / w.len().max(1) as f64
    )
}

/// Why GPTQ needs `--calib`.
pub const GPTQ_NEEDS_CALIB: &str = "rounding 'gptq' needs calibration images (--calib DATA): \
GPTQ moves each rounding error onto the weights not yet rounded through the inverse Hessian of the layer's inputs on them";

/// What an allocation computes that does not depend on its budget, kept across
/// the builds of one `optimize --search` (its plans differ only in `avg_bits`):
/// the calibration capture, the candidate table (each pooled layer's weighted
/// errors) and every layer's calibrated rounding at every candidate width. An
/// entry is keyed by a SHA-256 of the model as the pass receives it, the pass's
/// settings without `avg_bits`, the input shape and the calibration set's size
/// (the images are the context's, fixed for its life), so a build served from
/// the memo writes what a fresh build writes. Only allocations use it.
#[derive(Default)]
pub struct AllocationMemo {
    entries: std::sync::Mutex<HashMap<[u8; 32], std::sync::Arc<Memo>>>,
}

impl AllocationMemo {
    fn get(&self, key: &[u8; 32]) -> Option<std::sync::Arc<Memo>> {
        self.entries.lock().ok()?.get(key).cloned()
    }

    fn insert(&self, key: [u8; 32], memo: Memo) {
        if let Ok(mut e) = self.entries.lock() {
            e.insert(key, std::sync::Arc::new(memo));
        }
    }
}

/// One allocation's budget-free work (see [`AllocationMemo`]).
struct Memo {
    calibrated: HashMap<usize, calib::Calibrated>,
    too_big: Vec<(usize, String)>,
    table: Table,
}

/// The candidate table of an allocation: the pooled layers (job, weights), their
/// errors at [`ALLOCATION_BITS`] weighted by their effect on the network, and
/// every (job, width)'s calibrated rounding as the pass would compute it.
struct Table {
    pool: Vec<(usize, usize)>,
    weighted: Vec<Vec<f64>>,
    layers: HashMap<(usize, u32), LayerResult>,
}

type LayerResult = std::result::Result<CalibratedLayer, String>;

fn memo_key(model: &Model, cx: &Context, cfg: &QuantConfig) -> [u8; 32] {
    use prost::Message;
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(model.proto.encode_to_vec());
    let settings = QuantConfig {
        avg_bits: None,
        ..cfg.clone()
    };
    h.update(format!("{settings:?}").as_bytes());
    h.update(format!("{:?}", cx.input_shape).as_bytes());
    h.update(cx.calib.map_or(0, |d| d.len()).to_le_bytes());
    h.finalize().into()
}

/// Which inputs a calibrated layer is fit on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inputs {
    /// Its own captured inputs (parallel or sequential calibration).
    Own,
    /// The compressed model's inputs, fit to the original model's output
    /// (asymmetric calibration: the first layer of a stage).
    FitOriginal,
    /// The original model's inputs of a paired capture (asymmetric calibration:
    /// a stage's later layers).
    Original,
}

/// What calibration did to one layer.
#[derive(Clone)]
struct CalibratedLayer {
    values: ArrayD<f32>,
    method: String,
    nearest: f64,
    after: f64,
}

/// GPTQ (or nearest rounding) of one weight with its calibration: the values on
/// the claim's grids, and the relative output errors of nearest rounding and of
/// the result.
#[allow(clippy::too_many_arguments)]
fn calibrated_layer(
    cfg: &QuantConfig,
    scheme: Scheme,
    bits: u32,
    axis: Option<usize>,
    fan_in: usize,
    w: &ArrayD<f32>,
    nearest: &Quantized,
    cal: &calib::Calibrated,
    rows: &calib::Rows,
    rounding: Rounding,
    inputs: Inputs,
    reference: Option<&[f32]>,
) -> std::result::Result<CalibratedLayer, String> {
    use calib::obs;
    // With no more calibration rows than inputs, H = X^T X is singular: GPTQ at a
    // fixed dampening would fit the calibration images exactly and move the error
    // into directions they never probe (a dense classifier on 128 images: measured
    // 0.004% output error on them, worse than nearest rounding on other images).
    // With auto dampening and halves of the rows, cross-validation decides
    // between GPTQ's dampenings and nearest rounding on the rows not fit.
    // (A paired capture keeps rows of twice the layer's inputs: it may keep X
    // while H = X^T X of the layer's own d inputs is not singular.)
    let validated = cfg.damp == calib::obs::Damp::Auto && cal.folds.len() == 2;
    if rounding == Rounding::Gptq && !validated {
        if let Some(calib::gram::Stats::Rows { n, .. }) = cal.stats.first() {
            if *n <= rows.len {
                return Err(format!(
                    "{n} calibration rows for {} inputs: GPTQ would fit the calibration images rather than the data (give more images)",
                    rows.len
                ));
            }
        }
    }
    let d = rows.len;
    if inputs == Inputs::Original {
        let own = calib::paired::original_only(cal, d)?;
        return calibrated_layer(
            cfg,
            scheme,
            bits,
            axis,
            fan_in,
            w,
            nearest,
            &own,
            rows,
            rounding,
            Inputs::Own,
            None,
        );
    }
    let paired = inputs == Inputs::FitOriginal;
    // Asymmetric calibration: each group's Gram is that of [x~, x] (the quantized
    // model's input beside the float model's; `calib::paired`): GPTQ sweeps with
    // H~ from the target w* (`paired::targets`), the least-squares fit to the float
    // output. A stage's later layers (`Inputs::Original`, above) are fit on the
    // float model's inputs alone: their compressed inputs are not known yet (the
    // earlier layers of the stage are quantized after the capture), and fitting
    // them to the stage's uncompensated inputs would compensate the same error twice.
    let w0: Vec<f32> = w.iter().copied().collect();
    // The float model's weight the fit aims at (asymmetric: the layer's weight
    // before an earlier lossy pass pruned it, say), else the layer's own.
    let w_ref: &[f32] = match reference {
        Some(r) if paired && r.len() == w0.len() => r,
        _ => &w0,
    };
    // Rows only (the factors are not read by `rows_of`).
    let shape = obs::Layer {
        rows,
        groups: cal.groups,
        factors: &[],
    };
    // The relative output error of new weights on the statistics of `c`: against
    // the float model's output (asymmetric) or against the layer's own output on
    // the same inputs.
    let error_on = |c: &calib::Calibrated, new: &[f32]| -> f64 {
        let (mut num, mut den) = (0.0, 0.0);
        for (g, st) in c.stats.iter().enumerate() {
            let (old, _) = shape.rows_of(w_ref, g);
            let (new, _) = shape.rows_of(new, g);
            let (n, dd) = if paired {
                calib::paired::fit_error(&calib::paired::blocks(st, d), d, &old, &new)
            } else {
                obs::output_error(st, d, &old, &new)
            };
            num += n;
            den += dd;
        }
        if den > 0.0 {
            num / den
        } else {
            0.0
        }
    };
    let rtn: Vec<f32> = nearest.values.iter().copied().collect();
    let err_nearest = error_on(cal, &rtn);
    let (values, method) = match rounding {
        Rounding::Nearest => (rtn, "nearest".to_string()),
        Rounding::Gptq => {
            // The grid of each output row: its channel's (per channel along the rows'
            // axis) or the tensor's.
            let imp = scheme.imp();
            let p = cfg.params();
            let per_channel = cfg.per_channel && imp.per_channel() && axis.is_some();
            let grids: Vec<crate::repr::scheme::Grid> = if per_channel {
                w.axis_iter(ndarray::Axis(axis.expect("checked")))
                    .map(|lane| {
                        let v: Vec<f32> = lane.iter().copied().collect();
                        imp.grid(&v, bits, scheme.rule(), &p, fan_in)
                    })
                    .collect()
            } else {
                vec![imp.grid(&w0, bits, scheme.rule(), &p, fan_in)]
            };
            if per_channel && grids.len() != rows.count {
                return Err(format!(
                    "{} channel grids for {} rows",
                    grids.len(),
                    rows.count
                ));
            }
            let round = |r: usize, x: f64| -> f64 {
                grids[if per_channel { r } else { 0 }].round(x as f32) as f64
            };
            // GPTQ on the statistics of `c`, H dampened by `f`.
            let fit = |c: &calib::Calibrated, f: f64| -> std::result::Result<Vec<f32>, String> {
                if paired {
                    let (blocks, factors) = calib::paired::split(c, d, f, cfg.act_order)?;
                    let layer = obs::Layer {
                        rows,
                        groups: c.groups,
                        factors: &factors,
                    };
                    let target = calib::paired::layer_targets(
                        &layer,
                        &blocks,
                        &w0,
                        (w_ref != w0.as_slice()).then_some(w_ref),
                        f,
                    )?;
                    Ok(layer.solve_masked(&target, Some(&w0), Some(&round), obs::Sparsity::None))
                } else {
                    let factors = c
                        .stats
                        .iter()
                        .map(|st| obs::Factor::new(&obs::hessian(st, d), d, f, cfg.act_order))
                        .collect::<std::result::Result<Vec<_>, _>>()?;
                    let layer = obs::Layer {
                        rows,
                        groups: c.groups,
                        factors: &factors,
                    };
                    Ok(layer.solve(&w0, Some(&round), obs::Sparsity::None, true))
                }
            };
            let mut m = "GPTQ".to_string();
            if paired {
                m.push_str(" asymmetric");
            }
            if cfg.act_order {
                m.push_str(" (act-order)");
            }
            match cfg.damp {
                obs::Damp::Fixed(f) => (fit(cal, f)?, m),
                obs::Damp::Auto => match cross_validated_damp(cal, &fit, &error_on, &rtn) {
                    (Some(f), why) => {
                        m.push_str(&format!(", damp {f} ({why})"));
                        (fit(cal, f)?, m)
                    }
                    (None, why) => (rtn, format!("nearest ({why})")),
                },
            }
        }
    };
    let after = error_on(cal, &values);
    Ok(CalibratedLayer {
        values: ArrayD::from_shape_vec(w.raw_dim(), values).expect("same shape"),
        method,
        nearest: err_nearest,
        after,
    })
}

/// A solve of one layer on a calibration with a dampening: its new weights.
type Fit<'a> = dyn Fn(&calib::Calibrated, f64) -> std::result::Result<Vec<f32>, String> + 'a;

/// [`calib::obs::Damp::Auto`]: the dampening of [`calib::obs::AUTO_DAMPS`] whose solve on one
/// half of the calibration images (`fit`) has the least output error on the
/// other half (`error_on`), summed over both directions; ties go to the smaller
/// dampening. `None` when nearest rounding (`nearest`, which fits nothing) has
/// a held-out error no larger than the best dampening's: GPTQ then fits the
/// calibration images rather than the data (measured on MobileNetV2's
/// classifier at 4 bits: 1,280 inputs, one row per image). Returns it with how
/// it was chosen: [`calib::obs::DEFAULT_DAMP`] when the capture has no folds
/// (fewer than two chunks of images) or no candidate could be solved on both
/// halves.
fn cross_validated_damp(
    cal: &calib::Calibrated,
    fit: &Fit,
    error_on: &dyn Fn(&calib::Calibrated, &[f32]) -> f64,
    nearest: &[f32],
) -> (Option<f64>, String) {
    let (Some(a), Some(b)) = (cal.fold(0), cal.fold(1)) else {
        return (
            Some(calib::obs::DEFAULT_DAMP),
            "the default: no halves of the calibration images to cross-validate on".into(),
        );
    };
    let mut best: Option<(f64, f64)> = None;
    for &f in &calib::obs::AUTO_DAMPS {
        let (Ok(on_a), Ok(on_b)) = (fit(&a, f), fit(&b, f)) else {
            continue;
        };
        let held_out = error_on(&b, &on_a) + error_on(&a, &on_b);
        if held_out.is_finite() && best.is_none_or(|(e, _)| held_out < e) {
            best = Some((held_out, f));
        }
    }
    let rtn = error_on(&b, nearest) + error_on(&a, nearest);
    match best {
        Some((e, f)) if e < rtn => (
            Some(f),
            format!(
                "2-fold cross-validation: held-out error {:.3}%, nearest rounding's {:.3}%",
                50.0 * e,
                50.0 * rtn
            ),
        ),
        Some((e, f)) => (
            None,
            format!(
                "2-fold cross-validation: held-out error {:.3}%, GPTQ's least {:.3}% at damp {f}",
                50.0 * rtn,
                50.0 * e
            ),
        ),
        None => (
            Some(calib::obs::DEFAULT_DAMP),
            "the default: no dampening could be solved on both halves".into(),
        ),
    }
}

/// Computes the layers `ids` as many at a time as there are cores (`compute`
/// reads the model and is pure: memory holds one result per core, not one of
/// the whole model), and hands each result to `write` in the order of `ids`
/// (deterministic output). Stops at the first error, in that order.
fn in_order<T: Send>(
    ids: &[usize],
    model: &mut Model,
    compute: impl Fn(usize, &Model) -> Result<T> + Sync,
    mut write: impl FnMut(usize, T, &mut Model),
) -> Result<()> {
    use rayon::prelude::*;
    for chunk in ids.chunks(rayon::current_num_threads().max(1)) {
        let computed: Vec<Result<T>> = {
            let model = &*model;
            chunk.par_iter().map(|&ji| compute(ji, model)).collect()
        };
        for (&ji, c) in chunk.iter().zip(computed) {
            write(ji, c?, model);
        }
    }
    Ok(())
}

/// Reads a tensor's claim keys (for tests and reports).
pub use crate::repr::claim::claim_keys;

/// `quantize.avg_bits`: each pooled layer's relative output error at every width of
/// [`ALLOCATION_BITS`] (by the pass's rounding, GPTQ or nearest, on the captured
/// calibration statistics), then [`allocate_bits`] under avg_bits x (all planned
/// weights) minus the bits of the layers outside the pool (pinned by a rule or
/// qbn, or without calibration, at their own width). Sets `chosen`; returns the
/// report line.
#[allow(clippy::too_many_arguments)]
fn allocate_jobs(
    model: &Model,
    cx: &Context,
    cfg: &QuantConfig,
    jobs: &[Job],
    calibrated: &HashMap<usize, calib::Calibrated>,
    avg: f64,
    chosen: &mut [u32],
    memo: Option<&Table>,
) -> Result<(String, Option<Table>)> {
    let g = model.graph();
    let fresh = match memo {
        Some(_) => None,
        None => Some(candidate_table(model, cx, cfg, jobs, calibrated)?),
    };
    let Table { pool, weighted, .. } = memo.or(fresh.as_ref()).expect("one of them");
    let line = allocate_from(g, cx, jobs, pool, weighted, avg, chosen)?;
    Ok((line, fresh))
}

/// The candidate table of the calibrated, unpinned layers (see [`Table`]); the
/// per-width roundings (`Table::layers`, the pooled weights at every width) only
/// with a memo to keep them for the search's other plans.
fn candidate_table(
    model: &Model,
    cx: &Context,
    cfg: &QuantConfig,
    jobs: &[Job],
    calibrated: &HashMap<usize, calib::Calibrated>,
) -> Result<Table> {
    let keep = cx.memo.is_some();
    use rayon::prelude::*;
    let g = model.graph();
    let values = |init: &str| -> Result<ArrayD<f32>> {
        let t = g
            .initializer
            .iter()
            .find(|t| t.name() == init)
            .expect("planned");
        Ok(TensorData::from_proto(t)?.into_f32())
    };
    let candidates: Vec<(usize, ArrayD<f32>)> = (0..jobs.len())
        .filter(|&ji| !jobs[ji].pinned && calibrated.contains_key(&ji) && jobs[ji].layout.is_ok())
        .map(|ji| Ok((ji, values(&jobs[ji].init)?)))
        .collect::<Result<_>>()?;
    // errors[k][j]: candidate k at ALLOCATION_BITS[j]; a layer whose calibration
    // fails (too few rows) leaves the pool.
    // Each width by the layer's rounding; where GPTQ refuses (fewer calibration
    // rows than inputs) by nearest rounding, as the pass then writes it. The
    // values at PROBE_BITS are kept for the network's sensitivity runs.
    // Per candidate: (errors at each width, probe values) when every width worked,
    // and the pass's rounding at each width.
    type Candidate = (Option<(Vec<f64>, ArrayD<f32>)>, Vec<(u32, LayerResult)>);
    let rows: Vec<Candidate> = candidates
        .par_iter()
        .map(|(ji, w)| {
            let job = &jobs[*ji];
            let cal = &calibrated[ji];
            let (rows, _) = job.layout.as_ref().expect("pooled");
            let mut probe = None;
            // The pass's own rounding at each width, kept for writing the chosen one.
            let mut kept = Vec::new();
            let errs = ALLOCATION_BITS
                .iter()
                .map(|&b| {
                    let q = quantize_tensor(w, job.scheme, b, cfg, job.axis, job.fan_in);
                    let run = |r| {
                        calibrated_layer(
                            cfg,
                            job.scheme,
                            b,
                            job.axis,
                            job.fan_in,
                            w,
                            &q,
                            cal,
                            rows,
                            r,
                            Inputs::Own,
                            None,
                        )
                    };
                    let first = run(job.rounding);
                    if keep {
                        kept.push((b, first.clone()));
                    }
                    let d = first.or_else(|_| run(Rounding::Nearest)).ok()?;
                    if b == PROBE_BITS {
                        probe = Some(d.values);
                    }
                    Some(d.after)
                })
                .collect::<Option<Vec<f64>>>();
            let row = match (errs, probe) {
                (Some(e), Some(p)) => Some((e, p)),
                _ => None,
            };
            (row, kept)
        })
        .collect();
    let mut pool = Vec::new();
    let mut errors = Vec::new();
    let mut probes = Vec::new();
    let mut layers = HashMap::new();
    for ((ji, w), (row, kept)) in candidates.iter().zip(rows) {
        if let Some((row, probe)) = row {
            pool.push((*ji, w.len()));
            errors.push(row);
            probes.push(probe);
            for (b, r) in kept {
                layers.insert((*ji, b), r);
            }
        }
    }
    // Weight each layer's errors by its effect on the network's output.
    let weights = network_sensitivity(model, cx, jobs, &pool, &errors, &probes)?;
    let weighted: Vec<Vec<f64>> = errors
        .iter()
        .zip(&weights)
        .map(|(row, w)| row.iter().map(|e| e * w).collect())
        .collect();
    Ok(Table {
        pool,
        weighted,
        layers,
    })
}

/// Chooses the pooled layers' widths under the mean-width budget `avg` (the
/// dynamic program of [`allocate_bits`]) and returns the report line.
fn allocate_from(
    g: &crate::onnx::proto::GraphProto,
    cx: &Context,
    jobs: &[Job],
    pool: &[(usize, usize)],
    weighted: &[Vec<f64>],
    avg: f64,
    chosen: &mut [u32],
) -> Result<String> {
    let numel_of = |ji: usize| -> usize {
        g.initializer
            .iter()
            .find(|t| t.name() == jobs[ji].init)
            .map_or(0, |t| t.dims.iter().product::<i64>() as usize)
    };
    let all: usize = (0..jobs.len()).map(numel_of).sum();
    let fixed: f64 = (0..jobs.len())
        .filter(|ji| !pool.iter().any(|(p, _)| p == ji))
        .map(|ji| numel_of(ji) as f64 * chosen[ji] as f64)
        .sum();
    let budget = avg * all as f64 - fixed;
    let numel: Vec<usize> = pool.iter().map(|(_, n)| *n).collect();
    let picks = allocate_bits(&numel, weighted, &ALLOCATION_BITS, budget).ok_or_else(|| {
        Error::Budget(format!(
            "quantize avg_bits {avg}: the layers outside the allocation ({} of them, at their own widths) already take {:.2} bits per weight of the {all}; raise avg_bits or free them",
            jobs.len() - pool.len(),
            fixed / all.max(1) as f64
        ))
    })?;
    let mut used = fixed;
    let mut hist = [0usize; ALLOCATION_BITS.len()];
    let mut err_sum = 0.0;
    for (k, &j) in picks.iter().enumerate() {
        let (ji, n) = pool[k];
        chosen[ji] = ALLOCATION_BITS[j];
        used += n as f64 * ALLOCATION_BITS[j] as f64;
        hist[j] += 1;
        err_sum += weighted[k][j];
    }
    let widths: Vec<String> = ALLOCATION_BITS
        .iter()
        .zip(hist)
        .filter(|(_, c)| *c > 0)
        .map(|(b, c)| format!("{c} at {b}"))
        .collect();
    Ok(format!(
        "mean weight width {:.3} bits over {all} weights (budget {avg}): the bits of {} layers chosen from {:?} to minimize the sum of their relative output errors on the calibration rows, each weighted by its effect on the network's output (that layer alone at {PROBE_BITS} bits on {} images; dynamic program over the budget; estimated output error {:.4}); {}{}",
        used / all.max(1) as f64,
        pool.len(),
        ALLOCATION_BITS,
        NETWORK_IMAGES.min(cx.calib.map_or(0, |d| d.len())),
        err_sum,
        widths.join(", "),
        if pool.len() < jobs.len() {
            format!(
                "; {} layers at their own widths (a layer rule, or no calibration)",
                jobs.len() - pool.len()
            )
        } else {
            String::new()
        }
    ))
}

/// The width at which each layer's effect on the network is measured.
const PROBE_BITS: u32 = 3;

/// Calibration images the sensitivity runs use (the first ones).
const NETWORK_IMAGES: usize = 32;

/// Per pooled layer, how much of the network's output one unit of its relative
/// output error moves: with that layer alone at [`PROBE_BITS`] (its probe values),
/// the relative change of the model's outputs ||y_l - y||^2 / ||y||^2 on the first
/// [`NETWORK_IMAGES`] calibration images, divided by the layer's own error at that
/// width (the same measure as `prune.allocate = "network"`). Weight 1 where the
/// layer's error is 0.
fn network_sensitivity(
    model: &Model,
    cx: &Context,
    jobs: &[Job],
    pool: &[(usize, usize)],
    errors: &[Vec<f64>],
    probes: &[ArrayD<f32>],
) -> Result<Vec<f64>> {
    let probe_run = calib::OutputProbe::new(model, cx, NETWORK_IMAGES)?;
    let probe = ALLOCATION_BITS
        .iter()
        .position(|&b| b == PROBE_BITS)
        .expect("a candidate");
    let mut m = model.clone();
    let mut out = Vec::with_capacity(pool.len());
    crate::passes::solve_progress("bit allocation: sensitivity", 0, pool.len());
    for (k, &(ji, _)) in pool.iter().enumerate() {
        let init = &jobs[ji].init;
        let g = m.graph_mut();
        let t = g
            .initializer
            .iter()
            .find(|t| t.name() == init)
            .expect("planned");
        let original = TensorData::from_proto(t)?;
        crate::graph::edit::set_initializer(g, init, &TensorData::F32(probes[k].clone()));
        let d = probe_run.relative_change(&m)?;
        crate::graph::edit::set_initializer(m.graph_mut(), init, &original);
        let e = errors[k][probe];
        out.push(match d {
            Some(d) if e > 0.0 => d / e,
            _ => 1.0,
        });
        crate::passes::solve_progress("bit allocation: sensitivity", k + 1, pool.len());
    }
    Ok(out)
}

/// The weight widths `quantize.avg_bits` chooses from.
pub const ALLOCATION_BITS: [u32; 6] = [2, 3, 4, 5, 6, 8];

/// Budget units of the allocation's dynamic program: the largest possible total
/// (every layer at 8 bits) is cut into at most this many.
const ALLOCATION_UNITS: u64 = 65536;

/// Per-layer widths for a bit budget: choose one candidate j_l per layer to
/// minimize sum_l errors[l][j_l] subject to sum_l numel_l * bits[j_l] <= budget
/// (in bits), by dynamic programming over the budget in units of
/// q = ceil(sum_l numel_l * max(bits) / 65536) bits, each layer's cost rounded up
/// to whole units (so the budget always holds; exact when q = 1). The knapsack
/// form of OBC's SPDY allocation (Frantar and Alistarh, 2022) and of seed 004's
/// avg_bit_weights budget. `errors[l][j]` is the cost of layer l at `bits[j]`
/// (f64::INFINITY: not allowed). Returns the chosen index per layer, or `None`
/// when even the cheapest choice of every layer exceeds the budget.
pub fn allocate_bits(
    numel: &[usize],
    errors: &[Vec<f64>],
    bits: &[u32],
    budget: f64,
) -> Option<Vec<usize>> {
    assert!(bits.len() < u8::MAX as usize, "at most 254 candidates");
    let max_bits = *bits.iter().max()? as u64;
    let total: u64 = numel.iter().map(|&n| n as u64 * max_bits).sum();
    let q = total.div_ceil(ALLOCATION_UNITS).max(1);
    if budget < 0.0 {
        return None;
    }
    let cap = ((budget / q as f64).floor() as u64).min(total.div_ceil(q)) as usize;
    let cost = |l: usize, j: usize| (numel[l] as u64 * bits[j] as u64).div_ceil(q) as usize;
    // best[u]: least error of the layers so far within u units; pick[l][u]: the
    // candidate of layer l on that optimum.
    let mut best = vec![0.0f64; cap + 1];
    let mut pick = vec![vec![u8::MAX; cap + 1]; numel.len()];
    for l in 0..numel.len() {
        let mut next = vec![f64::INFINITY; cap + 1];
        for u in 0..=cap {
            for (j, &e) in errors[l].iter().enumerate() {
                let c = cost(l, j);
                if c > u || !e.is_finite() || !best[u - c].is_finite() {
                    continue;
                }
                let v = best[u - c] + e;
                if v < next[u] {
                    next[u] = v;
                    pick[l][u] = j as u8;
                }
            }
        }
        best = next;
    }
    if !best[cap].is_finite() {
        // Rounding every cost up to whole units can rule out the cheapest
        // assignment even where its exact cost fits (a budget of exactly the
        // narrowest width everywhere): then it is the only one, and taken.
        let cheapest: Vec<usize> = (0..numel.len())
            .map(|l| {
                (0..bits.len())
                    .filter(|&j| errors[l][j].is_finite())
                    .min_by_key(|&j| bits[j])
            })
            .collect::<Option<_>>()?;
        let exact: f64 = cheapest
            .iter()
            .enumerate()
            .map(|(l, &j)| numel[l] as f64 * bits[j] as f64)
            .sum();
        return (exact <= budget).then_some(cheapest);
    }
    let mut out = vec![0; numel.len()];
    let mut u = cap;
    for l in (0..numel.len()).rev() {
        let j = pick[l][u] as usize;
        out[l] = j;
        u -= cost(l, j);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::allocate_bits;

    /// `damp = "auto"` (2-fold cross-validation) by hand. Weights w = [0.4, 0.3,
    /// -1, 2] on the minmax 2-bit grid: [min, max] = [-1, 2], scale 1, zero point
    /// 1, levels {-1, 0, 1, 2}, so nearest rounding gives q = [0, 0, -1, 2] and
    /// only columns 0 and 1 carry error. Fold A's Gram couples them,
    /// H_a = [[1, .9], [.9, 1]] (+ identity on columns 2, 3; mean diagonal 1);
    /// fold B's is the identity. GPTQ (natural order) rounds column 0 to 0 and
    /// moves its error onto column 1: w1 = 0.3 + 0.9 / (1 + f) x 0.4, which rounds
    /// to 1 while 0.36 / (1 + f) > 0.2, i.e. f < 0.8: on fold A every candidate
    /// dampening but 1 gives q = [0, 1, -1, 2]; on fold B (no coupling) all give q
    /// = [0, 0, -1, 2]. Relative errors d^T H d / w^T H w (w^T I w = 0.16 + 0.09 +
    /// 1 + 4 = 5.25; w^T H_a w = 0.16 + 2 x 0.9 x 0.12 + 0.09 + 5 = 5.466):
    /// - fit on A, f < 0.8, held out on B: d = [-0.4, 0.7, 0, 0]: 0.65 / 5.25;
    ///   with f = 1, d = [-0.4, -0.3, 0, 0]: 0.25 / 5.25;
    /// - fit on B, held out on A: d = [-0.4, -0.3, 0, 0]: 0.466 / 5.466.
    ///
    /// So f = 1 wins: 0.25 / 5.25 + 0.466 / 5.466 = 0.132873 (the report prints
    /// half of it, the mean of the two folds, 6.644%) against 0.209064. When
    /// both folds couple the columns (H_b = H_a), the compensation holds out:
    /// d = [-0.4, 0.7, 0, 0] on H_a is 0.16 - 2 x 0.9 x 0.28 + 0.49 = 0.146,
    /// less than 0.466, every f < 0.8 ties and the smallest, 0.003, is chosen.
    #[test]
    fn auto_damp_by_cross_validation_by_hand() {
        use super::{calibrated_layer, quantize_tensor, Inputs, QuantConfig, Rounding, Scheme};
        use crate::passes::calib::{obs::Damp, Calibrated, Rows, Stats};
        let w = ndarray::ArrayD::from_shape_vec(vec![1, 4], vec![0.4f32, 0.3, -1.0, 2.0]).unwrap();
        let cfg = QuantConfig {
            scheme: Scheme::MinMax,
            bits: 2,
            damp: Damp::Auto,
            ..Default::default()
        };
        let nearest = quantize_tensor(&w, Scheme::MinMax, 2, &cfg, None, 4);
        assert_eq!(nearest.values.as_slice().unwrap(), &[0.0, 0.0, -1.0, 2.0]);
        let eye = |c: f64| {
            let mut h = vec![0.0; 16];
            for i in 0..4 {
                h[i * 4 + i] = 1.0;
            }
            h[1] = c;
            h[4] = c;
            h
        };
        let cal = |a: Vec<f64>, b: Vec<f64>| Calibrated {
            stats: vec![Stats::Gram(a.iter().zip(&b).map(|(x, y)| x + y).collect())],
            means: Vec::new(),
            dim: 4,
            groups: 1,
            rows: 100,
            scale: 1.0,
            folds: vec![vec![Stats::Gram(a)], vec![Stats::Gram(b)]],
        };
        let rows = Rows::contiguous(1, 4);
        let layer = |w: &ndarray::ArrayD<f32>, nearest, c: &Calibrated, cfg: &QuantConfig| {
            calibrated_layer(
                cfg,
                Scheme::MinMax,
                2,
                None,
                4,
                w,
                nearest,
                c,
                &rows,
                Rounding::Gptq,
                Inputs::Own,
                None,
            )
            .unwrap()
        };
        let run = |c: &Calibrated, cfg: &QuantConfig| layer(&w, &nearest, c, cfg);
        // f = 1 is GPTQ's best, and its fits on the halves are nearest rounding:
        // a tie with nearest, which then wins (it fits nothing).
        let one = run(&cal(eye(0.9), eye(0.0)), &cfg);
        let e: f64 = 0.25 / 5.25 + 0.466 / 5.466;
        assert_eq!(
            one.method,
            format!(
                "nearest (2-fold cross-validation: held-out error {:.3}%, GPTQ's least {:.3}% at damp 1)",
                50.0 * e,
                50.0 * e
            ),
        );
        assert!(one.method.contains("6.644%"), "{}", one.method);
        assert_eq!(one.values.as_slice().unwrap(), &[0.0, 0.0, -1.0, 2.0]);
        // With both halves coupled, nearest's held-out error is 2 x 0.466 / 5.466
        // (8.525%); GPTQ at 0.003 moves w1 to 1 (below): d = (0.4, -0.7),
        // d^T H d = 0.16 + 0.49 - 2 x 0.9 x 0.28 = 0.146, 2 x 0.146 / 5.466 (2.671%).
        let both = run(&cal(eye(0.9), eye(0.9)), &cfg);
        assert!(
            both.method.ends_with(
                "damp 0.003 (2-fold cross-validation: held-out error 2.671%, nearest rounding's 8.525%)"
            ),
            "{}",
            both.method
        );
        // H = 2 H_a, lambda = 0.006: w1 = 0.3 + 1.8 / 2.006 x 0.4 = 0.659 rounds to 1.
        assert_eq!(both.values.as_slice().unwrap(), &[0.0, 1.0, -1.0, 2.0]);
        // Without folds: the default, and the report says why.
        let mut none = cal(eye(0.9), eye(0.9));
        none.folds.clear();
        let r = run(&none, &cfg);
        assert!(
            r.method.contains("damp 0.01 (the default: no halves"),
            "{}",
            r.method
        );
        // A fixed dampening reads no folds and says nothing of them.
        let fixed = QuantConfig {
            damp: Damp::Fixed(1.0),
            ..cfg.clone()
        };
        assert_eq!(run(&cal(eye(0.9), eye(0.0)), &fixed).method, "GPTQ");
        // Nearest strictly better on held-out rows: w = (0.45, 0.45, -1, 2), nearest
        // (0, 0, -1, 2). Fit on the coupled half at any f <= 1, GPTQ moves w1 to
        // 0.45 + 0.45 x 0.9 / (1 + f) >= 0.6525, rounded to 1: d = (0.45, -0.55),
        // on the other half (H = I) 0.505 / 5.405; fit on the uncoupled half it is
        // nearest, on the coupled half 0.7695 / 5.7695 (d^T H d = 0.405 + 2 x 0.9
        // x 0.2025). Every f: 11.340%. Nearest: 0.405 / 5.405 + 0.7695 / 5.7695,
        // 10.415%. On all images GPTQ would round w1 up; nearest is written.
        let w =
            ndarray::ArrayD::from_shape_vec(vec![1, 4], vec![0.45f32, 0.45, -1.0, 2.0]).unwrap();
        let nearest = quantize_tensor(&w, Scheme::MinMax, 2, &cfg, None, 4);
        assert_eq!(nearest.values.as_slice().unwrap(), &[0.0, 0.0, -1.0, 2.0]);
        let c = cal(eye(0.9), eye(0.0));
        let strict = layer(&w, &nearest, &c, &cfg);
        assert_eq!(
            strict.method,
            "nearest (2-fold cross-validation: held-out error 10.415%, GPTQ's least 11.340% at damp 0.003)"
        );
        assert_eq!(strict.values.as_slice().unwrap(), &[0.0, 0.0, -1.0, 2.0]);
        let fixed = QuantConfig {
            damp: Damp::Fixed(0.003),
            ..cfg.clone()
        };
        let gptq = layer(&w, &nearest, &c, &fixed);
        assert_eq!(gptq.values.as_slice().unwrap(), &[0.0, 1.0, -1.0, 2.0]);
    }

    /// The least summed error within `budget` bits over every assignment.
    fn exhaustive(numel: &[usize], errors: &[Vec<f64>], bits: &[u32], budget: f64) -> Option<f64> {
        let (l, c) = (numel.len(), bits.len());
        let mut best: Option<f64> = None;
        for code in 0..c.pow(l as u32) {
            let (mut k, mut cost, mut err) = (code, 0.0, 0.0);
            for i in 0..l {
                let j = k % c;
                k /= c;
                cost += (numel[i] * bits[j] as usize) as f64;
                err += errors[i][j];
            }
            if cost <= budget && err.is_finite() && best.is_none_or(|b| err < b) {
                best = Some(err);
            }
        }
        best
    }

    #[test]
    fn bit_allocation_equals_exhaustive_search() {
        // 4 layers of 3, 5, 2 and 7 weights; widths 2, 3, 4, 8; the errors are not
        // convex in the width (layer 1 gains little from 3 to 4 bits, a lot from 2
        // to 3), and layer 2 may not take 2 bits. Totals: 17 weights, 34 bits at
        // the cheapest (all 2 bits, not allowed for layer 2: 36), 136 at the most.
        let numel = [3, 5, 2, 7];
        let bits = [2, 3, 4, 8];
        let inf = f64::INFINITY;
        let errors = vec![
            vec![0.9, 0.5, 0.2, 0.01],
            vec![2.0, 0.3, 0.25, 0.0],
            vec![inf, 0.49, 0.1, 0.05],
            vec![1.0, 0.7, 0.1, 0.02],
        ];
        for budget in (30..=140).map(|b| b as f64) {
            let got = allocate_bits(&numel, &errors, &bits, budget);
            match exhaustive(&numel, &errors, &bits, budget) {
                None => assert!(got.is_none(), "budget {budget}: {got:?}"),
                Some(best) => {
                    let picks = got.unwrap_or_else(|| panic!("budget {budget}: none"));
                    let cost: usize = (0..4).map(|i| numel[i] * bits[picks[i]] as usize).sum();
                    let err: f64 = (0..4).map(|i| errors[i][picks[i]]).sum();
                    assert!(cost as f64 <= budget, "budget {budget}: cost {cost}");
                    assert!(
                        (err - best).abs() < 1e-12,
                        "budget {budget}: {err} vs {best}"
                    );
                }
            }
        }
        // By hand, budget 36 = the cheapest allowed: 3x2 + 5x2 + 2x3 + 7x2 = 36 bits,
        // error 0.9 + 2.0 + 0.49 + 1.0 = 4.39; at 35 nothing fits.
        assert_eq!(
            allocate_bits(&numel, &errors, &bits, 36.0),
            Some(vec![0, 0, 1, 0])
        );
        assert_eq!(allocate_bits(&numel, &errors, &bits, 35.0), None);
    }

    /// A budget of exactly the narrowest width everywhere fits, though the dynamic
    /// program rounds costs up to units: 100000 + 3 weights at widths {2, 8}:
    /// total 8 x 100003 = 800024 bits, unit q = ceil(800024 / 65536) = 13 bits;
    /// at 2 bits the layers cost ceil(200000 / 13) + ceil(6 / 13) = 15385 + 1 =
    /// 15386 units, one more than the budget's floor(200006 / 13) = 15385.
    #[test]
    fn the_narrowest_budget_is_feasible_despite_unit_rounding() {
        let numel = [100_000usize, 3];
        let errors = vec![vec![1.0, 0.1], vec![2.0, 0.2]];
        let bits = [2u32, 8];
        assert_eq!(
            allocate_bits(&numel, &errors, &bits, 200_006.0),
            Some(vec![0, 0])
        );
        assert_eq!(allocate_bits(&numel, &errors, &bits, 200_005.0), None);
    }
}
