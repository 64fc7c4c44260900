//! `tanh`: seed 000's `tanh_quantize`: quantize tanh(x) uniformly on [-1, 1] with
//! 2^k levels and map back with artanh:
//!
//!   n = 2^k - 1,  t = tanh(x),  c = floor((t + 1) / 2 * n + 1/2)
//!   c clamped to [1, n - 1]        (the end levels +-1 would map to +-inf)
//!   Xq = artanh(2 c / n - 1)       (f64, then rounded to f32)
//!   x = 0 stays 0                  (the mask; the grid has no 0 level: n is odd)
//!
//! So at most 2^k - 2 nonzero levels plus 0. A clamped code counts as clipped.
//! The arithmetic is in f64 and deterministic, so the same tensor always maps to
//! the same f32 values.

use std::ops::RangeInclusive;

use super::{Grid, Params, Proof, Slice, Storage, WeightScheme};

/// (values, clipped count).
pub fn tanh(w: &[f32], bits: u32) -> (Vec<f32>, usize) {
    let n = 2f64.powi(bits as i32) - 1.0;
    let mut clipped = 0;
    let out = w
        .iter()
        .map(|&x| {
            if x == 0.0 {
                return 0.0;
            }
            let t = (x as f64).tanh();
            let c = crate::repr::round::floor((t + 1.0) / 2.0 * n + 0.5);
            if c < 1.0 || c > n - 1.0 {
                clipped += 1;
            }
            let c = c.clamp(1.0, n - 1.0);
            (2.0 * c / n - 1.0).atanh() as f32
        })
        .collect();
    (out, clipped)
}

/// `tanh`: tanh(w) on a uniform grid, mapped back by artanh.
pub struct Tanh;

impl WeightScheme for Tanh {
    fn name(&self) -> &'static str {
        "tanh"
    }
    fn bit_range(&self) -> RangeInclusive<u32> {
        2..=16
    }
    fn storage(&self, _: u32) -> Storage {
        Storage::Codebook
    }
    fn quantize(&self, w: &[f32], bits: u32, _: Option<&str>, _: &Params, _: usize) -> Slice {
        let (values, clipped) = tanh(w, bits);
        Slice {
            values,
            step: None,
            zero_point: None,
            clipped,
            grid: format!("artanh of {} levels", (1u64 << bits) - 2),
        }
    }
    /// The claim carries no grid parameter: the distinct count (at most 2^k
    /// values), checked for every claim, is the whole proof.
    fn verify(&self, _: &Proof) -> Result<(), String> {
        Ok(())
    }
    fn grid(&self, _: &[f32], bits: u32, _: Option<&str>, _: &Params, _: usize) -> Grid {
        Grid::Tanh {
            n: 2f64.powi(bits as i32) - 1.0,
        }
    }
}
