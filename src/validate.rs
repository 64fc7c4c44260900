//! Accuracy in an independent runtime: run one or two models in tract on the same
//! preprocessed images, and report top-1 / top-5 accuracy of each, their top-1
//! agreement, and the largest and mean absolute logit difference.

use std::time::Instant;

use ndarray::{Array2, ArrayView1};
use serde::Serialize;

use crate::data::{self, Dataset, Layout, Preprocess};
use crate::engine;
use crate::error::{Error, Result};
use crate::onnx::Model;

/// One model's results on the dataset.
#[derive(Debug, Clone, Serialize)]
pub struct ModelRun {
    pub model: String,
    pub images: usize,
    /// Fractions in [0, 1]; `None` when the data has no labels.
    pub top1: Option<f64>,
    /// Wilson 95% interval of top-1 over the labelled images ([`wilson`]).
    pub top1_interval: Option<(f64, f64)>,
    pub top5: Option<f64>,
    pub images_per_second: f64,
    #[serde(skip)]
    pub logits: Array2<f32>,
}

/// How far the second model is from the first.
#[derive(Debug, Clone, Serialize)]
pub struct Agreement {
    /// Share of images where both models give the same top-1 class.
    pub top1_agreement: f64,
    /// Its Wilson 95% interval ([`wilson`]).
    pub top1_agreement_interval: (f64, f64),
    pub max_abs_logit_diff: f64,
    pub mean_abs_logit_diff: f64,
    /// Rows (images) whose top-1 class differs (in the JSON by name:
    /// [`Report::changed_images`]).
    #[serde(skip)]
    pub changed: Vec<usize>,
}

/// The Wilson score interval at 95% (z = 1.959964) for k successes in n trials
/// (Wilson 1927; Brown, Cai and DasGupta 2001, "Interval Estimation for a Binomial
/// Proportion", eq. 4): centre (p + z^2/2n) / (1 + z^2/n), half-width
/// z / (1 + z^2/n) sqrt(p (1 - p) / n + z^2 / 4n^2). (0, 1) when n is 0.
pub fn wilson(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (k, n) = (k as f64, n as f64);
    let z = 1.959964f64;
    let p = k / n;
    let d = 1.0 + z * z / n;
    let c = (p + z * z / (2.0 * n)) / d;
    let h = z / d * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt();
    // At k = 0 (k = n) the lower (upper) bound is exactly 0 (1); spare it the round-off.
    let lo = if k == 0.0 { 0.0 } else { (c - h).max(0.0) };
    let hi = if k == n { 1.0 } else { (c + h).min(1.0) };
    (lo, hi)
}

/// Below this many images a top-1 figure is flagged as too uncertain to claim.
pub const FEW_IMAGES: usize = 300;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub data: String,
    pub labelled: usize,
    pub threads: usize,
    pub runs: Vec<ModelRun>,
    pub agreement: Option<Agreement>,
    /// The images whose top-1 class changed between the two models.
    pub changed_images: Vec<String>,
}

/// A model's image input: the shape it runs with and what preprocessing must match.
#[derive(Debug, Clone, PartialEq)]
pub struct Geometry {
    /// The input shape with batch 1.
    pub shape: Vec<usize>,
    pub layout: Layout,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl Geometry {
    /// The preset this input most likely wants when none is given ([`default_preset`]).
    pub fn default_preset(&self) -> &'static str {
        default_preset(self.channels, self.height)
    }
}

/// The input shape a model is run with (batch 1) and the dataset preprocessing
/// that matches it: layout NCHW unless the last dim looks like channels.
pub fn input_geometry(model: &Model, overrides: &[Vec<usize>]) -> Result<Geometry> {
    let inputs = engine::input_shapes(model, overrides)?;
    let first = inputs
        .first()
        .ok_or_else(|| Error::Usage("the model has no input".into()))?;
    let (name, shape) = (&first.name, &first.shape);
    if shape.len() != 4 {
        return Err(Error::Usage(format!(
            "input '{name}' has shape {shape:?}; validate needs an image input [N, C, H, W] or [N, H, W, C]"
        )));
    }
    let mut shape = shape.clone();
    shape[0] = 1;
    let nhwc = matches!(shape[3], 1 | 3) && !matches!(shape[1], 1 | 3);
    let (c, h, w) = if nhwc {
        (shape[3], shape[1], shape[2])
    } else {
        (shape[1], shape[2], shape[3])
    };
    Ok(Geometry {
        shape,
        layout: if nhwc { Layout::Nhwc } else { Layout::Nchw },
        channels: c,
        height: h,
        width: w,
    })
}

/// The preset a model's input most likely wants when none is given.
pub fn default_preset(channels: usize, height: usize) -> &'static str {
    if channels == 1 {
        "mnist"
    } else if height >= 128 {
        "imagenet"
    } else {
        "cifar"
    }
}

/// Runs every model on the dataset. The models must share an input geometry.
pub fn validate(
    models: &[(&str, &Model)],
    input_shape: &[usize],
    data: &Dataset,
    threads: usize,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Report> {
    let mut runs = Vec::new();
    for (k, (name, model)) in models.iter().enumerate() {
        runs.push(run_model(
            name,
            model,
            input_shape,
            data,
            threads,
            &|done| progress(k, done),
        )?);
    }
    compare(runs, data, threads)
}

/// One model's run over the dataset: its logits, top-1 (with its Wilson
/// interval) and top-5 where labelled, and its speed.
pub fn run_model(
    name: &str,
    model: &Model,
    input_shape: &[usize],
    data: &Dataset,
    threads: usize,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<ModelRun> {
    let plan = engine::plan(model, input_shape)?;
    if let Some(classes) = plan.output_len {
        check_labels(data, classes, name)?;
    }
    let start = Instant::now();
    let images = if input_shape[1..] == data.images.shape()[1..] {
        data.images.view()
    } else {
        return Err(Error::Usage(format!(
            "the data was prepared as {:?} per image but '{name}' wants {:?}",
            &data.images.shape()[1..],
            &input_shape[1..]
        )));
    };
    let logits = engine::run_images(&plan, images, threads, progress)?;
    let secs = start.elapsed().as_secs_f64();
    let (top1, top5) = accuracy(&logits, &data.labels);
    let labelled = data.labels.iter().filter(|l| l.is_some()).count();
    Ok(ModelRun {
        model: name.to_string(),
        images: logits.nrows(),
        top1,
        top1_interval: top1.map(|t| wilson((t * labelled as f64).round() as usize, labelled)),
        top5,
        images_per_second: logits.nrows() as f64 / secs.max(1e-9),
        logits,
    })
}

/// The report of runs over the same dataset: the first two compared (top-1
/// agreement, logit differences, the images that changed).
pub fn compare(runs: Vec<ModelRun>, data: &Dataset, threads: usize) -> Result<Report> {
    let agreement = match runs.as_slice() {
        [a, b, ..] => Some(agreement(&a.logits, &b.logits)?),
        _ => None,
    };
    let changed_images = agreement
        .iter()
        .flat_map(|a| &a.changed)
        .filter_map(|&i| data.names.get(i).cloned())
        .collect();
    Ok(Report {
        data: data.description.clone(),
        labelled: data.labels.iter().filter(|l| l.is_some()).count(),
        threads,
        runs,
        agreement,
        changed_images,
    })
}

/// Every label is one of the model's `classes` outputs; else an error naming the
/// first image whose label is not (file names such as `IMG_20240101_153012.jpg`
/// can look like `<set>_<idx>_<label>`).
pub fn check_labels(data: &Dataset, classes: usize, model: &str) -> Result<()> {
    if let Some((name, label)) = data
        .names
        .iter()
        .zip(&data.labels)
        .find_map(|(n, l)| l.filter(|l| *l >= classes).map(|l| (n, l)))
    {
        return Err(Error::Usage(format!(
            "image '{name}' has label {label}, but '{model}' has {classes} classes (0..{}); \
             the labels come from: {}",
            classes - 1,
            data.description
        )));
    }
    Ok(())
}

fn argmax(row: ArrayView1<f32>) -> usize {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if v.total_cmp(&row[best]).is_gt() {
            best = i;
        }
    }
    best
}

/// Top-1 and top-5 accuracy over the labelled images (`None` when none is labelled).
pub fn accuracy(logits: &Array2<f32>, labels: &[Option<usize>]) -> (Option<f64>, Option<f64>) {
    let (mut n, mut t1, mut t5) = (0usize, 0usize, 0usize);
    for (row, label) in logits.rows().into_iter().zip(labels) {
        let Some(label) = *label else { continue };
        n += 1;
        let target = row.get(label).copied();
        let Some(target) = target else { continue };
        // Rank of the true class: how many logits beat it (ties go to the lower index, as argmax).
        let better = row
            .iter()
            .enumerate()
            .filter(|(i, v)| {
                v.total_cmp(&target).is_gt() || (v.total_cmp(&target).is_eq() && *i < label)
            })
            .count();
        t1 += usize::from(better == 0);
        t5 += usize::from(better < 5);
    }
    if n == 0 {
        return (None, None);
    }
    (Some(t1 as f64 / n as f64), Some(t5 as f64 / n as f64))
}

/// Top-1 agreement and logit differences between two runs on the same images.
pub fn agreement(a: &Array2<f32>, b: &Array2<f32>) -> Result<Agreement> {
    if a.shape() != b.shape() {
        return Err(Error::Usage(format!(
            "the two models give outputs of different shapes: {:?} and {:?}",
            a.shape(),
            b.shape()
        )));
    }
    let n = a.nrows().max(1) as f64;
    let changed: Vec<usize> = a
        .rows()
        .into_iter()
        .zip(b.rows())
        .enumerate()
        .filter(|(_, (x, y))| argmax(*x) != argmax(*y))
        .map(|(i, _)| i)
        .collect();
    let same = a.nrows() - changed.len();
    let diffs = (a - b).mapv(|d| d.abs() as f64);
    Ok(Agreement {
        top1_agreement: same as f64 / n,
        top1_agreement_interval: wilson(same, a.nrows()),
        max_abs_logit_diff: diffs.iter().copied().fold(0.0, f64::max),
        mean_abs_logit_diff: diffs.mean().unwrap_or(0.0),
        changed,
    })
}

/// Loads the dataset with the preprocessing the model's input implies.
pub fn load_data(
    path: &std::path::Path,
    preset: &str,
    format: Option<data::Format>,
    limit: Option<usize>,
    geometry: &Geometry,
) -> Result<Dataset> {
    load_data_with(path, preset, &Adjust::default(), format, limit, geometry)
}

/// Changes to a preset's normalisation and geometry (`--mean`, `--std`, `--resize`).
#[derive(Debug, Clone, Default)]
pub struct Adjust {
    /// Per channel (or one for all), after scaling to 0..1.
    pub mean: Option<Vec<f32>>,
    pub std: Option<Vec<f32>>,
    /// torchvision's Resize(S) short side before the centre crop.
    pub resize: Option<usize>,
    /// The resize's filter (bilinear by default).
    pub interpolation: Option<data::Interpolation>,
}

/// [`load_data`] with the preset adjusted. Errors: a mean or std whose length is
/// neither 1 nor the input's channel count, a std of 0, a resize smaller than the crop.
pub fn load_data_with(
    path: &std::path::Path,
    preset: &str,
    adjust: &Adjust,
    format: Option<data::Format>,
    limit: Option<usize>,
    geometry: &Geometry,
) -> Result<Dataset> {
    let g = geometry;
    let mut pre = Preprocess::preset(preset, g.height, g.width, g.channels, g.layout)?;
    for (what, v, slot) in [
        ("--mean", &adjust.mean, &mut pre.mean),
        ("--std", &adjust.std, &mut pre.std),
    ] {
        if let Some(v) = v {
            if v.len() != 1 && v.len() != g.channels {
                return Err(Error::Usage(format!(
                    "{what} has {} values; the model input has {} channels (give 1 or {})",
                    v.len(),
                    g.channels,
                    g.channels
                )));
            }
            *slot = v.clone();
        }
    }
    if pre.std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
        return Err(Error::Usage(format!(
            "--std {:?}: every value must be a nonzero number",
            pre.std
        )));
    }
    if let Some(s) = adjust.resize {
        if s < g.height.min(g.width) {
            return Err(Error::Usage(format!(
                "--resize {s}: smaller than the model's {}x{} crop",
                g.height, g.width
            )));
        }
        pre.resize = data::Resize::ShortSideThenCenterCrop(s);
    }
    if let Some(i) = adjust.interpolation {
        pre.interpolation = i;
    }
    // The preprocessing goes with the data into every report (text and JSON).
    let mut d = data::load(path, &pre, format, limit)?;
    d.description = format!("{}; preprocessing: {}", d.description, pre.describe());
    Ok(d)
}

impl Report {
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let pct = |x: Option<f64>| {
            x.map(|v| format!("{:.2}%", 100.0 * v))
                .unwrap_or_else(|| "-".into())
        };
        let ci = |i: Option<(f64, f64)>| {
            i.map(|(lo, hi)| format!(" [95% CI {:.1}-{:.1}%]", 100.0 * lo, 100.0 * hi))
                .unwrap_or_default()
        };
        let _ = writeln!(
            s,
            "data: {} ({} labelled), {} threads",
            self.data, self.labelled, self.threads
        );
        for r in &self.runs {
            let _ = writeln!(
                s,
                "{}: top-1 {}{}  top-5 {}  ({} images, {:.1} images/s)",
                r.model,
                pct(r.top1),
                ci(r.top1_interval),
                pct(r.top5),
                r.images,
                r.images_per_second
            );
        }
        if let Some(a) = &self.agreement {
            let _ = writeln!(
                s,
                "agreement: top-1 {:.2}%{}, max |logit diff| {:.3e}, mean {:.3e}",
                100.0 * a.top1_agreement,
                ci(Some(a.top1_agreement_interval)),
                a.max_abs_logit_diff,
                a.mean_abs_logit_diff
            );
        }
        let n = self.runs.first().map_or(0, |r| r.images);
        if n > 0 && n < FEW_IMAGES {
            let _ = writeln!(
                s,
                "warning: {n} images: one image is {:.1} points; a figure to claim needs a few hundred held-out images",
                100.0 / n as f64
            );
        }
        s
    }
}
