//! MicroNet scoring, counted from the ONNX file itself.
//!
//! score = params / baseline_params + ops / baseline_ops, where params are 32-bit
//! parameter units (stored bits / 32) and ops are 32-bit operation units (each
//! multiply or add weighted by max(input bits) / 32). The counting follows the
//! organizers' reference code (REF, `micronet_challenge/counting.py`) per ONNX node;
//! the interpretations teams used are options (`../shared/micronet-rules.md` §5).
//!
//! - [`bits`]: bit widths read from the model (the one place representations are read);
//! - [`count`]: what each ONNX node costs;
//! - [`render`]: the terminal table, JSON and Markdown.

pub mod bits;
pub mod count;
pub mod render;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::engine;
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::onnx::Model;

/// The challenge tracks and their baselines (RULES, "Ranking Entries").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Track {
    /// CIFAR-100, normalized by WideResNet-28-10: 36.5M params, 10.49B ops.
    Cifar100,
    /// ImageNet, normalized by MobileNetV2-1.4: 6.9M params, 1170M ops.
    Imagenet,
}

impl Track {
    pub fn baseline(self) -> Baseline {
        match self {
            Track::Cifar100 => Baseline {
                params: 36.5e6,
                ops: 10.49e9,
            },
            Track::Imagenet => Baseline {
                params: 6.9e6,
                ops: 1170e6,
            },
        }
    }
}

impl Track {
    /// The track a model was most likely made for, and why: ImageNet when its
    /// (first) input is at least 128 pixels high or it has 1000 (or 1001) classes,
    /// else CIFAR-100 (the challenge's 32 x 32 track).
    pub fn infer(model: &Model, input_shapes: &[Vec<usize>]) -> Result<(Track, String)> {
        let inputs = engine::input_shapes(model, input_shapes)?;
        let height = inputs
            .first()
            .and_then(|(_, s, _)| (s.len() == 4).then(|| s[2].min(s[3])));
        let classes = model
            .graph()
            .output
            .first()
            .and_then(crate::graph::declared_shape)
            .and_then(|d| d.last().copied().flatten());
        Ok(match (height, classes) {
            (Some(h), _) if h >= 128 => (Track::Imagenet, format!("input {h} px high")),
            (_, Some(c @ (1000 | 1001))) => (Track::Imagenet, format!("{c} classes")),
            (Some(h), _) => (Track::Cifar100, format!("input {h} px high")),
            _ => (Track::Cifar100, "no image input shape to go by".to_string()),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Baseline {
    pub params: f64,
    pub ops: f64,
}

/// How conv / fully-connected accumulation adds are counted (rules §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AccMode {
    /// Every add at 32 bits (REF, the rules' default).
    Fp32,
    /// Every accumulation add at 16 bits.
    Fp16,
    /// Integer adder tree over each output channel's nonzeros, one bit wider per level (2n, 2n+1, ...).
    Tree,
    /// Every add as wide as the widest adder tree level of the layer.
    FixedInt,
}

/// How ternary weights are counted (rules §5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TernaryMode {
    /// MSUNet: a sparse +-1 weight (mask bit + sign bit per nonzero), sign-flip multiplies at 1/32, one scale multiply per output.
    SparseBinaryPlusScale,
    /// HHI (EC2T): two bitmasks and two centroids, two multiplies per output.
    TwoMasksTwoCentroids,
}

/// How BatchNormalization is counted (rules §5.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BnMode {
    /// Folded into the preceding layer as one bias: C params, one add per element (NB).
    FoldBias,
    /// Only the multiply folds: C params, one add per element, even when the layer has a bias (MSU3).
    FoldMulOnly,
    /// C params, one multiply and one add per element (MSU1).
    Unfolded,
    /// Not counted.
    Ignore,
    /// Per layer (2C+1) 16-bit params, one 16-bit multiply and add per element (RIAIR).
    ScaleBiasFp16,
}

/// When a weight with zeros is stored sparse (values + one-bit mask) (rules §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SparsePolicy {
    /// Mask whenever the tensor has any zero (REF).
    MaskIfAnyZero,
    /// The cheaper of dense and masked.
    Min,
    /// Mask only at or above this sparsity (MSU1: 0.5, MSU3: 0.4).
    Threshold(f64),
}

impl std::str::FromStr for SparsePolicy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "mask-if-any-zero" => Ok(SparsePolicy::MaskIfAnyZero),
            "min" => Ok(SparsePolicy::Min),
            _ => match s.strip_prefix("threshold:").map(str::parse::<f64>) {
                Some(Ok(t)) if (0.0..=1.0).contains(&t) => Ok(SparsePolicy::Threshold(t)),
                _ => Err(format!(
                    "'{s}': expected mask-if-any-zero, min, or threshold:T with T in [0, 1]"
                )),
            },
        }
    }
}

/// Where output sizes come from (rules §3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OutputSize {
    /// The shapes tract infers for the graph.
    Graph,
    /// REF's formula for convolutions: ceil((in - k + 1 + 2 pad) / stride), pad = k/2 for 'same'.
    Ref,
}

/// Everything that decides a count.
#[derive(Debug, Clone, Serialize)]
pub struct ScoreOptions {
    pub track: Track,
    pub baseline: Baseline,
    /// Input shapes by position (default: declared, symbolic batch -> 1).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub input_shapes: Vec<Vec<usize>>,
    /// Allow the 16-bit freebie for unquantized models (params 16, mults 16, adds 32).
    pub freebie: bool,
    pub accumulation: AccMode,
    /// Bits of element-wise adds (bias, residual, BN, pooling, activation adds).
    pub elementwise_add_bits: u32,
    pub ternary: TernaryMode,
    pub bn: BnMode,
    /// Per-element (mults, adds) of activation ops, defaults merged with overrides.
    pub activations: BTreeMap<String, (f64, f64)>,
    pub sparse_storage: SparsePolicy,
    pub output_size: OutputSize,
    /// Comparisons of max pooling counted as (k*k - 1) multiplies per output (like REF's relu), or free.
    pub count_max_pool: bool,
    /// An op the table does not know is an error instead of a listed omission.
    pub strict: bool,
    /// Why the track was chosen when it was inferred ([`Track::infer`]), not given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub track_inferred: Option<String>,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        ScoreOptions {
            track: Track::Cifar100,
            baseline: Track::Cifar100.baseline(),
            input_shapes: Vec::new(),
            freebie: true,
            accumulation: AccMode::Fp32,
            elementwise_add_bits: 32,
            ternary: TernaryMode::SparseBinaryPlusScale,
            bn: BnMode::FoldBias,
            activations: count::default_activation_table(),
            sparse_storage: SparsePolicy::MaskIfAnyZero,
            output_size: OutputSize::Graph,
            count_max_pool: true,
            strict: false,
            track_inferred: None,
        }
    }
}

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
    /// Bytes on disk per layer beside the score's storage (`passes/pack/disk.rs`).
    pub disk: crate::passes::pack::disk::DiskReport,
}

/// Scores a loaded model.
pub fn score(model: &Model, opts: &ScoreOptions) -> Result<Report> {
    let g = Graph::new(model.graph())?;
    let inputs = engine::input_shapes(model, &opts.input_shapes)?;
    let shapes = engine::value_shapes(model, &inputs)?;
    let (layers, uncounted, quantized, freebie_applied) = count::count_graph(&g, &shapes, opts)?;
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
    let disk = crate::passes::pack::disk::measure(model, &layers)?;
    Ok(Report {
        model: model.path.as_ref().map(|p| p.display().to_string()),
        track: opts.track,
        baseline: opts.baseline,
        input_shapes: inputs.into_iter().map(|(n, s, _)| (n, s)).collect(),
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
