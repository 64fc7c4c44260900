//! MicroNet scoring, counted from the ONNX file itself.
//!
//! score = params / baseline_params + ops / baseline_ops, where params are 32-bit
//! parameter units (stored bits / 32) and ops are 32-bit operation units (each
//! multiply or add weighted by max(input bits) / 32). The counting follows the
//! organizers' reference code (REF, `micronet_challenge/counting.py`) per ONNX node;
//! the interpretations teams used are options (`../shared/micronet-rules.md` §5).
//!
//! - [`options`]: the counting options, defined once (flags, recipes, JSON);
//! - [`count`]: what each ONNX node costs (bit widths read through `crate::repr`);
//! - [`disk`]: bytes on disk per layer, beside the score's storage;
//! - [`render`]: the terminal table, JSON and Markdown.

pub mod count;
pub mod disk;
pub mod options;
pub mod render;

pub use options::{
    AccMode, Baseline, BnMode, Counting, MaxPool, OutputSize, QuantParams, ScoreOptions,
    SparsePolicy, TernaryMode, Track,
};

use serde::Serialize;

use crate::engine;
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::onnx::Model;

/// One counted ONNX node.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Layer {
    pub name: String,
    pub op_type: String,
    pub output_shape: Vec<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_shape: Option<Vec<usize>>,
    /// Exact zeros / elements of the weight.
    pub sparsity: Option<f64>,
    pub weight_bits: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_scheme: Option<String>,
    /// Bits of the input activation the multiplies read.
    pub act_bits: u32,
    /// Parameter storage in 32-bit units.
    pub params: f64,
    /// Multiplies and adds in 32-bit operation units.
    pub mults: f64,
    pub adds: f64,
    /// Unweighted counts.
    pub raw_mults: f64,
    pub raw_adds: f64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// An op the table does not know: listed, not counted.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Uncounted {
    pub name: String,
    pub op_type: String,
    pub output_elements: usize,
    /// It reads a constant of rank 2 or more (a weight), or is a quantized op.
    pub reads_weight: bool,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Totals {
    pub params: f64,
    pub mults: f64,
    pub adds: f64,
    pub ops: f64,
    pub raw_mults: f64,
    pub raw_adds: f64,
}

/// The scoring report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Every node is counted (no `uncounted` entry).
    pub complete: bool,
    pub model: Option<String>,
    pub track: Track,
    pub baseline: Baseline,
    pub input_shapes: Vec<(String, Vec<usize>)>,
    /// Whether any part is quantized below 16 bits (then no freebie anywhere).
    pub quantized: bool,
    /// Whether the 16-bit freebie was applied.
    pub freebie_applied: bool,
    pub totals: Totals,
    pub score: f64,
    pub score_params: f64,
    pub score_ops: f64,
    pub options: ScoreOptions,
    pub layers: Vec<Layer>,
    pub uncounted: Vec<Uncounted>,
    /// Bytes on disk per layer beside the score's storage ([`disk`]).
    pub disk: disk::DiskReport,
}

/// Scores a loaded model.
pub fn score(model: &Model, opts: &ScoreOptions) -> Result<Report> {
    let g = Graph::new(model.graph())?;
    let inputs = engine::input_shapes(model, &opts.input_shapes)?;
    let shapes = engine::value_shapes(model, &inputs)?;
    let count::Counted {
        layers,
        uncounted,
        quantized,
        freebie_applied,
    } = count::count_graph(&g, &shapes, opts)?;
    // A node that reads a weight, or a quantized op, left out of the count would
    // make the score silently absurd: an error unless asked for.
    let weighty: Vec<String> = uncounted
        .iter()
        .filter(|u| u.reads_weight)
        .map(|u| format!("'{}' ({})", u.name, u.op_type))
        .collect();
    if !weighty.is_empty() && !opts.allow_incomplete && !opts.strict {
        return Err(Error::Usage(format!(
            "the counting table does not know {} node(s) that read a weight or compute on quantized data: {}; \
             the score would leave them out (--allow-incomplete prints it anyway, marked incomplete)",
            weighty.len(),
            weighty.join(", ")
        )));
    }
    if opts.strict && !uncounted.is_empty() {
        let names: Vec<String> = uncounted
            .iter()
            .map(|u| format!("'{}' ({})", u.name, u.op_type))
            .collect();
        return Err(Error::Usage(format!(
            "--strict: the counting table does not know {} node(s): {}",
            names.len(),
            names.join(", ")
        )));
    }
    let mut totals = Totals::default();
    for l in &layers {
        totals.params += l.params;
        totals.mults += l.mults;
        totals.adds += l.adds;
        totals.raw_mults += l.raw_mults;
        totals.raw_adds += l.raw_adds;
    }
    totals.ops = totals.mults + totals.adds;
    let score_params = totals.params / opts.baseline.params;
    let score_ops = totals.ops / opts.baseline.ops;
    let disk = disk::measure(model, &layers)?;
    let complete = uncounted.is_empty();
    Ok(Report {
        complete,
        model: model.path.as_ref().map(|p| p.display().to_string()),
        track: opts.track,
        baseline: opts.baseline,
        input_shapes: inputs.into_iter().map(|i| (i.name, i.shape)).collect(),
        quantized,
        freebie_applied,
        totals,
        score: score_params + score_ops,
        score_params,
        score_ops,
        options: opts.clone(),
        layers,
        disk,
        uncounted,
    })
}
