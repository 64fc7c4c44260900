//! Graph rewrites, one pass a file, each with its math in the header comment, all
//! behind one small trait. A pipeline runs them in order; each pass reports what
//! it changed and what it left alone, and why.
//!
//! Passes edit the `ModelProto` through the helpers in [`crate::graph`] and read it
//! through a fresh [`crate::graph::Graph`] view; the pipeline checks the graph after
//! every pass, so a broken rewrite is caught where it happened.

pub mod act_quant;
pub mod bias_correct;
pub mod calib;
pub mod equalize;
pub mod fold_bn;
pub mod pack;
pub mod prune;
pub mod prune_channels;
pub mod quantize;
pub mod select;

use std::time::Instant;

use serde::Serialize;

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::onnx::Model;

/// The per-layer solver progress callback (what, layers done, layers in all),
/// installed once by the CLI; the library reports nothing by default.
type Progress = Box<dyn Fn(&str, usize, usize) + Send + Sync>;
static SOLVE_PROGRESS: std::sync::OnceLock<Progress> = std::sync::OnceLock::new();

/// Installs the callback the per-layer solvers (GPTQ, SparseGPT, channel
/// reconstruction) report to: `done` of `total` layers of `what` (0 at start).
pub fn set_solve_progress(f: impl Fn(&str, usize, usize) + Send + Sync + 'static) {
    let _ = SOLVE_PROGRESS.set(Box::new(f));
}

/// Reports solver progress to the installed callback, if any.
pub(crate) fn solve_progress(what: &str, done: usize, total: usize) {
    if let Some(f) = SOLVE_PROGRESS.get() {
        f(what, done, total);
    }
}

/// What passes may need besides the model.
#[derive(Default, Clone)]
pub struct Context<'a> {
    /// The model before any lossy pass (after BN folding), set by the pipeline:
    /// what bias correction measures the compressed model against.
    pub reference: Option<&'a Model>,
    /// Calibration images, preprocessed for the model's input (reweighted pruning, activation ranges).
    pub calib: Option<&'a Dataset>,
    /// The model input shape (batch 1) the calibration images were prepared for.
    pub input_shape: Vec<usize>,
    /// Worker threads for tract runs.
    pub threads: usize,
    /// Budget-free work of weight-width allocations, shared by the builds of one
    /// search (see [`quantize::AllocationMemo`]); `None`: computed per build.
    pub memo: Option<&'a quantize::AllocationMemo>,
}

impl Context<'_> {
    /// The model input shape (batch 1) for runs over `data`: the one the pipeline
    /// prepared the images for, else the images' own shape with batch 1.
    pub fn input_shape_for(&self, data: &Dataset) -> Vec<usize> {
        if self.input_shape.is_empty() {
            let mut s = data.images.shape().to_vec();
            s[0] = 1;
            s
        } else {
            self.input_shape.clone()
        }
    }
}

/// One thing a pass did, or did not do.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Item {
    /// The node or tensor concerned.
    pub target: String,
    /// What changed, or why it was left alone.
    pub what: String,
}

/// One layer's relative output error on the calibration rows,
/// sum ||X (W' - W)||^2 / sum ||X W||^2, with round-to-nearest and with the
/// method the pass used. For a method labelled "asymmetric" (GPTQ with
/// `calib_mode = "asymmetric"`) it is the error against the float model's
/// output instead, sum ||X~ W' - X W||^2 / sum ||X W||^2 with X~ the compressed
/// model's inputs to the layer: it includes the error its inputs carry.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LayerError {
    pub layer: String,
    pub method: String,
    pub nearest: f64,
    pub after: f64,
}

/// One activation quantizer's calibrated range (act-quant): the smallest and
/// largest value the calibration images produced, and the range its grid
/// represents, [lowest level, highest level] x scale (values outside it clip).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ActRange {
    pub value: String,
    pub bits: u32,
    pub seen_min: f64,
    pub seen_max: f64,
    pub grid_min: f64,
    pub grid_max: f64,
}

/// A pass's account of its run.
#[derive(Debug, Clone, Serialize)]
pub struct PassReport {
    pub pass: String,
    pub changed: Vec<Item>,
    pub skipped: Vec<Item>,
    pub seconds: f64,
    /// Per-layer output errors, where calibration data measured them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<LayerError>,
    /// Calibrated activation ranges (act-quant with calibration images).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<ActRange>,
}

impl PassReport {
    pub fn new(pass: &str) -> Self {
        PassReport {
            pass: pass.to_string(),
            changed: Vec::new(),
            skipped: Vec::new(),
            seconds: 0.0,
            errors: Vec::new(),
            ranges: Vec::new(),
        }
    }

    pub fn changed(&mut self, target: impl Into<String>, what: impl Into<String>) {
        self.changed.push(Item {
            target: target.into(),
            what: what.into(),
        });
    }

    pub fn skipped(&mut self, target: impl Into<String>, why: impl Into<String>) {
        self.skipped.push(Item {
            target: target.into(),
            what: why.into(),
        });
    }
}

/// A graph rewrite.
pub trait Pass {
    /// Short name, as in recipes and reports ("fold-bn", "prune").
    fn name(&self) -> &'static str;
    /// Rewrites the model in place and reports what it did.
    fn run(&self, model: &mut Model, cx: &Context) -> Result<PassReport>;
    /// Whether the pass keeps the model's function (BN folding, equalization): bias
    /// correction's reference is the model after the lossless passes.
    fn lossless(&self) -> bool {
        false
    }
    /// Whether bias correction's reference is taken after this pass: after the
    /// lossless passes, and after the passes whose changes are not compression
    /// error of the layers (channel pruning reshapes them and refits its own;
    /// equalization rescales them), so reference and compressed weights compare
    /// layer by layer.
    fn reference_after(&self) -> bool {
        self.lossless()
    }
}

/// Passes in order.
#[derive(Default)]
pub struct Pipeline {
    pub passes: Vec<Box<dyn Pass>>,
}

impl Pipeline {
    /// Runs every pass, timing each and checking the graph after it. Before IR 4,
    /// every initializer a pass adds is also listed as a graph input (that version's
    /// rule), and inputs naming initializers it removed are dropped.
    pub fn run(&self, model: &mut Model, cx: &Context) -> Result<Vec<PassReport>> {
        self.run_with_snapshot(model, cx, None)
    }

    /// [`Self::run`], and when `snapshot` is given, a copy of the model as the
    /// first lossy pass receives it (after BN folding and equalization: the float
    /// weights the compression starts from; the HTML report's "before" histograms).
    pub fn run_with_snapshot(
        &self,
        model: &mut Model,
        cx: &Context,
        mut snapshot: Option<&mut Option<Model>>,
    ) -> Result<Vec<PassReport>> {
        let mut reports = Vec::new();
        let ir = model.proto.ir_version();
        let mut reference: Option<Model> = None;
        for pass in &self.passes {
            // The reference: the model as it is when the first lossy pass starts. Only
            // bias correction reads it, and only with calibration images: without
            // them the (model-sized) copy is not made.
            let wanted = cx.calib.is_some_and(|d| !d.is_empty());
            if wanted && !pass.reference_after() && reference.is_none() && cx.reference.is_none() {
                reference = Some(model.clone());
            }
            if let Some(snap) = snapshot.as_deref_mut() {
                if !pass.lossless() && snap.is_none() {
                    *snap = Some(model.clone());
                }
            }
            let cx = Context {
                reference: cx.reference.or(reference.as_ref()),
                ..cx.clone()
            };
            let cx = &cx;
            let start = Instant::now();
            let before: std::collections::HashSet<String> = model
                .graph()
                .initializer
                .iter()
                .map(|t| t.name().to_string())
                .collect();
            let mut report = pass.run(model, cx)?;
            if ir < 4 {
                let (added, removed) =
                    crate::graph::edit::keep_initializers_listed(model.graph_mut(), &before);
                if added + removed > 0 {
                    report.changed(
                        "graph inputs",
                        format!(
                            "IR {ir}: every initializer is also a graph input; {added} listed, {removed} dropped with their initializers"
                        ),
                    );
                }
            }
            report.seconds = start.elapsed().as_secs_f64();
            let graph = model.graph();
            Graph::new(graph)
                .map_err(|e| Error::Graph(format!("after pass '{}': {e}", pass.name())))?;
            reports.push(report);
        }
        Ok(reports)
    }

    /// The pass names, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.passes.iter().map(|p| p.name()).collect()
    }
}

/// What a pipeline runs: each pass's configuration (`None` / `false`: not run).
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub fold_bn: bool,
    /// Structured channel pruning (before everything that reads weights).
    pub channels: Option<prune_channels::ChannelConfig>,
    pub equalize: Option<equalize::EqualizeConfig>,
    pub prune: Option<prune::PruneConfig>,
    pub quantize: Option<quantize::QuantConfig>,
    pub act_quant: Option<act_quant::ActQuantConfig>,
    /// Empirical bias correction after the quantizers (needs calibration data).
    pub bias_correct: bool,
    pub pack: bool,
}

/// The passes in the order they run: fold-bn, prune-channels, equalize, prune, quantize,
/// act-quant, bias-correct, pack.
/// A new pass is one line here.
pub fn pipeline(plan: Plan) -> Pipeline {
    let mut p = Pipeline::default();
    if plan.fold_bn {
        p.passes.push(Box::new(fold_bn::FoldBatchNorm));
    }
    if let Some(c) = plan.channels {
        p.passes.push(Box::new(prune_channels::PruneChannels(c)));
    }
    if let Some(c) = plan.equalize {
        p.passes.push(Box::new(equalize::Equalize(c)));
    }
    if let Some(mut c) = plan.prune {
        if c.act_aware {
            c.act_sim.clone_from(&plan.act_quant);
        }
        p.passes.push(Box::new(prune::Prune(c)));
    }
    if let Some(mut c) = plan.quantize {
        if c.act_aware {
            c.act_sim.clone_from(&plan.act_quant);
        }
        p.passes.push(Box::new(quantize::Quantize(c)));
    }
    if let Some(c) = plan.act_quant {
        p.passes.push(Box::new(act_quant::ActQuant(c)));
    }
    if plan.bias_correct {
        p.passes.push(Box::new(bias_correct::BiasCorrect));
    }
    if plan.pack {
        p.passes.push(Box::new(pack::Pack));
    }
    p
}
