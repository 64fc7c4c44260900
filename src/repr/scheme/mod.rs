//! Weight schemes: the grids a weight can be written on. One file per grid
//! family, each holding both directions: its quantizer (the values a pass
//! writes) and its verifier (the proof `score` and packing demand before they
//! believe a claim). Every scheme implements [`WeightScheme`], whose `verify`
//! has no default, and is listed once in [`Scheme::ALL`]; parsing, help texts,
//! claim verification and packing iterate that list.
//!
//! Adding a scheme: a file here with a `WeightScheme` impl, and its variant in
//! [`Scheme`] (the `imp` match and `ALL` sit beside it; the compiler points at
//! both).

pub mod fp16;
pub mod linear;
pub mod log;
pub mod tanh;
pub mod ternary;

use std::fmt;
use std::ops::RangeInclusive;
use std::str::FromStr;

use ndarray::ArrayD;

use crate::error::{Error, Result};
use crate::onnx::TensorProto;
use crate::repr::round;

pub use ternary::TernaryRule;

/// Settings some quantizers read (seed 000's overflow rate; the ternary rules' knobs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// Fraction of |w| allowed to clip (linear, log).
    pub overflow_rate: f64,
    /// msu threshold on the normalized weights.
    pub msu_alpha: f64,
    /// ec2t entropy weight.
    pub ec2t_lambda: f64,
    /// Choose affine grids (linear, minmax) by the error they give instead of by
    /// the range: see `linear::mse_choice`.
    pub mse_grid: bool,
}

/// One tensor, or one channel of it, on a scheme's grid.
#[derive(Debug, Clone)]
pub struct Slice {
    pub values: Vec<f32>,
    /// The grid's step or scale (affine schemes): `onnx_micronet.step`.
    pub step: Option<f32>,
    /// The integer code of 0.0 (minmax): `onnx_micronet.zero_point`.
    pub zero_point: Option<i64>,
    /// Values whose code left the grid's range.
    pub clipped: usize,
    /// The grid in words, for the report.
    pub grid: String,
}

/// How packed storage keeps a scheme's values (`repr::packed`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Storage {
    /// k-bit codes u with W = (u - zp) * scale, zp = claimed zero point + `offset`
    /// (signed codes are stored shifted by 2^(k-1)).
    Affine { offset: i64 },
    /// k-bit codes into a codebook of at most 2^k values.
    Codebook,
    /// A mask plus one sign bit per nonzero into [w_n, w_p].
    Ternary,
    /// float16 values, cast to float32.
    Half,
}

/// What a verifier is shown: the claim read from `metadata_props`, and the values.
pub struct Proof<'a> {
    pub tensor: &'a TensorProto,
    pub values: &'a ArrayD<f32>,
    pub bits: u32,
    /// Per-channel claims: the axis the slices run along.
    pub axis: Option<usize>,
    /// The values sharing one grid: one per channel along `axis`, or the whole tensor.
    pub slices: &'a [Vec<f32>],
}

impl Proof<'_> {
    /// A metadata value of the tensor.
    pub fn meta(&self, key: &str) -> Option<&str> {
        super::claim::meta(self.tensor, key)
    }

    /// One number per slice from a metadata list (`None`: the key is absent).
    pub fn per_slice(&self, key: &str) -> std::result::Result<Option<Vec<f64>>, String> {
        let Some(raw) = self.meta(key) else {
            return Ok(None);
        };
        // Written as f32 (shortest round-trip form): read back as the same f32, then
        // widened, so the grid checked is the grid written (parsing the text as f64
        // would be off by up to half an f32 ulp, 2e-5 relative at 20-bit codes).
        let list: Vec<f64> =
            raw.split(',')
                .map(|s| {
                    s.trim().parse::<f32>().map(f64::from).map_err(|_| {
                        format!("{key} = '{raw}' is not a number or a list of numbers")
                    })
                })
                .collect::<std::result::Result<_, _>>()?;
        if list.len() != self.slices.len() {
            return Err(format!(
                "{key} lists {} values for {} {}",
                list.len(),
                self.slices.len(),
                if self.axis.is_some() {
                    "channels"
                } else {
                    "tensor (no axis)"
                }
            ));
        }
        Ok(Some(list))
    }
}

/// A weight scheme: its grid, both ways.
pub trait WeightScheme: Sync {
    /// The name in `onnx_micronet.scheme`, `--quantize` and recipes.
    fn name(&self) -> &'static str;
    /// Other spellings accepted on input.
    fn aliases(&self) -> &'static [&'static str] {
        &[]
    }
    /// Bit widths the quantizer takes.
    fn bit_range(&self) -> RangeInclusive<u32>;
    /// A width fixed by the scheme (ternary 2, fp16 16): `--quantize` takes no bits.
    fn fixed_bits(&self) -> Option<u32> {
        None
    }
    /// Whether `per_channel` gives one grid per output channel.
    fn per_channel(&self) -> bool {
        false
    }
    /// The most distinct values a claim of `bits` may hold (per channel when per-channel).
    fn max_levels(&self, bits: u32) -> u64 {
        1u64 << bits.min(63)
    }
    /// How packed storage keeps the values.
    fn storage(&self, bits: u32) -> Storage;
    /// Quantizes one tensor (or channel). `rule`: the variant (ternary rules);
    /// `fan_in`: inputs per output (msu).
    fn quantize(
        &self,
        w: &[f32],
        bits: u32,
        rule: Option<&str>,
        p: &Params,
        fan_in: usize,
    ) -> Slice;
    /// Checks a claim against the values, beyond the distinct count every claim
    /// passes first; `Err` says what contradicts it. No default: a scheme states its proof.
    fn verify(&self, proof: &Proof) -> std::result::Result<(), String>;
    /// The grid `quantize` would put `w` on, as a rounding function of single values,
    /// for rounding methods that choose each value themselves (GPTQ): every value it
    /// returns lies on the grid the claim of `quantize(w, ...)` states.
    fn grid(&self, w: &[f32], bits: u32, rule: Option<&str>, p: &Params, fan_in: usize) -> Grid;
}

/// A fixed grid, rounding one value at a time exactly as the scheme's quantizer
/// does (same arithmetic, so the claim stays provable).
#[derive(Debug, Clone, PartialEq)]
pub enum Grid {
    /// linear: clamp(floor(x / d + 1/2), lo, hi) * d.
    Linear { d: f32, lo: f64, hi: f64 },
    /// minmax: ((clamp(floor(x / s + 1/2) + z, 0, n) - z) as f32) * s.
    MinMax { s: f32, z: i64, n: f64 },
    /// log: sign(x) 2^round(log2 |x|) within [emin, emax], 0 below 2^(emin - 1).
    Log { emin: i32, emax: i32 },
    /// tanh: artanh of a uniform grid on tanh(x), n = 2^k - 1.
    Tanh { n: f64 },
    /// ternary: the nearest of {neg, 0, pos}.
    Ternary { neg: f32, pos: f32 },
    /// float16 rounding.
    Half,
}

impl Grid {
    /// The grid value for `x`; 0 stays 0.
    pub fn round(&self, x: f32) -> f32 {
        if x == 0.0 {
            return 0.0;
        }
        match *self {
            Grid::Linear { d, lo, hi } => {
                (round::floor(x as f64 / d as f64 + 0.5).clamp(lo, hi) as f32) * d
            }
            Grid::MinMax { s, z, n } => {
                let q = round::floor(x as f64 / s as f64 + 0.5) + z as f64;
                ((q.clamp(0.0, n) as i64 - z) as f32) * s
            }
            Grid::Log { emin, emax } => {
                let mut e = (x.abs() as f64).log2().round() as i32;
                if e > emax {
                    e = emax;
                }
                if e < emin {
                    if (x.abs() as f64) < 2f64.powi(emin - 1) {
                        return 0.0;
                    }
                    e = emin;
                }
                x.signum() * 2f32.powi(e)
            }
            Grid::Tanh { n } => {
                let c = round::floor(((x as f64).tanh() + 1.0) / 2.0 * n + 0.5).clamp(1.0, n - 1.0);
                (2.0 * c / n - 1.0).atanh() as f32
            }
            Grid::Ternary { neg, pos } => {
                let candidates = [
                    (0.0f32, x.abs()),
                    (neg, (x - neg).abs()),
                    (pos, (x - pos).abs()),
                ];
                candidates
                    .iter()
                    .min_by(|a, b| a.1.total_cmp(&b.1))
                    .map_or(0.0, |c| c.0)
            }
            Grid::Half => fp16::fp16(&[x]).0[0],
        }
    }
}

/// A scheme as configured: the grid family and, for ternary, the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Linear,
    MinMax,
    Log,
    Tanh,
    Ternary(TernaryRule),
    Fp16,
}

impl Scheme {
    /// Every scheme (each ternary rule once), in help order.
    pub const ALL: &'static [Scheme] = &[
        Scheme::Linear,
        Scheme::MinMax,
        Scheme::Log,
        Scheme::Tanh,
        Scheme::Ternary(TernaryRule::Twn),
        Scheme::Ternary(TernaryRule::Msu),
        Scheme::Ternary(TernaryRule::Ec2t),
        Scheme::Fp16,
    ];

    /// The grid behind the scheme.
    pub fn imp(self) -> &'static dyn WeightScheme {
        match self {
            Scheme::Linear => &linear::Linear,
            Scheme::MinMax => &linear::MinMax,
            Scheme::Log => &log::Log,
            Scheme::Tanh => &tanh::Tanh,
            Scheme::Ternary(_) => &ternary::Ternary,
            Scheme::Fp16 => &fp16::Fp16,
        }
    }

    /// The name written in `onnx_micronet.scheme`.
    pub fn claim_name(self) -> &'static str {
        self.imp().name()
    }

    /// The variant written in `onnx_micronet.rule` (ternary rules).
    pub fn rule(self) -> Option<&'static str> {
        match self {
            Scheme::Ternary(r) => Some(r.name()),
            _ => None,
        }
    }

    /// The bit widths the scheme takes.
    pub fn bit_range(self) -> RangeInclusive<u32> {
        self.imp().bit_range()
    }

    /// The accepted spellings, for error messages and `--help`.
    pub fn help() -> String {
        let mut plain = Vec::new();
        let mut rules = Vec::new();
        for s in Self::ALL {
            match s.rule() {
                Some(r) => rules.push((format!("{}:{r}", s.claim_name()), r)),
                None => plain.push(s.claim_name().to_string()),
            }
        }
        let (long, short): (Vec<String>, Vec<&str>) = rules.into_iter().unzip();
        format!(
            "{}, or {} ({} for short)",
            plain.join(", "),
            long.join(" | "),
            short.join(", ")
        )
    }

    /// The scheme a claim names (ternary rules share one grid: the first is returned).
    pub fn by_claim_name(name: &str) -> Option<Scheme> {
        Self::ALL.iter().copied().find(|s| s.claim_name() == name)
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rule() {
            Some(r) => write!(f, "{}:{r}", self.claim_name()),
            None => f.write_str(self.claim_name()),
        }
    }
}

impl FromStr for Scheme {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        for &sc in Self::ALL {
            let imp = sc.imp();
            let names = std::iter::once(imp.name()).chain(imp.aliases().iter().copied());
            // A family with variants: "ternary:msu", or the rule alone ("msu"); the
            // bare family name means its first variant in ALL.
            let first = Scheme::by_claim_name(imp.name()) == Some(sc);
            let hit = match sc.rule() {
                Some(r) => {
                    t == r
                        || names
                            .clone()
                            .any(|n| t == format!("{n}:{r}") || (t == n && first))
                }
                None => names.clone().any(|n| t == n),
            };
            if hit {
                return Ok(sc);
            }
        }
        Err(Error::Usage(format!(
            "unknown quantization scheme '{s}': expected {}",
            Scheme::help()
        )))
    }
}

/// One tensor quantized: values on the grid and the claim that states it.
#[derive(Debug, Clone)]
pub struct Quantized {
    pub values: ArrayD<f32>,
    /// `metadata_props` to write (the claim, `repr::claim`).
    pub meta: Vec<(&'static str, String)>,
    /// Step, scale or levels, for the report.
    pub grid: String,
    pub clipped: usize,
}

/// Quantizes a tensor on `scheme` at `bits`, with one grid per slice along
/// `axis` when `per_channel` (and the scheme has per-channel grids), and writes
/// the claim: scheme and bits, then axis and the step (and zero point) lists
/// (per channel) or the step (and zero point) of the one grid, then the rule.
/// `fan_in`: inputs per output (msu).
pub fn quantize(
    w: &ArrayD<f32>,
    scheme: Scheme,
    bits: u32,
    p: &Params,
    per_channel: bool,
    axis: Option<usize>,
    fan_in: usize,
) -> Quantized {
    use super::claim::{META_AXIS, META_BITS, META_RULE, META_SCHEME, META_STEP, META_ZERO_POINT};
    let imp = scheme.imp();
    let rule = scheme.rule();
    let mut meta = vec![
        (META_SCHEME, imp.name().to_string()),
        (META_BITS, bits.to_string()),
    ];
    if let (true, true, Some(ax)) = (per_channel, imp.per_channel(), axis) {
        let mut out = w.clone();
        let mut steps = Vec::new();
        let mut zps = Vec::new();
        let mut clipped = 0;
        for mut lane in out.axis_iter_mut(ndarray::Axis(ax)) {
            let v: Vec<f32> = lane.iter().copied().collect();
            let q = imp.quantize(&v, bits, rule, p, fan_in);
            steps.extend(q.step);
            zps.extend(q.zero_point);
            clipped += q.clipped;
            for (dst, src) in lane.iter_mut().zip(q.values) {
                *dst = src;
            }
        }
        let list = |v: Vec<String>| v.join(",");
        meta.push((META_AXIS, ax.to_string()));
        meta.push((META_STEP, list(steps.iter().map(|s| fmt_f32(*s)).collect())));
        if !zps.is_empty() {
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
    let flat: Vec<f32> = w.iter().copied().collect();
    let q = imp.quantize(&flat, bits, rule, p, fan_in);
    if let Some(s) = q.step {
        meta.push((META_STEP, fmt_f32(s)));
    }
    if let Some(z) = q.zero_point {
        meta.push((META_ZERO_POINT, z.to_string()));
    }
    if let Some(r) = rule {
        meta.push((META_RULE, r.to_string()));
    }
    Quantized {
        values: ArrayD::from_shape_vec(w.raw_dim(), q.values).expect("same shape"),
        meta,
        grid: q.grid,
        clipped: q.clipped,
    }
}

/// |x| at rank floor(rate n) of |w| sorted descending (seed 000's overflow rule;
/// rate 0: the max |w|). 0 for an empty slice.
pub fn abs_at_overflow_rank(w: &[f32], overflow_rate: f64) -> f32 {
    let n = w.len();
    if n == 0 {
        return 0.0;
    }
    let idx = (crate::repr::round::rank_at_rate(overflow_rate, n as u64) as usize).min(n - 1);
    if idx == 0 {
        return w.iter().fold(0f32, |m, x| m.max(x.abs()));
    }
    let mut a: Vec<f32> = w.iter().map(|x| x.abs()).collect();
    let (_, v, _) = a.select_nth_unstable_by(idx, |p, q| q.total_cmp(p));
    *v
}

/// A float as written in claims and reports (shortest round-trip form).
pub fn fmt_f32(x: f32) -> String {
    format!("{x:?}")
}

/// A step, as a power of two when it is one.
pub fn fmt_step(d: f32) -> String {
    let e = d.log2();
    if e.fract() == 0.0 {
        format!("2^{} = {}", e as i32, fmt_f32(d))
    } else {
        fmt_f32(d)
    }
}
