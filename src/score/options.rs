//! The counting options: every interpretation that decides a count
//! (micronet-rules.md section 5), defined once. [`Counting`] is what a user gives
//! (the flags of `score` and `optimize`, derived from this struct); [`ScoreOptions`]
//! is what the count runs with, resolved for a model ([`Counting::resolve`]: the
//! track inferred when not given, the baseline and the activation table filled
//! in). Adding an option: a field in both, its line in `resolve`, and its rule in
//! `count.rs`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::count;
use crate::engine;
use crate::error::{Error, Result};
use crate::onnx::Model;

/// The challenge tracks and their baselines (RULES, "Ranking Entries").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
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
            .map(|i| &i.shape)
            .and_then(|s| (s.len() == 4).then(|| s[2].min(s[3])));
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TernaryMode {
    /// MSUNet: a sparse +-1 weight (mask bit + sign bit per nonzero), sign-flip multiplies at 1/32, one scale multiply per output.
    SparseBinaryPlusScale,
    /// HHI (EC2T): two bitmasks and two centroids, two multiplies per output.
    TwoMasksTwoCentroids,
}

/// How BatchNormalization is counted (rules §5.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
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
    /// Scales and zero points of quantized weights and activations count as
    /// parameters (rules section 2.1: any values needed for inference).
    pub quant_params: bool,
    /// Leave uncounted weighted or quantized ops listed instead of failing.
    pub allow_incomplete: bool,
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
            quant_params: true,
            allow_incomplete: false,
            track_inferred: None,
        }
    }
}

/// Max pooling comparisons (rules section 3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MaxPool {
    /// k*k - 1 comparisons per output, counted as multiplies like REF's relu.
    Counted,
    /// Not counted.
    Free,
}

/// The counting options as given: the flags of `score` and `optimize` (clap derives
/// them from this struct) and the recipe's `[score]` section.
#[derive(Debug, Clone, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields, default)]
pub struct Counting {
    /// Challenge track: its baseline normalizes the score.
    /// cifar100 = WideResNet-28-10 (36.5M params, 10.49B ops); imagenet = MobileNetV2-1.4 (6.9M, 1170M).
    /// Default: imagenet for inputs from 128 px or 1000 classes, else cifar100 (the report says so).
    #[arg(long, value_enum)]
    pub track: Option<Track>,
    /// Custom baseline parameter count (overrides the track's).
    #[arg(long, value_name = "N")]
    pub baseline_params: Option<f64>,
    /// Custom baseline operation count (overrides the track's).
    #[arg(long, value_name = "N")]
    pub baseline_ops: Option<f64>,
    /// Input shape, comma-separated (repeat for several inputs, in order). Default: the
    /// declared shape with a symbolic batch set to 1. Example: --input-shape 1,3,224,224
    #[arg(long, value_name = "DIMS", value_parser = parse_shape)]
    pub input_shape: Vec<Vec<usize>>,
    /// Count an unquantized model at 32 bits instead of taking the 16-bit freebie.
    #[arg(long)]
    pub no_freebie: bool,
    /// Conv/FC accumulation adds: fp32 (REF), fp16, tree (integer adder tree, 2n, 2n+1, ...
    /// bits per level; integer layers only), fixed-int (every add as wide as the widest level).
    #[arg(long, value_enum, default_value = "fp32")]
    pub accumulation: AccMode,
    /// Bits of element-wise adds (bias, residual, BN, pooling and activation adds).
    #[arg(long, value_name = "BITS", default_value_t = 32, value_parser = parse_add_bits)]
    pub elementwise_add_bits: u32,
    /// Ternary weights: sparse-binary-plus-scale (MSUNet) or two-masks-two-centroids (EC2T).
    #[arg(long, value_enum, default_value = "sparse-binary-plus-scale")]
    pub ternary_mode: TernaryMode,
    /// BatchNormalization: fold-bias (NB), fold-mul-only (MSU3), unfolded (MSU1), ignore, scale-bias-fp16 (RIAIR).
    #[arg(long, value_enum, default_value = "fold-bias")]
    pub bn_mode: BnMode,
    /// Per-element cost of an activation op, overriding the table: OP=MULTS,ADDS
    /// (repeatable). Example: --act-cost HardSwish=3,1
    #[arg(long, value_name = "OP=M,A", value_parser = parse_act_cost)]
    pub act_cost: Vec<(String, (f64, f64))>,
    /// Sparse weight storage: mask-if-any-zero (REF), min (cheaper of dense and masked),
    /// threshold:T (mask at sparsity >= T, e.g. threshold:0.5 as MSUNet-v1).
    #[arg(long, value_name = "POLICY", default_value = "mask-if-any-zero")]
    pub sparse_storage: SparsePolicy,
    /// Output sizes: graph (tract's shapes) or ref (REF's conv formula, for parity checks).
    #[arg(long, value_enum, default_value = "graph")]
    pub output_size: OutputSize,
    /// Max pooling comparisons: counted (k*k-1 per output, as multiplies like REF's relu) or free.
    #[arg(long, value_name = "HOW", value_enum, default_value = "counted")]
    pub max_pool: MaxPool,
    /// Fail when a node's op is not in the counting table (default: list it as
    /// uncounted, unless it reads a weight or is a quantized op: those always fail,
    /// see --allow-incomplete).
    #[arg(long)]
    pub strict: bool,
    /// Scales and zero points of quantized weights and activations: counted as
    /// parameters (the rules: any values needed to perform inference) or free (REF).
    #[arg(long, value_name = "HOW", value_enum, default_value = "counted")]
    pub quant_params: QuantParams,
    /// Print the score even when a node that reads a weight, or a quantized op, is
    /// not in the counting table (the report then says the count is incomplete).
    #[arg(long)]
    pub allow_incomplete: bool,
}

/// Whether quantization scales and zero points count as parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum QuantParams {
    Counted,
    Free,
}

impl Default for Counting {
    /// The defaults of the flags: REF's counting, the track inferred.
    fn default() -> Self {
        Counting {
            track: None,
            baseline_params: None,
            baseline_ops: None,
            input_shape: Vec::new(),
            no_freebie: false,
            accumulation: AccMode::Fp32,
            elementwise_add_bits: 32,
            ternary_mode: TernaryMode::SparseBinaryPlusScale,
            bn_mode: BnMode::FoldBias,
            act_cost: Vec::new(),
            sparse_storage: SparsePolicy::MaskIfAnyZero,
            output_size: OutputSize::Graph,
            max_pool: MaxPool::Counted,
            strict: false,
            quant_params: QuantParams::Counted,
            allow_incomplete: false,
        }
    }
}

impl Counting {
    /// The counting options for `model`; the track, when not given, is inferred from
    /// the model ([`Track::infer`]; the report says so).
    pub fn resolve(&self, model: &Model) -> Result<ScoreOptions> {
        if !matches!(self.elementwise_add_bits, 16 | 32) {
            return Err(Error::Usage(format!(
                "elementwise_add_bits {}: element-wise add bits are 32 or 16",
                self.elementwise_add_bits
            )));
        }
        let (track, inferred) = match self.track {
            Some(t) => (t, None),
            None => {
                let (t, why) = Track::infer(model, &self.input_shape)?;
                (t, Some(why))
            }
        };
        let mut o = ScoreOptions {
            track,
            track_inferred: inferred,
            baseline: track.baseline(),
            input_shapes: self.input_shape.clone(),
            freebie: !self.no_freebie,
            accumulation: self.accumulation,
            elementwise_add_bits: self.elementwise_add_bits,
            ternary: self.ternary_mode,
            bn: self.bn_mode,
            sparse_storage: self.sparse_storage,
            output_size: self.output_size,
            count_max_pool: self.max_pool == MaxPool::Counted,
            strict: self.strict,
            quant_params: self.quant_params == QuantParams::Counted,
            allow_incomplete: self.allow_incomplete,
            ..ScoreOptions::default()
        };
        if let Some(p) = self.baseline_params {
            o.baseline.params = p;
        }
        if let Some(p) = self.baseline_ops {
            o.baseline.ops = p;
        }
        for (op, cost) in &self.act_cost {
            o.activations.insert(op.clone(), *cost);
        }
        Ok(o)
    }
}

/// `--input-shape 1,3,32,32`.
pub fn parse_shape(s: &str) -> std::result::Result<Vec<usize>, String> {
    s.split(',')
        .map(|d| {
            d.trim()
                .parse::<usize>()
                .map_err(|_| format!("'{s}': expected comma-separated dims, e.g. 1,3,32,32"))
        })
        .collect()
}

fn parse_act_cost(s: &str) -> std::result::Result<(String, (f64, f64)), String> {
    let err = || format!("'{s}': expected OP=MULTS,ADDS, e.g. HardSwish=3,1");
    let (op, cost) = s.split_once('=').ok_or_else(err)?;
    let (m, a) = cost.split_once(',').ok_or_else(err)?;
    Ok((
        op.to_string(),
        (
            m.trim().parse().map_err(|_| err())?,
            a.trim().parse().map_err(|_| err())?,
        ),
    ))
}

fn parse_add_bits(s: &str) -> std::result::Result<u32, String> {
    match s {
        "32" => Ok(32),
        "16" => Ok(16),
        _ => Err(format!("'{s}': element-wise add bits are 32 or 16")),
    }
}

impl<'de> Deserialize<'de> for SparsePolicy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
