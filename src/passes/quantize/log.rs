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

/// (values, emax, emin, clipped count).
pub fn log(w: &[f32], bits: u32, overflow_rate: f64) -> (Vec<f32>, i32, i32, usize) {
    let n = w.len();
    if n == 0 || w.iter().all(|x| *x == 0.0) {
        return (w.iter().map(|_| 0.0).collect(), 0, 0, 0);
    }
    let idx = ((overflow_rate * n as f64).floor() as usize).min(n - 1);
    let mut a: Vec<f32> = w.iter().map(|x| x.abs()).collect();
    let v = if idx == 0 {
        a.iter().fold(0f32, |m, x| m.max(*x))
    } else {
        let (_, v, _) = a.select_nth_unstable_by(idx, |p, q| q.total_cmp(p));
        *v
    };
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
