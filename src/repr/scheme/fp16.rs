//! `fp16`: IEEE 754 half precision (binary16), the storage seed 001 keeps its
//! non-ternary layers in and seed 002 counts its FP16 parameters at.
//!
//!   Xq = f16(x)   round to nearest, ties to even (the `half` crate's `f16::from_f32`)
//!   |x| > 65504 (the largest finite half) -> +-65504, counted as clipped
//!
//! Subnormal halves (down to 2^-24) are kept. A nonzero value whose half would
//! be zero (|x| < 2^-25) becomes +-2^-24 instead: rounding must not create
//! zeros, which the score would count as sparsity (a mask over the whole tensor
//! under REF's rule) and packing would store behind one; an error of at most
//! 2^-24 (6e-8). Zeros stay zeros. A claim is proved when every value converts
//! to float16 and back unchanged. Packed, the values are float16 initializers
//! feeding `Cast(to = FLOAT)` (behind a mask when the tensor has zeros), which
//! tract and onnxruntime fold at load; the score counts them at 16 bits
//! (micronet-rules.md section 2.1: FP16 = 0.5 parameter). 16 bits is not below
//! 16, so an all-fp16 model keeps the freebie; with 8-bit activations its
//! multiplies count at max(16, 8) = 16 bits.

use std::ops::RangeInclusive;

use half::f16;

use super::{Grid, Params, Proof, Slice, Storage, WeightScheme};

/// The largest finite float16.
pub const F16_MAX: f32 = 65504.0;

/// Rounds to float16 and back: (values, clipped count).
pub fn fp16(w: &[f32]) -> (Vec<f32>, usize) {
    let mut clipped = 0;
    let out = w
        .iter()
        .map(|&x| {
            if x.abs() > F16_MAX {
                clipped += 1;
                return F16_MAX.copysign(x);
            }
            let h = f16::from_f32(x).to_f32();
            if h == 0.0 && x != 0.0 {
                return SMALLEST.copysign(x);
            }
            h
        })
        .collect();
    (out, clipped)
}

/// The smallest positive float16 (subnormal), 2^-24.
const SMALLEST: f32 = 1.0 / 16_777_216.0;

/// Whether `x` is a float16 value (converts to float16 and back unchanged).
pub fn is_half(x: f32) -> bool {
    f16::from_f32(x).to_f32().to_bits() == x.to_bits()
}

/// `fp16`.
pub struct Fp16;

impl WeightScheme for Fp16 {
    fn name(&self) -> &'static str {
        "fp16"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["float16", "half"]
    }
    fn bit_range(&self) -> RangeInclusive<u32> {
        16..=16
    }
    fn fixed_bits(&self) -> Option<u32> {
        Some(16)
    }
    fn storage(&self, _: u32) -> Storage {
        Storage::Half
    }
    fn quantize(&self, w: &[f32], _: u32, _: Option<&str>, _: &Params, _: usize) -> Slice {
        let (values, clipped) = fp16(w);
        Slice {
            values,
            step: None,
            zero_point: None,
            clipped,
            grid: "float16, round to nearest even".into(),
        }
    }
    fn verify(&self, p: &Proof) -> Result<(), String> {
        if p.bits != 16 {
            return Err(format!("{} bits: float16 has 16", p.bits));
        }
        match p.values.iter().find(|v| !is_half(**v)) {
            Some(v) => Err(format!("value {v} is not a float16 value")),
            None => Ok(()),
        }
    }
    fn grid(&self, _: &[f32], _: u32, _: Option<&str>, _: &Params, _: usize) -> Grid {
        Grid::Half
    }
}
