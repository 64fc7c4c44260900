//! Gram matrices of layer inputs on calibration images: G = X^T X with X the
//! rows a layer's weights multiply (im2col patches of a Conv, one Gram per group;
//! the K-vectors of a Gemm/MatMul input). Captured with [`crate::engine::capture`],
//! image by image, rows buffered per worker and added in f64; X is never held
//! beyond a few hundred rows.

use ndarray::ArrayViewD;

use crate::engine;
use crate::error::{Error, Result};
use crate::onnx::Model;

/// Images per capture chunk (fixed, so sums do not depend on the thread count).
const CHUNK: usize = 8;
/// Rows buffered per Gram before they are multiplied in.
const FLUSH_ROWS: usize = 256;
/// Bytes of Gram matrices alive at once during a capture (all workers).
const BUDGET: usize = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoPad {
    NotSet,
    Valid,
    SameUpper,
    SameLower,
}

/// A 2-D convolution's input geometry (1-D convs have height 1).
#[derive(Debug, Clone, PartialEq)]
pub struct ConvGeom {
    pub input: String,
    pub cin_per_group: usize,
    pub groups: usize,
    pub kernel: [usize; 2],
    pub strides: [usize; 2],
    pub dilations: [usize; 2],
    /// top, left, bottom, right
    pub pads: [usize; 4],
    pub auto_pad: AutoPad,
}

/// What a layer's input rows are.
#[derive(Debug, Clone, PartialEq)]
pub enum Geom {
    Conv(ConvGeom),
    /// Gemm (A or A^T when trans_a) / MatMul input: rows of length k.
    Dense {
        input: String,
        k: usize,
        trans_a: bool,
    },
}

impl Geom {
    pub fn groups(&self) -> usize {
        match self {
            Geom::Conv(c) => c.groups,
            Geom::Dense { .. } => 1,
        }
    }

    /// Gram dimension: Cin/g kh kw, or K.
    pub fn dim(&self) -> usize {
        match self {
            Geom::Conv(c) => c.cin_per_group * c.kernel[0] * c.kernel[1],
            Geom::Dense { k, .. } => *k,
        }
    }

    pub fn input(&self) -> &str {
        match self {
            Geom::Conv(c) => &c.input,
            Geom::Dense { input, .. } => input,
        }
    }

    /// The same geometry on another input value.
    pub fn set_input(&mut self, value: &str) {
        match self {
            Geom::Conv(c) => c.input = value.to_string(),
            Geom::Dense { input, .. } => *input = value.to_string(),
        }
    }
}

/// Output size and begin padding along one axis.
fn axis(
    input: usize,
    k: usize,
    s: usize,
    d: usize,
    begin: usize,
    end: usize,
    auto: AutoPad,
) -> (usize, usize) {
    let span = (k - 1) * d + 1;
    let (b, e) = match auto {
        AutoPad::NotSet => (begin, end),
        AutoPad::Valid => (0, 0),
        AutoPad::SameUpper | AutoPad::SameLower => {
            let out = input.div_ceil(s);
            let total = ((out.max(1) - 1) * s + span).saturating_sub(input);
            if auto == AutoPad::SameUpper {
                (total / 2, total - total / 2)
            } else {
                (total - total / 2, total / 2)
            }
        }
    };
    let padded = input + b + e;
    let out = if padded < span {
        0
    } else {
        (padded - span) / s + 1
    };
    (out, b)
}

/// A conv input [1, C, H, W] (or [1, C, L]) as [C, H, W], with the output size and
/// the leading padding of both spatial axes.
struct Patches<'a> {
    x: ndarray::ArrayView3<'a, f32>,
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
    pt: usize,
    pl: usize,
}

fn patches<'a>(c: &ConvGeom, x: &'a ArrayViewD<f32>) -> std::result::Result<Patches<'a>, String> {
    let shape = x.shape();
    let (ch, h, w) = match shape.len() {
        3 => (shape[1], 1, shape[2]),
        4 => (shape[1], shape[2], shape[3]),
        _ => return Err(format!("conv input '{}' has shape {shape:?}", c.input)),
    };
    if ch != c.cin_per_group * c.groups || shape[0] != 1 {
        return Err(format!(
            "conv input '{}' has shape {shape:?}, expected {} channels",
            c.input,
            c.cin_per_group * c.groups
        ));
    }
    let x = x
        .view()
        .into_shape_with_order((ch, h, w))
        .map_err(|e| format!("conv input '{}': {e}", c.input))?;
    let (ho, pt) = axis(
        h,
        c.kernel[0],
        c.strides[0],
        c.dilations[0],
        c.pads[0],
        c.pads[2],
        c.auto_pad,
    );
    let (wo, pl) = axis(
        w,
        c.kernel[1],
        c.strides[1],
        c.dilations[1],
        c.pads[1],
        c.pads[3],
        c.auto_pad,
    );
    Ok(Patches {
        x,
        h,
        w,
        ho,
        wo,
        pt,
        pl,
    })
}

/// Appends the im2col rows of group `g` of a conv input [1, C, H, W] to `buf`.
fn conv_rows(
    c: &ConvGeom,
    x: &ArrayViewD<f32>,
    g: usize,
    buf: &mut Vec<f32>,
) -> std::result::Result<usize, String> {
    let Patches {
        x,
        h,
        w,
        ho,
        wo,
        pt,
        pl,
    } = patches(c, x)?;
    let [kh, kw] = c.kernel;
    let [sh, sw] = c.strides;
    let [dh, dw] = c.dilations;
    let c0 = g * c.cin_per_group;
    // Contiguous [C, H, W] (a standard-layout view borrows, otherwise one copy).
    let x = x.as_standard_layout();
    let xs = x.as_slice().expect("standard layout");
    let dim = c.cin_per_group * kh * kw;
    let start = buf.len();
    // Padding taps stay 0.
    buf.resize(start + ho * wo * dim, 0.0);
    let out = &mut buf[start..];
    if kh == 1 && kw == 1 && sh == 1 && sw == 1 && pt == 0 && pl == 0 && ho == h && wo == w {
        // Pointwise: the rows are the transpose of the group's [C, H*W] planes,
        // copied in tiles so that both sides stay in cache.
        const T: usize = 32;
        let hw = h * w;
        for c_lo in (0..dim).step_by(T) {
            for p_lo in (0..hw).step_by(T) {
                for ci in c_lo..(c_lo + T).min(dim) {
                    let plane = &xs[(c0 + ci) * hw..(c0 + ci + 1) * hw];
                    for p in p_lo..(p_lo + T).min(hw) {
                        out[p * dim + ci] = plane[p];
                    }
                }
            }
        }
        return Ok(hw);
    }
    // The taps of each kernel column that land inside the image, per output column.
    let ix_of = |ox: usize, kx: usize| (ox * sw + kx * dw) as isize - pl as isize;
    for oy in 0..ho {
        for ox in 0..wo {
            let row = &mut out[(oy * wo + ox) * dim..(oy * wo + ox + 1) * dim];
            let mut at = 0;
            for ci in c0..c0 + c.cin_per_group {
                let plane = &xs[ci * h * w..(ci + 1) * h * w];
                for ky in 0..kh {
                    let iy = (oy * sh + ky * dh) as isize - pt as isize;
                    if iy < 0 || iy as usize >= h {
                        at += kw;
                        continue;
                    }
                    let line = &plane[iy as usize * w..(iy as usize + 1) * w];
                    for kx in 0..kw {
                        let ix = ix_of(ox, kx);
                        if ix >= 0 && (ix as usize) < w {
                            row[at] = line[ix as usize];
                        }
                        at += 1;
                    }
                }
            }
        }
    }
    Ok(ho * wo)
}

/// Input rows of at most this many entries (cin/g kh kw) get their Gram straight
/// from the input planes ([`conv_gram_small`]); wider ones from im2col rows and a
/// matrix product ([`flush`]).
const SMALL_DIM: usize = 32;

/// G += X^T X and sum += the rows of group `g` of a conv whose rows are short
/// (cin/g kh kw <= [`SMALL_DIM`]: depthwise convs, 9; the paired [x~, x] inputs
/// of asymmetric calibration, 18; a stem conv on RGB, 27), straight from the
/// group's input planes, without forming the im2col rows: entry (a, b) of G,
/// for taps a = (ci, ky, kx) and b (the im2col order), is the sum over output
/// positions of the products of the two taps' inputs. Each plane is copied
/// once, zero-padded and split into `stride` column phases, so that tap
/// (ci, ky, kx) at output row oy is the contiguous run
/// phase[ci][(kx d) mod s][oy s_h + ky d_h][(kx d) div s ..][.. wo]; the runs of
/// each tap are copied into one column, and G's entries are dot products of
/// columns in f32 (one image's positions, as [`flush`] sums a flush), added to
/// G in f64. A layer that will keep its rows (`images` x positions <= dim:
/// [`Stats::Rows`]) gets them in `buf` from [`conv_rows`] instead. Returns the
/// row count (output positions), as [`conv_rows`] does.
#[allow(clippy::too_many_arguments)]
fn conv_gram_small(
    c: &ConvGeom,
    x: &ArrayViewD<f32>,
    g: usize,
    images: usize,
    buf: &mut Vec<f32>,
    gram: &mut Vec<f64>,
    sum: &mut Vec<f64>,
) -> std::result::Result<usize, String> {
    let Patches {
        x: planes,
        h,
        w,
        ho,
        wo,
        pt,
        pl,
    } = patches(c, x)?;
    let [kh, kw] = c.kernel;
    let [sh, sw] = c.strides;
    let [dh, dw] = c.dilations;
    let cpg = c.cin_per_group;
    let dim = cpg * kh * kw;
    if ho * wo * images <= dim {
        return conv_rows(c, x, g, buf);
    }
    if gram.is_empty() {
        *gram = vec![0.0; dim * dim];
    }
    if sum.is_empty() {
        *sum = vec![0.0; dim];
    }
    // Here ho wo >= 1: the rows outnumber dim >= 1 (an empty output keeps its
    // zero rows above).
    // Padded rows needed, and each phase's width.
    let hp = (ho - 1) * sh + (kh - 1) * dh + 1;
    let wq = wo + (kw - 1) * dw / sw;
    let mut phases = vec![0f32; cpg * sw * hp * wq];
    for ci in 0..cpg {
        let plane = planes.index_axis(ndarray::Axis(0), g * cpg + ci);
        for r in 0..sw {
            for y in 0..hp {
                let Some(iy) = y.checked_sub(pt).filter(|&iy| iy < h) else {
                    continue;
                };
                let src = plane.row(iy);
                let at = ((ci * sw + r) * hp + y) * wq;
                let dst = &mut phases[at..at + wq];
                // Phase columns j whose input column j s + r - pl is inside [0, w).
                let lo = pl.saturating_sub(r).div_ceil(sw);
                let hi = if w + pl > r {
                    ((w + pl - r - 1) / sw + 1).min(wq)
                } else {
                    0
                };
                for (j, v) in dst.iter_mut().enumerate().take(hi).skip(lo) {
                    *v = src[j * sw + r - pl];
                }
            }
        }
    }
    // Per tap: its phase, row offset and column offset within the phase.
    let taps: Vec<(usize, usize, usize)> = (0..dim)
        .map(|a| {
            let (ci, k) = (a / (kh * kw), a % (kh * kw));
            let (ky, kx) = (k / kw, k % kw);
            (ci * sw + (kx * dw) % sw, ky * dh, (kx * dw) / sw)
        })
        .collect();
    // Each tap's inputs over all output positions, contiguous (the columns of the
    // im2col matrix), then the upper triangle of X^T X as dot products of columns.
    let rows = ho * wo;
    let mut cols = vec![0f32; dim * rows];
    for (a, &(r, dy, dx)) in taps.iter().enumerate() {
        let col = &mut cols[a * rows..(a + 1) * rows];
        for (oy, run) in col.chunks_exact_mut(wo).enumerate() {
            let at = (r * hp + oy * sh + dy) * wq + dx;
            run.copy_from_slice(&phases[at..at + wo]);
        }
    }
    for (s, col) in sum.iter_mut().zip(cols.chunks_exact(rows)) {
        *s += lane_sum(col);
    }
    add_column_gram(&cols, rows, dim, gram);
    Ok(ho * wo)
}

/// Adds the sum of the im2col rows of group `g` of a conv input [1, C, H, W] to
/// `sum` (dim long) without forming them: entry (ci, ky, kx) is the sum of x[ci]
/// over the output positions' taps that fall inside the image (padding adds 0).
/// Returns the row count, as [`conv_rows`] does.
fn conv_row_sum(
    c: &ConvGeom,
    x: &ArrayViewD<f32>,
    g: usize,
    sum: &mut Vec<f64>,
) -> std::result::Result<usize, String> {
    let Patches {
        x,
        h,
        w,
        ho,
        wo,
        pt,
        pl,
    } = patches(c, x)?;
    let [kh, kw] = c.kernel;
    let [sh, sw] = c.strides;
    let [dh, dw] = c.dilations;
    let dim = c.cin_per_group * kh * kw;
    if sum.is_empty() {
        *sum = vec![0.0; dim];
    }
    // The output positions o in [0, n) whose tap o s + k d - p lands in [0, len).
    let valid = |n: usize, s: usize, k: usize, p: usize, len: usize| -> (usize, usize) {
        let off = k as isize - p as isize;
        let lo = if off >= 0 {
            0
        } else {
            ((-off) as usize).div_ceil(s)
        };
        let hi = if (len as isize) <= off {
            0
        } else {
            (((len as isize - 1 - off) as usize) / s + 1).min(n)
        };
        (lo, hi.max(lo))
    };
    // For each kernel row ky: the column sums (f64) of the input rows its taps
    // visit, one vectorizable pass over those rows; then each tap kx sums the
    // columns it visits.
    let c0 = g * c.cin_per_group;
    let mut col = vec![0f64; w];
    for (k, ci) in (c0..c0 + c.cin_per_group).enumerate() {
        let plane = x.index_axis(ndarray::Axis(0), ci);
        for ky in 0..kh {
            let (y0, y1) = valid(ho, sh, ky * dh, pt, h);
            if y0 == y1 {
                continue;
            }
            col.fill(0.0);
            for oy in y0..y1 {
                let row = plane.row(oy * sh + ky * dh - pt);
                match row.as_slice() {
                    Some(r) => col.iter_mut().zip(r).for_each(|(a, &v)| *a += v as f64),
                    None => col.iter_mut().zip(row).for_each(|(a, &v)| *a += v as f64),
                }
            }
            for kx in 0..kw {
                let (x0, x1) = valid(wo, sw, kx * dw, pl, w);
                let acc: f64 = (x0..x1).map(|ox| col[ox * sw + kx * dw - pl]).sum();
                sum[(k * kh + ky) * kw + kx] += acc;
            }
        }
    }
    Ok(ho * wo)
}

/// Appends the K-rows of a dense input to `buf`.
fn dense_rows(
    input: &str,
    k: usize,
    trans_a: bool,
    x: &ArrayViewD<f32>,
    buf: &mut Vec<f32>,
) -> std::result::Result<usize, String> {
    let shape = x.shape();
    if trans_a {
        if shape.len() != 2 || shape[0] != k {
            return Err(format!(
                "input '{input}' has shape {shape:?}, expected [{k}, M]"
            ));
        }
        let m = shape[1];
        for r in 0..m {
            for j in 0..k {
                buf.push(x[[j, r]]);
            }
        }
        return Ok(m);
    }
    if shape.last() != Some(&k) {
        return Err(format!(
            "input '{input}' has shape {shape:?}, expected last dimension {k}"
        ));
    }
    buf.extend(x.iter().copied());
    Ok(x.len() / k.max(1))
}

/// G += X^T X and sum += the rows, for the rows in `buf` (row-major, `dim` wide).
fn flush(buf: &mut Vec<f32>, dim: usize, gram: &mut Vec<f64>, sum: &mut Vec<f64>) {
    if buf.is_empty() {
        return;
    }
    if gram.is_empty() {
        *gram = vec![0.0; dim * dim];
    }
    add_rows(buf, dim, sum);
    let rows = buf.len() / dim;
    if dim <= 16 {
        // Few inputs (depthwise groups: 9): the columns of X copied out contiguous,
        // then the upper triangle of X^T X as dot products of columns, in f32 within
        // one flush as below (vectorized), summed across flushes in f64.
        let mut cols = vec![0f32; rows * dim];
        for (r, row) in buf.chunks_exact(dim).enumerate() {
            for (a, &v) in row.iter().enumerate() {
                cols[a * rows + r] = v;
            }
        }
        add_column_gram(&cols, rows, dim, gram);
    } else {
        // The product of one flush (a few hundred to a thousand rows) in f32, twice as
        // fast as f64, and only its lower triangle (faer's triangular product: half
        // the multiplies; X^T X is symmetric); the sums across flushes and images
        // in f64, both halves from the lower one.
        let x = faer::MatRef::from_row_major_slice(buf.as_slice(), rows, dim);
        let mut part = faer::Mat::<f32>::zeros(dim, dim);
        faer::linalg::matmul::triangular::matmul(
            &mut part,
            faer::linalg::matmul::triangular::BlockStructure::TriangularLower,
            faer::Accum::Replace,
            x.transpose(),
            faer::linalg::matmul::triangular::BlockStructure::Rectangular,
            x,
            faer::linalg::matmul::triangular::BlockStructure::Rectangular,
            1.0f32,
            faer::Par::Seq,
        );
        for a in 0..dim {
            for b in 0..=a {
                let v = part[(a, b)] as f64;
                gram[a * dim + b] += v;
                if a != b {
                    gram[b * dim + a] += v;
                }
            }
        }
    }
    buf.clear();
}

/// G += X^T X for X given by its columns (`cols`: `dim` columns of `rows`
/// values each, contiguous): the upper triangle as dot products of columns in
/// f32 (vectorized), added to both halves of G in f64.
fn add_column_gram(cols: &[f32], rows: usize, dim: usize, gram: &mut [f64]) {
    for a in 0..dim {
        let ca = &cols[a * rows..(a + 1) * rows];
        for b in a..dim {
            let v = dot(ca, &cols[b * rows..(b + 1) * rows]) as f64;
            gram[a * dim + b] += v;
            if a != b {
                gram[b * dim + a] += v;
            }
        }
    }
}

/// The dot product of two equally long slices, in 8 f32 lanes.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The sum of a slice in 8 f64 lanes (each value widened, as [`add_rows`] sums
/// them; the lanes vectorize where one running f64 sum cannot).
fn lane_sum(a: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let ca = a.chunks_exact(8);
    let tail: f64 = ca.remainder().iter().map(|&v| v as f64).sum();
    for x in ca {
        for k in 0..8 {
            acc[k] += x[k] as f64;
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// sum += each row of `buf`.
fn add_rows(buf: &[f32], dim: usize, sum: &mut Vec<f64>) {
    if sum.is_empty() {
        *sum = vec![0.0; dim];
    }
    for r in buf.chunks_exact(dim) {
        for (s, &v) in sum.iter_mut().zip(r) {
            *s += v as f64;
        }
    }
}

/// One layer's calibration: per group, its quadratic form and the mean of its
/// input rows (E[x], for bias correction), and the row count.
pub struct Captured {
    /// The index the caller gave the layer.
    pub layer: usize,
    pub stats: Vec<Stats>,
    /// Per group, the mean input row (unscaled), `dim` long.
    pub means: Vec<Vec<f64>>,
    /// Rows seen per group.
    pub rows: usize,
    /// What G (and X) were divided by: `stats` hold G / scale (X / sqrt(scale));
    /// 1 when G was zero.
    pub scale: f64,
    /// With [`Capture::GramsAndHalves`]: the Grams of two disjoint halves of the images
    /// (chunks of [`CHUNK`] images taken alternately: even chunks, odd chunks),
    /// per group, scaled as `stats`, summing to them (a layer that keeps its
    /// rows: its rows of each half, as [`Stats::Rows`]). Empty otherwise, and
    /// for a layer that saw fewer than two chunks.
    pub folds: Vec<Vec<Stats>>,
}

/// What a layer's calibration leaves for the solves, per group, scaled so the
/// mean diagonal of G over the layer is 1.
#[derive(Clone)]
pub enum Stats {
    /// G = X^T X, d x d row-major.
    Gram(Vec<f64>),
    /// X itself, kept when the layer sees no more rows than its dimension (so X
    /// is smaller than G): column-major, x[i n + s] = row s, input i.
    Rows { x: Vec<f64>, n: usize },
}

/// Row-major rows of `dim` values as [`Stats::Rows`] (column-major, f64).
fn column_major(r: &[f32], dim: usize) -> Stats {
    let count = r.len() / dim;
    let mut x = vec![0.0f64; dim * count];
    for (s, row) in r.chunks_exact(dim).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            x[i * count + s] = v as f64;
        }
    }
    Stats::Rows { x, n: count }
}

/// One chunk's partial sums.
struct Acc {
    /// [layer][group] d x d, empty until first used.
    grams: Vec<Vec<Vec<f64>>>,
    /// [layer][group] sum of the rows flushed into `grams`.
    sums: Vec<Vec<Vec<f64>>>,
    /// [layer] rows seen per group.
    rows: Vec<usize>,
    /// [layer][group] buffered rows (all of them for a layer that keeps its rows).
    bufs: Vec<Vec<Vec<f32>>>,
    error: Option<String>,
}

/// What [`collect`] keeps of each layer's input rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capture {
    /// G = X^T X (or X itself, see [`Stats::Rows`]) and the mean input row.
    Grams,
    /// As `Grams`, with the Grams (or rows) of the two halves of the images kept
    /// apart as well ([`Captured::folds`]: cross-validation of a solve's
    /// settings). The Gram memory of a batch is twice `Grams`'.
    GramsAndHalves,
    /// The mean input rows alone (`stats` is empty).
    MeansOnly,
}

/// Captures the Gram matrices (or rows) of the `wanted` layers (index, one
/// geometry per consuming node; all with the same groups and dim), or what
/// `what` asks of them. Returns, per layer, one [`Stats`] per group, and the
/// layers left out because their Grams alone exceed the memory budget.
#[allow(clippy::type_complexity)]
pub fn collect(
    model: &Model,
    input_shape: &[usize],
    images: ndarray::ArrayView4<f32>,
    threads: usize,
    wanted: &[(usize, Vec<Geom>)],
    what: Capture,
) -> Result<(Vec<Captured>, Vec<(usize, String)>)> {
    let means_only = what == Capture::MeansOnly;
    let folds = what == Capture::GramsAndHalves;
    let bytes = |gs: &[Geom]| {
        if means_only {
            gs[0].groups() * gs[0].dim() * 8
        } else {
            // Two fold accumulators instead of one.
            (1 + folds as usize) * gs[0].groups() * gs[0].dim() * gs[0].dim() * 8
        }
    };
    let mut too_big = Vec::new();
    let mut batches: Vec<Vec<&(usize, Vec<Geom>)>> = Vec::new();
    let mut used = 0usize;
    for w in wanted {
        let b = bytes(&w.1);
        // A batch needs its Grams at least three times (accumulator, one chunk, one pending).
        if 3 * b > BUDGET {
            too_big.push((
                w.0,
                format!(
                    "its Gram matrix ({} MB for dimension {}) is over the memory budget",
                    b >> 20,
                    w.1[0].dim()
                ),
            ));
            continue;
        }
        if batches.is_empty() || 3 * (used + b) > BUDGET {
            batches.push(Vec::new());
            used = 0;
        }
        used += b;
        batches.last_mut().expect("pushed").push(w);
    }

    let n = images.shape()[0];
    let mut out = Vec::new();
    for batch in batches {
        let total: usize = batch.iter().map(|w| bytes(&w.1)).sum();
        let threads = threads.min(((BUDGET / total.max(1)).saturating_sub(1) / 2).max(1));
        let mut values: Vec<String> = Vec::new();
        // (layer in batch, geometry, value slot)
        let mut feeders: Vec<(usize, &Geom, usize)> = Vec::new();
        for (li, w) in batch.iter().enumerate() {
            for g in &w.1 {
                let slot = match values.iter().position(|v| v == g.input()) {
                    Some(s) => s,
                    None => {
                        values.push(g.input().to_string());
                        values.len() - 1
                    }
                };
                feeders.push((li, g, slot));
            }
        }
        let dims: Vec<(usize, usize)> = batch
            .iter()
            .map(|w| (w.1[0].groups(), w.1[0].dim()))
            .collect();
        let init = || Acc {
            grams: dims.iter().map(|&(g, _)| vec![Vec::new(); g]).collect(),
            sums: dims.iter().map(|&(g, _)| vec![Vec::new(); g]).collect(),
            rows: vec![0; dims.len()],
            bufs: dims.iter().map(|&(g, _)| vec![Vec::new(); g]).collect(),
            error: None,
        };
        let fold = |acc: &mut Acc, i: usize, acts: &[ArrayViewD<f32>]| {
            if acc.error.is_some() {
                return;
            }
            let last = (i + 1).is_multiple_of(CHUNK) || i + 1 == n;
            // Rows this image gave each layer: all images give the same, so the layer's
            // total is known after the first and decides between G and X.
            let mut per_image = vec![0usize; dims.len()];
            for &(li, geom, slot) in &feeders {
                let (groups, _) = dims[li];
                for g in 0..groups {
                    let buf = &mut acc.bufs[li][g];
                    let r = match geom {
                        Geom::Conv(c) if means_only => {
                            conv_row_sum(c, &acts[slot], g, &mut acc.sums[li][g])
                        }
                        // Short rows (depthwise, paired depthwise, a stem): the
                        // Gram straight from the planes.
                        Geom::Conv(c)
                            if c.cin_per_group * c.kernel[0] * c.kernel[1] <= SMALL_DIM =>
                        {
                            conv_gram_small(
                                c,
                                &acts[slot],
                                g,
                                n,
                                buf,
                                &mut acc.grams[li][g],
                                &mut acc.sums[li][g],
                            )
                        }
                        Geom::Conv(c) => conv_rows(c, &acts[slot], g, buf),
                        Geom::Dense { input, k, trans_a } => {
                            dense_rows(input, *k, *trans_a, &acts[slot], buf)
                        }
                    };
                    match r {
                        Ok(r) if g == 0 => per_image[li] += r,
                        Ok(_) => {}
                        Err(e) => {
                            acc.error = Some(e);
                            return;
                        }
                    }
                }
            }
            for (r, p) in acc.rows.iter_mut().zip(&per_image) {
                *r += p;
            }
            for (li, &(_, dim)) in dims.iter().enumerate() {
                if per_image[li] * n <= dim {
                    continue; // keeps its rows
                }
                let sums = acc.sums[li].iter_mut();
                for ((buf, gram), sum) in acc.bufs[li]
                    .iter_mut()
                    .zip(acc.grams[li].iter_mut())
                    .zip(sums)
                {
                    if last || buf.len() >= FLUSH_ROWS * dim {
                        if means_only {
                            add_rows(buf, dim, sum);
                            buf.clear();
                        } else {
                            flush(buf, dim, gram, sum);
                        }
                    }
                }
            }
        };
        // [fold][layer][group]: one fold unless `folds` (chunk k goes to fold k % 2).
        let mut grams: Vec<Vec<Vec<Vec<f64>>>> = (0..1 + folds as usize)
            .map(|_| dims.iter().map(|&(g, _)| vec![Vec::new(); g]).collect())
            .collect();
        let mut chunk = 0usize;
        let mut sums: Vec<Vec<Vec<f64>>> = dims.iter().map(|&(g, _)| vec![Vec::new(); g]).collect();
        let mut row_counts = vec![0usize; dims.len()];
        let mut rows: Vec<Vec<Vec<f32>>> = dims.iter().map(|&(g, _)| vec![Vec::new(); g]).collect();
        // [layer]: (fold, rows per group) of each chunk, in order: the halves of
        // a layer that keeps its rows.
        let mut segments: Vec<Vec<(usize, usize)>> = vec![Vec::new(); dims.len()];
        let mut error: Option<String> = None;
        let merge = |acc: Acc| {
            if let Some(e) = acc.error {
                error.get_or_insert(e);
                return;
            }
            let fold = chunk % grams.len();
            chunk += 1;
            for ((c, r), s) in row_counts.iter_mut().zip(&acc.rows).zip(&mut segments) {
                *c += r;
                s.push((fold, *r));
            }
            for (target, part) in [(&mut grams[fold], acc.grams), (&mut sums, acc.sums)] {
                for (s, a) in target.iter_mut().zip(part) {
                    for (sg, ag) in s.iter_mut().zip(a) {
                        if sg.is_empty() {
                            *sg = ag;
                        } else {
                            for (x, y) in sg.iter_mut().zip(ag) {
                                *x += y;
                            }
                        }
                    }
                }
            }
            for (s, a) in rows.iter_mut().zip(acc.bufs) {
                for (sr, ar) in s.iter_mut().zip(a) {
                    sr.extend_from_slice(&ar);
                }
            }
        };
        engine::capture(
            model,
            input_shape,
            &values,
            images,
            threads,
            CHUNK,
            init,
            fold,
            merge,
        )?;
        if let Some(e) = error {
            return Err(Error::Usage(format!(
                "capturing calibration activations: {e}"
            )));
        }
        // The full Grams (the folds' sums, fold 0 then fold 1 added in that
        // order) and, with `folds`, the folds themselves.
        let mut fold_grams = grams.split_off(1);
        let mut grams = grams.pop().expect("one fold");
        let mut halves: Vec<Option<[Vec<Vec<f64>>; 2]>> = vec![None; grams.len()];
        if let Some(odd) = fold_grams.pop() {
            for ((li, even), odd) in grams.iter_mut().enumerate().zip(odd) {
                let complete = even
                    .iter()
                    .zip(&odd)
                    .all(|(a, b)| !a.is_empty() && !b.is_empty());
                let kept = complete.then(|| even.clone());
                for (a, b) in even.iter_mut().zip(&odd) {
                    if a.is_empty() {
                        a.clone_from(b);
                    } else if !b.is_empty() {
                        a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                    }
                }
                halves[li] = kept.map(|kept| [kept, odd]);
            }
        }
        for ((((((w, layer_grams), layer_rows), layer_sums), &layer_count), half), segments) in
            batch
                .iter()
                .zip(grams)
                .zip(rows)
                .zip(sums)
                .zip(&row_counts)
                .zip(halves)
                .zip(&segments)
        {
            let (groups, dim) = (w.1[0].groups(), w.1[0].dim());
            let mut stats: Vec<Stats> = Vec::with_capacity(groups);
            let mut means: Vec<Vec<f64>> = Vec::with_capacity(groups);
            // Gram folds only when every row went into their Grams (none kept,
            // none left over).
            let half = half.filter(|_| layer_rows.iter().all(Vec::is_empty));
            // A layer that keeps all its rows has them split by the chunks' folds.
            let kept_rows = folds
                && layer_grams.iter().all(Vec::is_empty)
                && layer_rows.iter().all(|r| !r.is_empty())
                && [0, 1]
                    .iter()
                    .all(|k| segments.iter().any(|&(f, r)| f == *k && r > 0));
            let mut row_folds: Vec<Vec<Stats>> = if kept_rows {
                vec![Vec::with_capacity(groups), Vec::with_capacity(groups)]
            } else {
                Vec::new()
            };
            for ((mut g, mut r), mut sum) in layer_grams.into_iter().zip(layer_rows).zip(layer_sums)
            {
                // Rows never flushed (kept as rows, or left over) join the sums.
                add_rows(&r, dim, &mut sum);
                if means_only {
                    means.push(sum);
                    continue;
                }
                if g.is_empty() && !r.is_empty() {
                    if kept_rows {
                        let mut parts = [Vec::new(), Vec::new()];
                        let mut at = 0;
                        for &(f, count) in segments {
                            parts[f].extend_from_slice(&r[at..at + count * dim]);
                            at += count * dim;
                        }
                        for (fold, part) in row_folds.iter_mut().zip(&parts) {
                            fold.push(column_major(part, dim));
                        }
                    }
                    stats.push(column_major(&r, dim));
                } else {
                    // Rows left over (none in practice) join the Gram.
                    if g.is_empty() {
                        g = vec![0.0; dim * dim];
                    }
                    let mut unused = Vec::new();
                    flush(&mut r, dim, &mut g, &mut unused);
                    stats.push(Stats::Gram(g));
                }
                means.push(sum);
            }
            let trace: f64 = stats
                .iter()
                .filter(|_| !means_only)
                .map(|s| match s {
                    Stats::Gram(g) => (0..dim).map(|i| g[i * dim + i]).sum::<f64>(),
                    Stats::Rows { x, .. } => x.iter().map(|v| v * v).sum(),
                })
                .sum();
            let mut scale = trace / (groups * dim) as f64;
            if !(scale > 0.0 && scale.is_finite()) {
                scale = 1.0;
            } else {
                let root = scale.sqrt();
                for s in &mut stats {
                    match s {
                        Stats::Gram(g) => g.iter_mut().for_each(|v| *v /= scale),
                        Stats::Rows { x, .. } => x.iter_mut().for_each(|v| *v /= root),
                    }
                }
            }
            let total = layer_count.max(1) as f64;
            for m in &mut means {
                m.iter_mut().for_each(|v| *v /= total);
            }
            let folds = match half {
                Some(parts) => parts
                    .into_iter()
                    .map(|fold| {
                        fold.into_iter()
                            .map(|mut g| {
                                g.iter_mut().for_each(|v| *v /= scale);
                                Stats::Gram(g)
                            })
                            .collect()
                    })
                    .collect(),
                None => {
                    let root = scale.sqrt();
                    for s in row_folds.iter_mut().flatten() {
                        if let Stats::Rows { x, .. } = s {
                            x.iter_mut().for_each(|v| *v /= root);
                        }
                    }
                    row_folds
                }
            };
            out.push(Captured {
                layer: w.0,
                stats,
                means,
                rows: layer_count,
                scale,
                folds,
            });
        }
    }
    Ok((out, too_big))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geom(
        k: [usize; 2],
        s: [usize; 2],
        d: [usize; 2],
        pads: [usize; 4],
        auto: AutoPad,
    ) -> ConvGeom {
        ConvGeom {
            input: "x".into(),
            cin_per_group: 1,
            groups: 3,
            kernel: k,
            strides: s,
            dilations: d,
            pads,
            auto_pad: auto,
        }
    }

    #[test]
    fn small_gram_by_hand() {
        // One channel [[1, 2], [3, 4]], kernel 1 x 2, no padding: the rows are
        // (1, 2) and (3, 4), so G = [[1 + 9, 2 + 12], [2 + 12, 4 + 16]] =
        // [[10, 14], [14, 20]] and the row sum is (4, 6).
        let mut c = geom([1, 2], [1, 1], [1, 1], [0; 4], AutoPad::NotSet);
        c.groups = 1;
        let x = ndarray::Array4::from_shape_vec((1, 1, 2, 2), vec![1.0f32, 2.0, 3.0, 4.0])
            .unwrap()
            .into_dyn();
        let (mut g, mut s, mut buf) = (Vec::new(), Vec::new(), Vec::new());
        let rows = conv_gram_small(&c, &x.view(), 0, 10, &mut buf, &mut g, &mut s).unwrap();
        assert_eq!(rows, 2);
        assert!(buf.is_empty());
        assert_eq!(g, vec![10.0, 14.0, 14.0, 20.0]);
        assert_eq!(s, vec![4.0, 6.0]);
        // The row sum alone (bias correction's means), without the rows.
        let mut m = Vec::new();
        assert_eq!(conv_row_sum(&c, &x.view(), 0, &mut m), Ok(2));
        assert_eq!(m, vec![4.0, 6.0]);
        // One image whose 2 rows do not outnumber the 2 inputs keeps its rows.
        let rows = conv_gram_small(&c, &x.view(), 0, 1, &mut buf, &mut g, &mut s).unwrap();
        assert_eq!((rows, buf), (2, vec![1.0, 2.0, 3.0, 4.0]));
    }

    #[test]
    fn small_gram_equals_the_im2col_gram() {
        // The direct Gram and the row sum alone against im2col rows + flush, on
        // strided, dilated and padded geometries (explicit, uneven and SAME
        // pads), 2-D and 1-D inputs, one input channel per group (depthwise),
        // two per group and three in one group (a stem on RGB).
        let mut seed = 11u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 11) as f64 / (1u64 << 53) as f64) as f32 * 2.0 - 1.0
        };
        let x4 = ndarray::Array4::from_shape_fn((1, 3, 9, 11), |_| rnd()).into_dyn();
        let x3 = ndarray::Array3::from_shape_fn((1, 3, 13), |_| rnd()).into_dyn();
        let cases = [
            (
                geom([3, 3], [1, 1], [1, 1], [1, 1, 1, 1], AutoPad::NotSet),
                &x4,
            ),
            (
                geom([3, 3], [2, 2], [1, 1], [1, 1, 1, 1], AutoPad::NotSet),
                &x4,
            ),
            (
                geom([3, 3], [2, 3], [1, 1], [0, 2, 1, 0], AutoPad::NotSet),
                &x4,
            ),
            (
                geom([5, 5], [1, 2], [2, 1], [2, 2, 2, 2], AutoPad::NotSet),
                &x4,
            ),
            (
                geom([3, 3], [2, 2], [1, 1], [0; 4], AutoPad::SameUpper),
                &x4,
            ),
            (
                geom([3, 3], [2, 2], [1, 1], [0; 4], AutoPad::SameLower),
                &x4,
            ),
            (geom([1, 1], [2, 2], [1, 1], [0; 4], AutoPad::NotSet), &x4),
            (
                geom([1, 3], [1, 2], [1, 1], [0, 1, 0, 1], AutoPad::NotSet),
                &x3,
            ),
        ];
        let x6 = ndarray::Array4::from_shape_fn((1, 6, 8, 7), |_| rnd()).into_dyn();
        let mut wide = Vec::new();
        for (cpg, groups, x) in [(2, 3, &x6), (3, 1, &x4)] {
            for (st, pads) in [([1, 1], [1, 1, 1, 1]), ([2, 2], [1, 0, 1, 1])] {
                let mut c = geom([3, 3], st, [1, 1], pads, AutoPad::NotSet);
                c.cin_per_group = cpg;
                c.groups = groups;
                wide.push((c, x));
            }
        }
        for (i, (c, x)) in cases.iter().cloned().chain(wide).enumerate() {
            for g in 0..c.groups {
                let dim = c.cin_per_group * c.kernel[0] * c.kernel[1];
                let (mut gd, mut sd, mut buf) = (Vec::new(), Vec::new(), Vec::new());
                let rd =
                    conv_gram_small(&c, &x.view(), g, 100, &mut buf, &mut gd, &mut sd).unwrap();
                assert!(buf.is_empty());
                let (mut gi, mut si, mut rows) = (Vec::new(), Vec::new(), Vec::new());
                let ri = conv_rows(&c, &x.view(), g, &mut rows).unwrap();
                flush(&mut rows, dim, &mut gi, &mut si);
                assert_eq!(rd, ri, "case {i} group {g}");
                // And the row sum computed alone, as bias correction does.
                let mut sr = Vec::new();
                assert_eq!(conv_row_sum(&c, &x.view(), g, &mut sr), Ok(ri));
                for (a, b) in gd
                    .iter()
                    .zip(&gi)
                    .chain(sd.iter().zip(&si))
                    .chain(sr.iter().zip(&si))
                {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "case {i} group {g}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
