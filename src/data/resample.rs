//! PIL's bilinear resampling (`Image.resize(size, Image.BILINEAR)`, as torchvision's
//! `Resize` calls it on PIL images), transcribed from Pillow's `Resample.c`: a
//! separable triangle filter whose support is scaled by the downscale factor
//! (so downscaling averages, i.e. antialiases), horizontal pass first, then
//! vertical, each skipped when that side keeps its size. 8-bit images use
//! Pillow's 22-bit fixed-point coefficients and round to bytes after each pass,
//! so the result is byte-identical to PIL's; float images use the same
//! coefficients in double precision without rounding (PIL's mode "F").

/// The filter taps for resizing one axis from `in_size` to `out_size` samples.
struct Coeffs {
    /// Per output sample: first input index and number of taps.
    bounds: Vec<(usize, usize)>,
    /// Taps of output sample `i` at `k[i * ksize..]`.
    k: Vec<f64>,
    ksize: usize,
}

/// The resampling filter (Pillow's `Image.BILINEAR`, `BICUBIC`, `NEAREST`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Interpolation {
    #[default]
    Bilinear,
    Bicubic,
    Nearest,
}

impl std::str::FromStr for Interpolation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "bilinear" => Ok(Interpolation::Bilinear),
            "bicubic" => Ok(Interpolation::Bicubic),
            "nearest" => Ok(Interpolation::Nearest),
            _ => Err(format!(
                "interpolation '{s}': expected bilinear, bicubic or nearest"
            )),
        }
    }
}

impl std::fmt::Display for Interpolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Interpolation::Bilinear => "bilinear",
            Interpolation::Bicubic => "bicubic",
            Interpolation::Nearest => "nearest",
        })
    }
}

/// Pillow's `bicubic_filter` (a = -0.5, support 2).
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

fn bilinear_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// Pillow's `precompute_coeffs` with the BILINEAR (support 1) or BICUBIC
/// (support 2) filter and the whole input as the box; NEAREST takes input pixel
/// floor((x + 0.5) scale), as Pillow's nearest scale transform does.
fn coeffs(in_size: usize, out_size: usize, how: Interpolation) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    if how == Interpolation::Nearest {
        // Pillow's ImagingScaleAffine: the position is accumulated, not multiplied
        // (xo = scale / 2, then += scale), so it truncates as Pillow does.
        let mut xo = scale * 0.5;
        let bounds = (0..out_size)
            .map(|_| {
                let i = (xo as usize).min(in_size - 1);
                xo += scale;
                (i, 1)
            })
            .collect();
        return Coeffs {
            bounds,
            k: vec![1.0; out_size],
            ksize: 1,
        };
    }
    let (filter, base): (fn(f64) -> f64, f64) = match how {
        Interpolation::Bicubic => (bicubic_filter, 2.0),
        _ => (bilinear_filter, 1.0),
    };
    let filterscale = scale.max(1.0);
    let support = base * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut k = vec![0f64; out_size * ksize];
    let ss = 1.0 / filterscale;
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C's (int) truncates toward zero, as `as i64` does.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let n = (xmax - xmin).max(0) as usize;
        let taps = &mut k[xx * ksize..xx * ksize + n.min(ksize)];
        let mut ww = 0.0;
        for (x, t) in taps.iter_mut().enumerate() {
            let w = filter((x as f64 + xmin as f64 - center + 0.5) * ss);
            *t = w;
            ww += w;
        }
        if ww != 0.0 {
            for t in taps.iter_mut() {
                *t /= ww;
            }
        }
        bounds.push((xmin as usize, n.min(ksize)));
    }
    Coeffs { bounds, k, ksize }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's `normalize_coeffs_8bpc`.
fn fixed(k: &[f64]) -> Vec<i32> {
    let one = (1u32 << PRECISION_BITS) as f64;
    k.iter()
        .map(|&w| {
            if w < 0.0 {
                (-0.5 + w * one) as i32
            } else {
                (0.5 + w * one) as i32
            }
        })
        .collect()
}

fn clip8(ss: i32) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes an interleaved `h x w x c` byte image to `nh x nw`.
pub(crate) fn resize_u8(
    src: &[u8],
    (h, w, c): (usize, usize, usize),
    (nh, nw): (usize, usize),
    how: Interpolation,
) -> Vec<u8> {
    let mut cur: Vec<u8>;
    let mut cur_ref: &[u8] = src;
    let mut cur_w = w;
    if nw != w {
        let co = coeffs(w, nw, how);
        let kk = fixed(&co.k);
        let mut out = vec![0u8; h * nw * c];
        for y in 0..h {
            let row = &src[y * w * c..(y + 1) * w * c];
            let orow = &mut out[y * nw * c..(y + 1) * nw * c];
            for (xx, &(xmin, n)) in co.bounds.iter().enumerate() {
                let taps = &kk[xx * co.ksize..xx * co.ksize + n];
                for ch in 0..c {
                    let mut ss: i32 = 1 << (PRECISION_BITS - 1);
                    for (i, &t) in taps.iter().enumerate() {
                        ss += row[(xmin + i) * c + ch] as i32 * t;
                    }
                    orow[xx * c + ch] = clip8(ss);
                }
            }
        }
        cur = out;
        cur_ref = &cur;
        cur_w = nw;
    }
    if nh != h {
        let co = coeffs(h, nh, how);
        let kk = fixed(&co.k);
        let rowlen = cur_w * c;
        let mut out = vec![0u8; nh * rowlen];
        for (yy, &(ymin, n)) in co.bounds.iter().enumerate() {
            let taps = &kk[yy * co.ksize..yy * co.ksize + n];
            let orow = &mut out[yy * rowlen..(yy + 1) * rowlen];
            for (j, o) in orow.iter_mut().enumerate() {
                let mut ss: i32 = 1 << (PRECISION_BITS - 1);
                for (i, &t) in taps.iter().enumerate() {
                    ss += cur_ref[(ymin + i) * rowlen + j] as i32 * t;
                }
                *o = clip8(ss);
            }
        }
        cur = out;
        return cur;
    }
    cur_ref.to_vec()
}

/// Resizes an interleaved `h x w x c` float image to `nh x nw` (no rounding).
pub(crate) fn resize_f32(
    src: &[f32],
    (h, w, c): (usize, usize, usize),
    (nh, nw): (usize, usize),
    how: Interpolation,
) -> Vec<f32> {
    let mut cur: Vec<f32>;
    let mut cur_ref: &[f32] = src;
    let mut cur_w = w;
    if nw != w {
        let co = coeffs(w, nw, how);
        let mut out = vec![0f32; h * nw * c];
        for y in 0..h {
            let row = &src[y * w * c..(y + 1) * w * c];
            let orow = &mut out[y * nw * c..(y + 1) * nw * c];
            for (xx, &(xmin, n)) in co.bounds.iter().enumerate() {
                let taps = &co.k[xx * co.ksize..xx * co.ksize + n];
                for ch in 0..c {
                    let mut ss = 0f64;
                    for (i, &t) in taps.iter().enumerate() {
                        ss += row[(xmin + i) * c + ch] as f64 * t;
                    }
                    orow[xx * c + ch] = ss as f32;
                }
            }
        }
        cur = out;
        cur_ref = &cur;
        cur_w = nw;
    }
    if nh != h {
        let co = coeffs(h, nh, how);
        let rowlen = cur_w * c;
        let mut out = vec![0f32; nh * rowlen];
        for (yy, &(ymin, n)) in co.bounds.iter().enumerate() {
            let taps = &co.k[yy * co.ksize..yy * co.ksize + n];
            let orow = &mut out[yy * rowlen..(yy + 1) * rowlen];
            for (j, o) in orow.iter_mut().enumerate() {
                let mut ss = 0f64;
                for (i, &t) in taps.iter().enumerate() {
                    ss += cur_ref[(ymin + i) * rowlen + j] as f64 * t;
                }
                *o = ss as f32;
            }
        }
        cur = out;
        return cur;
    }
    cur_ref.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_identity() {
        let src: Vec<u8> = (0..5 * 7 * 3).map(|i| (i * 37 % 256) as u8).collect();
        assert_eq!(
            resize_u8(&src, (5, 7, 3), (5, 7), Interpolation::Bilinear),
            src
        );
    }

    #[test]
    fn halving_averages_pairs() {
        // 1x4 -> 1x2: scale 2, so the triangle's support is 2 input pixels. Output 0 is
        // centred at 1.0; taps at input centres 0.5, 1.5, 2.5 are 0.5, 0.5, 1.5 away:
        // weights 1 - d/2 = 0.75, 0.75, 0.25 (sum 1.75, normalised).
        let out = resize_f32(
            &[0.0, 10.0, 20.0, 30.0],
            (1, 4, 1),
            (1, 2),
            Interpolation::Bilinear,
        );
        let want0 = (0.75 * 0.0 + 0.75 * 10.0 + 0.25 * 20.0) / 1.75;
        assert!((out[0] as f64 - want0).abs() < 1e-5, "{out:?}");
    }

    #[test]
    fn constant_stays_constant() {
        let src = vec![200u8; 13 * 9];
        assert!(
            resize_u8(&src, (13, 9, 1), (4, 31), Interpolation::Bilinear)
                .iter()
                .all(|&v| v == 200)
        );
    }
}
