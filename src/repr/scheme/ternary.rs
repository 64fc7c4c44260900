//! `ternary`: values in {w_n, 0, w_p}, one pair per tensor. Exact zeros (pruned
//! weights) stay 0 under every rule. n = number of values, all sums in f64.
//!
//! - `twn` (Ternary Weight Networks, Li & Liu 2016):
//!   delta = 0.7 mean|w| (over all n values, zeros included),
//!   alpha = mean |w| over {|w| > delta},  Xq = alpha sign(w) where |w| > delta, else 0.
//! - `msu` (seed 001, MSUNet's `ForwardSign`): z = (w - mean w) / std w (std with
//!   n - 1, as torch), t = +1 where z > a, -1 where z < -a, else 0 (a = 0.67749 by
//!   default, MSUNet-v3's --alpha), t = 0 where w = 0; the layer multiplier
//!   m = sqrt(2 / fan_in * n / nnz(t)) with fan_in = numel / shape[0] for a conv
//!   (torch's x.shape[1] x.shape[2] x.shape[3]) and K for Gemm/MatMul; Xq = m t.
//!   My reading of MSUNet: the ternary layers were trained from scratch with this
//!   He-style multiplier and a BatchNorm after them, which absorbs the scale. On a
//!   trained float model (and after BN folding) m is not the weights' scale, so
//!   post-training `msu` changes each layer's output scale by m / mean|w|;
//!   the report gives that ratio.
//! - `ec2t` (seed 002, entropy-constrained ternarization): centroids w_n < 0 < w_p
//!   and an assignment minimizing, per weight,
//!   J_c(w) = (w - c)^2 + lambda s2 (-log2 P_c),   c in {w_n, 0, w_p},
//!   with P_c the fraction of weights assigned to c and s2 = mean w^2 (so lambda is
//!   unitless; lambda = 0 is plain 3-level Lloyd with a fixed 0). Start from twn's
//!   assignment with w_p = mean of w > delta, w_n = mean of w < -delta; then
//!   alternate assignment (ties go to 0, then to the lower centroid) and centroid
//!   update (each the mean of its members; an emptied cluster keeps its centroid)
//!   until the assignment is stable, at most 30 rounds. Larger lambda: sparser.

use std::ops::RangeInclusive;

use super::{Grid, Params, Proof, Slice, Storage, WeightScheme};
use crate::repr::claim::META_RULE;

/// A ternary rule (the `onnx_micronet.rule` of a ternary claim).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TernaryRule {
    Twn,
    Msu,
    Ec2t,
}

impl TernaryRule {
    pub const ALL: [TernaryRule; 3] = [TernaryRule::Twn, TernaryRule::Msu, TernaryRule::Ec2t];

    pub fn name(self) -> &'static str {
        match self {
            TernaryRule::Twn => "twn",
            TernaryRule::Msu => "msu",
            TernaryRule::Ec2t => "ec2t",
        }
    }

    pub fn parse(s: &str) -> Option<TernaryRule> {
        Self::ALL.into_iter().find(|r| r.name() == s)
    }
}

/// twn: (values, delta, alpha).
pub fn twn(w: &[f32]) -> (Vec<f32>, f64, f64) {
    let n = w.len().max(1) as f64;
    let delta = 0.7 * w.iter().map(|x| x.abs() as f64).sum::<f64>() / n;
    let (sum, cnt) = w
        .iter()
        .filter(|x| x.abs() as f64 > delta)
        .fold((0f64, 0usize), |(s, c), x| (s + x.abs() as f64, c + 1));
    let alpha = if cnt > 0 { sum / cnt as f64 } else { 0.0 };
    let a = alpha as f32;
    let out = w
        .iter()
        .map(|&x| {
            if x.abs() as f64 > delta {
                a * x.signum()
            } else {
                0.0
            }
        })
        .collect();
    (out, delta, alpha)
}

/// msu: (values, multiplier m).
pub fn msu(w: &[f32], fan_in: usize, alpha: f64) -> (Vec<f32>, f64) {
    let n = w.len();
    if n < 2 {
        return (vec![0.0; n], 0.0);
    }
    let mean = w.iter().map(|x| *x as f64).sum::<f64>() / n as f64;
    let var = w.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let std = var.sqrt();
    if std == 0.0 {
        return (vec![0.0; n], 0.0);
    }
    let t: Vec<f32> = w
        .iter()
        .map(|&x| {
            let z = (x as f64 - mean) / std;
            if x == 0.0 {
                0.0
            } else if z > alpha {
                1.0
            } else if z < -alpha {
                -1.0
            } else {
                0.0
            }
        })
        .collect();
    let nnz = t.iter().filter(|v| **v != 0.0).count();
    if nnz == 0 {
        return (t, 0.0);
    }
    let m = (2.0 / fan_in.max(1) as f64 * n as f64 / nnz as f64).sqrt();
    let mf = m as f32;
    (t.into_iter().map(|v| v * mf).collect(), m)
}

/// ec2t: (values, w_n, w_p, rounds run).
pub fn ec2t(w: &[f32], lambda: f64) -> (Vec<f32>, f64, f64, usize) {
    let n = w.len();
    if n == 0 {
        return (Vec::new(), 0.0, 0.0, 0);
    }
    let (_, delta, _) = twn(w);
    // Assignment: 0 = w_n, 1 = zero, 2 = w_p.
    let mut assign: Vec<u8> = w
        .iter()
        .map(|&x| {
            let x = x as f64;
            if x > delta {
                2
            } else if x < -delta {
                0
            } else {
                1
            }
        })
        .collect();
    let means = |assign: &[u8], prev: [f64; 3]| -> [f64; 3] {
        let mut s = [0f64; 3];
        let mut c = [0usize; 3];
        for (&x, &a) in w.iter().zip(assign) {
            s[a as usize] += x as f64;
            c[a as usize] += 1;
        }
        let mut out = prev;
        for k in [0, 2] {
            if c[k] > 0 {
                out[k] = s[k] / c[k] as f64;
            }
        }
        out[1] = 0.0;
        out
    };
    let s2 = w.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / n as f64;
    let mut cent = means(&assign, [-delta, 0.0, delta]);
    let mut rounds = 0;
    for _ in 0..30 {
        rounds += 1;
        let mut count = [0usize; 3];
        for &a in &assign {
            count[a as usize] += 1;
        }
        let cost: Vec<f64> = count
            .iter()
            .map(|&c| lambda * s2 * -((c.max(1) as f64) / n as f64).log2())
            .collect();
        let mut changed = false;
        for (x, a) in w.iter().zip(assign.iter_mut()) {
            let new = if *x == 0.0 {
                1
            } else {
                let x = *x as f64;
                let j = |k: usize| (x - cent[k]).powi(2) + cost[k];
                let mut best = 1usize;
                for k in [0usize, 2] {
                    if j(k) < j(best) {
                        best = k;
                    }
                }
                best as u8
            };
            if new != *a {
                *a = new;
                changed = true;
            }
        }
        cent = means(&assign, cent);
        if !changed {
            break;
        }
    }
    let (wn, wp) = (cent[0] as f32, cent[2] as f32);
    let out = assign
        .iter()
        .map(|a| match a {
            0 => wn,
            2 => wp,
            _ => 0.0,
        })
        .collect();
    (out, cent[0], cent[2], rounds)
}

/// `ternary`: {w_n, 0, w_p} by one of the rules above.
pub struct Ternary;

impl WeightScheme for Ternary {
    fn name(&self) -> &'static str {
        "ternary"
    }
    fn bit_range(&self) -> RangeInclusive<u32> {
        2..=2
    }
    fn fixed_bits(&self) -> Option<u32> {
        Some(2)
    }
    fn max_levels(&self, _: u32) -> u64 {
        3
    }
    fn storage(&self, _: u32) -> Storage {
        Storage::Ternary
    }
    fn quantize(&self, w: &[f32], _: u32, rule: Option<&str>, p: &Params, fan_in: usize) -> Slice {
        let rule = rule
            .and_then(TernaryRule::parse)
            .unwrap_or(TernaryRule::Twn);
        let (values, grid) = match rule {
            TernaryRule::Twn => {
                let (q, delta, alpha) = twn(w);
                (q, format!("delta {delta:.6e}, alpha {alpha:.6e}"))
            }
            TernaryRule::Msu => {
                let (q, m) = msu(w, fan_in, p.msu_alpha);
                let mean_abs =
                    w.iter().map(|x| x.abs() as f64).sum::<f64>() / w.len().max(1) as f64;
                (
                    q,
                    format!(
                        "threshold {} std, multiplier {m:.6e} ({:.2}x mean|w|)",
                        p.msu_alpha,
                        if mean_abs > 0.0 { m / mean_abs } else { 0.0 }
                    ),
                )
            }
            TernaryRule::Ec2t => {
                let (q, wn, wp, rounds) = ec2t(w, p.ec2t_lambda);
                (
                    q,
                    format!(
                        "w_n {wn:.6e}, w_p {wp:.6e}, lambda {}, {rounds} rounds",
                        p.ec2t_lambda
                    ),
                )
            }
        };
        Slice {
            values,
            step: None,
            zero_point: None,
            clipped: 0,
            grid,
        }
    }
    /// At most one negative and one positive level; twn and msu symmetric (w_n = -w_p).
    fn verify(&self, p: &Proof) -> Result<(), String> {
        let r = p.meta(META_RULE);
        if let Some(r) = r.filter(|r| TernaryRule::parse(r).is_none()) {
            return Err(format!("{META_RULE} = '{r}' is not twn, msu or ec2t"));
        }
        let levels: std::collections::BTreeSet<u32> = p
            .values
            .iter()
            .filter(|v| **v != 0.0)
            .map(|v| v.to_bits())
            .collect();
        let neg: Vec<f32> = levels
            .iter()
            .map(|b| f32::from_bits(*b))
            .filter(|v| *v < 0.0)
            .collect();
        let pos: Vec<f32> = levels
            .iter()
            .map(|b| f32::from_bits(*b))
            .filter(|v| *v > 0.0)
            .collect();
        if neg.len() > 1 || pos.len() > 1 {
            return Err("holds more than one negative or positive level".into());
        }
        if let (Some("twn" | "msu"), [n], [q]) = (r, &neg[..], &pos[..]) {
            if *n != -*q {
                return Err(format!(
                    "rule {} is symmetric, yet its levels are {n} and {q}",
                    r.unwrap_or_default()
                ));
            }
        }
        Ok(())
    }
    fn grid(&self, w: &[f32], bits: u32, rule: Option<&str>, p: &Params, fan_in: usize) -> Grid {
        let q = self.quantize(w, bits, rule, p, fan_in).values;
        let neg = q.iter().copied().filter(|v| *v < 0.0).fold(0f32, f32::min);
        let pos = q.iter().copied().filter(|v| *v > 0.0).fold(0f32, f32::max);
        Grid::Ternary { neg, pos }
    }
}
