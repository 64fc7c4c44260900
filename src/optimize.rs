//! `optimize`: run a recipe's passes on a model, score before and after, and
//! (given labelled data) measure what it cost in accuracy.

use std::fmt::Write as _;

use serde::Serialize;

use crate::error::Result;
use crate::onnx::Model;
use crate::passes::{Context, PassReport};
use crate::recipe::Recipe;
use crate::score::{self, ScoreOptions};
use crate::validate;

/// Runs the recipe's pipeline on a copy of the model.
pub fn run(model: &Model, recipe: &Recipe, cx: &Context) -> Result<(Model, Vec<PassReport>)> {
    let pipeline = recipe.pipeline()?;
    let mut out = model.clone();
    let reports = pipeline.run(&mut out, cx)?;
    Ok((out, reports))
}

/// Everything `optimize` prints.
#[derive(Debug, Serialize)]
pub struct OptimizeReport {
    pub input: String,
    pub output: Option<String>,
    pub recipe: Recipe,
    pub passes: Vec<PassReport>,
    pub before: score::Report,
    pub after: score::Report,
    pub validation: Option<validate::Report>,
}

/// Scores both models with the same options.
pub fn scores(
    before: &Model,
    after: &Model,
    opts: &ScoreOptions,
) -> Result<(score::Report, score::Report)> {
    Ok((score::score(before, opts)?, score::score(after, opts)?))
}

impl OptimizeReport {
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        for p in &self.passes {
            let _ = writeln!(
                s,
                "{} ({:.2} s): {} changed, {} left alone",
                p.pass,
                p.seconds,
                p.changed.len(),
                p.skipped.len()
            );
            for c in &p.changed {
                let _ = writeln!(s, "  changed  {}: {}", c.target, c.what);
            }
            for c in &p.skipped {
                let _ = writeln!(s, "  left     {}: {}", c.target, c.what);
            }
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
        if let Some(o) = &self.output {
            let _ = writeln!(s, "\nwrote {o}");
        }
        s
    }
}
