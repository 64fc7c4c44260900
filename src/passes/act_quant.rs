//! Activation quantization, calibrated: the model runs in tract on the
//! calibration images, each chosen activation's range is measured, and a
//! quantizer is inserted on it:
//!
//! - at 8 bits, `QuantizeLinear -> DequantizeLinear` (uint8 when the calibration
//!   saw no negative value, else int8; zero point 0 except for `minmax`; per tensor), which tract and
//!   onnxruntime both run (tract-notes section 3: both round half to even and
//!   saturate; tract multiplies by 1/scale where ORT divides, so a power-of-two
//!   scale, the default, makes them agree exactly);
//! - at other widths (2..=16), the float fake-quant chain
//!   `Mul(Clip(Round(Div(x, s)), lo, hi), s)` with [lo, hi] = [-2^(b-1), 2^(b-1) - 1]
//!   (signed) or [0, 2^b - 1] (unsigned).
//!
//! - at 16 bits, `Cast(Cast(x, FLOAT16), FLOAT)`: float16 rounding, which seed
//!   001 and 002 count as 16-bit activations (calibration is not needed for the
//!   ranges, but the pass still runs the model to report them).
//!
//! `score` reads every form back as b-bit activations; the forms are built and read
//! in one place, `repr::act`.
//!
//! Where (`placement`):
//! - `inputs` (default): the data input of every weighted layer (Conv,
//!   ConvTranspose, Gemm, MatMul with a constant weight), one quantizer per value
//!   shared by all its weighted consumers; other readers (residual Adds, the graph
//!   outputs) keep the float value. The MicroNet rules count a multiply at
//!   max(weight bits, input bits), so this is where quantizing pays: every
//!   multiply reads an 8-bit operand;
//! - `outputs`: after each weighted layer's and each average pool's output, for
//!   all readers (seed 000's `duplicate_model_with_quant` places its quantizers
//!   after Conv/Linear/BatchNorm/AvgPool); graph outputs stay float.
//!
//! Values that already read as quantized (a DequantizeLinear or fake-quant
//! output, or passed through Relu/MaxPool/Reshape from one) are left alone.
//!
//! Ranges (k bits; signed qmax = 2^(k-1) - 1, unsigned qmax = 2^k - 1):
//! - `maxabs` (default), seed 000's `LinearQuant`: v = the |x| at the overflow
//!   rank over all calibration values (rate 0: the max), I = ceil(log2(v + 1e-12)),
//!   scale = 2^-(k - 1 - I) signed, 2^-(k - I) unsigned (a power of two);
//! - `percentile:P`: v = the P-th percentile of |x|, scale = v / qmax;
//! - `minmax`: asymmetric, [lo, hi] = [min(seen min, 0), max(seen max, 0)] on
//!   2^k levels: scale = (hi - lo) / (2^k - 1), zero point zp = round(-lo / scale)
//!   (uint8 Q/DQ with that zero point at 8 bits; at other widths the chain clips
//!   round(x / s) to [-zp, 2^k - 1 - zp], still 2^k levels). For one-sided,
//!   shifted ranges such as a BatchNorm after a ReLU;
//! - `mse`: scale = v / qmax for the v among max|x| 2^(-i/32), i = 0..320, that
//!   minimizes the quantization MSE estimated from the |x| histogram (clipped
//!   mass: exact squared excess; inside: s^2/12 per value above s/2, x^2 below).
//!
//! |x| is kept in a histogram of 32 bins per octave from 2^-40 to 2^24 (each
//! octave cut linearly, from the float's exponent and top mantissa bits;
//! quantiles are taken at a bin's upper edge: at most 3.2% above the exact
//! value, so the range errs wide), beside the exact min, max and max |x|.
//! Chunks of 4 images are merged in order, so results do not depend on threads.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::select;
use super::{Context, Pass, PassReport};
use crate::error::{Error, Result};
use crate::graph::{weighted_layers, Graph, Namer};
use crate::onnx::proto::NodeProto;
use crate::onnx::Model;
use crate::repr::act::{self, ActBits, Form};
use crate::repr::scheme::Storage;

const PER_OCTAVE: f64 = 32.0;
const LOW_EXP: f64 = -40.0;
const BINS: usize = 64 * 32;

/// How the range of an activation is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Range {
    MaxAbs,
    Percentile(f64),
    Mse,
    /// Asymmetric: the seen [min, max] (widened to hold 0) on 2^k levels, with a zero point.
    MinMax,
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Range::MaxAbs => f.write_str("maxabs"),
            Range::Percentile(p) => write!(f, "percentile:{p}"),
            Range::Mse => f.write_str("mse"),
            Range::MinMax => f.write_str("minmax"),
        }
    }
}

impl FromStr for Range {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "maxabs" | "max-abs" | "max" => return Ok(Range::MaxAbs),
            "mse" => return Ok(Range::Mse),
            "minmax" | "min-max" => return Ok(Range::MinMax),
            _ => {}
        }
        let bad = || {
            Error::Usage(format!(
                "--act-range '{s}': expected maxabs, percentile:P (0 < P <= 100, e.g. percentile:99.99), mse or minmax"
            ))
        };
        let p: f64 = t
            .strip_prefix("percentile:")
            .ok_or_else(bad)?
            .parse()
            .map_err(|_| bad())?;
        if !(p > 0.0 && p <= 100.0) {
            return Err(bad());
        }
        Ok(Range::Percentile(p))
    }
}

/// Where quantizers go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    Inputs,
    Outputs,
}

/// The `[act_quant]` recipe section.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ActQuantSection {
    pub bits: u32,
    /// maxabs | percentile:P | mse | minmax
    pub range: Option<String>,
    /// Fraction of |x| allowed to clip (maxabs); default 0.
    pub overflow_rate: Option<f64>,
    /// inputs | outputs
    pub placement: Option<String>,
    /// Glob patterns on value or layer names left float.
    #[serde(default)]
    pub skip: Vec<String>,
    /// 8-bit form: "auto" (default: Q/DQ, except before layers whose weights
    /// onnxruntime would re-quantize, which get the fake-quant chain) or "always"
    /// (Q/DQ everywhere, for runtimes without that re-quantization).
    pub qdq: Option<String>,
}

impl ActQuantSection {
    pub fn config(&self) -> Result<ActQuantConfig> {
        if !(2..=16).contains(&self.bits) {
            return Err(Error::Usage(format!(
                "--act-bits {}: activations take 2 to 16 bits (8: QuantizeLinear/DequantizeLinear, 16: float16, others: a float fake-quant chain)",
                self.bits
            )));
        }
        let range = match &self.range {
            Some(r) => r.parse()?,
            None => Range::MaxAbs,
        };
        let overflow_rate = self.overflow_rate.unwrap_or(0.0);
        if !(0.0..1.0).contains(&overflow_rate) {
            return Err(Error::Usage(format!(
                "act_quant overflow rate {overflow_rate}: must be in [0, 1)"
            )));
        }
        let placement = match self.placement.as_deref() {
            None | Some("inputs") => Placement::Inputs,
            Some("outputs") => Placement::Outputs,
            Some(p) => {
                return Err(Error::Usage(format!(
                    "act_quant placement '{p}': expected inputs or outputs"
                )))
            }
        };
        let qdq_always = match self.qdq.as_deref() {
            None | Some("auto") => false,
            Some("always") => true,
            Some(q) => {
                return Err(Error::Usage(format!(
                    "act_quant qdq '{q}': expected auto or always"
                )))
            }
        };
        Ok(ActQuantConfig {
            bits: self.bits,
            range,
            overflow_rate,
            placement,
            skip: self.skip.clone(),
            qdq_weights: true,
            qdq_always,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ActQuantConfig {
    pub bits: u32,
    pub range: Range,
    pub overflow_rate: f64,
    pub placement: Placement,
    pub skip: Vec<String>,
    /// Affine-claimed weights will be written as codes + DequantizeLinear (packed
    /// storage): their layers' inputs may take Q/DQ (see [`requantized_weights`]).
    pub qdq_weights: bool,
    /// Q/DQ at 8 bits whatever the weights (recipe `qdq = "always"`).
    pub qdq_always: bool,
}

/// Why the layers reading a value through `uses` would not keep their weights as
/// written if the value came from a DequantizeLinear: onnxruntime (1.21 and later,
/// at every optimization level but "disable all") re-quantizes the float32
/// weight of a Conv, ConvTranspose or Gemm whose input comes from a
/// DequantizeLinear to per-tensor int8 (its `WeightBiasQuantization`
/// transformer), throwing away the grid the file states. Weights that reach the
/// layer through DequantizeLinear are kept: those already in that form, and
/// affine (linear, minmax) claims that packed storage writes as codes +
/// DequantizeLinear (`qdq_weights`; per channel from opset 13). For the others
/// (fp16, log, tanh, ternary, unquantized float) the value gets the float
/// fake-quant chain instead, which onnxruntime runs as written; the score counts
/// both forms at 8 bits.
fn requantized_weights(
    g: &Graph,
    uses: &[(usize, usize)],
    qdq_weights: bool,
    opset: i64,
) -> Option<String> {
    let mut why = Vec::new();
    for &(n, slot) in uses {
        let node = g.node(n);
        if slot != 0 || !matches!(node.op_type(), "Conv" | "ConvTranspose" | "Gemm") {
            continue;
        }
        let Some(w) = node.input.get(1) else { continue };
        if g.producer(w)
            .is_some_and(|(p, _)| g.node(p).op_type() == "DequantizeLinear")
        {
            continue;
        }
        let kept = qdq_weights
            && crate::repr::weight(g, w).ok().flatten().is_some_and(|wt| {
                wt.claim.as_ref().is_some_and(|c| {
                    matches!(c.storage(), Storage::Affine { .. })
                        && c.bits <= 16
                        && (c.axis.is_none() || opset >= 13)
                })
            });
        if !kept {
            why.push(format!("'{}' ({})", g.node_name(n), w));
        }
    }
    (!why.is_empty()).then(|| {
        format!(
            "onnxruntime would re-quantize the float weights of {} to per-tensor int8 behind a DequantizeLinear input",
            why.join(", ")
        )
    })
}

/// Why activation quantization needs `--calib`.
pub const NEEDS_CALIB: &str =
    "activation quantization (--act-bits) needs calibration images (--calib DATA): \
the ranges are measured by running the model on them";

/// Range statistics of one value.
#[derive(Debug, Clone)]
pub struct Stats {
    pub min: f64,
    pub max: f64,
    pub absmax: f64,
    pub count: u64,
    /// hist[0]: |x| below 2^-40 (zeros) or NaN; hist[i], i = (e + 40) * 32 + m + 1: |x| = 2^e (1 + f) with top 5 mantissa bits m (32 equal steps per octave).
    pub hist: Vec<u64>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            absmax: 0.0,
            count: 0,
            hist: vec![0; BINS + 1],
        }
    }
}

/// The bin of |x| = a: 0 below 2^-40 (and NaN), else 1 + 32 (e + 40) + m for
/// a = 2^e (1 + m/32 + ...), read off the f32's exponent and top five mantissa
/// bits (no logarithm per value: capture runs this on every activation element).
fn bin_of(a: f32) -> usize {
    // On the bits of |a|: exponent and the top 5 mantissa bits are the bin, so
    // (bits - bits(2^LOW_EXP)) >> 18 = (e - LOW_EXP) * 32 + m. NaN and |a| below
    // 2^LOW_EXP go to bin 0; infinity to the last bin.
    const _: () = assert!(PER_OCTAVE as u32 == 1 << 5);
    const LOW: u32 = ((127 + LOW_EXP as i32) as u32) << 23;
    let b = a.to_bits() & 0x7fff_ffff;
    if !(LOW..=0x7f80_0000).contains(&b) {
        return 0;
    }
    (((b - LOW) >> 18) as usize + 1).min(BINS)
}

/// 2^e (1 + f) for bin i and the fraction f of its width (0: lower edge, 1: upper).
fn bin_point(i: usize, f: f64) -> f64 {
    let k = (i - 1) as f64;
    let e = (k / PER_OCTAVE).floor();
    let m = k - e * PER_OCTAVE;
    2f64.powf(e + LOW_EXP) * (1.0 + (m + f) / PER_OCTAVE)
}

fn upper_edge(i: usize) -> f64 {
    bin_point(i, 1.0)
}

fn center(i: usize) -> f64 {
    if i == 0 {
        0.0
    } else {
        bin_point(i, 0.5)
    }
}

impl Stats {
    pub fn add(&mut self, xs: impl Iterator<Item = f32>) {
        let (mut lo, mut hi, mut am) = (f32::INFINITY, f32::NEG_INFINITY, 0f32);
        let mut n = 0u64;
        for x in xs {
            lo = lo.min(x);
            hi = hi.max(x);
            let a = x.abs();
            am = am.max(a);
            self.hist[bin_of(a)] += 1;
            n += 1;
        }
        if n > 0 {
            self.min = self.min.min(lo as f64);
            self.max = self.max.max(hi as f64);
            self.absmax = self.absmax.max(am as f64);
            self.count += n;
        }
    }

    pub fn merge(&mut self, o: &Stats) {
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        self.absmax = self.absmax.max(o.absmax);
        self.count += o.count;
        for (a, b) in self.hist.iter_mut().zip(&o.hist) {
            *a += b;
        }
    }

    /// |x| at rank floor(rate * count) from the top (rate 0: the exact max).
    pub fn quantile_from_top(&self, rate: f64) -> f64 {
        let rank = (rate * self.count as f64).floor() as u64;
        if rank == 0 {
            return self.absmax;
        }
        let mut seen = 0u64;
        for i in (0..self.hist.len()).rev() {
            seen += self.hist[i];
            if seen > rank {
                return if i == 0 {
                    0.0
                } else {
                    upper_edge(i).min(self.absmax)
                };
            }
        }
        0.0
    }

    /// Estimated values above `limit`, as a fraction.
    pub fn fraction_above(&self, limit: f64) -> f64 {
        if self.count == 0 || self.absmax <= limit {
            return 0.0;
        }
        let above: u64 = (1..self.hist.len())
            .filter(|&i| center(i) > limit)
            .map(|i| self.hist[i])
            .sum();
        above as f64 / self.count as f64
    }

    fn mse_estimate(&self, s: f64, qmax: f64) -> f64 {
        let top = s * qmax;
        (0..self.hist.len())
            .filter(|&i| self.hist[i] > 0)
            .map(|i| {
                let c = center(i).min(self.absmax);
                let e = if c > top {
                    (c - top).powi(2)
                } else if c >= s / 2.0 {
                    s * s / 12.0
                } else {
                    c * c
                };
                e * self.hist[i] as f64
            })
            .sum()
    }
}

/// One activation's grid: x ~ (q - zero_point) * scale with q in [qmin, qmax]
/// (unsigned: [0, 2^k - 1]; signed: [-2^(k-1), 2^(k-1) - 1]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grid {
    pub scale: f32,
    pub signed: bool,
    pub zero_point: i32,
}

impl Grid {
    /// The integer range of round(x / scale), the zero point taken out: [qmin - zp, qmax - zp].
    pub fn levels(&self, bits: u32) -> (f64, f64) {
        let (qmin, qmax) = if self.signed {
            (
                -(2f64.powi(bits as i32 - 1)),
                2f64.powi(bits as i32 - 1) - 1.0,
            )
        } else {
            (0.0, 2f64.powi(bits as i32) - 1.0)
        };
        let zp = self.zero_point as f64;
        (qmin - zp, qmax - zp)
    }
}

/// The quantizer for one value.
pub fn choose_grid(st: &Stats, bits: u32, range: Range, overflow_rate: f64) -> Grid {
    if range == Range::MinMax {
        // [lo, hi] holds 0 so that 0 (ReLU's floor, padding) is exact:
        // scale = (hi - lo) / (2^k - 1), zero point = round(-lo / scale).
        let (lo, hi) = (st.min.min(0.0), st.max.max(0.0));
        let levels = 2f64.powi(bits as i32) - 1.0;
        let scale = finite_scale((hi - lo) / levels);
        let zp = (-lo / scale as f64).round().clamp(0.0, levels) as i32;
        return Grid {
            scale,
            signed: false,
            zero_point: zp,
        };
    }
    let signed = st.min < 0.0;
    let qmax = if signed {
        2f64.powi(bits as i32 - 1) - 1.0
    } else {
        2f64.powi(bits as i32) - 1.0
    };
    let scale = match range {
        Range::MaxAbs => {
            let v = st.quantile_from_top(overflow_rate);
            let i = (v + 1e-12).log2().ceil() as i32;
            let sf = if signed {
                bits as i32 - 1 - i
            } else {
                bits as i32 - i
            };
            2f64.powi(-sf.clamp(-126, 126))
        }
        Range::Percentile(p) => st.quantile_from_top(1.0 - p / 100.0) / qmax,
        Range::Mse => {
            let mut best = (f64::INFINITY, st.absmax / qmax);
            for i in 0..=320 {
                let v = st.absmax * 2f64.powf(-(i as f64) / 32.0);
                let s = v / qmax;
                let e = st.mse_estimate(s, qmax);
                if e < best.0 {
                    best = (e, s);
                }
            }
            best.1
        }
        Range::MinMax => unreachable!("handled above"),
    };
    Grid {
        scale: finite_scale(scale),
        signed,
        zero_point: 0,
    }
}

/// A usable f32 scale: positive, finite, at least the smallest normal (1 otherwise).
fn finite_scale(scale: f64) -> f32 {
    let scale = if scale > 0.0 && scale.is_finite() {
        scale as f32
    } else {
        1.0
    };
    scale.max(f32::MIN_POSITIVE)
}

/// The activation quantization pass.
pub struct ActQuant(pub ActQuantConfig);

struct Target {
    /// Why this value gets an 8-bit fake-quant chain instead of Q/DQ.
    no_qdq: Option<String>,
    value: String,
    /// (node index, input slot) to rewire to the quantized value.
    uses: Vec<(usize, usize)>,
    /// Node after which the quantizer goes (None: at the start, for graph inputs).
    after: Option<usize>,
    /// For the report.
    readers: Vec<String>,
    /// Relu / Clip / Min nodes that produce the value, nearest first, each read
    /// only by the next (or, the first, only by the rewired uses): the quantizer
    /// can take their place when its saturation does what they do.
    chain: Vec<Bound>,
}

/// An activation the quantizer may absorb.
#[derive(Debug, Clone)]
struct Bound {
    node: usize,
    /// Its input.
    input: String,
    /// It clamps at 0 from below (Relu, Clip(0, ..)).
    floor_zero: bool,
    /// Its upper bound (infinite for Relu), the smallest over channels for Min.
    top: f32,
}

/// The value after `v` when `v`'s only reader is a Relu, Clip(0, c) or Min with a
/// constant bound (an activation a quantizer belongs after), else `v`.
fn after_activation(g: &Graph, v: &str) -> String {
    let mut v = v.to_string();
    loop {
        if g.is_output(&v) {
            return v;
        }
        let [c] = g.consumers(&v) else { return v };
        if bound_of(g, *c).is_none() || g.node(*c).input.first() != Some(&v) {
            return v;
        }
        v = g.node(*c).output[0].clone();
    }
}

/// The node as an absorbable bound, when it is one.
fn bound_of(g: &Graph, n: usize) -> Option<Bound> {
    let node = g.node(n);
    let input = node.input.first()?.clone();
    let constant = |slot: usize| -> Option<Option<ndarray::ArrayD<f32>>> {
        match node.input.get(slot).filter(|s| !s.is_empty()) {
            None => Some(None),
            Some(name) => g.constant_f32(name).ok().flatten().map(Some),
        }
    };
    let (floor_zero, top) = match node.op_type() {
        "Relu" => (true, f32::INFINITY),
        "Clip" => {
            use crate::onnx::attr::NodeAttrs;
            let lo = match constant(1)? {
                Some(a) if a.len() == 1 => a.iter().next().copied()?,
                Some(_) => return None,
                None => node.get_float("min").ok()?.unwrap_or(f32::NEG_INFINITY),
            };
            let hi = match constant(2)? {
                Some(a) if a.len() == 1 => a.iter().next().copied()?,
                Some(_) => return None,
                None => node.get_float("max").ok()?.unwrap_or(f32::INFINITY),
            };
            if lo != 0.0 {
                return None;
            }
            (true, hi)
        }
        "Min" if node.input.len() == 2 => {
            let b = constant(1)??;
            (false, b.iter().copied().fold(f32::INFINITY, f32::min))
        }
        _ => return None,
    };
    Some(Bound {
        node: n,
        input,
        floor_zero,
        top,
    })
}

/// The absorbable chain behind `value` whose readers are exactly `uses`.
fn chain_of(g: &Graph, value: &str, uses: &[(usize, usize)]) -> Vec<Bound> {
    let mut chain = Vec::new();
    if g.is_output(value) {
        return chain;
    }
    let readers: HashSet<usize> = uses.iter().map(|u| u.0).collect();
    let all_rewired = g.consumers(value).iter().all(|c| {
        readers.contains(c)
            && g.node(*c)
                .input
                .iter()
                .enumerate()
                .filter(|(_, s)| *s == value)
                .all(|(k, _)| uses.contains(&(*c, k)))
    });
    if !all_rewired {
        return chain;
    }
    let mut v = value.to_string();
    while let Some((p, _)) = g.producer(&v) {
        let Some(b) = bound_of(g, p) else { break };
        let next = b.input.clone();
        chain.push(b);
        if g.is_output(&next) || g.consumers(&next) != [p] || g.producer(&next).is_none() {
            break;
        }
        v = next;
    }
    chain
}

impl Pass for ActQuant {
    fn name(&self) -> &'static str {
        "act-quant"
    }

    fn run(&self, model: &mut Model, cx: &Context) -> Result<PassReport> {
        let cfg = &self.0;
        let mut report = PassReport::new(self.name());
        // Float16 rounding has no range to choose: it runs without images.
        let data = cx.calib.filter(|d| !d.is_empty());
        if data.is_none() && cfg.bits != 16 {
            return Err(Error::Usage(NEEDS_CALIB.into()));
        }
        let opset = model.opset();
        if opset < 11 {
            return Err(Error::Usage(format!(
                "activation quantization needs ai.onnx opset 11 or later (QuantizeLinear, Round, Clip with min/max inputs); the model imports opset {opset}"
            )));
        }

        // Which values, and who reads them.
        let targets: Vec<Target> = {
            let view = Graph::of(model)?;
            let mut act = ActBits::new(&view);
            // Layers whose weight is a float32 initializer (the ones weight
            // quantization rewrites).
            let weighted: HashSet<usize> = weighted_layers(&view)
                .into_iter()
                .filter(|l| l.not_float_initializer(&view).is_none())
                .flat_map(|l| l.nodes)
                .collect();
            let mut by_value: BTreeMap<usize, Target> = BTreeMap::new();
            let mut order: HashMap<String, usize> = HashMap::new();
            let mut left: HashSet<String> = HashSet::new();
            let mut add = |value: &str,
                           uses: Vec<(usize, usize)>,
                           readers: Vec<String>,
                           report: &mut PassReport| {
                if left.contains(value) {
                    return;
                }
                if let Some(&k) = order.get(value) {
                    let t = by_value.get_mut(&k).expect("indexed");
                    t.uses.extend(uses);
                    t.readers.extend(readers);
                    return;
                }
                let names: Vec<&str> = std::iter::once(value)
                    .chain(readers.iter().map(String::as_str))
                    .collect();
                let skip = select::first_match(&cfg.skip, &names);
                let why = match (skip, act.of(value)) {
                    (Some(p), _) => Some(format!("left float: matches skip pattern '{p}'")),
                    (None, Some(b)) => Some(format!("already a {b}-bit activation")),
                    _ => None,
                };
                if let Some(why) = why {
                    report.skipped(value, why);
                    left.insert(value.to_string());
                    return;
                }
                let after = view.producer(value).map(|(p, _)| p);
                let key = order.len();
                order.insert(value.to_string(), key);
                by_value.insert(
                    key,
                    Target {
                        no_qdq: None,
                        value: value.into(),
                        uses,
                        after,
                        readers,
                        chain: Vec::new(),
                    },
                );
            };
            for &i in view.topo_order() {
                let n = view.node(i);
                match cfg.placement {
                    Placement::Inputs if weighted.contains(&i) => {
                        add(
                            &n.input[0],
                            vec![(i, 0)],
                            vec![view.node_name(i).to_string()],
                            &mut report,
                        );
                    }
                    Placement::Outputs
                        if weighted.contains(&i)
                            || matches!(n.op_type(), "AveragePool" | "GlobalAveragePool") =>
                    {
                        // After the activation that follows the layer, as runtimes place it.
                        let v = &after_activation(&view, &n.output[0]);
                        let uses: Vec<(usize, usize)> = view
                            .consumers(v)
                            .iter()
                            .flat_map(|&c| {
                                view.node(c)
                                    .input
                                    .iter()
                                    .enumerate()
                                    .filter(|(_, s)| *s == v)
                                    .map(move |(k, _)| (c, k))
                            })
                            .collect::<HashSet<_>>()
                            .into_iter()
                            .collect();
                        if uses.is_empty() {
                            report.skipped(v, "left float: only a graph output reads it");
                            continue;
                        }
                        let readers = uses
                            .iter()
                            .map(|&(c, _)| view.node_name(c).to_string())
                            .collect::<std::collections::BTreeSet<_>>()
                            .into_iter()
                            .collect();
                        add(v, uses, readers, &mut report);
                    }
                    _ => {}
                }
            }
            let mut targets: Vec<Target> = by_value
                .into_values()
                .filter(|t| !t.uses.is_empty())
                .collect();
            if cfg.bits == 8 && !cfg.qdq_always {
                for t in &mut targets {
                    t.no_qdq = requantized_weights(&view, &t.uses, cfg.qdq_weights, opset);
                }
            }
            for t in &mut targets {
                t.chain = chain_of(&view, &t.value, &t.uses);
            }
            targets
        };
        if targets.is_empty() {
            return Ok(report);
        }

        // Calibration (float16 rounding without images: nothing to measure).
        let mut stats: Vec<Stats> = vec![Stats::default(); targets.len()];
        if let Some(data) = data {
            let input_shape = cx.input_shape_for(data);
            let values: Vec<String> = targets.iter().map(|t| t.value.clone()).collect();
            let start = std::time::Instant::now();
            crate::engine::capture(
                model,
                &input_shape,
                &values,
                data.images.view(),
                cx.threads.max(1),
                4,
                || vec![Stats::default(); values.len()],
                |acc: &mut Vec<Stats>, _i, views| {
                    for (s, v) in acc.iter_mut().zip(views) {
                        // A contiguous output (tract's usual) as a slice: much
                        // faster than ndarray's element iterator.
                        match v.as_slice() {
                            Some(xs) => s.add(xs.iter().copied()),
                            None => s.add(v.iter().copied()),
                        }
                    }
                },
                |acc| {
                    for (s, a) in stats.iter_mut().zip(&acc) {
                        s.merge(a);
                    }
                },
            )
            .map_err(|e| Error::Usage(format!("act-quant calibration: {e}")))?;
            report.changed(
                "calibration",
                format!(
                    "{} images: {} activations measured in {:.2}s, range {}{}",
                    data.len(),
                    values.len(),
                    start.elapsed().as_secs_f64(),
                    cfg.range,
                    if cfg.range == Range::MaxAbs {
                        format!(" with overflow rate {}", cfg.overflow_rate)
                    } else {
                        String::new()
                    }
                ),
            );
        }

        // Rewrite.
        let bits = cfg.bits;
        let g = model.graph_mut();
        let mut names = Namer::of(g);
        let mut before: HashMap<Option<usize>, Vec<NodeProto>> = HashMap::new();
        let mut rewires: Vec<(usize, usize, String)> = Vec::new();
        let mut absorbed: HashSet<usize> = HashSet::new();
        for (t, st) in targets.iter().zip(&stats) {
            let grid = choose_grid(st, bits, cfg.range, cfg.overflow_rate);
            let (scale, signed) = (grid.scale, grid.signed);
            let (lo, hi) = grid.levels(bits);
            let form = match bits {
                8 if t.no_qdq.is_none() => Form::Qdq {
                    signed,
                    zero_point: grid.zero_point,
                },
                16 => Form::Half,
                _ => Form::FakeQuant { signed, lo, hi },
            };
            // Activations the quantizer's saturation makes redundant: Relu and
            // Clip(0, c) when the grid's lowest level is 0, Clip and Min when the top
            // level rounds from at or below the bound (c / s >= top level - 1/4,
            // a margin for the runtime's float division).
            let mut src = t.value.clone();
            let mut absorbed_here = Vec::new();
            if form != Form::Half {
                for b in &t.chain {
                    let floor_ok = !b.floor_zero || lo == 0.0;
                    let top_ok =
                        b.top == f32::INFINITY || (b.top as f64) / (scale as f64) >= hi - 0.25;
                    if !(floor_ok && top_ok) {
                        break;
                    }
                    absorbed_here.push(b.node);
                    src = b.input.clone();
                }
            }
            let (nodes, out) = act::build(g, &mut names, &src, form, scale);
            before.entry(t.after).or_default().extend(nodes);
            let absorbed_names: Vec<String> = absorbed_here
                .iter()
                .map(|&n| {
                    let node = &g.node[n];
                    format!("{} '{}'", node.op_type(), node.name())
                })
                .collect();
            absorbed.extend(absorbed_here);
            for &(n, k) in &t.uses {
                rewires.push((n, k, out.clone()));
            }
            let mut readers = t.readers.clone();
            readers.dedup();
            let read_by = if readers.len() > 3 {
                format!("{} and {} more", readers[..3].join(", "), readers.len() - 3)
            } else {
                readers.join(", ")
            };
            if form == Form::Half {
                report.changed(
                    &t.value,
                    match data {
                        Some(_) => format!(
                            "16-bit {}, seen [{:.4}, {:.4}] (read by {read_by})",
                            form.describe(),
                            st.min,
                            st.max,
                        ),
                        None => format!("16-bit {} (read by {read_by})", form.describe()),
                    },
                );
                continue;
            }
            let top = scale as f64 * hi;
            let mut step = if (scale.log2()).fract() == 0.0 {
                format!("2^{} = {scale:?}", scale.log2() as i32)
            } else {
                format!("{scale:?}")
            };
            if grid.zero_point != 0 {
                step += &format!(", zero point {}", grid.zero_point);
            }
            let mut why = t
                .no_qdq
                .as_ref()
                .map(|w| format!("; not Q/DQ: {w}"))
                .unwrap_or_default();
            if !absorbed_names.is_empty() {
                why.push_str(&format!(
                    "; absorbs {} (the grid saturates where it clamps)",
                    absorbed_names.join(", ")
                ));
            }
            if data.is_some() {
                report.ranges.push(super::ActRange {
                    value: t.value.clone(),
                    bits,
                    seen_min: st.min,
                    seen_max: st.max,
                    grid_min: scale as f64 * lo,
                    grid_max: top,
                });
            }
            report.changed(
                &t.value,
                format!(
                    "{bits}-bit {}, scale {step}, seen [{:.4}, {:.4}], clipped ~{:.3}% (read by {read_by}){why}",
                    form.describe(),
                    st.min,
                    st.max,
                    100.0 * st.fraction_above(top),
                ),
            );
        }
        for (n, k, v) in rewires {
            g.node[n].input[k] = v;
        }
        let bound_inputs: HashSet<String> = absorbed
            .iter()
            .flat_map(|&n| g.node[n].input.iter().skip(1).cloned())
            .collect();
        let old = std::mem::take(&mut g.node);
        let mut new = Vec::with_capacity(old.len() + before.values().map(Vec::len).sum::<usize>());
        if let Some(v) = before.remove(&None) {
            new.extend(v);
        }
        for (i, n) in old.into_iter().enumerate() {
            if !absorbed.contains(&i) {
                new.push(n);
            }
            if let Some(v) = before.remove(&Some(i)) {
                new.extend(v);
            }
        }
        g.node = new;
        // Constants only the absorbed nodes read (Clip bounds) go with them.
        crate::graph::edit::remove_dead_constants(g, &bound_inputs);
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_bins_by_hand() {
        // |a| = 2^e (1 + f) with unbiased exponent e >= -40 and top 5 bits m of its
        // mantissa f is in bin (e + 40) * 32 + m + 1 (32 equal steps per octave).
        assert_eq!(bin_of(1.0), 40 * 32 + 1); // e 0, m 0
        assert_eq!(bin_of(1.5), 40 * 32 + 16 + 1); // mantissa .1 -> m 16
        assert_eq!(bin_of(-1.5), bin_of(1.5));
        assert_eq!(bin_of(2f32.powi(-40)), 1);
        assert_eq!(bin_of(2f32.powi(-41)), 0);
        assert_eq!(bin_of(0.0), 0);
        assert_eq!(bin_of(f32::NAN), 0);
        assert_eq!(bin_of(f32::INFINITY), BINS);
        assert_eq!(bin_of(3.0e38), BINS);
        // Every bin's centre falls in its own bin.
        for i in 1..BINS {
            assert_eq!(bin_of(bin_point(i, 0.5) as f32), i, "bin {i}");
        }
    }
}
