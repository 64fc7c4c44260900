//! Calibration for the second-order methods: how a layer reads its weight (its
//! rows, one per output unit, and the geometry of its input rows), and the Gram
//! matrices G = X^T X of those input rows on calibration images ([`gram`]), which
//! pruning's reweighted solver, GPTQ and SparseGPT ([`obs`]) and bias correction
//! share. Not a pass: the passes that need it call it.

pub mod gram;
pub mod obs;
pub mod paired;

use crate::graph::layers::weight_axis;
use crate::onnx::attr::NodeAttrs;
use crate::onnx::proto::NodeProto;

pub use gram::{AutoPad, ConvGeom, Geom, Stats};

/// How a weight tensor splits into output units ("rows"), each a vector of `len`
/// weights along the input dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rows {
    pub count: usize,
    pub len: usize,
    kind: Kind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// Row r is the contiguous slice [r len, (r + 1) len).
    Contiguous,
    /// The tensor is [batch, len, n]; row r = b n + c is column c of batch b.
    Columns { n: usize },
}

impl Rows {
    pub fn contiguous(count: usize, len: usize) -> Rows {
        Rows {
            count,
            len,
            kind: Kind::Contiguous,
        }
    }

    /// Columns of `batch` matrices of shape [len, n].
    pub fn columns(n: usize, len: usize, batch: usize) -> Rows {
        Rows {
            count: n * batch,
            len,
            kind: Kind::Columns { n },
        }
    }

    /// Flat index of element `j` of row `r`.
    #[inline]
    pub fn index(&self, r: usize, j: usize) -> usize {
        match self.kind {
            Kind::Contiguous => r * self.len + j,
            Kind::Columns { n } => (r / n) * self.len * n + j * n + r % n,
        }
    }
}

/// The row layout a node reads its weight in: one row per output unit, along the
/// weight's output-channel axis (`graph::layers`).
pub fn rows_of(node: &NodeProto, shape: &[usize]) -> std::result::Result<Rows, String> {
    match node.op_type() {
        "Conv" => {
            if shape.len() < 2 {
                return Err(format!("Conv weight of rank {}", shape.len()));
            }
            Ok(Rows::contiguous(shape[0], shape[1..].iter().product()))
        }
        "Gemm" => {
            if shape.len() != 2 {
                return Err(format!("Gemm weight of rank {}", shape.len()));
            }
            match weight_axis(node, shape).map_err(|e| e.to_string())?.0 {
                Some(0) => Ok(Rows::contiguous(shape[0], shape[1])),
                _ => Ok(Rows::columns(shape[1], shape[0], 1)),
            }
        }
        "MatMul" => match shape.len() {
            0 => Err("a scalar MatMul weight".into()),
            1 => Ok(Rows::contiguous(1, shape[0])),
            r => {
                let batch: usize = shape[..r - 2].iter().product();
                Ok(Rows::columns(shape[r - 1], shape[r - 2], batch))
            }
        },
        op => Err(format!("{op} is not prunable")),
    }
}

/// The calibration geometry of a node's weight: what its input rows look like.
pub fn geom_of(node: &NodeProto, shape: &[usize]) -> std::result::Result<Geom, String> {
    let input = node.input[0].clone();
    match node.op_type() {
        "Conv" => {
            let spatial = shape.len().saturating_sub(2);
            if !(1..=2).contains(&spatial) {
                return Err(format!("{spatial}-D convolution"));
            }
            let to_usize = |v: Vec<i64>| -> std::result::Result<Vec<usize>, String> {
                v.into_iter()
                    .map(|x| {
                        usize::try_from(x).map_err(|_| format!("negative attribute value {x}"))
                    })
                    .collect()
            };
            let ints = |name: &str, default: Vec<i64>| -> std::result::Result<Vec<usize>, String> {
                to_usize(
                    node.get_ints(name)
                        .map_err(|e| e.to_string())?
                        .unwrap_or(default),
                )
            };
            let group = node.int_or("group", 1).map_err(|e| e.to_string())?.max(1) as usize;
            let strides = ints("strides", vec![1; spatial])?;
            let dilations = ints("dilations", vec![1; spatial])?;
            let pads = ints("pads", vec![0; 2 * spatial])?;
            if strides.len() != spatial || dilations.len() != spatial || pads.len() != 2 * spatial {
                return Err("Conv attributes do not match the kernel rank".into());
            }
            let auto_pad = node
                .get_string("auto_pad")
                .map_err(|e| e.to_string())?
                .unwrap_or_default();
            let auto_pad = match auto_pad.as_str() {
                "" | "NOTSET" => AutoPad::NotSet,
                "VALID" => AutoPad::Valid,
                "SAME_UPPER" => AutoPad::SameUpper,
                "SAME_LOWER" => AutoPad::SameLower,
                other => return Err(format!("auto_pad '{other}'")),
            };
            // Normalized to 2-D: a 1-D conv is a 2-D one of height 1.
            let (kernel, strides, dilations, pads) = if spatial == 1 {
                (
                    [1, shape[2]],
                    [1, strides[0]],
                    [1, dilations[0]],
                    [0, pads[0], 0, pads[1]],
                )
            } else {
                (
                    [shape[2], shape[3]],
                    [strides[0], strides[1]],
                    [dilations[0], dilations[1]],
                    [pads[0], pads[1], pads[2], pads[3]],
                )
            };
            if strides.contains(&0) || dilations.contains(&0) {
                return Err("zero stride or dilation".into());
            }
            let cout = shape[0];
            if !cout.is_multiple_of(group) {
                return Err(format!("{cout} output channels in {group} groups"));
            }
            Ok(Geom::Conv(ConvGeom {
                input,
                cin_per_group: shape[1],
                groups: group,
                kernel,
                strides,
                dilations,
                pads,
                auto_pad,
            }))
        }
        "Gemm" => {
            if shape.len() != 2 {
                return Err(format!("Gemm weight of rank {}", shape.len()));
            }
            let (_, k) = weight_axis(node, shape).map_err(|e| e.to_string())?;
            Ok(Geom::Dense {
                input,
                k,
                trans_a: node.int_or("transA", 0).map_err(|e| e.to_string())? != 0,
            })
        }
        "MatMul" => {
            if shape.len() != 2 {
                return Err(format!("MatMul weight of rank {} (batched)", shape.len()));
            }
            Ok(Geom::Dense {
                input,
                k: shape[0],
                trans_a: false,
            })
        }
        op => Err(format!("{op} is not prunable")),
    }
}

/// One layer's calibration.
pub struct Calibrated {
    pub stats: Vec<Stats>,
    /// Per group, the mean input row.
    pub means: Vec<Vec<f64>>,
    pub dim: usize,
    pub groups: usize,
    /// Input rows seen per group.
    pub rows: usize,
    /// What `stats` were scaled by (G / scale; see [`gram::Captured`]).
    pub scale: f64,
    /// The Grams of two disjoint halves of the images, scaled as `stats` and
    /// summing to them ([`gram::Captured::folds`]); empty unless captured with
    /// [`capture_folds`], and for a layer that kept its rows.
    pub folds: Vec<Vec<Stats>>,
}

impl Calibrated {
    /// Fold `k` (0 or 1) as a calibration of its own (its Grams; no means).
    pub fn fold(&self, k: usize) -> Option<Calibrated> {
        self.folds.get(k).map(|stats| Calibrated {
            stats: stats.clone(),
            means: Vec::new(),
            dim: self.dim,
            groups: self.groups,
            rows: 0,
            scale: self.scale,
            folds: Vec::new(),
        })
    }
}

/// Captures the Gram matrices and mean input rows of the `wanted` layers (key,
/// one geometry per consuming node) on the calibration images of `cx`. Returns
/// the calibrated layers by key, the layers left out with the reason, and the
/// seconds the capture took.
#[allow(clippy::type_complexity)]
pub fn capture(
    model: &crate::onnx::Model,
    cx: &super::Context,
    wanted: &[(usize, Vec<Geom>)],
) -> crate::error::Result<(
    std::collections::HashMap<usize, Calibrated>,
    Vec<(usize, String)>,
    f64,
)> {
    capture_folds(model, cx, wanted, false)
}

/// [`capture`], with `folds` the Grams of two halves of the images kept as well
/// ([`Calibrated::folds`]).
#[allow(clippy::type_complexity)]
pub fn capture_folds(
    model: &crate::onnx::Model,
    cx: &super::Context,
    wanted: &[(usize, Vec<Geom>)],
    folds: bool,
) -> crate::error::Result<(
    std::collections::HashMap<usize, Calibrated>,
    Vec<(usize, String)>,
    f64,
)> {
    let mut out = std::collections::HashMap::new();
    let Some(data) = cx.calib.filter(|d| !d.is_empty()) else {
        return Ok((out, Vec::new(), 0.0));
    };
    if wanted.is_empty() {
        return Ok((out, Vec::new(), 0.0));
    }
    let input_shape = cx.input_shape_for(data);
    let start = std::time::Instant::now();
    let (captured, too_big) = gram::collect(
        model,
        &input_shape,
        data.images.view(),
        cx.threads.max(1),
        wanted,
        if folds {
            gram::Capture::GramsAndHalves
        } else {
            gram::Capture::Grams
        },
    )?;
    for c in captured {
        let geoms = &wanted
            .iter()
            .find(|(k, _)| *k == c.layer)
            .expect("wanted")
            .1;
        out.insert(
            c.layer,
            Calibrated {
                dim: geoms[0].dim(),
                groups: geoms[0].groups(),
                stats: c.stats,
                means: c.means,
                rows: c.rows,
                scale: c.scale,
                folds: c.folds,
            },
        );
    }
    Ok((out, too_big, start.elapsed().as_secs_f64()))
}

/// The geometries of a weight read by `nodes` (all must agree), and its rows.
pub fn layout(
    g: &crate::graph::Graph,
    nodes: &[usize],
    shape: &[usize],
) -> std::result::Result<(Rows, Vec<Geom>), String> {
    let rows = rows_of(g.node(nodes[0]), shape)?;
    let mut geoms = Vec::new();
    for &n in nodes {
        let geom = geom_of(g.node(n), shape)?;
        if rows_of(g.node(n), shape)? != rows {
            return Err("its nodes read it in different layouts".into());
        }
        geoms.push(geom);
    }
    let (g0, d0) = (geoms[0].groups(), geoms[0].dim());
    if geoms.iter().any(|x| x.groups() != g0 || x.dim() != d0) {
        return Err("its nodes read it in different layouts".into());
    }
    if rows.len != d0 || rows.count % g0 != 0 {
        return Err("its rows do not match its input patches".into());
    }
    Ok((rows, geoms))
}

/// Where a layer's calibration inputs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalibMode {
    /// Every layer's inputs captured at once, on the model before the pass.
    Parallel,
    /// The layers in this many groups of consecutive layers, each captured on the
    /// model already compressed up to it (one model run per group).
    Sequential(usize),
    /// As `Sequential`, and each layer fit to the original model's output rather
    /// than to its own on the compressed inputs (GPTAQ's asymmetric calibration;
    /// the two models captured side by side: [`paired`]).
    Asymmetric(usize),
}

impl std::str::FromStr for CalibMode {
    type Err = crate::error::Error;
    fn from_str(s: &str) -> crate::error::Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        let bad = || {
            crate::error::Error::Usage(format!(
                "calibration mode '{s}': expected parallel, sequential (one group per layer), sequential:K (K groups of consecutive layers), asymmetric or asymmetric:K (sequential, each layer fit to the original model's output)"
            ))
        };
        match t.as_str() {
            "parallel" => Ok(CalibMode::Parallel),
            "sequential" => Ok(CalibMode::Sequential(usize::MAX)),
            "asymmetric" => Ok(CalibMode::Asymmetric(usize::MAX)),
            _ => {
                let (k, asymmetric) = match t.strip_prefix("sequential:") {
                    Some(k) => (k, false),
                    None => (t.strip_prefix("asymmetric:").ok_or_else(bad)?, true),
                };
                let k: usize = k.parse().map_err(|_| bad())?;
                if k == 0 {
                    return Err(bad());
                }
                Ok(if asymmetric {
                    CalibMode::Asymmetric(k)
                } else {
                    CalibMode::Sequential(k)
                })
            }
        }
    }
}

/// The model's outputs on the first calibration images, to measure how much a
/// changed copy of it moves them (the per-layer sensitivities of
/// `prune.allocate = "network"` and `quantize.avg_bits`).
pub struct OutputProbe<'a> {
    images: ndarray::ArrayView4<'a, f32>,
    input_shape: Vec<usize>,
    threads: usize,
    y0: ndarray::Array2<f32>,
    energy: f64,
}

impl<'a> OutputProbe<'a> {
    /// Runs `model` on the first `n` calibration images of `cx` (which must have some).
    pub fn new(
        model: &crate::onnx::Model,
        cx: &super::Context<'a>,
        n: usize,
    ) -> crate::Result<Self> {
        let data = cx
            .calib
            .ok_or_else(|| crate::Error::Usage("output probe: no calibration images".into()))?;
        let n = n.min(data.len());
        let mut p = OutputProbe {
            images: data.images.slice(ndarray::s![..n, .., .., ..]),
            input_shape: cx.input_shape_for(data),
            threads: cx.threads.max(1),
            y0: ndarray::Array2::zeros((0, 0)),
            energy: 0.0,
        };
        p.y0 = p.run(model)?;
        p.energy = p.y0.iter().map(|v| (*v as f64).powi(2)).sum();
        Ok(p)
    }

    /// The images the probe runs.
    pub fn images(&self) -> usize {
        self.images.shape()[0]
    }

    fn run(&self, m: &crate::onnx::Model) -> crate::Result<ndarray::Array2<f32>> {
        let plan = crate::engine::plan(m, &self.input_shape)?;
        crate::engine::run_images(&plan, self.images, self.threads, &|_| {})
    }

    /// ||y(m) - y||² / ||y||² over the probe's images (`None` when the original
    /// outputs are all zero).
    pub fn relative_change(&self, m: &crate::onnx::Model) -> crate::Result<Option<f64>> {
        let y = self.run(m)?;
        let d: f64 = y
            .iter()
            .zip(self.y0.iter())
            .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
            .sum();
        Ok((self.energy > 0.0).then(|| d / self.energy))
    }
}

#[cfg(test)]
mod tests {
    use super::CalibMode;

    #[test]
    fn calib_modes_parse() {
        let p = |s: &str| s.parse::<CalibMode>();
        assert_eq!(p("parallel").unwrap(), CalibMode::Parallel);
        assert_eq!(
            p(" Sequential ").unwrap(),
            CalibMode::Sequential(usize::MAX)
        );
        assert_eq!(p("sequential:4").unwrap(), CalibMode::Sequential(4));
        assert_eq!(p("asymmetric").unwrap(), CalibMode::Asymmetric(usize::MAX));
        assert_eq!(p("asymmetric:8").unwrap(), CalibMode::Asymmetric(8));
        for bad in ["asymmetric:0", "asymmetric:x", "sequential:", "gptaq", ""] {
            let e = p(bad).unwrap_err().to_string();
            assert!(
                e.contains(&format!("'{bad}'")) && e.contains("asymmetric:K"),
                "{e}"
            );
        }
    }
}
