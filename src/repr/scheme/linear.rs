//! Uniform grids: `linear` (seed 000's fixed point, power-of-two step) and
//! `minmax` (an asymmetric grid over [min, max] with an integer zero point).
//!
//! linear, k bits, overflow rate r (seed 000's `compute_integral_part` and
//! `linear_quantize`):
//!
//!   v  = the value at index floor(r n) of |x| sorted descending (r = 0: max |x|)
//!   I  = ceil(log2(v + 1e-12))            integral bits (computed in f64)
//!   sf = k - 1 - I,  d = 2^-sf            fraction bits and step
//!   q  = clamp(floor(x / d + 1/2), -2^(k-1), 2^(k-1) - 1),  Xq = (q as f32) * d
//!
//! d is a power of two, so x / d and q * d are exact in f32: the written value
//! is the code times the step bit for bit, and 0.0 stays 0.0. A value whose
//! rounded code left the range is counted as clipped (with r = 0 only the top
//! half-step of a positive maximum can clip).
//!
//! minmax, k bits: seed 000's `min_max_quantize` spreads 2^k levels from min to
//! max; here the range is first widened to hold 0 and the grid nudged so that
//! 0.0 is a level exactly (ONNX / TFLite style), so pruned zeros stay zero and a
//! DequantizeLinear of the codes reproduces the values:
//!
//!   lo = min(min x, 0), hi = max(max x, 0), n = 2^k - 1
//!   s  = (f32) ((hi - lo) / n)            scale
//!   z  = clamp(round(-lo / s), 0, n)      zero point (an integer code)
//!   q  = clamp(floor(x / s + 1/2) + z, 0, n),  Xq = ((q - z) as f32) * s
//!
//! Codes are unsigned, [0, 2^k - 1] (uint8 at k = 8). An all-zero tensor gets
//! s = 1, z = 0; s is at least the smallest normal f32 (2^-126), so values and
//! their check stay exact (a smaller range quantizes to zeros).

use std::ops::RangeInclusive;

use super::{
    abs_at_overflow_rank, fmt_f32, fmt_step, Grid, Params, Proof, Slice, Storage, WeightScheme,
};
use crate::repr::claim::{META_STEP, META_ZERO_POINT};
use crate::repr::round;

/// Integral bits of seed 000: ceil(log2(v + 1e-12)), v the |x| at the overflow rank.
pub fn integral_part(w: &[f32], overflow_rate: f64) -> i32 {
    if w.is_empty() {
        return 0;
    }
    let v = abs_at_overflow_rank(w, overflow_rate);
    (v as f64 + 1e-12).log2().ceil() as i32
}

/// Linear quantization with `sf` fraction bits: (values, step, clipped count).
pub fn linear_with_sf(w: &[f32], sf: i32, bits: u32) -> (Vec<f32>, f32, usize) {
    // Keep the step a normal f32 (2^-126 .. 2^127).
    let sf = sf.clamp(-127, 126);
    let d = 2f32.powi(-sf);
    let lo = -(2f64.powi(bits as i32 - 1));
    let hi = 2f64.powi(bits as i32 - 1) - 1.0;
    let mut clipped = 0;
    let out = w
        .iter()
        .map(|&x| {
            let r = round::floor(x as f64 / d as f64 + 0.5);
            if r < lo || r > hi {
                clipped += 1;
            }
            (r.clamp(lo, hi) as f32) * d
        })
        .collect();
    (out, d, clipped)
}

/// Seed 000's linear quantizer: (values, step, sf, clipped count).
pub fn linear(w: &[f32], bits: u32, overflow_rate: f64) -> (Vec<f32>, f32, i32, usize) {
    let sf = bits as i32 - 1 - integral_part(w, overflow_rate);
    let sf = sf.clamp(-127, 126);
    let (v, d, c) = linear_with_sf(w, sf, bits);
    (v, d, sf, c)
}

/// The norm GPTQ's reference quantizer minimizes when it searches a grid
/// (`quant.py`, `Quantizer.find_params(mse=True)`: sum |q(w) - w|^2.4).
pub const MSE_NORM: f64 = 2.4;

/// Error of a grid on `w`: sum |q(w) - w|^2.4.
fn grid_error(w: &[f32], q: &[f32]) -> f64 {
    w.iter()
        .zip(q)
        .map(|(a, b)| ((*a - *b).abs() as f64).powf(MSE_NORM))
        .sum()
}

/// The minmax grid of `w` with its range shrunk by the factor p in
/// {1, 0.99, .., 0.21} that minimizes sum |q(w) - w|^2.4 (GPTQ's grid search:
/// 100 steps, shrinking by at most 0.8); ties keep the larger range.
pub fn minmax_grid_mse(w: &[f32], bits: u32) -> (f32, i64) {
    let mut best = (f64::INFINITY, minmax_grid(w, bits));
    for i in 0..80 {
        let p = 1.0 - i as f64 / 100.0;
        let (s, z) = minmax_grid_shrunk(w, bits, p);
        let (q, _) = minmax_with(w, bits, s, z);
        let e = grid_error(w, &q);
        if e < best.0 {
            best = (e, (s, z));
        }
    }
    best.1
}

/// The linear step exponent sf (step 2^-sf) among the range's and the next two
/// finer ones that minimizes sum |q(w) - w|^2.4 (a power-of-two grid can only
/// clip by factors of 2).
pub fn linear_sf_mse(w: &[f32], bits: u32, overflow_rate: f64) -> i32 {
    let sf0 = (bits as i32 - 1 - integral_part(w, overflow_rate)).clamp(-127, 126);
    let mut best = (f64::INFINITY, sf0);
    for sf in sf0..=(sf0 + 2).min(126) {
        let (q, _, _) = linear_with_sf(w, sf, bits);
        let e = grid_error(w, &q);
        if e < best.0 {
            best = (e, sf);
        }
    }
    best.1
}

/// The minmax grid of `w`: (scale, zero point).
pub fn minmax_grid(w: &[f32], bits: u32) -> (f32, i64) {
    minmax_grid_shrunk(w, bits, 1.0)
}

/// The minmax grid of [p min(w, 0), p max(w, 0)].
fn minmax_grid_shrunk(w: &[f32], bits: u32, p: f64) -> (f32, i64) {
    let n = 2f64.powi(bits as i32) - 1.0;
    let lo = p * w.iter().fold(0f32, |m, x| m.min(*x)) as f64;
    let hi = p * w.iter().fold(0f32, |m, x| m.max(*x)) as f64;
    if hi - lo <= 0.0 {
        return (1.0, 0);
    }
    // A normal f32 step: a subnormal one (channels of magnitude ~1e-39) would make
    // ((q - z) as f32) * s inexact, off the grid the claim states.
    let s = (((hi - lo) / n) as f32).max(f32::MIN_POSITIVE);
    let z = (-lo / s as f64).round().clamp(0.0, n) as i64;
    (s, z)
}

/// Values on a minmax grid: (values, clipped count).
pub fn minmax_with(w: &[f32], bits: u32, s: f32, z: i64) -> (Vec<f32>, usize) {
    let n = 2f64.powi(bits as i32) - 1.0;
    let mut clipped = 0;
    let out = w
        .iter()
        .map(|&x| {
            let q = round::floor(x as f64 / s as f64 + 0.5) + z as f64;
            if q < 0.0 || q > n {
                clipped += 1;
            }
            ((q.clamp(0.0, n) as i64 - z) as f32) * s
        })
        .collect();
    (out, clipped)
}

/// The minmax quantizer: (values, scale, zero point, clipped count).
pub fn minmax(w: &[f32], bits: u32) -> (Vec<f32>, f32, i64, usize) {
    let (s, z) = minmax_grid(w, bits);
    let (v, c) = minmax_with(w, bits, s, z);
    (v, s, z, c)
}

/// `linear`: seed 000's fixed point, signed codes in [-2^(k-1), 2^(k-1) - 1].
pub struct Linear;

/// `minmax`: an asymmetric grid with an integer zero point, unsigned codes in [0, 2^k - 1].
pub struct MinMax;

impl WeightScheme for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }
    fn bit_range(&self) -> RangeInclusive<u32> {
        2..=24
    }
    fn per_channel(&self) -> bool {
        true
    }
    fn storage(&self, bits: u32) -> Storage {
        Storage::Affine {
            offset: 1i64 << (bits.max(1) - 1),
        }
    }
    fn quantize(&self, w: &[f32], bits: u32, _: Option<&str>, p: &Params, _: usize) -> Slice {
        let (values, d, sf, clipped) = if p.mse_grid {
            let sf = linear_sf_mse(w, bits, p.overflow_rate);
            let (v, d, c) = linear_with_sf(w, sf, bits);
            (v, d, sf, c)
        } else {
            linear(w, bits, p.overflow_rate)
        };
        Slice {
            values,
            step: Some(d),
            zero_point: None,
            clipped,
            grid: format!("step {} (sf {sf})", fmt_step(d)),
        }
    }
    fn verify(&self, proof: &Proof) -> Result<(), String> {
        verify_affine(proof, true)
    }
    fn grid(&self, w: &[f32], bits: u32, _: Option<&str>, p: &Params, _: usize) -> Grid {
        let sf = if p.mse_grid {
            linear_sf_mse(w, bits, p.overflow_rate)
        } else {
            (bits as i32 - 1 - integral_part(w, p.overflow_rate)).clamp(-127, 126)
        };
        Grid::Linear {
            d: 2f32.powi(-sf),
            lo: -(2f64.powi(bits as i32 - 1)),
            hi: 2f64.powi(bits as i32 - 1) - 1.0,
        }
    }
}

impl WeightScheme for MinMax {
    fn name(&self) -> &'static str {
        "minmax"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["min_max", "min-max"]
    }
    fn bit_range(&self) -> RangeInclusive<u32> {
        2..=16
    }
    fn per_channel(&self) -> bool {
        true
    }
    fn storage(&self, _: u32) -> Storage {
        Storage::Affine { offset: 0 }
    }
    fn quantize(&self, w: &[f32], bits: u32, _: Option<&str>, p: &Params, _: usize) -> Slice {
        let (s, z) = if p.mse_grid {
            minmax_grid_mse(w, bits)
        } else {
            minmax_grid(w, bits)
        };
        let (values, clipped) = minmax_with(w, bits, s, z);
        Slice {
            values,
            step: Some(s),
            zero_point: Some(z),
            clipped,
            grid: format!("scale {}, zero point {z}", fmt_f32(s)),
        }
    }
    fn verify(&self, proof: &Proof) -> Result<(), String> {
        verify_affine(proof, false)
    }
    fn grid(&self, w: &[f32], bits: u32, _: Option<&str>, p: &Params, _: usize) -> Grid {
        let (s, z) = if p.mse_grid {
            minmax_grid_mse(w, bits)
        } else {
            minmax_grid(w, bits)
        };
        Grid::MinMax {
            s,
            z,
            n: 2f64.powi(bits as i32) - 1.0,
        }
    }
}

/// Every value v of each slice is (q - zp) * step with an integer code q in range
/// (see `on_grid`). linear: zp = 0, signed codes; minmax: the claimed zero point,
/// unsigned codes.
fn verify_affine(p: &Proof, signed: bool) -> Result<(), String> {
    let steps = p
        .per_slice(META_STEP)?
        .ok_or_else(|| format!("has no valid {META_STEP}"))?;
    let zps = if signed {
        vec![0.0; p.slices.len()]
    } else {
        p.per_slice(META_ZERO_POINT)?
            .ok_or_else(|| format!("has no valid {META_ZERO_POINT}"))?
    };
    let bits = p.bits as i32;
    let (lo, hi) = if signed {
        (-(2f64.powi(bits - 1)), 2f64.powi(bits - 1) - 1.0)
    } else {
        (0.0, 2f64.powi(bits) - 1.0)
    };
    // The writer computes ((q - zp) as f32) * step in f32: v is on the grid when
    // that product, for the nearest integer k = q - zp, gives v back bit for bit
    // (the same arithmetic), or v / step is within 1e-3 of k (values a float ulp
    // away, written by other tools).
    let on_grid = |v: f32, step: f64, zp: f64| -> bool {
        let x = v as f64 / step;
        let k = round::round(x);
        let exact = (k as f32) * (step as f32) == v;
        (exact || (x - k).abs() <= 1e-3) && k + zp >= lo && k + zp <= hi
    };
    for ((s, &step), &zp) in p.slices.iter().zip(&steps).zip(&zps) {
        if !(step > 0.0 && step.is_finite()) {
            return Err(format!("{META_STEP} {step} is not positive"));
        }
        if zp.fract() != 0.0 || zp < lo || zp > hi {
            return Err(format!(
                "{META_ZERO_POINT} {zp} is not an integer code in [{lo}, {hi}]"
            ));
        }
        if let Some(v) = s.iter().find(|v| !on_grid(**v, step, zp)) {
            return Err(if signed {
                format!("value {v} is not on the grid k * {step}, k in [{lo}, {hi}]")
            } else {
                format!("value {v} is not on the grid (q - {zp}) * {step}, q in [{lo}, {hi}]")
            });
        }
    }
    Ok(())
}
