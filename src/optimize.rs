//! `optimize`: run a recipe's passes on a model, score before and after, and
//! (given labelled data) measure what it cost in accuracy.

use std::fmt::Write as _;

use serde::Serialize;

use crate::error::Result;
use crate::onnx::Model;
use crate::passes::{Context, PassReport};
use crate::recipe::Recipe;
use crate::score;
use crate::validate;

/// Runs the recipe's pipeline on a copy of the model.
pub fn run(model: &Model, recipe: &Recipe, cx: &Context) -> Result<(Model, Vec<PassReport>)> {
    let (out, reports, _) = run_with_snapshot(model, recipe, cx, false)?;
    Ok((out, reports))
}

/// [`run`], and with `snapshot`, the model as the first lossy pass received it
/// (`passes::Pipeline::run_with_snapshot`; `None` when every pass was lossless).
pub fn run_with_snapshot(
    model: &Model,
    recipe: &Recipe,
    cx: &Context,
    snapshot: bool,
) -> Result<(Model, Vec<PassReport>, Option<Model>)> {
    let pipeline = recipe.pipeline()?;
    let mut out = model.clone();
    let mut snap = None;
    let reports = pipeline.run_with_snapshot(&mut out, cx, snapshot.then_some(&mut snap))?;
    Ok((out, reports, snap))
}

/// Everything `optimize` prints.
#[derive(Debug, Serialize)]
pub struct OptimizeReport {
    /// The passes that ran, in order.
    pub plan: Vec<String>,
    pub input: String,
    pub output: Option<String>,
    pub recipe: Recipe,
    pub passes: Vec<PassReport>,
    pub before: score::Report,
    pub after: score::Report,
    pub validation: Option<validate::Report>,
    /// `--search`: every plan built and measured, the chosen one marked.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<SearchRow>,
}

/// One plan of `--search`: its budget, what it achieved and what it cost.
#[derive(Debug, Clone, Serialize)]
pub struct SearchRow {
    /// The mean weight width allowed (quantize.avg_bits).
    pub avg_bits: f64,
    /// The parameter-weighted mean weight width of the model built.
    pub mean_bits: f64,
    pub score: f64,
    /// 32-bit parameter and operation units.
    pub params: f64,
    pub ops: f64,
    pub agreement: Option<f64>,
    pub agreement_interval: Option<(f64, f64)>,
    pub top1: Option<f64>,
    /// Whether it passed the accuracy gate.
    pub passed: bool,
    pub chosen: bool,
    /// Build and measurement, wall seconds.
    pub seconds: f64,
}

impl SearchRow {
    pub fn of(
        avg_bits: f64,
        after: &score::Report,
        v: &validate::Report,
        passed: bool,
        seconds: f64,
    ) -> SearchRow {
        SearchRow {
            avg_bits,
            mean_bits: mean_weight_bits(after),
            score: after.score,
            params: after.totals.params,
            ops: after.totals.ops,
            agreement: v.agreement.as_ref().map(|a| a.top1_agreement),
            agreement_interval: v.agreement.as_ref().map(|a| a.top1_agreement_interval),
            top1: v.runs.get(1).and_then(|r| r.top1),
            passed,
            chosen: false,
            seconds,
        }
    }
}

/// The parameter-weighted mean weight width of a scored model: sum over weighted
/// layers of elements x bits / sum of elements (seed 004's avg_bit_weights).
pub fn mean_weight_bits(r: &score::Report) -> f64 {
    let (mut bits, mut n) = (0.0, 0.0);
    for l in &r.layers {
        if let (Some(b), Some(s)) = (l.weight_bits, &l.weight_shape) {
            let k = s.iter().product::<usize>() as f64;
            bits += k * b as f64;
            n += k;
        }
    }
    if n > 0.0 {
        bits / n
    } else {
        0.0
    }
}

/// The `--search` table as text, the chosen plan marked with '*'.
pub fn search_table(rows: &[SearchRow]) -> String {
    let mut s = String::from(
        "\n  search    budget  mean bits    score       params          ops   agreement [95%]     top-1  gate  seconds\n",
    );
    let pct = |x: Option<f64>| x.map_or("-".into(), |x| format!("{:.2}%", 100.0 * x));
    for r in rows {
        let _ = writeln!(
            s,
            "  {:>6} {:>9.2} {:>10.3} {:>8.4} {:>12} {:>12}   {:>7} [{}] {:>9}  {:>4} {:>8.1}",
            if r.chosen { "*" } else { "" },
            r.avg_bits,
            r.mean_bits,
            r.score,
            crate::score::render::si(r.params),
            crate::score::render::si(r.ops),
            pct(r.agreement),
            r.agreement_interval.map_or("-".into(), |(a, b)| format!(
                "{:.1}-{:.1}",
                100.0 * a,
                100.0 * b
            )),
            pct(r.top1),
            if r.passed { "pass" } else { "fail" },
            r.seconds
        );
    }
    s
}

/// The plan a run chose, as a recipe that reproduces it: `recipe` with the
/// allocation's budget (quantize.avg_bits) replaced by one `[[quantize.layer]]`
/// rule per weighted layer pinning the width the written model has (read back by
/// the score). Without a budget, `recipe` itself. A model built by an allocation
/// records this plan in its provenance, so that `optimize --recipe PLAN` writes
/// the same file, byte for byte.
pub fn plan_of(recipe: &Recipe, after: &score::Report) -> Recipe {
    let mut r = recipe.clone();
    if let Some(q) = r.quantize.as_mut() {
        if q.avg_bits.take().is_some() {
            for l in &after.layers {
                if let Some(b) = l.weight_bits.filter(|b| *b < 16) {
                    q.layers.push(crate::passes::quantize::LayerSection {
                        pattern: l.name.clone(),
                        bits: Some(b),
                        ..Default::default()
                    });
                }
            }
        }
    }
    r
}

impl OptimizeReport {
    /// The before/after summary: score, parameters, operations, file size, and
    /// top-1 and agreement with their Wilson 95% intervals when validated. Rows
    /// of [what, before, after, after/before]; the Markdown and HTML renderings
    /// print the same rows.
    pub fn summary_rows(&self) -> Vec<[String; 4]> {
        let (b, a) = (&self.before, &self.after);
        let mut rows = Vec::new();
        let ratio = |x: f64, y: f64| {
            if x != 0.0 {
                format!("{:.3}x", y / x)
            } else {
                "-".into()
            }
        };
        let si = crate::score::render::si;
        rows.push([
            format!("MicroNet score ({:?} track)", a.track),
            format!("{:.4}", b.score),
            format!("{:.4}", a.score),
            ratio(b.score, a.score),
        ]);
        for (what, x, y) in [
            (
                "parameters (32-bit units)",
                b.totals.params,
                a.totals.params,
            ),
            ("operations (32-bit units)", b.totals.ops, a.totals.ops),
            (
                "file bytes",
                b.disk.file_bytes as f64,
                a.disk.file_bytes as f64,
            ),
        ] {
            rows.push([what.to_string(), si(x), si(y), ratio(x, y)]);
        }
        if let Some(v) = &self.validation {
            let pct = |x: Option<f64>, i: Option<(f64, f64)>| match (x, i) {
                (Some(x), Some((lo, hi))) => {
                    format!("{:.2}% [{:.1}-{:.1}]", 100.0 * x, 100.0 * lo, 100.0 * hi)
                }
                (Some(x), None) => format!("{:.2}%", 100.0 * x),
                _ => "-".into(),
            };
            if let (Some(r0), Some(r1)) = (v.runs.first(), v.runs.get(1)) {
                if r0.top1.is_some() {
                    rows.push([
                        format!("top-1 ({} labelled images, 95% interval)", v.labelled),
                        pct(r0.top1, r0.top1_interval),
                        pct(r1.top1, r1.top1_interval),
                        String::new(),
                    ]);
                }
            }
            if let Some(ag) = &v.agreement {
                rows.push([
                    format!(
                        "top-1 agreement with the original ({} images)",
                        v.runs.first().map_or(0, |r| r.images)
                    ),
                    String::new(),
                    pct(Some(ag.top1_agreement), Some(ag.top1_agreement_interval)),
                    String::new(),
                ]);
            }
        }
        rows
    }

    /// The before/after table ([`Self::summary_rows`]) as Markdown, for a pull
    /// request or a paper.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "| {} | before | after | after/before |\n|---|---:|---:|---:|",
            self.output.as_deref().unwrap_or("(not written)")
        );
        for r in self.summary_rows() {
            s.push('|');
            for c in &r {
                s.push_str(&if c.is_empty() {
                    " |".into()
                } else {
                    format!(" {c} |")
                });
            }
            s.push('\n');
        }
        s
    }

    /// When accuracy collapsed (top-1 agreement with the original under 50%, or
    /// top-1 under half the original's), what to try: the layers with the largest
    /// measured output errors and the flags that address the passes that ran.
    pub fn collapse_advice(&self) -> Option<String> {
        let v = self.validation.as_ref()?;
        let agreement = v.agreement.as_ref().map(|a| a.top1_agreement);
        let top1 = |i: usize| v.runs.get(i).and_then(|r| r.top1);
        let halved = matches!((top1(0), top1(1)), (Some(b), Some(a)) if a < 0.5 * b);
        if !(agreement.is_some_and(|a| a < 0.5) || halved) {
            return None;
        }
        let mut s = String::from("accuracy collapsed");
        if let Some(a) = agreement {
            let _ = write!(s, " (top-1 agreement {:.1}%)", 100.0 * a);
        }
        s.push_str(". ");
        let mut errors: Vec<(&str, &crate::passes::LayerError)> = self
            .passes
            .iter()
            .flat_map(|p| p.errors.iter().map(move |e| (p.pass.as_str(), e)))
            .collect();
        errors.sort_by(|a, b| b.1.after.total_cmp(&a.1.after));
        if errors.is_empty() {
            s.push_str("No per-layer errors were measured: calibrate (--calib DATA) for them and for the data-aware methods (GPTQ, SparseGPT, reconstruction).");
        } else {
            s.push_str("Largest relative output errors on the calibration images: ");
            let worst: Vec<String> = errors
                .iter()
                .take(3)
                .map(|(p, e)| format!("{} ({p}, {:.3})", e.layer, e.after))
                .collect();
            s.push_str(&worst.join(", "));
            s.push('.');
        }
        let r = &self.recipe;
        let mut tries: Vec<&str> = Vec::new();
        if r.channels.is_some() {
            tries.push(
                "a lower channel ratio, or channels.skip / [[channels.layer]] for the worst groups",
            );
        }
        if r.prune.is_some() {
            tries.push("a lower sparsity, or --prune sparsegpt:S with --set prune.allocate=network (needs --calib)");
        }
        if r.quantize.is_some() {
            tries.push("more bits for the worst layers (--layer-bits NAME=8), --rounding gptq and --equalize with --calib, --act-order and --calib-mode asymmetric with GPTQ, --weight-range mse");
        }
        if r.act_quant.is_some() {
            tries
                .push("--act-range percentile:99.99 or mse, or --act-bits 16 for the worst inputs");
        }
        if !tries.is_empty() {
            let _ = write!(s, " Try: {}.", tries.join("; "));
        }
        Some(s)
    }

    /// The text report: one line per pass (every change and every node left
    /// alone, with the reason, when `verbose`), the before/after table, accuracy.
    pub fn to_text(&self, verbose: bool) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "plan: {}", self.plan.join(" -> "));
        let mut hidden = 0;
        for p in &self.passes {
            let _ = writeln!(
                s,
                "{} ({:.2} s): {} changed, {} left alone",
                p.pass,
                p.seconds,
                p.changed.len(),
                p.skipped.len()
            );
            if !verbose {
                hidden += p.changed.len() + p.skipped.len();
                continue;
            }
            for c in &p.changed {
                let _ = writeln!(s, "  changed  {}: {}", c.target, c.what);
            }
            for c in &p.skipped {
                let _ = writeln!(s, "  left     {}: {}", c.target, c.what);
            }
        }
        if hidden > 0 {
            let _ = writeln!(
                s,
                "({hidden} per-layer lines: --verbose prints them, --report FILE writes them as JSON)"
            );
        }
        let (b, a) = (&self.before, &self.after);
        let row = |s: &mut String, what: &str, x: f64, y: f64| {
            let ratio = if x != 0.0 {
                format!("{:.3}x", y / x)
            } else {
                "-".to_string()
            };
            let _ = writeln!(
                s,
                "  {what:<22} {:>16} {:>16} {ratio:>10}",
                crate::score::render::si(x),
                crate::score::render::si(y),
            );
        };
        let _ = writeln!(
            s,
            "\n  {:<22} {:>16} {:>16} {:>10}",
            "MicroNet", "before", "after", "after/before"
        );
        row(
            &mut s,
            "params (32-bit units)",
            b.totals.params,
            a.totals.params,
        );
        row(
            &mut s,
            "mults (32-bit units)",
            b.totals.mults,
            a.totals.mults,
        );
        row(&mut s, "adds (32-bit units)", b.totals.adds, a.totals.adds);
        row(&mut s, "ops (32-bit units)", b.totals.ops, a.totals.ops);
        row(
            &mut s,
            "storage bytes (params x 4)",
            b.disk.score_bytes,
            a.disk.score_bytes,
        );
        row(
            &mut s,
            "bytes on disk",
            b.disk.file_bytes as f64,
            a.disk.file_bytes as f64,
        );
        row(
            &mut s,
            "  of which decoders",
            (b.disk.decoder_bytes + b.disk.shared_bytes) as f64,
            (a.disk.decoder_bytes + a.disk.shared_bytes) as f64,
        );
        let _ = writeln!(
            s,
            "  {:<22} {:>16.4} {:>16.4} {:>9.3}x   ({:?} track)",
            "score",
            b.score,
            a.score,
            a.score / b.score,
            a.track
        );
        if let Some(v) = &self.validation {
            let _ = writeln!(s);
            s.push_str(&v.to_text());
        }
        if !self.search.is_empty() {
            s.push_str(&search_table(&self.search));
        }
        if let Some(a) = self.collapse_advice() {
            let _ = writeln!(s, "\n{a}");
        }
        if let Some(o) = &self.output {
            let _ = writeln!(s, "\nwrote {o}");
        }
        s
    }
}
