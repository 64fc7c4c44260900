//! `log`: signed powers of two, seed 000's log quantizer read as the scheme's
//! name says (its `log_minmax_quantize` quantizes ln|x| on a min-max grid of
//! k - 1 bits, which gives powers of e off any binary grid; the contract here is
//! the shift-friendly one: powers of two).
//!
//! k bits = one sign bit + a (k-1)-bit exponent code, one code of which is kept
//! for zero, so L = 2^(k-1) - 1 exponents:
//!
//!   v    = |x| at the overflow rank (as `linear`; r = 0: max |x|)
//!   emax = round(log2 v),  emin = max(emax - L + 1, -126)
//!   e    = round(log2 |x|)   (rounding in the log domain)
//!   e > emax  -> emax (clipped)
//!   e < emin  -> 2^emin if |x| >= 2^(emin - 1), else 0 (the nearer of the two)
//!   Xq   = sign(x) 2^e;  0 stays 0
//!
//! At most 2 L + 1 = 2^k - 1 distinct values. k = 2 gives {0, +-2^emax}.

use std::ops::RangeInclusive;

use super::{abs_at_overflow_rank, Grid, Params, Proof, Slice, Storage, WeightScheme};

/// (values, emax, emin, clipped count).
pub fn log(w: &[f32], bits: u32, overflow_rate: f64) -> (Vec<f32>, i32, i32, usize) {
    let n = w.len();
    if n == 0 || w.iter().all(|x| *x == 0.0) {
        return (w.iter().map(|_| 0.0).collect(), 0, 0, 0);
    }
    let v = abs_at_overflow_rank(w, overflow_rate);
    let v = if v > 0.0 {
        v
    } else {
        w.iter().fold(0f32, |m, x| m.max(x.abs()))
    };
    let levels = (1i64 << (bits - 1).min(30)) - 1;
    let emax = ((v as f64).log2().round() as i32).clamp(-126, 127);
    let emin = (emax as i64 - levels + 1).max(-126) as i32;
    let mut clipped = 0;
    let out = w
        .iter()
        .map(|&x| {
            if x == 0.0 {
                return 0.0;
            }
            let mut e = (x.abs() as f64).log2().round() as i32;
            if e > emax {
                e = emax;
                clipped += 1;
            }
            if e < emin {
                if (x.abs() as f64) >= 2f64.powi(emin - 1) {
                    e = emin;
                } else {
                    return 0.0;
                }
            }
            x.signum() * 2f32.powi(e)
        })
        .collect();
    (out, emax, emin, clipped)
}

/// `log`: signed powers of two.
pub struct Log;

impl WeightScheme for Log {
    fn name(&self) -> &'static str {
        "log"
    }
    fn bit_range(&self) -> RangeInclusive<u32> {
        2..=16
    }
    fn storage(&self, _: u32) -> Storage {
        Storage::Codebook
    }
    fn quantize(&self, w: &[f32], bits: u32, _: Option<&str>, p: &Params, _: usize) -> Slice {
        let (values, emax, emin, clipped) = log(w, bits, p.overflow_rate);
        Slice {
            values,
            step: None,
            zero_point: None,
            clipped,
            grid: format!("+-2^{emin} .. +-2^{emax} and 0"),
        }
    }
    /// Every nonzero value is a signed power of two, the exponents spanning at most
    /// 2^(k-1) values (an exponent on k - 1 bits plus a sign bit).
    fn verify(&self, p: &Proof) -> Result<(), String> {
        let mut exps = std::collections::BTreeSet::new();
        for v in p.values.iter().filter(|v| **v != 0.0) {
            let e = v.abs().log2();
            if (e - e.round()).abs() > 1e-4 {
                return Err(format!("value {v} is not a signed power of two"));
            }
            exps.insert(e.round() as i64);
        }
        if let (Some(lo), Some(hi)) = (exps.first(), exps.last()) {
            let span = (hi - lo + 1) as u64;
            let bits = p.bits;
            if bits < 2 || span > 1u64 << (bits - 1).min(62) {
                return Err(format!(
                    "its exponents span 2^{lo}..2^{hi} ({span} exponents; {} bits of exponent give {})",
                    bits.saturating_sub(1),
                    1u64 << bits.saturating_sub(1).min(62)
                ));
            }
        }
        Ok(())
    }
    fn grid(&self, w: &[f32], bits: u32, _: Option<&str>, p: &Params, _: usize) -> Grid {
        let (_, emax, emin, _) = log(w, bits, p.overflow_rate);
        Grid::Log { emin, emax }
    }
}
