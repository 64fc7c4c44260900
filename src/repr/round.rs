//! floor and round to nearest (halves away from zero) without a libm call.
//!
//! On baseline x86-64 (no SSE4.1 `roundsd`/`roundss`), `f64::floor` and
//! `f32::round` compile to calls into libm; the quantizers call them once per
//! weight, and a ResNet-50 has 25M weights. These give the same results, bit for
//! bit (sign of zero included), from a truncating integer conversion: for
//! |v| < 2^52 (f64), v - trunc(v) is exact, so comparing it with
//! 0 or 1/2 decides the result exactly; larger magnitudes, infinities and NaN are
//! already their own floor and rounding.

/// floor(rate x n), the rank a clipping rate names among n values, with a
/// product within 1e-9 (relative) below an integer taken as that integer: a
/// rate computed as 1 - 99.9 / 100 = 0.000999999999999889 must name rank 1 of
/// 1000 values (the product 0.999999999999889 would floor to 0 and clip
/// nothing). Rates are at most 1; so are the errors of computing them, far
/// above 1e-9 relative of no real rank.
pub fn rank_at_rate(rate: f64, n: u64) -> u64 {
    let x = rate * n as f64;
    let r = round(x);
    let rank = if r > x && r - x <= 1e-9 * r.max(1.0) {
        r
    } else {
        floor(x)
    };
    rank.max(0.0) as u64
}

/// `v.floor()`, exactly.
#[inline]
pub fn floor(v: f64) -> f64 {
    if v.abs() >= 4_503_599_627_370_496.0 || v.is_nan() {
        return v; // |v| >= 2^52: an integer; or infinite, or NaN
    }
    let t = v as i64 as f64;
    let f = if t > v { t - 1.0 } else { t };
    f.copysign(v) // floor(-0.0) = -0.0; otherwise f already has v's sign
}

/// `v.round()` (halves away from zero), exactly.
#[inline]
pub fn round(v: f64) -> f64 {
    if v.abs() >= 4_503_599_627_370_496.0 || v.is_nan() {
        return v;
    }
    let t = v as i64 as f64;
    let d = v - t;
    let r = if d >= 0.5 {
        t + 1.0
    } else if d <= -0.5 {
        t - 1.0
    } else {
        t
    };
    r.copysign(v) // round(-0.3) = -0.0
}

/// `v.round()` (halves away from zero), exactly: through f64, which holds
/// every f32 and every rounded f32 exactly.
#[inline]
pub fn round_f32(v: f32) -> f32 {
    round(v as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same64(a: f64, b: f64) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    fn same32(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    /// Bit for bit what std gives: the edges by hand (signed zeros, halves,
    /// just below and above them, 2^52 and 2^23 and their neighbours,
    /// infinities, NaN) and a million values spread over every exponent.
    #[test]
    fn rank_at_rate_by_hand() {
        // 1 - 99.9 / 100 = 0.000999999999999889: x 1000 = 0.999999999999889, rank 1.
        assert_eq!(rank_at_rate(1.0 - 99.9 / 100.0, 1000), 1);
        // (1 - 99.9 / 100) / 2 x 2000 (the asymmetric tails): rank 1.
        assert_eq!(rank_at_rate((1.0 - 99.9 / 100.0) / 2.0, 2000), 1);
        assert_eq!(rank_at_rate(0.1, 10), 1);
        assert_eq!(rank_at_rate(0.0, 1000), 0);
        assert_eq!(rank_at_rate(0.5, 3), 1); // floor(1.5)
        assert_eq!(rank_at_rate(0.00099, 1000), 0); // 0.99: a real fraction floors
        assert_eq!(rank_at_rate(0.999_999_9, 10), 9); // 9.999999: not within 1e-9
    }

    #[test]
    fn same_bits_as_std() {
        let mut edges: Vec<f64> = vec![
            0.0,
            -0.0,
            0.3,
            -0.3,
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            -2.5,
            0.49999999999999994,
            -0.49999999999999994,
            1.0,
            -1.0,
            7.999999,
            -7.000001,
            1e-300,
            -1e-300,
            4_503_599_627_370_495.5,
            -4_503_599_627_370_495.5,
            4_503_599_627_370_496.0,
            -4_503_599_627_370_497.0,
            9.3e18,
            -9.3e18,
            1e300,
            -1e300,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            f64::MIN_POSITIVE,
            -f64::MIN_POSITIVE,
        ];
        for e in [8_388_607.5f64, 8_388_608.0, 8_388_609.0, 4_194_303.5] {
            edges.push(e);
            edges.push(-e);
        }
        let mut r = 0x9e37_79b9_7f4a_7c15u64;
        let mut all = edges.clone();
        for _ in 0..1_000_000 {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            all.push(f64::from_bits(r));
            // Values near small integers and halves, where the rounding turns.
            all.push((r % 20_000) as f64 / 8.0 - 1250.0 + (r >> 60) as f64 * 1e-9);
        }
        for &v in &all {
            assert!(same64(floor(v), v.floor()), "floor({v:e})");
            assert!(same64(round(v), v.round()), "round({v:e})");
            let w = v as f32;
            assert!(same32(round_f32(w), w.round()), "round_f32({w:e})");
            let w = f32::from_bits(v.to_bits() as u32);
            assert!(same32(round_f32(w), w.round()), "round_f32({w:e})");
        }
    }
}
