//! Claims: how a float tensor states the grid its values lie on, and the proof
//! demanded before anyone believes it.
//!
//! Quantized weights may stay float32 initializers whose values lie exactly on
//! their grid, computed in f32 as `((code - zp) as f32) * scale`, so a
//! DequantizeLinear of the codes reproduces them bit for bit; exact zeros (pruned
//! weights) stay exactly 0.0 under every scheme (the mask is the zeros). The
//! tensor's `metadata_props` state the grid:
//! - `onnx_micronet.scheme` = a [`Scheme`] name (linear | minmax | log | tanh |
//!   ternary | fp16), and `onnx_micronet.bits` = k (may be omitted where the
//!   scheme fixes it: ternary 2, fp16 16);
//! - linear: `onnx_micronet.step` = scale (2^-sf), zp = 0, signed codes in
//!   [-2^(k-1), 2^(k-1) - 1];
//! - minmax: `onnx_micronet.step` = scale and `onnx_micronet.zero_point` = zp, an
//!   integer; unsigned codes in [0, 2^k - 1] (ONNX uint8 style at k = 8; the grid
//!   is nudged so 0.0 is code zp);
//! - per-channel linear/minmax: `onnx_micronet.axis` = the tensor's output-channel
//!   axis (`graph::layers`), and step / zero_point as comma-separated lists, one
//!   per channel;
//! - log: every nonzero value is a signed power of two, the exponents spanning at
//!   most 2^(k-1) values;
//! - tanh: at most 2^k distinct values;
//! - ternary: `onnx_micronet.rule` = twn | msu | ec2t; values in {w_n, 0, w_p},
//!   twn and msu symmetric (w_n = -w_p);
//! - fp16: every value is a float16 value.
//!
//! Verification ([`verify`]): the scheme is known, the distinct count (per channel
//! when per-channel) is at most the scheme's level count (2^k; ternary 3), then
//! the scheme's own proof (`WeightScheme::verify`). Any contradiction is an error
//! naming the tensor and the claim, never silently believed.

use std::collections::BTreeSet;

use ndarray::{ArrayD, Axis};

use super::scheme::{Proof, Scheme, Storage};
use crate::error::{Error, Result};
use crate::onnx::proto::StringStringEntryProto;
use crate::onnx::TensorProto;

/// Metadata keys on a `TensorProto` through which passes state a weight's scheme.
pub const META_SCHEME: &str = "onnx_micronet.scheme";
pub const META_BITS: &str = "onnx_micronet.bits";
pub const META_STEP: &str = "onnx_micronet.step";
pub const META_ZERO_POINT: &str = "onnx_micronet.zero_point";
pub const META_AXIS: &str = "onnx_micronet.axis";
pub const META_RULE: &str = "onnx_micronet.rule";
/// Every key of the claim contract, in the order they are written.
pub const META_KEYS: [&str; 6] = [
    META_SCHEME,
    META_BITS,
    META_STEP,
    META_ZERO_POINT,
    META_AXIS,
    META_RULE,
];

/// A metadata value of a tensor.
pub fn meta<'a>(t: &'a TensorProto, key: &str) -> Option<&'a str> {
    t.metadata_props
        .iter()
        .find(|p| p.key() == key)
        .map(|p| p.value())
}

/// A scheme claim on a float tensor, proved by its values.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    /// The scheme (for ternary, with the claimed rule; twn when none is claimed).
    pub scheme: Scheme,
    pub bits: u32,
    /// The claimed variant (ternary: twn | msu | ec2t), as written.
    pub rule: Option<String>,
    /// Per-channel grids (linear, minmax): the output-channel axis.
    pub axis: Option<usize>,
}

impl Claim {
    /// How packed storage keeps the claimed values.
    pub fn storage(&self) -> Storage {
        self.scheme.imp().storage(self.bits)
    }
}

/// Whether `s` holds at most `allowed` distinct values (+0 and -0 one value,
/// other floats by their bits): an open-addressing set of at most `allowed` + 1
/// keys, left as soon as it holds more.
fn at_most_distinct(s: &[f32], allowed: u64) -> bool {
    if allowed >= s.len() as u64 {
        return true;
    }
    let cap = ((allowed as usize + 1) * 2).next_power_of_two().max(16);
    let shift = 64 - cap.trailing_zeros();
    // Keys are stored + 1 so that 0 marks an empty slot (u32::MAX, a NaN
    // pattern, wraps to 0: it gets its own flag).
    let (mut table, mut max_seen, mut count) = (vec![0u32; cap], false, 0u64);
    for v in s {
        let key = if *v == 0.0 { 0 } else { v.to_bits() };
        if key == u32::MAX {
            if !max_seen {
                max_seen = true;
                count += 1;
            }
        } else {
            let stored = key + 1;
            let mut at = ((u64::from(key).wrapping_mul(0x9E37_79B9_7F4A_7C15)) >> shift) as usize;
            loop {
                match table[at] {
                    0 => {
                        table[at] = stored;
                        count += 1;
                        break;
                    }
                    x if x == stored => break,
                    _ => at = (at + 1) & (cap - 1),
                }
            }
        }
        if count > allowed {
            return false;
        }
    }
    true
}

/// Reads and checks the scheme claim in a tensor's `metadata_props` against its
/// values (see the module doc for the contract). `Ok(None)`: no claim.
pub fn verify(t: &TensorProto, values: &ArrayD<f32>) -> Result<Option<Claim>> {
    let Some(name) = meta(t, META_SCHEME) else {
        return Ok(None);
    };
    let claim_err = |m: String| Error::tensor(t.name(), format!("claims {name} but {m}"));
    let Some(family) = Scheme::by_claim_name(name) else {
        return Err(claim_err(format!(
            "that is not a known scheme (expected {})",
            Scheme::help()
        )));
    };
    let imp = family.imp();
    let bits: u32 = match meta(t, META_BITS) {
        Some(b) => b
            .parse()
            .map_err(|_| claim_err(format!("{META_BITS} = '{b}' is not a number")))?,
        None => match imp.fixed_bits() {
            Some(b) => b,
            None => return Err(claim_err(format!("has no {META_BITS}"))),
        },
    };
    if !(1..=32).contains(&bits) {
        return Err(claim_err(format!("{bits} bits is out of range")));
    }
    let axis = match meta(t, META_AXIS) {
        None => None,
        Some(a) => {
            let a: usize = a
                .parse()
                .map_err(|_| claim_err(format!("{META_AXIS} = '{a}' is not an axis")))?;
            if a >= values.ndim() {
                return Err(claim_err(format!(
                    "{META_AXIS} = {a} is not an axis of a rank-{} tensor",
                    values.ndim()
                )));
            }
            Some(a)
        }
    };
    // The slices that share one grid: the channels along `axis`, or the whole tensor.
    let slices: Vec<Vec<f32>> = match axis {
        Some(a) => values
            .axis_iter(Axis(a))
            .map(|s| s.iter().copied().collect())
            .collect(),
        None => vec![values.iter().copied().collect()],
    };
    // Distinct values: the proof every scheme shares (per channel when per-channel).
    let allowed = imp.max_levels(bits);
    for s in &slices {
        if !at_most_distinct(s, allowed) {
            let distinct: BTreeSet<u32> = s
                .iter()
                .map(|v| if *v == 0.0 { 0 } else { v.to_bits() })
                .collect();
            return Err(claim_err(format!(
                "holds {} distinct values{} (a {bits}-bit code has at most {allowed})",
                distinct.len(),
                if axis.is_some() {
                    " in one channel"
                } else {
                    ""
                }
            )));
        }
    }
    imp.verify(&Proof {
        tensor: t,
        values,
        bits,
        axis,
        slices: &slices,
    })
    .map_err(claim_err)?;
    // A family with variants (ternary) names one in the claim.
    let has_rules = Scheme::ALL
        .iter()
        .any(|s| s.claim_name() == name && s.rule().is_some());
    let rule = has_rules
        .then(|| meta(t, META_RULE).map(str::to_string))
        .flatten();
    let scheme = Scheme::ALL
        .iter()
        .copied()
        .find(|s| s.claim_name() == name && s.rule() == rule.as_deref())
        .unwrap_or(family);
    Ok(Some(Claim {
        scheme,
        bits,
        rule,
        axis,
    }))
}

/// Replaces the claim keys of a tensor by `meta` (other metadata kept).
pub fn write(t: &mut TensorProto, meta: &[(&'static str, String)]) {
    t.metadata_props.retain(|p| !META_KEYS.contains(&p.key()));
    for (k, v) in meta {
        t.metadata_props.push(StringStringEntryProto {
            key: Some(k.to_string()),
            value: Some(v.clone()),
        });
    }
}

/// A tensor's claim keys and values, as written (for tests and reports).
pub fn claim_keys(t: &TensorProto) -> Vec<(String, String)> {
    t.metadata_props
        .iter()
        .filter(|p| p.key().starts_with("onnx_micronet."))
        .map(|p| (p.key().to_string(), p.value().to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_count_matches_a_set() {
        // By hand: {1, 2, 0, -0, 1} holds 3 distinct values (0 and -0 are one).
        let s = [1.0f32, 2.0, 0.0, -0.0, 1.0];
        assert!(at_most_distinct(&s, 3));
        assert!(!at_most_distinct(&s, 2));
        // The bit pattern u32::MAX (a NaN) counts once, like any other value.
        let nan = f32::from_bits(u32::MAX);
        let s = [nan, nan, 1.0, 3.0];
        assert!(at_most_distinct(&s, 3));
        assert!(!at_most_distinct(&s, 2));
        // Pseudo-random values on small grids, against a BTreeSet at every budget
        // around the true count.
        let mut x = 0x9e37_79b9u32;
        for levels in [1u32, 2, 3, 15, 16, 17, 255, 256, 300] {
            let s: Vec<f32> = (0..5000)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    (x % levels) as f32 * 0.125 - 3.0
                })
                .collect();
            let n = s
                .iter()
                .map(|v| if *v == 0.0 { 0 } else { v.to_bits() })
                .collect::<BTreeSet<u32>>()
                .len() as u64;
            for allowed in n.saturating_sub(2)..n + 3 {
                assert_eq!(
                    at_most_distinct(&s, allowed),
                    n <= allowed,
                    "{levels} {allowed}"
                );
            }
        }
    }
}
