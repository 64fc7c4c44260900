//! Activation quantization, calibrated: the model runs in tract on the
//! calibration images, each chosen activation's range is measured, and a
//! quantizer is inserted on it:
//!
//! - at 8 bits, `QuantizeLinear -> DequantizeLinear` (uint8 when the calibration
//!   saw no negative value, else int8; zero point 0 except for `minmax` and the
//!   `asym-` ranges, uint8 with a zero point; per tensor), which tract and
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
//! Mixed precision (`keep = K`): each value is quantized alone and the model run
//! on 32 calibration images; the K whose quantization moves the output most,
//! ||y_k - y||^2 / ||y||^2, stay at 16 bits on the fake-quant chain with a maxabs
//! int16 grid (TFLite's 16x8 mode keeps activations at int16 the same way).
//!
//! Range search (`search = R`): R rounds of coordinate descent on the scales,
//! each activation in graph order trying its scale x 0.5 .. x 2 with the others on
//! their current grids, keeping the one with the least network output error on
//! 32 calibration images (`search_images`), LAPQ's loss-aware clipping without
//! labels (see `search_ranges`).
//!
//! Per-channel grids (`per_channel = true`): each channel of axis 1 gets the grid
//! the range chooses for its own values ([`Stats::channel`], from a histogram per
//! channel at 8 bins an octave), on the tensor's signed or unsigned levels, as
//! the fake-quant chain with a [C, 1, .., 1] scale (symmetric ranges only; a value
//! a MatMul reads keeps one grid). Outlier channels get their own scales as in
//! per-embedding-group activation quantization (PEG: Bondarenko et al., 2021,
//! "Understanding and overcoming the challenges of efficient transformer
//! quantization"), here one group per channel.
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
//!   mass: exact squared excess; inside: s^2/12 per value above s/2, x^2 below);
//! - `asym-percentile:P`: minmax's affine grid (2^k levels, zero point, uint8 at
//!   8 bits) on [lo, hi] = the two tails' quantiles at rank floor((1 - P/100)/2
//!   count) from each extreme (ranks counted over all values): the 100 - P percent
//!   that `percentile:P` may clip, split evenly between the tails, as onnxruntime's
//!   `HistogramCalibrater` does with `symmetric=False` (its `compute_percentile`);
//! - `asym-mse`: the affine grid over [-a, b], a among -min 2^(-i/32) and b among
//!   max 2^(-j/32) (i, j = 0..320, or 0), with the least MSE estimated as `mse`
//!   does but per tail, at the levels the rounded zero point gives (a full search
//!   of the 322 x 322 pairs, two binary searches each on prefix sums).
//!
//! The asymmetric ranges change only values that go below 0: on the others they
//! are `percentile:P` and `mse` (the same grid, zero point 0).
//!
//! |x| is kept in a histogram of 32 bins per octave from 2^-40 to 2^24 (each
//! octave cut linearly, from the float's exponent and top mantissa bits;
//! quantiles are taken at a bin's upper edge: at most 3.2% above the exact
//! value, so the range errs wide), and the |x| of negative x in a second one of
//! the same bins (the two tails), beside the exact min, max and max |x|.
//! Images are counted in chunks (about 4 a thread, at least 4 images each);
//! counts are integers and a zero min or max is taken as +0, so results do not
//! depend on the thread count.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::calib::Geom;
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
    /// Asymmetric with outlier clipping: [lo, hi] = the (100 - P)/2-th and
    /// (100 + P)/2-th percentiles of x (the 100 - P percent clipped split evenly
    /// between the tails, as onnxruntime's asymmetric percentile calibration),
    /// widened to hold 0, on 2^k levels with a zero point. Without negative values:
    /// `Percentile(P)`.
    AsymPercentile(f64),
    /// Asymmetric: the [lo, hi] whose zero-point grid has the least estimated
    /// quantization MSE, lo and hi each from its own list of candidates and every
    /// pair scored on both tails. Without negative values: `Mse`.
    AsymMse,
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Range::MaxAbs => f.write_str("maxabs"),
            Range::Percentile(p) => write!(f, "percentile:{p}"),
            Range::Mse => f.write_str("mse"),
            Range::MinMax => f.write_str("minmax"),
            Range::AsymPercentile(p) => write!(f, "asym-percentile:{p}"),
            Range::AsymMse => f.write_str("asym-mse"),
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
            "asym-mse" => return Ok(Range::AsymMse),
            _ => {}
        }
        let bad = || {
            Error::Usage(format!(
                "--act-range '{s}': expected maxabs, percentile:P (0 < P <= 100, e.g. percentile:99.99), mse, minmax, asym-percentile:P (0 < P <= 100) or asym-mse"
            ))
        };
        let (asym, p) = match t.strip_prefix("asym-") {
            Some(rest) => (true, rest),
            None => (false, t.as_str()),
        };
        let p: f64 = p
            .strip_prefix("percentile:")
            .ok_or_else(bad)?
            .parse()
            .map_err(|_| bad())?;
        if !(p > 0.0 && p <= 100.0) {
            return Err(bad());
        }
        Ok(if asym {
            Range::AsymPercentile(p)
        } else {
            Range::Percentile(p)
        })
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
    /// maxabs | percentile:P | mse | minmax | asym-percentile:P | asym-mse
    pub range: Option<String>,
    /// Fraction of |x| allowed to clip (maxabs); default 0.
    pub overflow_rate: Option<f64>,
    /// inputs | outputs
    pub placement: Option<String>,
    /// Glob patterns on value or layer names left float.
    #[serde(default)]
    pub skip: Vec<String>,
    /// Mixed precision: this many activations, those whose quantization alone
    /// moves the network's output most on the calibration images, stay at 16 bits
    /// (an int16 grid over the seen range). Default 0.
    pub keep: Option<usize>,
    /// Loss-aware range search: rounds of coordinate descent on each activation's
    /// scale by the network's output error on 32 calibration images (default 0:
    /// the range's grids as they are). A round costs 8 model runs an activation.
    pub search: Option<usize>,
    /// Calibration images the range search runs (the first ones; default 32).
    /// More fit the scales less to those images, at proportional cost.
    pub search_images: Option<usize>,
    /// Per-channel grids: each channel (axis 1) of a quantized activation gets the
    /// grid the range chooses for that channel's values alone (symmetric ranges
    /// only; the fake-quant chain). Default false.
    pub per_channel: Option<bool>,
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
        let search_images = self.search_images.unwrap_or(SEARCH_IMAGES);
        if search_images == 0 {
            return Err(Error::Usage(
                "act_quant search_images = 0: the range search needs at least one calibration image"
                    .into(),
            ));
        }
        let per_channel = self.per_channel.unwrap_or(false);
        if per_channel
            && matches!(
                range,
                Range::MinMax | Range::AsymPercentile(_) | Range::AsymMse
            )
        {
            return Err(Error::Usage(format!(
                "per-channel activations take a symmetric range (maxabs, percentile:P or mse), not {range}: a zero point per channel is not supported"
            )));
        }
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
            keep: self.keep.unwrap_or(0),
            search: self.search.unwrap_or(0),
            search_images,
            qdq_weights: true,
            qdq_always,
            per_channel,
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
    /// Activations kept at 16 bits by measured sensitivity (mixed precision).
    pub keep: usize,
    /// Rounds of loss-aware range search (0: the range's grids as they are).
    pub search: usize,
    /// Calibration images each range-search run uses.
    pub search_images: usize,
    /// Affine-claimed weights will be written as codes + DequantizeLinear (packed
    /// storage): their layers' inputs may take Q/DQ (see [`requantized_weights`]).
    pub qdq_weights: bool,
    /// Q/DQ at 8 bits whatever the weights (recipe `qdq = "always"`).
    pub qdq_always: bool,
    /// Per-channel grids (axis 1), each channel's own by the range.
    pub per_channel: bool,
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

/// Lanes of [`Tally`]: element j of each run of `TALLY_LANES` counts in table j.
const TALLY_LANES: usize = 8;
/// The raw index of |x|: its f32 bits without the sign, shifted right by 18
/// (exponent and top 5 mantissa bits), 0..8191; [`bin_of`] is a function of it,
/// except that an infinity and a NaN can share one (told apart by a NaN count).
const TALLY_RAW: usize = 1 << 13;
/// Padding after each lane's table (128 bytes), so that the same slot of two
/// lanes differs in its address's low 12 bits: a load from one lane's counter
/// does not wait for a store to another lane's (4K aliasing).
const TALLY_PAD: usize = 16;

/// The counts behind [`Stats`] as the capture gathers them, one table per lane.
///
/// A histogram increments one counter per element; a run of equal bins (a
/// ReLU's zeros) makes every increment wait for the previous one's store. Here
/// element j of every run of 8 counts in its own table; the index is the raw
/// bits of |x| shifted (no comparisons, so no branches), plus TALLY_RAW when
/// x < 0 (the two tails of a signed value); min, max and NaNs are kept per lane.
/// Raw indices become [`bin_of`]'s bins once, when [`Stats::merge_tally`] sums
/// the tables. Counts equal [`Stats::add`]'s exactly.
///
/// Memory: 8 x (2 x 8192 + 16) u32 = 512 KiB a value, written once (zeroed,
/// not calloc's lazily mapped pages, whose first increment faults twice and
/// flushes the other threads' TLBs); the capture reuses them chunk after chunk
/// ([`Tally::reset`]). Before a lane's u32 could overflow (2^32 elements since
/// the last spill), the tables are added into `spill` and zeroed.
#[derive(Debug)]
pub struct Tally {
    lo: f32,
    hi: f32,
    count: u64,
    nan: u64,
    /// Elements counted in `counts` since they were last zeroed.
    in_tables: u64,
    /// [lane][(x < 0) * TALLY_RAW + raw index of |x|], then TALLY_PAD unused.
    counts: Box<[[u32; 2 * TALLY_RAW + TALLY_PAD]]>,
    /// Bins spilled from `counts` when a tally outgrew u32 (only its hist and
    /// neg are filled: its min, max and count stay neutral for a merge).
    spill: Option<Box<Stats>>,
    /// Per channel (axis 1), max |x| (see [`Tally::add_channels`]; empty until then).
    channels: Vec<f32>,
    /// Per channel, [`CH_BINS`] counts of |x| ([`ch_bin`]), channel after channel.
    channel_hist: Vec<u32>,
    /// The rank of the values `channels` was measured on.
    rank: usize,
}

impl Default for Tally {
    fn default() -> Self {
        let mut counts = Vec::with_capacity(TALLY_LANES);
        for _ in 0..TALLY_LANES {
            // Pushed, so written: not a calloc.
            counts.push([0u32; 2 * TALLY_RAW + TALLY_PAD]);
        }
        Tally {
            lo: f32::INFINITY,
            hi: f32::NEG_INFINITY,
            count: 0,
            nan: 0,
            in_tables: 0,
            counts: counts.into_boxed_slice(),
            spill: None,
            channels: Vec::new(),
            channel_hist: Vec::new(),
            rank: 0,
        }
    }
}

/// Per-channel histograms: 8 bins per octave of |x| from 2^-16 to 2^16 (bin 0:
/// below, zeros included; the last: 2^16 and above, and NaN). Coarser than
/// [`Stats`]' 32 (1 KiB a channel, so that the ~17k channels of MobileNetV2's
/// activations fit in a chunk's tallies); each bin is 4 of [`Stats`]' bins.
pub const CH_BINS: usize = 32 * 8 + 2;

/// The per-channel bin of |x|: its f32 exponent and top 3 mantissa bits, offset
/// so that 2^-16 is bin 1.
#[inline(always)]
fn ch_bin(x: f32) -> usize {
    const BASE: usize = (127 - 16) * 8;
    let r = ((x.to_bits() & 0x7fff_ffff) >> 20) as usize;
    (r + 1).saturating_sub(BASE).min(CH_BINS - 1)
}

/// The slot of x in a lane's table: its raw index, plus TALLY_RAW when x < 0.
#[inline(always)]
fn tally_slot(x: f32) -> usize {
    ((x.to_bits() & 0x7fff_ffff) >> 18) as usize + usize::from(x < 0.0) * TALLY_RAW
}

/// [`bin_of`] from a raw index (a NaN's raw index is an infinity's or above:
/// it gives BINS; [`Stats::merge_tally`] moves the NaNs to bin 0).
fn bin_of_raw(r: usize) -> usize {
    bin_of(f32::from_bits(((r as u32) << 18).min(0x7f80_0000)))
}

/// hist += the tables' counts of either sign, neg += those of x < 0, by bin.
fn add_tables(counts: &[[u32; 2 * TALLY_RAW + TALLY_PAD]], hist: &mut [u64], neg: &mut [u64]) {
    for lane in counts {
        let (pos, ng) = lane.split_at(TALLY_RAW);
        for (r, (&p, &n)) in pos.iter().zip(&ng[..TALLY_RAW]).enumerate() {
            if p | n != 0 {
                let b = bin_of_raw(r);
                hist[b] += u64::from(p) + u64::from(n);
                neg[b] += u64::from(n);
            }
        }
    }
}

impl Tally {
    /// Counts every element of `xs` (NaN: bin 0, neither min nor max, as
    /// [`Stats::add`]).
    pub fn add(&mut self, xs: &[f32]) {
        // Parts short enough that no u32 counter can overflow within one.
        for part in xs.chunks(1 << 30) {
            if self.in_tables + part.len() as u64 > u64::from(u32::MAX) {
                self.spill_tables();
            }
            self.add_part(part);
        }
    }

    fn add_part(&mut self, xs: &[f32]) {
        const MASK: usize = 2 * TALLY_RAW - 1;
        let (mut lo, mut hi) = (
            [f32::INFINITY; TALLY_LANES],
            [f32::NEG_INFINITY; TALLY_LANES],
        );
        let mut nan = [0u64; TALLY_LANES];
        let mut chunks = xs.chunks_exact(TALLY_LANES);
        let counts = &mut self.counts[..TALLY_LANES];
        for c in &mut chunks {
            let c: &[f32; TALLY_LANES] = c.try_into().expect("a chunk of TALLY_LANES");
            let mut slot = [0usize; TALLY_LANES];
            for j in 0..TALLY_LANES {
                lo[j] = lo[j].min(c[j]);
                hi[j] = hi[j].max(c[j]);
                nan[j] += u64::from(c[j].is_nan());
                slot[j] = tally_slot(c[j]);
            }
            for j in 0..TALLY_LANES {
                counts[j][slot[j] & MASK] += 1;
            }
        }
        for &x in chunks.remainder() {
            lo[0] = lo[0].min(x);
            hi[0] = hi[0].max(x);
            nan[0] += u64::from(x.is_nan());
            counts[0][tally_slot(x) & MASK] += 1;
        }
        self.lo = lo.iter().fold(self.lo, |a, b| a.min(*b));
        self.hi = hi.iter().fold(self.hi, |a, b| a.max(*b));
        self.nan += nan.iter().sum::<u64>();
        self.count += xs.len() as u64;
        self.in_tables += xs.len() as u64;
    }

    /// Counts `v` per channel of axis 1 (rank >= 2): each channel's max |x| (NaN
    /// ignored) and its histogram of |x| ([`ch_bin`]), from which per-channel
    /// activation quantization chooses each channel's grid. 1 KiB a channel.
    pub fn add_channels(&mut self, v: &ndarray::ArrayViewD<f32>) {
        let c = v.shape()[1];
        if self.channels.len() < c {
            self.channels.resize(c, 0.0);
            self.channel_hist.resize(c * CH_BINS, 0);
        }
        self.rank = v.ndim();
        match v.as_slice() {
            // [N, C, ...] contiguous: N x C planes in order.
            Some(xs) if !xs.is_empty() => {
                let plane = (xs.len() / (v.shape()[0] * c)).max(1);
                for (i, p) in xs.chunks(plane).enumerate() {
                    self.count_channel(i % c, p);
                }
            }
            _ => {
                for (ch, lane) in v.axis_iter(ndarray::Axis(1)).enumerate() {
                    self.count_channel(ch, &lane.iter().copied().collect::<Vec<f32>>());
                }
            }
        }
    }

    /// Channel `ch`'s max |x| and histogram, over `xs`.
    fn count_channel(&mut self, ch: usize, xs: &[f32]) {
        let hist = &mut self.channel_hist[ch * CH_BINS..(ch + 1) * CH_BINS];
        // Two running maxima: no single dependency chain through every element.
        let (mut m0, mut m1) = (self.channels[ch], 0f32);
        let mut pairs = xs.chunks_exact(2);
        for p in &mut pairs {
            m0 = m0.max(p[0].abs());
            m1 = m1.max(p[1].abs());
            hist[ch_bin(p[0])] += 1;
            hist[ch_bin(p[1])] += 1;
        }
        for &x in pairs.remainder() {
            m0 = m0.max(x.abs());
            hist[ch_bin(x)] += 1;
        }
        self.channels[ch] = m0.max(m1);
    }

    /// Adds the tables into `spill` and zeroes them.
    fn spill_tables(&mut self) {
        let s = self.spill.get_or_insert_with(Default::default);
        add_tables(&self.counts, &mut s.hist, &mut s.neg);
        for lane in self.counts.iter_mut() {
            lane.fill(0);
        }
        self.in_tables = 0;
    }

    /// Back to no elements, keeping the tables' memory.
    pub fn reset(&mut self) {
        for lane in self.counts.iter_mut() {
            lane.fill(0);
        }
        (self.lo, self.hi) = (f32::INFINITY, f32::NEG_INFINITY);
        (self.count, self.nan, self.in_tables, self.spill) = (0, 0, 0, None);
        self.channels.clear();
        self.channel_hist.clear();
        self.rank = 0;
    }
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
    /// The same bins, negative x only (so hist - neg counts x >= 0): the two
    /// tails of a signed value for the asymmetric ranges.
    pub neg: Vec<u64>,
    /// Per channel of axis 1, max |x| (empty when not measured: per-tensor grids).
    pub channel_absmax: Vec<f64>,
    /// Per channel, [`CH_BINS`] counts of |x|, channel after channel.
    pub channel_hist: Vec<u64>,
    /// The rank of the value `channel_absmax` was measured on (0: not measured).
    pub rank: usize,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            absmax: 0.0,
            count: 0,
            hist: vec![0; BINS + 1],
            neg: vec![0; BINS + 1],
            channel_absmax: Vec::new(),
            channel_hist: Vec::new(),
            rank: 0,
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
    /// Counts every element, one at a time: the definition [`Tally`] (what the
    /// capture uses) is tested against.
    pub fn add(&mut self, xs: impl Iterator<Item = f32>) {
        let (mut lo, mut hi, mut am) = (f32::INFINITY, f32::NEG_INFINITY, 0f32);
        let mut n = 0u64;
        for x in xs {
            lo = lo.min(x);
            hi = hi.max(x);
            let a = x.abs();
            am = am.max(a);
            let b = bin_of(a);
            self.hist[b] += 1;
            if x < 0.0 {
                self.neg[b] += 1;
            }
            n += 1;
        }
        if n > 0 {
            self.min = self.min.min(lo as f64);
            self.max = self.max.max(hi as f64);
            self.absmax = self.absmax.max(am as f64);
            self.count += n;
        }
    }

    /// Adds what a [`Tally`] counted.
    pub fn merge_tally(&mut self, t: &Tally) {
        if t.count == 0 {
            return;
        }
        // +0 for a zero of either sign: which zero f32::min/max keeps depends on
        // the order the lanes and chunks met them, and so on the thread count.
        let plus_zero = |v: f32| if v == 0.0 { 0.0 } else { v as f64 };
        self.min = self.min.min(plus_zero(t.lo));
        self.max = self.max.max(plus_zero(t.hi));
        // max |x| over the non-NaN values is max(hi, -lo); 0 when all are NaN.
        self.absmax = self.absmax.max((t.hi.max(-t.lo)).max(0.0) as f64);
        self.count += t.count;
        add_tables(&t.counts, &mut self.hist, &mut self.neg);
        if let Some(s) = &t.spill {
            self.merge(s);
        }
        // NaNs (never x < 0) were counted at an infinity's raw index or above.
        self.hist[BINS] -= t.nan;
        self.hist[0] += t.nan;
        let channels: Vec<f64> = t.channels.iter().map(|&c| c as f64).collect();
        let hist: Vec<u64> = t.channel_hist.iter().map(|&c| u64::from(c)).collect();
        self.merge_channels(&channels, &hist, t.rank);
    }

    /// Per-channel maxima (the larger of each) and histograms (summed); a
    /// shorter list counts as zeros.
    fn merge_channels(&mut self, channels: &[f64], hist: &[u64], rank: usize) {
        if channels.is_empty() {
            return;
        }
        if self.channel_absmax.len() < channels.len() {
            self.channel_absmax.resize(channels.len(), 0.0);
            self.channel_hist.resize(channels.len() * CH_BINS, 0);
        }
        for (a, b) in self.channel_absmax.iter_mut().zip(channels) {
            *a = a.max(*b);
        }
        for (a, b) in self.channel_hist.iter_mut().zip(hist) {
            *a += b;
        }
        self.rank = rank;
    }

    /// Channel `c`'s statistics as a [`Stats`] (so that every symmetric range
    /// reads it as it reads a tensor's): each per-channel bin's count spread
    /// evenly over the 4 bins it spans here, min = -max |x| when `signed` (the
    /// tensor's sign decides the grid), else 0. Values below 2^-16 count as zeros.
    pub fn channel(&self, c: usize, signed: bool) -> Stats {
        let mut st = Stats::default();
        let absmax = self.channel_absmax[c];
        let hist = &self.channel_hist[c * CH_BINS..(c + 1) * CH_BINS];
        for (b, &n) in hist.iter().enumerate() {
            if n == 0 {
                continue;
            }
            if b == 0 {
                st.hist[0] += n;
                continue;
            }
            // 2^(-16 + (b - 1) / 8): octave e, top 3 mantissa bits m.
            let (e, m) = (((b - 1) / 8) as i64 - 16, (b - 1) % 8);
            let first = ((e + 40) * 32) as usize + 4 * m + 1;
            if b == CH_BINS - 1 {
                st.hist[first.min(BINS)] += n;
                continue;
            }
            for k in 0..4 {
                st.hist[first + k] += n / 4 + u64::from((k as u64) < n % 4);
            }
        }
        st.count = hist.iter().sum();
        st.absmax = absmax;
        st.max = absmax;
        st.min = if signed { -absmax } else { 0.0 };
        st
    }

    pub fn merge(&mut self, o: &Stats) {
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        self.absmax = self.absmax.max(o.absmax);
        self.count += o.count;
        for (a, b) in self.hist.iter_mut().zip(&o.hist) {
            *a += b;
        }
        for (a, b) in self.neg.iter_mut().zip(&o.neg) {
            *a += b;
        }
        self.merge_channels(&o.channel_absmax, &o.channel_hist, o.rank);
    }

    /// Bin counts of one side: x >= 0 (`negative` false, zeros included in bin 0)
    /// or x < 0 (as |x|).
    fn side(&self, negative: bool) -> Vec<u64> {
        if negative {
            self.neg.clone()
        } else {
            self.hist
                .iter()
                .zip(&self.neg)
                .map(|(h, n)| h - n)
                .collect()
        }
    }

    /// The largest |x| seen on one side (0 when it holds no value).
    fn side_max(&self, negative: bool) -> f64 {
        if negative {
            (-self.min).max(0.0)
        } else {
            self.max.max(0.0)
        }
    }

    /// One tail's quantile, as a magnitude: the x (`negative` false) or -x
    /// (`negative` true) at rank floor(rate * count) from that side's extreme, the
    /// rank counted over all values (rate 0: the exact max, or -min). A bin's upper
    /// edge, capped at the side's max (so it errs wide); 0 when the side holds
    /// no more than `rank` values.
    pub fn tail_quantile(&self, negative: bool, rate: f64) -> f64 {
        let top = self.side_max(negative);
        let rank = crate::repr::round::rank_at_rate(rate, self.count);
        if rank == 0 {
            return top;
        }
        let counts = self.side(negative);
        let mut seen = 0u64;
        for i in (1..counts.len()).rev() {
            seen += counts[i];
            if seen > rank {
                return upper_edge(i).min(top);
            }
        }
        0.0
    }

    /// Estimated fraction of the values outside [lo, hi] (lo <= 0 <= hi): the
    /// bins whose centre (capped at its side's max) lies beyond either bound.
    pub fn fraction_outside(&self, lo: f64, hi: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let mut out = 0u64;
        for (negative, limit) in [(false, hi), (true, -lo)] {
            if self.side_max(negative) <= limit {
                continue;
            }
            let (counts, max) = (self.side(negative), self.side_max(negative));
            out += (1..counts.len())
                .filter(|&i| center(i).min(max) > limit)
                .map(|i| counts[i])
                .sum::<u64>();
        }
        out as f64 / self.count as f64
    }

    /// |x| at rank floor(rate * count) from the top (rate 0: the exact max).
    pub fn quantile_from_top(&self, rate: f64) -> f64 {
        let rank = crate::repr::round::rank_at_rate(rate, self.count);
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

/// One side of a value's histogram (x >= 0, or |x| for x < 0) as nondecreasing
/// bin centres (capped at the side's max; bin 0, the zeros, left out: 0 is on every
/// grid) with prefix sums of n, n c and n c^2, so that the squared error of a grid
/// on this side costs two binary searches.
struct Tail {
    c: Vec<f64>,
    /// Prefix sums, one longer than `c`: n[k] = sum of the first k counts.
    n: Vec<f64>,
    s1: Vec<f64>,
    s2: Vec<f64>,
}

impl Tail {
    fn new(counts: &[u64], max: f64) -> Tail {
        let mut t = Tail {
            c: Vec::new(),
            n: vec![0.0],
            s1: vec![0.0],
            s2: vec![0.0],
        };
        for (i, &k) in counts.iter().enumerate().skip(1) {
            if k == 0 {
                continue;
            }
            let (c, k) = (center(i).min(max), k as f64);
            t.c.push(c);
            t.n.push(t.n.last().unwrap() + k);
            t.s1.push(t.s1.last().unwrap() + k * c);
            t.s2.push(t.s2.last().unwrap() + k * c * c);
        }
        t
    }

    /// Estimated squared error, summed over this side, of a grid with step `s`
    /// whose last level on this side is `top` (>= 0): the same model as the
    /// symmetric `mse` (clipped: (c - top)^2; inside: s^2/12 from s/2 up, c^2 below,
    /// where values round to 0). Clipped sum by expansion: S2 - 2 top S1 + top^2 N
    /// over the bins above `top`.
    fn error(&self, s: f64, top: f64) -> f64 {
        let len = self.c.len();
        let k2 = self.c.partition_point(|&c| c <= top);
        let k1 = self.c[..k2].partition_point(|&c| c < s / 2.0);
        let below = self.s2[k1];
        let inside = (self.n[k2] - self.n[k1]) * s * s / 12.0;
        let (cn, c1, c2) = (
            self.n[len] - self.n[k2],
            self.s1[len] - self.s1[k2],
            self.s2[len] - self.s2[k2],
        );
        below + inside + (c2 - 2.0 * top * c1 + top * top * cn).max(0.0)
    }
}

/// The affine grid on 2^k levels over [lo, hi] widened to hold 0 (so 0, ReLU's
/// floor and padding, is exact): scale = (hi - lo) / (2^k - 1), zero point =
/// round(-lo / scale), unsigned codes.
fn affine(lo: f64, hi: f64, bits: u32) -> Grid {
    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
    let levels = 2f64.powi(bits as i32) - 1.0;
    let scale = finite_scale((hi - lo) / levels);
    let zp = (-lo / scale as f64).round().clamp(0.0, levels) as i32;
    Grid {
        scale,
        signed: false,
        zero_point: zp,
    }
}

/// `asym-mse`: the [-a, b] with a among -min 2^(-i/32) and b among max 2^(-j/32),
/// i, j = 0..320, or 0, whose affine grid (scale (a + b) / (2^k - 1), zero point
/// zp = round(a / scale), so levels from -zp scale to (2^k - 1 - zp) scale) has the
/// least estimated squared error over both tails ([`Tail::error`]); ties keep the
/// wider range. Returns (lo, hi) = (-a, b).
fn asym_mse_range(st: &Stats, bits: u32) -> (f64, f64) {
    let levels = 2f64.powi(bits as i32) - 1.0;
    let (a_max, b_max) = (st.side_max(true), st.side_max(false));
    let (neg, pos) = (
        Tail::new(&st.side(true), a_max),
        Tail::new(&st.side(false), b_max),
    );
    let cands = |m: f64| -> Vec<f64> {
        (0..=320)
            .map(|i| m * 2f64.powf(-(i as f64) / 32.0))
            .chain(std::iter::once(0.0))
            .collect()
    };
    let (ca, cb) = (cands(a_max), cands(b_max));
    let mut best = (f64::INFINITY, -a_max, b_max);
    for &a in &ca {
        for &b in &cb {
            if a + b <= 0.0 {
                continue;
            }
            let g = affine(-a, b, bits);
            let s = g.scale as f64;
            let zp = g.zero_point as f64;
            let e = neg.error(s, zp * s) + pos.error(s, (levels - zp) * s);
            if e < best.0 {
                best = (e, -a, b);
            }
        }
    }
    (best.1, best.2)
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
    let signed = st.min < 0.0;
    let range = match range {
        Range::MinMax => return affine(st.min, st.max, bits),
        Range::AsymPercentile(p) if signed => {
            // Half the clipped share on each side.
            let rate = (1.0 - p / 100.0) / 2.0;
            return affine(
                -st.tail_quantile(true, rate),
                st.tail_quantile(false, rate),
                bits,
            );
        }
        Range::AsymMse if signed => {
            let (lo, hi) = asym_mse_range(st, bits);
            return affine(lo, hi, bits);
        }
        // Nothing below 0: the unsigned grids of the symmetric ranges.
        Range::AsymPercentile(p) => Range::Percentile(p),
        Range::AsymMse => Range::Mse,
        r => r,
    };
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
        Range::MinMax | Range::AsymPercentile(_) | Range::AsymMse => {
            unreachable!("handled above")
        }
    };
    Grid {
        scale: finite_scale(scale),
        signed,
        zero_point: 0,
    }
}

/// Per-channel scales of a value at `bits` (zero point 0), each relative to the
/// per-tensor grid's scale `grid.scale`: channel c's grid is the one the range
/// chooses for that channel's values alone ([`Stats::channel`]; percentile:P
/// its own P-th percentile of |x|, mse its own least-MSE clipping, maxabs its
/// own max), on the tensor's signed or unsigned levels. Except with maxabs
/// (whose power-of-two scales round up by design), no channel's grid reaches
/// above its own max |x|: a channel zero but for fewer values than the
/// percentile clips has a zero percentile, and would otherwise get
/// [`choose_grid`]'s fallback scale 1. A channel that never left 0 takes the
/// tensor's scale (any scale represents it). Relative, so that the range
/// search's factor on the tensor's scale moves every channel alike.
pub fn channel_scales(st: &Stats, grid: &Grid, bits: u32, cfg: &ActQuantConfig) -> Vec<f32> {
    let (_, top) = grid.levels(bits);
    (0..st.channel_absmax.len())
        .map(|c| {
            let absmax = st.channel_absmax[c];
            if !(absmax > 0.0 && absmax.is_finite()) {
                return 1.0;
            }
            let g = choose_grid(
                &st.channel(c, grid.signed),
                bits,
                cfg.range,
                cfg.overflow_rate,
            );
            let scale = match cfg.range {
                Range::MaxAbs => g.scale,
                _ => g.scale.min(finite_scale(absmax / top)),
            };
            scale / grid.scale
        })
        .collect()
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
    /// With per-channel grids asked: why this value keeps one grid.
    per_tensor_why: Option<String>,
    /// Per-channel grids at the pass's width: each channel's scale over the
    /// tensor grid's ([`channel_scales`]).
    channel_rel: Option<Vec<f32>>,
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
        let mut report = PassReport::new(self.name());
        if let Some(p) = plan(&self.0, model, cx, &mut report)? {
            p.insert(model, &self.0, &mut report);
        }
        Ok(report)
    }
}

/// What the pass inserts, measured and chosen but not yet written: the targets
/// (node indices of the model it was planned on), their statistics, grids, widths
/// and report notes.
struct Planned {
    targets: Vec<Target>,
    stats: Vec<Stats>,
    grids: Vec<Grid>,
    bits: Vec<u32>,
    notes: Vec<String>,
    measured: bool,
}

impl Planned {
    fn insert(
        &self,
        model: &mut Model,
        cfg: &ActQuantConfig,
        report: &mut PassReport,
    ) -> HashMap<String, String> {
        insert(
            model,
            &self.targets,
            &self.stats,
            &self.grids,
            &self.bits,
            &self.notes,
            cfg,
            self.measured,
            report,
        )
    }
}

/// The activation quantizers this pass would insert, calibrated once on a model
/// and written into copies of it whose weights have changed since: what GPTQ's
/// sequential and asymmetric calibration see, so that each layer is fit on the
/// inputs the deployed model feeds it, activation rounding and clipping included
/// (QDrop's point, Wei et al. 2022: reconstruct with the activations quantized).
/// The copies must keep the planned model's nodes (same count and outputs):
/// weight rewrites (GPTQ, private weight copies) do.
pub struct Simulation {
    cfg: ActQuantConfig,
    planned: Planned,
    /// The first output of every node of the planned model, in order.
    outputs: Vec<String>,
}

impl Simulation {
    /// Plans the pass on `model` (its ranges measured on `cx.calib`). `Ok(None)`:
    /// nothing would be quantized. Errors as the pass's.
    pub fn calibrate(cfg: &ActQuantConfig, model: &Model, cx: &Context) -> Result<Option<Self>> {
        let mut report = PassReport::new("act-quant (simulated)");
        Ok(
            plan(cfg, model, cx, &mut report)?.map(|planned| Simulation {
                cfg: cfg.clone(),
                planned,
                outputs: first_outputs(model),
            }),
        )
    }

    /// How many activations it quantizes.
    pub fn len(&self) -> usize {
        self.planned.bits.iter().filter(|&&b| b > 0).count()
    }

    /// Whether it quantizes nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What a calibration report line says of it.
    pub fn describe(&self) -> String {
        format!(
            "with the {} activation quantizers of the act-quant pass simulated, ranges from the model before this pass",
            self.len()
        )
    }

    /// `model` with the planned quantizers written in. `Err` when its nodes are
    /// not the planned model's.
    pub fn apply(&self, model: &Model) -> Result<Simulated> {
        if first_outputs(model) != self.outputs {
            return Err(Error::Graph(
                "simulated activation quantization: the model's nodes changed since its ranges were calibrated".into(),
            ));
        }
        let mut m = model.clone();
        let mut report = PassReport::new("act-quant (simulated)");
        let quantized = self.planned.insert(&mut m, &self.cfg, &mut report);
        Ok(Simulated {
            model: m,
            quantized,
        })
    }
}

/// A model with simulated activation quantizers ([`Simulation::apply`]).
pub struct Simulated {
    pub model: Model,
    /// Each quantized value and the value its weighted readers now read.
    quantized: HashMap<String, String>,
}

impl Simulated {
    /// Capture geometries of the original model's layers, moved onto the values
    /// those layers read here (unquantized inputs stay as they are).
    pub fn rebind(&self, wanted: Vec<(usize, Vec<Geom>)>) -> Vec<(usize, Vec<Geom>)> {
        wanted
            .into_iter()
            .map(|(i, mut geoms)| {
                for g in &mut geoms {
                    if let Some(v) = self.quantized.get(g.input()) {
                        g.set_input(v);
                    }
                }
                (i, geoms)
            })
            .collect()
    }
}

fn first_outputs(model: &Model) -> Vec<String> {
    model
        .graph()
        .node
        .iter()
        .map(|n| n.output.first().cloned().unwrap_or_default())
        .collect()
}

/// The pass up to its edit: which values, their calibrated ranges, mixed
/// precision and range search. `None`: nothing to quantize.
fn plan(
    cfg: &ActQuantConfig,
    model: &Model,
    cx: &Context,
    report: &mut PassReport,
) -> Result<Option<Planned>> {
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
                    per_tensor_why: None,
                    channel_rel: None,
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
                        report,
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
                    add(v, uses, readers, report);
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
            if cfg.per_channel {
                t.per_tensor_why = t
                    .uses
                    .iter()
                    .find(|&&(n, _)| view.node(n).op_type() == "MatMul")
                    .map(|&(n, _)| {
                        format!(
                            "one grid: MatMul '{}' reads it (its channels are the last axis, not axis 1)",
                            view.node_name(n)
                        )
                    });
            }
        }
        targets
    };
    if targets.is_empty() {
        return Ok(None);
    }

    // Calibration (float16 rounding without images: nothing to measure).
    let mut stats: Vec<Stats> = vec![Stats::default(); targets.len()];
    if let Some(data) = data {
        let input_shape = cx.input_shape_for(data);
        let values: Vec<String> = targets.iter().map(|t| t.value.clone()).collect();
        let start = std::time::Instant::now();
        // Tallies come back from each merge to be reused by the next chunk.
        let pool: std::sync::Mutex<Vec<Vec<Tally>>> = std::sync::Mutex::new(Vec::new());
        crate::engine::capture(
            model,
            &input_shape,
            &values,
            data.images.view(),
            cx.threads.max(1),
            // Chunks of images share one set of tallies (512 KiB a value,
            // summed at each chunk's merge, then reused): about 4 chunks a
            // thread, at least 4 images each.
            (data.len() / (4 * cx.threads.max(1))).max(4),
            || {
                pool.lock()
                    .expect("no poisoned lock")
                    .pop()
                    .unwrap_or_else(|| values.iter().map(|_| Tally::default()).collect())
            },
            |acc: &mut Vec<Tally>, _i, views| {
                for ((s, v), t) in acc.iter_mut().zip(views).zip(&targets) {
                    // A contiguous output (tract's usual) as a slice.
                    match v.as_slice() {
                        Some(xs) => s.add(xs),
                        None => s.add(&v.iter().copied().collect::<Vec<f32>>()),
                    }
                    if cfg.per_channel && t.per_tensor_why.is_none() && v.ndim() >= 2 {
                        s.add_channels(v);
                    }
                }
            },
            |mut acc: Vec<Tally>| {
                for (s, a) in stats.iter_mut().zip(&mut acc) {
                    s.merge_tally(a);
                    a.reset();
                }
                pool.lock().expect("no poisoned lock").push(acc);
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

    // Per-channel grids, relative to the tensor's (on symmetric levels, so
    // not for a zero-point grid; 16 bits is float16 rounding).
    let mut targets = targets;
    if cfg.per_channel && cfg.bits < 16 {
        for (t, st) in targets.iter_mut().zip(&stats) {
            let g = grid_for(st, cfg.bits, cfg);
            if st.rank >= 2 && st.channel_absmax.len() > 1 && g.zero_point == 0 {
                t.channel_rel = Some(channel_scales(st, &g, cfg.bits, cfg));
            }
        }
    }

    // Mixed precision: the `keep` values whose quantization alone moves the
    // network's output most stay at 16 bits (an int16 grid, see `insert`).
    let mut bits = vec![cfg.bits; targets.len()];
    let mut notes = vec![String::new(); targets.len()];
    if cfg.keep > 0 && cfg.bits >= 16 {
        report.skipped(
            "mixed precision",
            format!(
                "keep = {} has nothing to keep: every activation is already at {} bits",
                cfg.keep, cfg.bits
            ),
        );
    }
    if cfg.keep > 0 && cfg.bits < 16 {
        let (s, images) = sensitivities(model, cx, &targets, &stats, cfg)?;
        // Most sensitive first; ties in graph order.
        let mut rank: Vec<usize> = (0..targets.len()).collect();
        rank.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
        let kept = cfg.keep.min(targets.len());
        for (r, &k) in rank.iter().enumerate() {
            if r < kept {
                bits[k] = 16;
            }
            notes[k] = format!(
                "; {}-bit alone: output change {:.3e}, rank {} of {}{}",
                cfg.bits,
                s[k],
                r + 1,
                targets.len(),
                if r < kept { ", kept at 16 bits" } else { "" }
            );
        }
        let sum_kept: f64 = rank[..kept].iter().map(|&k| s[k]).sum();
        let sum_all: f64 = s.iter().sum();
        report.changed(
            "mixed precision",
            format!(
                "the {kept} of {} activations whose {}-bit quantization alone moves the network's output most stay at 16 bits (int16 grid over the seen range, maxabs): each measured as ||y_k - y||^2 / ||y||^2 on {images} calibration images; the kept ones sum to {:.1}% of the summed changes",
                targets.len(),
                cfg.bits,
                if sum_all > 0.0 { 100.0 * sum_kept / sum_all } else { 0.0 },
            ),
        );
    }
    let mut grids = grids_for(&stats, &bits, cfg);
    if cfg.search > 0 && cfg.bits < 16 {
        let s = search_ranges(model, cx, &targets, &stats, &bits, &mut grids, cfg)?;
        for (note, f) in notes.iter_mut().zip(&s.factors) {
            if *f != 1.0 {
                note.push_str(&format!(
                    "; range search: scale x {f:.3} of the {} grid",
                    cfg.range
                ));
            }
        }
        let moved = s.factors.iter().filter(|f| **f != 1.0).count();
        report.changed(
            "range search",
            format!(
                "{} round(s) over {} activations, {} model runs on {} calibration images: {moved} scales moved; output error ||y - y_float||^2 / ||y_float||^2 {:.4e} -> {:.4e} ({:.1}% less) in {:.1}s",
                cfg.search,
                s.factors.len(),
                s.runs,
                s.images,
                s.before,
                s.after,
                if s.before > 0.0 { 100.0 * (1.0 - s.after / s.before) } else { 0.0 },
                s.seconds,
            ),
        );
    }
    Ok(Some(Planned {
        targets,
        stats,
        grids,
        bits,
        notes,
        measured: data.is_some(),
    }))
}

/// Calibration images the mixed-precision sensitivity runs use (the first ones).
const SENSITIVITY_IMAGES: usize = 32;

/// Per target, how much quantizing that value alone (at `cfg.bits`, on its
/// calibrated grid) moves the network: ||y_k - y||^2 / ||y||^2 over all outputs
/// on the first [`SENSITIVITY_IMAGES`] calibration images, y the model as this
/// pass receives it (0 where its outputs are all zero). One model run per target,
/// the images spread over the cores. The ranking HAWQ-style mixed precision uses
/// (Dong et al., 2019, rank layers by their effect and keep the sensitive ones
/// wide), measured on the network output instead of estimated from curvature.
/// Returns the changes and the number of images.
fn sensitivities(
    model: &Model,
    cx: &Context,
    targets: &[Target],
    stats: &[Stats],
    cfg: &ActQuantConfig,
) -> Result<(Vec<f64>, usize)> {
    let probe = super::calib::OutputProbe::new(model, cx, SENSITIVITY_IMAGES)?;
    let grids = grids_for(stats, &vec![cfg.bits; targets.len()], cfg);
    let mut out = Vec::with_capacity(targets.len());
    crate::passes::solve_progress("act-quant: sensitivity", 0, targets.len());
    for k in 0..targets.len() {
        let mut bits = vec![0; targets.len()];
        bits[k] = cfg.bits;
        out.push(output_change(
            model, &probe, targets, stats, &grids, &bits, cfg,
        )?);
        crate::passes::solve_progress("act-quant: sensitivity", k + 1, targets.len());
    }
    Ok((out, probe.images()))
}

/// The grid of a value at `bits` by the pass's range. A value kept at 16 bits by
/// mixed precision (the pass's width is lower) goes on a 16-bit integer grid over
/// its whole seen range (maxabs, no clipping), the int16 activations of TFLite's
/// 16x8 mode: as accurate as float16 here and about 3x faster in tract, whose
/// float16 casts convert element by element.
fn grid_for(st: &Stats, bits: u32, cfg: &ActQuantConfig) -> Grid {
    if bits == 16 && cfg.bits < 16 {
        choose_grid(st, 16, Range::MaxAbs, 0.0)
    } else {
        choose_grid(st, bits, cfg.range, cfg.overflow_rate)
    }
}

/// [`grid_for`] of every target at its `bits[k]`.
fn grids_for(stats: &[Stats], bits: &[u32], cfg: &ActQuantConfig) -> Vec<Grid> {
    stats
        .iter()
        .zip(bits)
        .map(|(st, &b)| grid_for(st, b, cfg))
        .collect()
}

/// How far the quantizers at `bits[k]` on `grids[k]` move the network's output
/// on the probe's images: ||y - y0||^2 / ||y0||^2 (0 where y0 is all zero).
#[allow(clippy::too_many_arguments)]
fn output_change(
    model: &Model,
    probe: &super::calib::OutputProbe,
    targets: &[Target],
    stats: &[Stats],
    grids: &[Grid],
    bits: &[u32],
    cfg: &ActQuantConfig,
) -> Result<f64> {
    let mut m = model.clone();
    let notes = vec![String::new(); targets.len()];
    let mut scratch = PassReport::new("act-quant");
    insert(
        &mut m,
        targets,
        stats,
        grids,
        bits,
        &notes,
        cfg,
        true,
        &mut scratch,
    );
    Ok(probe.relative_change(&m)?.unwrap_or(0.0))
}

/// Calibration images the range search runs by default (the first ones).
pub const SEARCH_IMAGES: usize = 32;

/// Scale factors the range search tries on each activation in a round, around
/// its current scale (1, the current one, is known).
const SEARCH_FACTORS: [f64; 8] = [0.5, 0.65, 0.8, 0.9, 1.12, 1.25, 1.5, 2.0];

/// What the range search did.
struct Search {
    /// Per target, its final scale over the range's (1: unchanged or not searched).
    factors: Vec<f64>,
    /// The output error with the range's grids, and with the searched ones.
    before: f64,
    after: f64,
    runs: usize,
    images: usize,
    seconds: f64,
}

/// Loss-aware range search: coordinate descent on the activation scales, by the
/// network's output. In graph order, each activation quantized at the pass's
/// width tries its scale times each of [`SEARCH_FACTORS`] (the zero point kept)
/// with every other activation quantized on its current grid, and keeps the
/// scale with the least output error ||y - y_float||^2 / ||y_float||^2 over the
/// first `cfg.search_images` calibration images ([`SEARCH_IMAGES`] by default;
/// y_float: the model this pass receives); `cfg.search` rounds over all of
/// them. The per-tensor criteria (percentile, MSE) weigh every element's error
/// alike; this one weighs it by what it does downstream, as LAPQ (Nahshan et
/// al., 2021, "Loss aware post-training quantization") chooses clipping by the
/// network's loss, here without labels. One model run per candidate: rounds x
/// targets x 8 runs.
fn search_ranges(
    model: &Model,
    cx: &Context,
    targets: &[Target],
    stats: &[Stats],
    bits: &[u32],
    grids: &mut [Grid],
    cfg: &ActQuantConfig,
) -> Result<Search> {
    let start = std::time::Instant::now();
    let probe = super::calib::OutputProbe::new(model, cx, cfg.search_images)?;
    let error = |grids: &[Grid]| output_change(model, &probe, targets, stats, grids, bits, cfg);
    let searched: Vec<usize> = (0..targets.len())
        .filter(|&k| bits[k] == cfg.bits)
        .collect();
    let total = cfg.search * searched.len();
    let before = error(grids)?;
    let (mut now, mut runs) = (before, 1);
    let mut factors = vec![1.0; targets.len()];
    crate::passes::solve_progress("act-quant: range search", 0, total);
    for round in 0..cfg.search {
        for (j, &k) in searched.iter().enumerate() {
            let base = grids[k];
            let mut best = (now, 1.0);
            for &f in &SEARCH_FACTORS {
                grids[k].scale = finite_scale(base.scale as f64 * f);
                let e = error(grids)?;
                runs += 1;
                if e < best.0 {
                    best = (e, f);
                }
            }
            grids[k].scale = finite_scale(base.scale as f64 * best.1);
            factors[k] *= best.1;
            now = best.0;
            crate::passes::solve_progress(
                "act-quant: range search",
                round * searched.len() + j + 1,
                total,
            );
        }
    }
    Ok(Search {
        factors,
        before,
        after: now,
        runs,
        images: probe.images(),
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Inserts the quantizer of each target at `bits[k]` on `grids[k]` (0: none; 16:
/// float16 rounding when the pass's width is 16, else (mixed precision) the
/// fake-quant chain on the int16 grid; 8: Q/DQ unless the target says why not;
/// else the fake-quant chain),
/// absorbing the activations its grid makes redundant, and reports each line with
/// `notes[k]` appended (`measured`: the stats come from calibration images).
#[allow(clippy::too_many_arguments)]
fn insert(
    model: &mut Model,
    targets: &[Target],
    stats: &[Stats],
    grids: &[Grid],
    bits: &[u32],
    notes: &[String],
    cfg: &ActQuantConfig,
    measured: bool,
    report: &mut PassReport,
) -> HashMap<String, String> {
    let g = model.graph_mut();
    let mut names = Namer::of(g);
    let mut quantized = HashMap::new();
    let mut before: HashMap<Option<usize>, Vec<NodeProto>> = HashMap::new();
    let mut rewires: Vec<(usize, usize, String)> = Vec::new();
    let mut absorbed: HashSet<usize> = HashSet::new();
    for ((((t, st), grid), &bits), note) in
        targets.iter().zip(stats).zip(grids).zip(bits).zip(notes)
    {
        if bits == 0 {
            continue;
        }
        let kept = bits == 16 && cfg.bits < 16;
        let (scale, signed) = (grid.scale, grid.signed);
        let (lo, hi) = grid.levels(bits);
        // Per-channel grids: at the pass's width (not Half, not kept), where the
        // capture measured channels.
        let channel_scales = t
            .channel_rel
            .as_ref()
            .filter(|_| bits == cfg.bits && grid.zero_point == 0)
            .map(|rel| {
                rel.iter()
                    .map(|&r| finite_scale(scale as f64 * r as f64))
                    .collect::<Vec<f32>>()
            });
        let form = match bits {
            8 if t.no_qdq.is_none() && channel_scales.is_none() => Form::Qdq {
                signed,
                zero_point: grid.zero_point,
            },
            16 if !kept => Form::Half,
            _ => Form::FakeQuant { signed, lo, hi },
        };
        // The largest scale sets the top of the grid (the others stop lower).
        let scales = channel_scales.clone().unwrap_or_else(|| vec![scale]);
        let top_scale = scales.iter().fold(0f32, |a, &b| a.max(b));
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
                    b.top == f32::INFINITY || (b.top as f64) / (top_scale as f64) >= hi - 0.25;
                if !(floor_ok && top_ok) {
                    break;
                }
                absorbed_here.push(b.node);
                src = b.input.clone();
            }
        }
        let (nodes, out) = act::build(g, &mut names, &src, form, &scales, st.rank);
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
        quantized.insert(t.value.clone(), out.clone());
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
                if measured {
                    format!(
                        "16-bit {}, seen [{:.4}, {:.4}] (read by {read_by}){note}",
                        form.describe(),
                        st.min,
                        st.max,
                    )
                } else {
                    format!("16-bit {} (read by {read_by}){note}", form.describe())
                },
            );
            continue;
        }
        let (bottom, top) = (scale as f64 * lo, scale as f64 * hi);
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
        match &channel_scales {
            Some(cs) => {
                let least = cs.iter().fold(f32::INFINITY, |a, &b| a.min(b));
                why.push_str(&format!(
                    "; per channel: {} scales in [{least:?}, {top_scale:?}] (each channel's own {} grid; the grid above is the tensor's), as the fake-quant chain",
                    cs.len(),
                    cfg.range
                ));
            }
            None if cfg.per_channel && bits == cfg.bits && bits < 16 => {
                why.push_str(&format!(
                    "; {}",
                    t.per_tensor_why
                        .as_deref()
                        .unwrap_or("one grid: no axis 1 with more than one channel")
                ));
            }
            None => {}
        }
        if !absorbed_names.is_empty() {
            why.push_str(&format!(
                "; absorbs {} (the grid saturates where it clamps)",
                absorbed_names.join(", ")
            ));
        }
        if measured {
            report.ranges.push(super::ActRange {
                value: t.value.clone(),
                bits,
                seen_min: st.min,
                seen_max: st.max,
                grid_min: bottom,
                grid_max: top,
            });
        }
        report.changed(
            &t.value,
            format!(
                "{bits}-bit {}, scale {step}, grid [{bottom:.4}, {top:.4}], seen [{:.4}, {:.4}], clipped ~{:.3}% (read by {read_by}){why}{note}",
                form.describe(),
                st.min,
                st.max,
                100.0 * st.fraction_outside(bottom, top),
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
    quantized
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

    fn stats_of(xs: &[f32]) -> Stats {
        let mut st = Stats::default();
        st.add(xs.iter().copied());
        st
    }

    /// The lane tables count what the one-table loop counts, bin for bin, on
    /// every kind of element (zeros of both signs, NaN, infinities, values below
    /// 2^-40 and above 2^24, negatives) and a length that leaves a remainder
    /// (8 runs of 8 and 5 more), split over two calls with the tables spilled
    /// between them, and again after a reset.
    #[test]
    fn channel_stats_by_hand() {
        // One image [1, 2, 1000]: channel 0 holds 999 ones and one 100, channel 1
        // only zeros. Per-channel bins are 8 an octave: 1.0 falls in [1, 1.125),
        // spread over the 4 fine bins [1, 1.03125) .. [1.09375, 1.125) as 250,
        // 250, 250, 249. percentile:99.9 skips floor(0.001 x 1000) = 1 value from
        // the top (the 100), so v = the last fine bin's upper edge, 1.125 (the
        // tensor's own 32-an-octave histogram would say 1.03125); unsigned 8 bits:
        // scale 1.125 / 255. Channel 1 is 999 zeros and one 5: its 99.9th
        // percentile is 0, so its grid stops at its max, scale 5 / 255 (not
        // choose_grid's fallback 1, which would round it to integers). The
        // tensor's grid: the top 2 of 2000 skipped (100, 5): v = 1.03125.
        let mut x = vec![1.0f32; 2000];
        x[500] = 100.0;
        x[1000..].fill(0.0);
        x[1500] = 5.0;
        let v = ndarray::ArrayD::from_shape_vec(vec![1, 2, 1000], x.clone()).unwrap();
        let mut t = Tally::default();
        t.add(&x);
        t.add_channels(&v.view());
        let mut st = Stats::default();
        st.merge_tally(&t);
        assert_eq!(st.channel_absmax, vec![100.0, 5.0]);
        assert_eq!(st.rank, 3);
        let c0 = st.channel(0, false);
        assert_eq!(c0.count, 1000);
        assert_eq!(c0.quantile_from_top(0.001), 1.125);
        let cfg = ActQuantSection {
            bits: 8,
            range: Some("percentile:99.9".into()),
            per_channel: Some(true),
            ..Default::default()
        }
        .config()
        .unwrap();
        let g = grid_for(&st, 8, &cfg);
        assert_eq!(g.scale, (1.03125f64 / 255.0) as f32);
        let rel = channel_scales(&st, &g, 8, &cfg);
        assert_eq!(
            rel,
            vec![
                (1.125f64 / 255.0) as f32 / g.scale,
                (5.0f64 / 255.0) as f32 / g.scale
            ]
        );
        // A channel that never left 0: ratio 1.
        let mut zero = st.clone();
        zero.channel_absmax[1] = 0.0;
        assert_eq!(channel_scales(&zero, &g, 8, &cfg)[1], 1.0);
        // Bins: 2^-16 is bin 1, just below it bin 0, 2^16 and up the last.
        assert_eq!(ch_bin(2f32.powi(-16)), 1);
        assert_eq!(ch_bin(2f32.powi(-16) * 0.999), 0);
        assert_eq!(ch_bin(0.0), 0);
        assert_eq!(ch_bin(-1.0), ch_bin(1.0));
        assert_eq!(ch_bin(1.0), 16 * 8 + 1);
        assert_eq!(ch_bin(1.124), 16 * 8 + 1);
        assert_eq!(ch_bin(1.125), 16 * 8 + 2);
        assert_eq!(ch_bin(65535.0), CH_BINS - 2);
        assert_eq!(ch_bin(65536.0), CH_BINS - 1);
        assert_eq!(ch_bin(f32::NAN), CH_BINS - 1);
    }

    #[test]
    fn tally_counts_what_add_counts() {
        let mut xs: Vec<f32> = vec![
            0.0,
            -0.0,
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e-13,
            -1e-13,
            3.0e38,
            -3.0e38,
            6.0,
            -6.0,
            0.5,
            -0.25,
            1.0,
            2.0,
        ];
        // A pseudo-random tail (an LCG) over both signs and many octaves, and a
        // run of zeros (a ReLU's), as the chained increments the lanes break.
        let mut r = 12345u32;
        for _ in 0..48 {
            r = r.wrapping_mul(1664525).wrapping_add(1013904223);
            // Exponents 100..163: |x| from 2^-27 to 2^37 (those from 2^24 in the
            // last bin), never in bin 0.
            let bits = ((r >> 9) & 0x7f_ffff) | ((100 + (r >> 26)) << 23);
            xs.push(f32::from_bits(bits) * if r & 1 == 1 { -1.0 } else { 1.0 });
        }
        xs.extend([0.0; 5]);
        assert_eq!(xs.len(), 69);
        let want = stats_of(&xs);
        let mut t = Tally::default();
        t.add(&xs[..21]);
        // As when a lane's u32 could overflow: the first 21 move to the spill.
        t.spill_tables();
        t.add(&xs[21..]);
        let mut got = Stats::default();
        got.merge_tally(&t);
        // A reset tally counts afresh (the capture reuses them).
        t.reset();
        t.add(&xs);
        let mut again = Stats::default();
        again.merge_tally(&t);
        assert_eq!(
            (again.hist.clone(), again.neg.clone()),
            (want.hist.clone(), want.neg.clone())
        );
        assert_eq!(again.count, 69);
        assert_eq!(got.count, 69);
        assert_eq!(got.hist, want.hist);
        assert_eq!(got.neg, want.neg);
        // -0.0 and -NaN are not negative (x < 0 is false): bin 0 (below 2^-40)
        // holds 0.0, -0.0, NaN, -NaN, 1e-13 and the 5 zeros on the x >= 0 side,
        // -1e-13 on the other.
        assert_eq!((got.hist[0] - got.neg[0], got.neg[0]), (10, 1));
        assert_eq!(
            (got.min, got.max, got.absmax),
            (want.min, want.max, want.absmax)
        );
        assert_eq!(got.min, f64::NEG_INFINITY);
        assert_eq!(got.absmax, f64::INFINITY);
        // All NaN: no min or max, absmax 0, as add gives.
        let mut t = Tally::default();
        t.add(&[f32::NAN; 9]);
        let mut got = Stats::default();
        got.merge_tally(&t);
        let want = stats_of(&[f32::NAN; 9]);
        assert_eq!(
            (got.min, got.max, got.absmax, got.count),
            (want.min, want.max, want.absmax, want.count)
        );
        assert_eq!(got.hist, want.hist);
    }

    /// n copies of each (value, n).
    fn repeat(parts: &[(f32, usize)]) -> Vec<f32> {
        parts
            .iter()
            .flat_map(|&(v, n)| std::iter::repeat_n(v, n))
            .collect()
    }

    #[test]
    fn range_names_parse_and_print_back() {
        for s in [
            "asym-percentile:99.9",
            "asym-mse",
            "percentile:99.99",
            "minmax",
        ] {
            assert_eq!(s.parse::<Range>().unwrap().to_string(), s);
        }
        assert_eq!(
            "ASYM-Percentile:99.99".parse::<Range>().unwrap(),
            Range::AsymPercentile(99.99)
        );
        for bad in [
            "asym-percentile:0",
            "asym-percentile:100.5",
            "asym-minmax",
            "asym-",
        ] {
            let e = bad.parse::<Range>().unwrap_err().to_string();
            assert!(e.contains("asym-percentile:P (0 < P <= 100)"), "{bad}: {e}");
        }
    }

    #[test]
    fn two_tailed_percentile_by_hand() {
        // 1000 values: negatives -4, -3, -1 x 2, -0.5 x 96; positives 16, 12,
        // 2 x 2, 1 x 896. asym-percentile:99.6: 0.4% may clip, 0.2% a side: rate
        // 0.002, rank floor(0.002 * 1000) = 2 from each side's extreme, counted over
        // all values.
        let xs = repeat(&[
            (-4.0, 1),
            (-3.0, 1),
            (-1.0, 2),
            (-0.5, 96),
            (16.0, 1),
            (12.0, 1),
            (2.0, 2),
            (1.0, 896),
        ]);
        let st = stats_of(&xs);
        // Positive side from the top: 16 (1 seen), 12 (2), 2 (4 > 2): the bin of
        // 2 = 2^1 (1 + 0/32), upper edge 2 (1 + 1/32) = 2.0625.
        assert_eq!(st.tail_quantile(false, 0.002), 2.0625);
        // Negative side: 4 (1), 3 (2), 1 (4 > 2): upper edge of 1's bin, 1.03125.
        assert_eq!(st.tail_quantile(true, 0.002), 1.03125);
        // Rate 0: the exact extremes.
        assert_eq!(st.tail_quantile(false, 0.0), 16.0);
        assert_eq!(st.tail_quantile(true, 0.0), 4.0);
        // [lo, hi] = [-1.03125, 2.0625] on 255 steps: scale = 3.09375 / 255
        // = 0.0121324, zero point = round(1.03125 / scale) = round(255 / 3) = 85.
        let g = choose_grid(&st, 8, Range::AsymPercentile(99.6), 0.0);
        assert_eq!(g.scale, (3.09375f64 / 255.0) as f32);
        assert_eq!((g.signed, g.zero_point), (false, 85));
        // Codes 0..255 less the zero point: k in [-85, 170], i.e. the grid
        // [-85 s, 170 s] = [-1.03125, 2.0625].
        assert_eq!(g.levels(8), (-85.0, 170.0));
        // The symmetric percentile:99.6 reads |x| at rank 4: 16, 12, 4, 3, 2 (6 > 4),
        // so v is the upper edge of 2's bin, 2.0625, and the int8 step 2.0625 / 127
        // = 0.016240: the same four values clip, and the asymmetric step is 0.747
        // times as wide (3.09375 / 255 over 2.0625 / 127).
        let sym = choose_grid(&st, 8, Range::Percentile(99.6), 0.0);
        assert_eq!(sym.scale, (2.0625f64 / 127.0) as f32);
        assert_eq!((sym.signed, sym.zero_point), (true, 0));
        // Outside [-1.03125, 2.0625]: the four outliers, 0.4%.
        assert_eq!(st.fraction_outside(-1.03125, 2.0625), 0.004);
        // and outside the symmetric grid [-128 s, 127 s] = [-2.0787, 2.0625]: the same four.
        assert_eq!(st.fraction_outside(-128.0 * 2.0625 / 127.0, 2.0625), 0.004);
    }

    #[test]
    fn asymmetric_ranges_without_negatives_are_the_symmetric_ones() {
        let xs: Vec<f32> = (0..1000).map(|i| (i as f32 / 100.0).powi(2)).collect();
        let st = stats_of(&xs);
        for (a, s) in [
            (Range::AsymPercentile(99.9), Range::Percentile(99.9)),
            (Range::AsymMse, Range::Mse),
        ] {
            assert_eq!(choose_grid(&st, 8, a, 0.0), choose_grid(&st, 8, s, 0.0));
            assert_eq!(choose_grid(&st, 5, a, 0.0), choose_grid(&st, 5, s, 0.0));
        }
    }

    #[test]
    fn tail_error_by_hand() {
        // 1 x 2, 2, 4: bin centres 1 (1 + 0.5/32) = 1.015625, 2.03125, and
        // 4.0625 capped at the max, 4.
        let st = stats_of(&[1.0, 1.0, 2.0, 4.0]);
        let t = Tail::new(&st.side(false), st.side_max(false));
        assert_eq!(t.c, vec![1.015625, 2.03125, 4.0]);
        // Step 0.5, top 3: 4 clips, (4 - 3)^2 = 1; three inside at 0.25 / 12 each.
        assert_eq!(t.error(0.5, 3.0), 1.0 + 3.0 * 0.25 / 12.0);
        // Step 4, top 4: 1.015625 < s/2 = 2 rounds to 0: 2 x 1.015625^2 = 2.06298828125;
        // 2.03125 and 4 inside, 16 / 12 each.
        assert_eq!(t.error(4.0, 4.0), 2.06298828125 + 2.0 * 16.0 / 12.0);
        // Top 0: every value clips to 0, 2 x 1.015625^2 + 2.03125^2 + 4^2.
        assert_eq!(
            t.error(0.5, 0.0),
            2.0 * 1.015625f64.powi(2) + 2.03125f64.powi(2) + 16.0
        );
        // The negative side of the same stats is empty: no error.
        let n = Tail::new(&st.side(true), st.side_max(true));
        assert_eq!(n.error(0.5, 0.0), 0.0);
    }

    /// Mean squared error of quantizing xs on the grid, as the runtime does
    /// (round half to even of x / s, clip to the levels).
    fn grid_mse(xs: &[f32], g: Grid, bits: u32) -> f64 {
        let (lo, hi) = g.levels(bits);
        let s = g.scale as f64;
        xs.iter()
            .map(|&x| {
                let q = (x as f64 / s).round_ties_even().clamp(lo, hi);
                (q * s - x as f64).powi(2)
            })
            .sum::<f64>()
            / xs.len() as f64
    }

    #[test]
    fn asym_mse_beats_symmetric_on_a_skewed_distribution() {
        // 900 values i / 300 (i < 900: [0, 2.997], uniform) and 100 values
        // -(i + 1) / 333.3 (i < 100: [-0.3, -0.003]): the range is lopsided 10 : 1.
        let xs: Vec<f32> = (0..900)
            .map(|i| i as f32 / 300.0)
            .chain((0..100).map(|i| -(i as f32 + 1.0) * 0.003))
            .collect();
        let st = stats_of(&xs);
        let sym = choose_grid(&st, 8, Range::Mse, 0.0);
        let asym = choose_grid(&st, 8, Range::AsymMse, 0.0);
        // Symmetric int8 keeps all of [-3, 3]: the search's first candidate, max |x|
        // = 899 / 300 = 2.99667, step 2.99667 / 127 = 0.0235958 (s^2 / 12 = 4.640e-5).
        assert_eq!(sym, {
            let v = (899f32 / 300.0) as f64;
            Grid {
                scale: (v / 127.0) as f32,
                signed: true,
                zero_point: 0,
            }
        });
        // Asymmetric: about [-0.3, 2.997] on 255 steps; the search lands on
        // [-0.2968, 2.9935] (both a little inside), step 0.0129029 (s^2 / 12 =
        // 1.387e-5), zero point round(0.2968 / 0.0129029) = 23: a step 0.547 times
        // as wide.
        let (lo, hi) = asym.levels(8);
        let (bottom, top) = (lo * asym.scale as f64, hi * asym.scale as f64);
        assert!(!asym.signed && asym.zero_point == 23, "{asym:?}");
        assert!((0.012902..0.012904).contains(&asym.scale), "{asym:?}");
        assert!((-0.2968..-0.2967).contains(&bottom), "{bottom}");
        assert!((2.9934..2.9935).contains(&top), "{top}");
        // The mean squared error, measured by quantizing the 1000 values: each close
        // to its s^2 / 12 (within 1%: 4.643e-5 and 1.385e-5), the asymmetric one
        // 0.298 times the symmetric one (0.547^2 = 0.299).
        let (es, ea) = (grid_mse(&xs, sym, 8), grid_mse(&xs, asym, 8));
        assert!((4.62e-5..4.66e-5).contains(&es), "{es}");
        assert!((1.38e-5..1.39e-5).contains(&ea), "{ea}");
        assert!(ea < 0.3 * es, "asym {ea} vs sym {es}");
    }
}
