//! The self-contained HTML report (`--html FILE` on `optimize`, `score` and
//! `validate`): one file, no network, no JavaScript; tables and inline SVG plots
//! ([`plot`], drawn with `plotters`).
//!
//! - `optimize`: the before/after summary, the score's split per layer (before as
//!   an outline), each layer's weight bits, activation bits and sparsity, every
//!   weighted layer's weight histogram before and after with its quantization grid
//!   (seed 004's quant-plot), the calibrated activation ranges against their grids,
//!   the per-layer output errors each data-aware pass measured, the accuracy with
//!   its intervals, and after `--search` every plan's score against its agreement
//!   (the Pareto front, the chosen plan marked);
//! - `score`: the totals, the split per layer, bits and sparsity, the histograms;
//! - `validate`: accuracy and agreement with intervals, the images that changed.
//!
//! Every plot is an `<svg data-plot="NAME">` inside a `<figure>`.

pub mod plot;

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::error::Result;
use crate::graph::{weighted_layers, Graph};
use crate::onnx::Model;
use crate::optimize::OptimizeReport;
use crate::score::{self, render::fmt_shape};
use crate::validate;

/// At most this many weight histograms (the layers with the most weights first,
/// then shown in graph order); the page says how many were left out.
pub const MAX_HISTOGRAMS: usize = 120;

/// Escapes text for HTML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1400px;padding:0 1em;color:#222}\
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}\
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:2px 8px}\
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3}\
figure{margin:1em 0;display:inline-block;vertical-align:top}figcaption{font-size:.85em;color:#555;max-width:760px}\
.hist figure{margin:.3em;width:410px}.hist figcaption{font-size:.75em}pre{background:#f6f6f6;padding:.6em;overflow:auto;font-size:.85em}\
.warn{color:#a40}";

/// A page under construction.
pub struct Page {
    body: String,
    title: String,
}

impl Page {
    pub fn new(title: &str) -> Self {
        let mut body = String::new();
        let _ = writeln!(body, "<h1>{}</h1>", escape(title));
        Page {
            body,
            title: title.to_string(),
        }
    }

    pub fn h2(&mut self, t: &str) {
        let _ = writeln!(self.body, "<h2>{}</h2>", escape(t));
    }

    pub fn p(&mut self, t: &str) {
        let _ = writeln!(self.body, "<p>{}</p>", escape(t));
    }

    pub fn warn(&mut self, t: &str) {
        let _ = writeln!(self.body, "<p class=\"warn\">{}</p>", escape(t));
    }

    pub fn pre(&mut self, t: &str) {
        let _ = writeln!(self.body, "<pre>{}</pre>", escape(t));
    }

    /// A table; cells that parse as numbers (or end in %, x) are right-aligned.
    pub fn table(&mut self, header: &[&str], rows: &[Vec<String>]) {
        let b = &mut self.body;
        b.push_str("<table><tr>");
        for h in header {
            let _ = write!(b, "<th>{}</th>", escape(h));
        }
        b.push_str("</tr>\n");
        for r in rows {
            b.push_str("<tr>");
            for c in r {
                let numeric = c
                    .trim_end_matches(['%', 'x', 'k', 'M', 'G'])
                    .split_whitespace()
                    .next()
                    .is_some_and(|t| t.trim_end_matches('%').parse::<f64>().is_ok());
                let _ = write!(
                    b,
                    "<td{}>{}</td>",
                    if numeric { " class=\"n\"" } else { "" },
                    escape(c)
                );
            }
            b.push_str("</tr>\n");
        }
        b.push_str("</table>\n");
    }

    /// A table folded behind a summary line.
    pub fn details_table(&mut self, summary: &str, header: &[&str], rows: &[Vec<String>]) {
        let _ = writeln!(self.body, "<details><summary>{}</summary>", escape(summary));
        self.table(header, rows);
        self.body.push_str("</details>\n");
    }

    /// A plot with its caption.
    pub fn figure(&mut self, svg: &str, caption: &str) {
        let _ = writeln!(
            self.body,
            "<figure>{svg}<figcaption>{}</figcaption></figure>",
            escape(caption)
        );
    }

    pub fn raw(&mut self, html: &str) {
        self.body.push_str(html);
    }

    /// The whole document.
    pub fn finish(self) -> String {
        format!(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta name=\"generator\" content=\"onnx-micronet {}\">\
             <title>{}</title><style>{STYLE}</style></head><body>\n{}\
             <p style=\"color:#888;font-size:.8em\">onnx-micronet {}</p></body></html>\n",
            env!("CARGO_PKG_VERSION"),
            escape(&self.title),
            self.body,
            env!("CARGO_PKG_VERSION"),
        )
    }
}

/// One weighted layer's weights as the histograms show them.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// The weighted node's name (its weight's name when the node has none).
    pub name: String,
    pub bits: u32,
    pub scheme: String,
    /// The float weights before compression (same node name), when known.
    pub before: Option<Vec<f32>>,
    /// The values the runtime multiplies with.
    pub after: Vec<f32>,
    /// The grid overlaid on the histogram: the representable values of the whole
    /// tensor (per-tensor grids) or of its widest output channel (per-channel),
    /// empty for float weights.
    pub grid: Vec<f32>,
    /// Which grid: "the tensor" or "channel c".
    pub grid_of: String,
}

/// Sorted distinct values.
fn distinct(v: impl Iterator<Item = f32>) -> Vec<f32> {
    let mut d: Vec<f32> = v.filter(|x| x.is_finite()).collect();
    d.sort_by(f32::total_cmp);
    d.dedup();
    d
}

/// The grid of a quantized weight ([`LayerWeights::grid`]): the tensor's distinct
/// values when there are at most 2^bits + 1 of them (a per-tensor grid; + 1 for a
/// pruned zero beside an asymmetric grid), else those of the output channel
/// (axis 0, or the last axis of a 2-D weight stored K x N) with the largest
/// |value| when every channel holds at most that many.
fn grid_of(values: &ndarray::ArrayD<f32>, bits: u32) -> (Vec<f32>, String) {
    if bits >= 16 || values.is_empty() {
        return (Vec::new(), String::new());
    }
    let cap = (1usize << bits) + 1;
    let all = distinct(values.iter().copied());
    if all.len() <= cap {
        return (all, "the tensor".into());
    }
    let mut axes = vec![0];
    if values.ndim() == 2 {
        axes.push(1);
    }
    for axis in axes {
        let lanes: Vec<Vec<f32>> = values
            .axis_iter(ndarray::Axis(axis))
            .map(|c| distinct(c.iter().copied()))
            .collect();
        if lanes.iter().all(|l| l.len() <= cap) {
            let absmax = |l: &Vec<f32>| l.iter().fold(0f32, |m, x| m.max(x.abs()));
            let (c, g) = lanes
                .iter()
                .enumerate()
                .max_by(|a, b| absmax(a.1).total_cmp(&absmax(b.1)))
                .expect("a non-empty weight has a channel");
            return (g.clone(), format!("channel {c}"));
        }
    }
    (Vec::new(), String::new())
}

/// Float weights of every weighted layer of `m`, by node name.
fn weights_by_name(m: &Model) -> Result<Vec<(String, crate::repr::Weight)>> {
    let g = Graph::new(m.graph())?;
    let mut out = Vec::new();
    for wl in weighted_layers(&g) {
        let idx = wl.nodes[0];
        let node = g.node(idx);
        let name = if node.name().is_empty() {
            wl.weight.clone()
        } else {
            node.name().to_string()
        };
        if let Some(w) = crate::repr::layer_weight(&g, idx)? {
            out.push((name, w));
        }
    }
    Ok(out)
}

/// Every weighted layer of `after`, with the same node's weights in `before`
/// (when given and present) for the histograms.
pub fn collect_weights(before: Option<&Model>, after: &Model) -> Result<Vec<LayerWeights>> {
    let mut prior: HashMap<String, Vec<f32>> = HashMap::new();
    if let Some(b) = before {
        for (name, w) in weights_by_name(b)? {
            prior.insert(name, w.values.iter().copied().collect());
        }
    }
    let mut out = Vec::new();
    for (name, w) in weights_by_name(after)? {
        let (grid, grid_of) = grid_of(&w.values, w.bits);
        out.push(LayerWeights {
            before: prior.remove(&name),
            after: w.values.iter().copied().collect(),
            bits: w.bits,
            scheme: w.scheme.clone(),
            grid,
            grid_of,
            name,
        });
    }
    Ok(out)
}

fn pct(x: f64) -> String {
    format!("{:.2}%", 100.0 * x)
}

/// The score's sections: the split per layer (before as outlines, when given),
/// bits and sparsity, the layer table.
fn score_sections(
    page: &mut Page,
    after: &score::Report,
    before: Option<&score::Report>,
) -> Result<()> {
    let (bp, bo) = (after.baseline.params, after.baseline.ops);
    let share = |l: &score::Layer| (l.params / bp, (l.mults + l.adds) / bo);
    let prior: HashMap<&str, f64> = before
        .map(|b| {
            b.layers
                .iter()
                .map(|l| (l.name.as_str(), l.params / bp + (l.mults + l.adds) / bo))
                .collect()
        })
        .unwrap_or_default();
    let weighted: Vec<&score::Layer> = after
        .layers
        .iter()
        .filter(|l| l.weight_bits.is_some())
        .collect();
    let mut bars: Vec<plot::ScoreBar> = weighted
        .iter()
        .map(|l| {
            let (p, o) = share(l);
            plot::ScoreBar {
                label: l.name.clone(),
                params: p,
                ops: o,
                before: prior.get(l.name.as_str()).copied(),
            }
        })
        .collect();
    let other = after.layers.iter().filter(|l| l.weight_bits.is_none());
    let (op, oo) = other.clone().fold((0.0, 0.0), |(a, b), l| {
        let (p, o) = share(l);
        (a + p, b + o)
    });
    let other_before = before.map(|b| {
        b.layers
            .iter()
            .filter(|l| l.weight_bits.is_none())
            .map(|l| l.params / bp + (l.mults + l.adds) / bo)
            .sum::<f64>()
    });
    bars.push(plot::ScoreBar {
        label: "all other ops".into(),
        params: op,
        ops: oo,
        before: other_before,
    });
    page.h2("Score per layer");
    page.p(&format!(
        "MicroNet score {:.4} ({:?} track) = parameters {:.4} + operations {:.4}; baseline {:.0} parameters, {:.0} operations (32-bit units). The last bar sums the {} layers without weights (activations, additions, pooling).",
        after.score,
        after.track,
        after.score_params,
        after.score_ops,
        bp,
        bo,
        other.count()
    ));
    page.figure(
        &plot::score_split(&bars)?,
        "Each weighted layer's share of the score: its parameter storage / the baseline's parameters (blue) plus its operations / the baseline's operations (orange). Outline: the same layer before compression.",
    );
    let bits: Vec<plot::LayerBits> = weighted
        .iter()
        .map(|l| plot::LayerBits {
            weight_bits: l.weight_bits,
            act_bits: l.act_bits,
            sparsity: l.sparsity,
        })
        .collect();
    page.h2("Bits and sparsity per layer");
    page.figure(
        &plot::bits_sparsity(&bits)?,
        "Weight bits (blue; 32 or 16 for float weights), bits of the input activation the multiplies read (red), and the share of exact zeros in each weight (green).",
    );
    let rows: Vec<Vec<String>> = weighted
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let (p, o) = share(l);
            vec![
                i.to_string(),
                l.name.clone(),
                l.op_type.clone(),
                l.weight_shape.as_deref().map(fmt_shape).unwrap_or_default(),
                l.weight_bits.map(|b| b.to_string()).unwrap_or_default(),
                l.weight_scheme.clone().unwrap_or_default(),
                l.act_bits.to_string(),
                l.sparsity.map(pct).unwrap_or_default(),
                format!("{:.1}", l.params),
                format!("{:.0}", l.mults + l.adds),
                format!("{:.5}", p + o),
            ]
        })
        .collect();
    page.details_table(
        &format!("the {} weighted layers", rows.len()),
        &[
            "#",
            "layer",
            "op",
            "weight",
            "w bits",
            "scheme",
            "a bits",
            "sparsity",
            "params",
            "ops",
            "score share",
        ],
        &rows,
    );
    Ok(())
}

/// The weight histograms, at most [`MAX_HISTOGRAMS`].
fn histogram_section(page: &mut Page, weights: &[LayerWeights]) -> Result<()> {
    if weights.is_empty() {
        return Ok(());
    }
    page.h2("Weight histograms");
    let mut shown: Vec<usize> = (0..weights.len()).collect();
    if shown.len() > MAX_HISTOGRAMS {
        shown.sort_by_key(|&i| std::cmp::Reverse(weights[i].after.len()));
        shown.truncate(MAX_HISTOGRAMS);
        shown.sort_unstable();
        page.p(&format!(
            "The {MAX_HISTOGRAMS} layers with the most weights of {}.",
            weights.len()
        ));
    }
    page.p("Counts on a log scale in 80 equal bins over the layer's range: grey, the float weights the compression started from; blue outline, the values the runtime multiplies with; orange, the quantization grid (of the tensor, or of its widest output channel for per-channel grids; ticks under the axis when more than 64 levels are in view).");
    page.raw("<div class=\"hist\">\n");
    for &i in &shown {
        let w = &weights[i];
        let title = format!("{} · {} bit", plot::short(&w.name, 40), w.bits);
        let svg = plot::weight_histogram(&plot::WeightHist {
            title,
            before: w.before.as_deref(),
            after: &w.after,
            grid: &w.grid,
        })?;
        let grid = if w.grid.is_empty() {
            "no grid (float)".to_string()
        } else {
            format!("grid of {}: {} values in use", w.grid_of, w.grid.len())
        };
        page.figure(&svg, &format!("{}: {}, {grid}", w.name, w.scheme));
    }
    page.raw("</div>\n");
    Ok(())
}

/// The page of `score --html`.
pub fn score_page(report: &score::Report, weights: &[LayerWeights]) -> Result<String> {
    let mut page = Page::new(&format!(
        "MicroNet score of {}",
        report.model.as_deref().unwrap_or("the model")
    ));
    page.table(
        &["", "count (32-bit units)", "baseline", "ratio"],
        &[
            vec![
                "parameter storage".into(),
                format!("{:.0}", report.totals.params),
                format!("{:.0}", report.baseline.params),
                format!("{:.4}", report.score_params),
            ],
            vec![
                "math operations".into(),
                format!("{:.0}", report.totals.ops),
                format!("{:.0}", report.baseline.ops),
                format!("{:.4}", report.score_ops),
            ],
            vec![
                "score".into(),
                String::new(),
                String::new(),
                format!("{:.4}", report.score),
            ],
        ],
    );
    if !report.complete {
        page.warn(&format!(
            "{} ops are not counted (unknown to the counting table).",
            report.uncounted.len()
        ));
    }
    score_sections(&mut page, report, None)?;
    histogram_section(&mut page, weights)?;
    Ok(page.finish())
}

/// The accuracy section of a validation report.
fn validation_section(page: &mut Page, v: &validate::Report) -> Result<()> {
    page.h2("Accuracy");
    page.p(&format!(
        "{} images from {} ({} labelled), tract, {} threads.",
        v.runs.first().map_or(0, |r| r.images),
        v.data,
        v.labelled,
        v.threads
    ));
    let mut rows = Vec::new();
    for r in &v.runs {
        if let (Some(t), Some((lo, hi))) = (r.top1, r.top1_interval) {
            rows.push(plot::Interval {
                label: format!("top-1 of {}", plot::short(&r.model, 50)),
                value: t,
                lo,
                hi,
            });
        }
    }
    if let Some(a) = &v.agreement {
        rows.push(plot::Interval {
            label: "top-1 agreement".into(),
            value: a.top1_agreement,
            lo: a.top1_agreement_interval.0,
            hi: a.top1_agreement_interval.1,
        });
    }
    if !rows.is_empty() {
        page.figure(
            &plot::intervals(&rows)?,
            "Top-1 accuracy on the labelled images and top-1 agreement between the two models, with their Wilson 95% intervals.",
        );
    }
    let n = v.runs.first().map_or(0, |r| r.images);
    if n < validate::FEW_IMAGES {
        page.warn(&format!(
            "Only {n} images: an interval this wide proves little; use a few hundred held-out images."
        ));
    }
    if !v.changed_images.is_empty() {
        let rows: Vec<Vec<String>> = v
            .changed_images
            .iter()
            .take(200)
            .map(|s| vec![s.clone()])
            .collect();
        page.details_table(
            &format!(
                "{} images changed their top-1 class{}",
                v.changed_images.len(),
                if v.changed_images.len() > 200 {
                    " (first 200)"
                } else {
                    ""
                }
            ),
            &["image"],
            &rows,
        );
    }
    Ok(())
}

/// The page of `validate --html`.
pub fn validate_page(v: &validate::Report) -> Result<String> {
    let names: Vec<&str> = v.runs.iter().map(|r| r.model.as_str()).collect();
    let mut page = Page::new(&format!("Validation of {}", names.join(" against ")));
    let rows: Vec<Vec<String>> = v
        .runs
        .iter()
        .map(|r| {
            vec![
                r.model.clone(),
                r.images.to_string(),
                r.top1.map(pct).unwrap_or_default(),
                r.top1_interval
                    .map(|(a, b)| format!("[{:.1}, {:.1}]", 100.0 * a, 100.0 * b))
                    .unwrap_or_default(),
                r.top5.map(pct).unwrap_or_default(),
                format!("{:.1}", r.images_per_second),
            ]
        })
        .collect();
    page.table(
        &[
            "model",
            "images",
            "top-1",
            "95% interval",
            "top-5",
            "images/s",
        ],
        &rows,
    );
    validation_section(&mut page, v)?;
    Ok(page.finish())
}

/// The page of `optimize --html`; `weights` from [`collect_weights`] (the
/// model before the first weight-changing pass against the written one).
pub fn optimize_page(rep: &OptimizeReport, weights: &[LayerWeights]) -> Result<String> {
    let mut page = Page::new(&format!(
        "onnx-micronet optimize {} -> {}",
        rep.input,
        rep.output.as_deref().unwrap_or("(not written)")
    ));
    page.p(&format!("plan: {}", rep.plan.join(" -> ")));
    let rows: Vec<Vec<String>> = rep.summary_rows().into_iter().map(Vec::from).collect();
    page.table(&["", "before", "after", "after/before"], &rows);
    if let Some(a) = rep.collapse_advice() {
        page.warn(&a);
    }
    if let Some(v) = &rep.validation {
        validation_section(&mut page, v)?;
    }
    if !rep.search.is_empty() {
        page.h2("Search");
        let points: Vec<plot::PlanPoint> = rep
            .search
            .iter()
            .filter_map(|r| {
                Some(plot::PlanPoint {
                    score: r.score,
                    agreement: r.agreement?,
                    passed: r.passed,
                    chosen: r.chosen,
                })
            })
            .collect();
        page.figure(
            &plot::pareto(&points)?,
            "Every plan --search built and measured: its MicroNet score against its top-1 agreement with the original on the evaluation images; the chosen plan (the smallest that passed the gate) ringed.",
        );
        let rows: Vec<Vec<String>> = rep
            .search
            .iter()
            .map(|r| {
                vec![
                    if r.chosen { "*".into() } else { String::new() },
                    format!("{:.2}", r.avg_bits),
                    format!("{:.3}", r.mean_bits),
                    format!("{:.4}", r.score),
                    r.agreement.map(pct).unwrap_or_default(),
                    r.top1.map(pct).unwrap_or_default(),
                    if r.passed { "pass" } else { "fail" }.into(),
                    format!("{:.1}", r.seconds),
                ]
            })
            .collect();
        page.table(
            &[
                "chosen",
                "budget (bits)",
                "mean bits",
                "score",
                "agreement",
                "top-1",
                "gate",
                "seconds",
            ],
            &rows,
        );
    }
    score_sections(&mut page, &rep.after, Some(&rep.before))?;
    histogram_section(&mut page, weights)?;
    for p in &rep.passes {
        if !p.ranges.is_empty() {
            page.h2("Activation ranges");
            let rows: Vec<plot::ActRow> = p
                .ranges
                .iter()
                .map(|r| plot::ActRow {
                    seen: (r.seen_min, r.seen_max),
                    grid: (r.grid_min, r.grid_max),
                })
                .collect();
            page.figure(
                &plot::activation_ranges(&rows)?,
                "Each quantized activation: the values the calibration images produced (black line) and the range its grid represents (blue bar); what lies outside the bar is clipped.",
            );
            let table: Vec<Vec<String>> = p
                .ranges
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    vec![
                        i.to_string(),
                        r.value.clone(),
                        r.bits.to_string(),
                        format!("{:.4}", r.seen_min),
                        format!("{:.4}", r.seen_max),
                        format!("{:.4}", r.grid_min),
                        format!("{:.4}", r.grid_max),
                    ]
                })
                .collect();
            page.details_table(
                &format!("the {} activation quantizers", table.len()),
                &[
                    "#", "value", "bits", "seen min", "seen max", "grid min", "grid max",
                ],
                &table,
            );
        }
    }
    for p in &rep.passes {
        if p.errors.is_empty() {
            continue;
        }
        let method = p.errors[0].method.clone();
        page.h2(&format!("Per-layer output error ({})", p.pass));
        let rows: Vec<plot::ErrRow> = p
            .errors
            .iter()
            .map(|e| plot::ErrRow {
                nearest: e.nearest,
                after: e.after,
            })
            .collect();
        page.figure(
            &plot::layer_errors(&format!("{}: relative output error per layer", p.pass), &method, &rows)?,
            "Relative output error of each layer on the calibration rows, ||X (W' - W)||² / ||X W||²: the plain method (round to nearest, magnitude mask or plain cut) beside the one the pass used.",
        );
        let table: Vec<Vec<String>> = p
            .errors
            .iter()
            .enumerate()
            .map(|(i, e)| {
                vec![
                    i.to_string(),
                    e.layer.clone(),
                    e.method.clone(),
                    format!("{:.4}%", 100.0 * e.nearest),
                    format!("{:.4}%", 100.0 * e.after),
                ]
            })
            .collect();
        page.details_table(
            &format!("the {} layers", table.len()),
            &["#", "layer", "method", "plain", "after"],
            &table,
        );
    }
    page.h2("Recipe");
    page.pre(&toml::to_string(&rep.recipe).unwrap_or_default());
    Ok(page.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr2, ArrayD};

    #[test]
    fn escape_covers_markup_and_quotes() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn histogram_counts_by_hand() {
        // 4 bins of width 0.25 over [0, 1]: 0 -> bin 0, 0.25 -> 1, 0.5 -> 2,
        // 0.99 -> 3, 1.0 (top edge, inclusive) -> 3; -0.1 and 1.1 lie outside.
        let h = plot::histogram(&[0.0, 0.25, 0.5, 0.99, 1.0, -0.1, 1.1], 0.0, 1.0, 4);
        assert_eq!(h, vec![1, 1, 1, 2]);
    }

    #[test]
    fn grid_is_the_tensors_or_the_widest_channels() {
        // 2-bit: at most 2^2 + 1 = 5 distinct values make a per-tensor grid.
        let t: ArrayD<f32> = arr2(&[[-2.0, -1.0], [0.0, 1.0]]).into_dyn();
        assert_eq!(
            grid_of(&t, 2),
            (vec![-2.0, -1.0, 0.0, 1.0], "the tensor".into())
        );
        // 8 distinct values over the tensor, at most 5 per row: per-channel along
        // axis 0, and row 1 (|3| the largest) is shown.
        let c: ArrayD<f32> =
            arr2(&[[0.0, 0.1, 0.2, 0.3, 0.1], [0.0, 1.0, 2.0, 3.0, -1.0]]).into_dyn();
        assert_eq!(
            grid_of(&c, 2),
            (vec![-1.0, 0.0, 1.0, 2.0, 3.0], "channel 1".into())
        );
        // Float weights have no grid.
        assert_eq!(grid_of(&c, 32).0, Vec::<f32>::new());
    }
}
