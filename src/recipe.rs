//! Recipes: which passes `optimize` runs, with per-layer settings, in a TOML file.
//! Each section is owned by its pass (`passes::prune::PruneSection`, ...); the
//! command-line flags ([`Overrides`]) are shorthand for the same settings and win
//! over the file; `--set section.key=value` sets any key, last.
//!
//! ```toml
//! fold_bn = true                 # default
//! storage = "packed"             # packed (default when pruning or quantizing) | float
//!
//! [equalize]                     # passes/equalize.rs; lossless rescaling of layer pairs
//! mode = "auto"                  # auto | cle | smoothquant:0.5 (needs --calib)
//! across_clip = "min"            # min (Relu + per-channel Min, exact) | relu | no
//! skip = []                      # glob patterns on node or weight names
//!
//! [prune]
//! method = "magnitude"           # magnitude | global | nm:2:4 | reweighted | sparsegpt | sparsegpt:2:4
//! sparsity = 0.5
//! skip = ["features.0.*"]        # glob patterns on node or initializer names
//! min_elements = 1000            # default
//! skip_first_conv = true         # default
//! calib_mode = "parallel"        # sparsegpt: parallel | sequential[:K] | asymmetric[:K] (as in [quantize])
//! refit = false                  # least-squares refit of survivors (needs --calib)
//! rounds = 3                     # reweighting rounds
//! allocate = "uniform"           # sparsegpt: uniform | error | network (per-layer sparsities by output error, unweighted or weighted by measured effect on the output; the target overall; chosen on the float model's inputs, then pruned in the stages of a sequential/asymmetric calib_mode)
//! damp = 0.01                    # sparsegpt: ridge of H, fraction of its mean diagonal
//!
//! [channels]                     # passes/prune_channels.rs; structured: whole channels go
//! ratio = 0.3                    # fraction of each group's channels removed
//! criterion = "reconstruction"   # reconstruction (default with --calib) | l1 | l2
//! reconstruct = true             # least-squares refit of the layers reading them (default with --calib)
//! coupled = false                # also groups tied by residual Adds, all members together
//! damp = 0.01                    # ridge, fraction of the mean diagonal of the input covariance
//! multiple = 8                   # kept counts rounded to a multiple (onnxruntime's blocked convs)
//! allocate = "uniform"           # uniform | error (per-group counts by estimated error, same parameters removed)
//! calib_mode = "parallel"        # parallel | sequential[:K] (the pruned model's inputs fit to the original's outputs; asymmetric[:K] = sequential here)
//! skip = ["features.0.*"]        # globs on the roots' node or weight names
//! [[channels.layer]]             # later entries win
//! match = "*features.18*"
//! ratio = 0.1                    # and/or skip = true
//!
//! [[prune.layer]]                # later entries win
//! match = "*classifier*"
//! sparsity = 0.8
//!
//! [quantize]                     # weights (passes/quantize.rs, grids in repr/scheme/)
//! scheme = "linear"              # linear | minmax | log | tanh | fp16 | ternary (rule = twn | msu | ec2t)
//! bits = 8
//! qbn = [9, 8, 8, 6]             # per layer, in layer order (32 = float)
//! per_channel = false            # linear, minmax
//! overflow_rate = 0.0            # fraction of |w| allowed to clip
//! bias_bits = 16                 # optional: biases linear too
//! range = "minmax"               # minmax | mse (linear, minmax grids chosen by their error)
//! rounding = "gptq"              # gptq (default with --calib) | nearest
//! calib_mode = "parallel"        # parallel | sequential[:K] (GPTQ's inputs from the model quantized so far) | asymmetric[:K] (and each layer fit to the float model's output: GPTAQ)
//! act_order = true               # GPTQ's columns by decreasing Hessian diagonal (default false: the weight's order)
//! act_aware = true               # sequential/asymmetric captures run with [act_quant]'s quantizers in place (default true)
//! damp = "auto"                  # GPTQ's ridge of H: "auto" (default: per layer, 2-fold cross-validation) or a fraction of its mean diagonal (0.01)
//! avg_bits = 4.0                 # per-layer bits from 2..8 with this parameter-weighted mean (needs --calib)
//! [[quantize.layer]]             # later entries win
//! match = "*classifier*"
//! bits = 6                       # and/or scheme = "...", skip = true
//!
//! [preprocess]                   # how --calib and --data images are prepared (flags win)
//! preset = "imagenet"            # imagenet | cifar | mnist | raw
//! mean = [0.5, 0.5, 0.5]         # after scaling to 0..1, overriding the preset's
//! std = [0.5, 0.5, 0.5]
//! resize = 297                   # short side before the centre crop (crop fraction = input / resize)
//! # crop_pct = 0.875             # or timm's crop fraction: short side floor(input / crop_pct)
//! interpolation = "bicubic"      # bilinear | bicubic | nearest
//!
//! [act_quant]                    # activations (passes/act_quant.rs; needs --calib)
//! bits = 8                       # 8: QuantizeLinear/DequantizeLinear; 16: float16; else fake-quant
//! range = "maxabs"               # maxabs | percentile:99.99 | mse | minmax | asym-percentile:99.99 | asym-mse
//! overflow_rate = 0.0
//! placement = "inputs"           # inputs (of weighted layers) | outputs
//! keep = 0                       # mixed precision: the K most output-sensitive activations stay 16-bit
//! search = 0                     # rounds of loss-aware range search (search_images = 32)
//! per_channel = false            # one grid per channel (axis 1), symmetric ranges only
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::passes::act_quant::ActQuantSection;
use crate::passes::equalize::EqualizeSection;
use crate::passes::prune::PruneSection;
use crate::passes::prune_channels::ChannelSection;
use crate::passes::quantize::{parse_layer_bits, parse_qbn, QuantizeSection};
use crate::passes::{self, Pipeline};

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Fold BatchNormalization into the preceding layer (default true).
    pub fold_bn: Option<bool>,
    /// Cross-layer equalization / SmoothQuant scaling of layer pairs.
    pub equalize: Option<EqualizeSection>,
    pub prune: Option<PruneSection>,
    /// Structured channel pruning.
    pub channels: Option<ChannelSection>,
    /// Weight quantization.
    pub quantize: Option<QuantizeSection>,
    /// Calibrated activation quantization.
    pub act_quant: Option<ActQuantSection>,
    /// Weight storage: "packed" (bitmask + k-bit codes, decoded by standard ops; the
    /// default when pruning or quantizing) or "float" (dense float32).
    pub storage: Option<String>,
    /// Bias correction after quantization, with calibration data (default true).
    pub bias_correction: Option<bool>,
    /// How calibration and evaluation images are prepared; the `--preprocess`,
    /// `--mean`, `--std`, `--resize` and `--interpolation` flags win over it.
    pub preprocess: Option<PreprocessSection>,
}

/// The `[preprocess]` section: the same settings as the preprocessing flags, so
/// that a recipe reproduces a run, images included (an EfficientNet-Lite recipe
/// carries its mean = std = 0.5).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PreprocessSection {
    /// imagenet | cifar | mnist | raw.
    pub preset: Option<String>,
    /// Per-channel mean subtracted after scaling to 0..1.
    pub mean: Option<Vec<f32>>,
    /// Per-channel standard deviation divided by.
    pub std: Option<Vec<f32>>,
    /// Short side before the centre crop, pixels.
    pub resize: Option<usize>,
    /// Or the crop as a fraction of the resized short side (timm's crop_pct).
    pub crop_pct: Option<f64>,
    /// bilinear | bicubic | nearest.
    pub interpolation: Option<String>,
    /// Calibration images added as transformed copies: "flip" (each image and
    /// its left-right mirror, side by side: twice the calibration rows) or
    /// "none" (the default). Evaluation images are never augmented.
    pub calib_augment: Option<String>,
}

impl PreprocessSection {
    /// Checks the names (preset, interpolation) and the mean/std values.
    pub fn check(&self) -> Result<()> {
        let bad = |k: &str, v: &str, allowed: &str| {
            Error::Usage(format!(
                "recipe [preprocess] {k} = '{v}': expected one of {allowed}"
            ))
        };
        if let Some(p) = &self.preset {
            if !["imagenet", "cifar", "mnist", "raw"].contains(&p.as_str()) {
                return Err(bad("preset", p, "imagenet, cifar, mnist, raw"));
            }
        }
        if let Some(i) = &self.interpolation {
            if !["bilinear", "bicubic", "nearest"].contains(&i.as_str()) {
                return Err(bad("interpolation", i, "bilinear, bicubic, nearest"));
            }
        }
        if let Some(a) = &self.calib_augment {
            if !["none", "flip"].contains(&a.as_str()) {
                return Err(bad("calib_augment", a, "none, flip"));
            }
        }
        if let Some(s) = &self.std {
            if s.iter().any(|x| !(x.is_finite() && *x > 0.0)) {
                return Err(Error::Usage(format!(
                    "recipe [preprocess] std = {s:?}: every value must be finite and positive"
                )));
            }
        }
        if let Some(m) = &self.mean {
            if m.iter().any(|x| !x.is_finite()) {
                return Err(Error::Usage(format!(
                    "recipe [preprocess] mean = {m:?}: every value must be finite"
                )));
            }
        }
        if let Some(p) = self.crop_pct {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::Usage(format!(
                    "recipe [preprocess] crop_pct = {p}: expected a fraction in (0, 1], e.g. 0.875"
                )));
            }
            if self.resize.is_some() {
                return Err(Error::Usage(
                    "recipe [preprocess]: resize and crop_pct both set; keep one".into(),
                ));
            }
        }
        if self.resize == Some(0) {
            return Err(Error::Usage(
                "recipe [preprocess] resize = 0: expected the short side in pixels".into(),
            ));
        }
        Ok(())
    }
}

/// The flags of `optimize` that set recipe keys (clap derives them from this
/// struct). They win over the recipe file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Overrides {
    /// Do not fold BatchNormalization (folding is on by default).
    #[arg(long)]
    pub no_fold_bn: bool,
    /// Calibration augmentation: flip (each calibration image and its left-right
    /// mirror: twice the rows for GPTQ, SparseGPT and the activation ranges, for
    /// datasets whose classes are mirror-symmetric, as ImageNet's are) or none
    /// (the default). Recipe `[preprocess] calib_augment`
    #[arg(long, value_name = "HOW", value_parser = ["none", "flip"])]
    pub calib_augment: Option<String>,
    /// Equalize consecutive layers before quantizing (lossless per-channel rescaling):
    /// cle (data-free, Nagel et al. 2019), smoothquant[:A] (activation ranges from
    /// --calib, Xiao et al. 2023) or auto (the default value: smoothquant:0.5 with
    /// --calib and per-channel weights, else cle).
    #[arg(long, value_name = "MODE", num_args = 0..=1, default_missing_value = "auto")]
    pub equalize: Option<String>,
    /// Prune: magnitude:S (each layer to sparsity S, a fraction or a percentage: 0.5, 50%),
    /// global:S (one threshold), nm:N:M (N of every M kept), reweighted:S (reweighted L1 on
    /// calibration data, needs --calib), sparsegpt:S or sparsegpt:N:M (SparseGPT's OBS
    /// mask and update, needs --calib); or channels:R[:l1|l2|reconstruction] to remove a
    /// fraction R of whole channels (structured; [channels] in a recipe).
    #[arg(long, value_name = "METHOD:SPARSITY")]
    pub prune: Option<String>,
    /// Never prune weights whose node or initializer name matches this glob (repeatable).
    #[arg(long, value_name = "PATTERN")]
    pub prune_skip: Vec<String>,
    /// After pruning, refit the surviving weights by least squares on calibration data (needs --calib).
    #[arg(long)]
    pub refit: bool,
    /// Quantize weights: linear:B, minmax:B, log:B, tanh:B (B bits), fp16, or ternary:twn,
    /// ternary:msu, ternary:ec2t (e.g. --quantize linear:8).
    #[arg(long, value_name = "SCHEME:BITS")]
    pub quantize: Option<String>,
    /// Bits for named layers: NAME=BITS,... (node or weight names, globs allowed;
    /// 16 = float16 storage, 32 = float; NAME=SCHEME[:BITS] sets the layer's scheme too).
    #[arg(long, value_name = "NAME=BITS,..")]
    pub layer_bits: Option<String>,
    /// Bits per weighted layer in layer order (topological order of Conv/ConvTranspose/Gemm/MatMul
    /// with a constant weight), e.g. 9,8,8,6; its length must equal the layer count.
    #[arg(long, value_name = "B,B,..")]
    pub qbn: Option<String>,
    /// One grid per output channel (linear, minmax).
    #[arg(long)]
    pub per_channel: bool,
    /// Choose each layer's weight bits (from 2, 3, 4, 5, 6, 8) so that the mean
    /// weight width, weighted by parameter count, is at most B, minimizing the sum
    /// of the layers' relative output errors on the calibration images (seed 004's
    /// avg_bit_weights budget; needs --calib). Sets quantize.avg_bits.
    #[arg(long, value_name = "B")]
    pub avg_weight_bits: Option<f64>,
    /// Fraction of values allowed to clip when choosing a range (weights and activations; default 0).
    #[arg(long, value_name = "R")]
    pub overflow_rate: Option<f64>,
    /// Quantize biases too (linear, B bits); by default they stay float.
    #[arg(long, value_name = "B")]
    pub bias_bits: Option<u32>,
    /// How weights reach their grid: gptq (GPTQ on the calibration images' layer
    /// inputs; the default with --calib) or nearest.
    #[arg(long, value_name = "HOW", value_parser = ["nearest", "gptq"])]
    pub rounding: Option<String>,
    /// How linear/minmax weight grids are chosen: minmax (span the weights' range,
    /// the default) or mse (the range shrunk to minimize sum |q(w) - w|^2.4, GPTQ's grid search).
    #[arg(long, value_name = "RANGE", value_parser = ["minmax", "mse"])]
    pub weight_range: Option<String>,
    /// Where GPTQ's and SparseGPT's layer inputs come from: parallel (the float
    /// model), sequential[:K] (the model already compressed up to each layer, in
    /// K groups of layers, one model run each) or asymmetric[:K] (as sequential,
    /// each group's first layer fit to the float model's output from the
    /// compressed inputs, GPTAQ; K defaults to one group per layer). With
    /// --act-bits, GPTQ's stages run with the activation quantizers in place
    /// (`--set quantize.act_aware=false` turns that off).
    #[arg(long, value_name = "MODE")]
    pub calib_mode: Option<String>,
    /// GPTQ's dampening of H: auto (the default: each layer's from 0.003 to 1 by
    /// 2-fold cross-validation on the calibration images, the least output error
    /// on the half not fit, or nearest rounding where that errs no more) or a
    /// fixed fraction of its mean diagonal (GPTQ's usual 0.01)
    #[arg(long, value_name = "F|auto")]
    pub gptq_damp: Option<crate::passes::calib::obs::Damp>,
    /// GPTQ's column order: by decreasing Hessian diagonal (GPTQ's act-order:
    /// the inputs carrying the most signal are rounded while the most columns
    /// are left to absorb their error; `--act-order` or `--act-order true`) or
    /// the weight's own order (the default; `--act-order false` overrides a
    /// recipe's true). At 4 bits it is worth using: MobileNetV2 W4A8 per-channel
    /// kept 66% top-1 agreement with it against 58% without (644 held-out photos)
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub act_order: Option<bool>,
    /// No bias correction (by default, with --calib, each quantized layer's bias
    /// absorbs its mean output shift).
    #[arg(long)]
    pub no_bias_correction: bool,
    /// Quantize activations to B bits (8: QuantizeLinear/DequantizeLinear; 16: float16;
    /// else a fake-quant chain), ranges calibrated on --calib.
    #[arg(long, value_name = "B")]
    pub act_bits: Option<u32>,
    /// Activation range: maxabs (with --overflow-rate; power-of-two scales), percentile:P,
    /// mse, or minmax (asymmetric, with a zero point: for shifted ranges like BN after ReLU);
    /// asym-percentile:P (each tail of a signed value clipped at its own percentile) and
    /// asym-mse (lo and hi searched for the least squared error) put signed values on
    /// a zero-point grid with outliers clipped (unsigned ones as percentile:P and mse).
    #[arg(long, value_name = "RANGE")]
    pub act_range: Option<String>,
    /// Mixed-precision activations: the K activations whose --act-bits quantization
    /// alone moves the network's output most (measured on 32 calibration images,
    /// one model run per activation) stay at 16 bits (an int16 grid over their seen range, as TFLite's 16x8 mode).
    #[arg(long, value_name = "K")]
    pub act_keep: Option<usize>,
    /// Loss-aware activation range search: R rounds of coordinate descent on each
    /// activation's scale (x0.5 to x2 of the --act-range grid), keeping the one
    /// with the least network output error on 32 calibration images (LAPQ's
    /// criterion without labels). Costs R x activations x 8 model runs.
    #[arg(long, value_name = "R")]
    pub act_search: Option<usize>,
    /// Per-channel activation grids: each channel (axis 1) of a quantized
    /// activation gets the grid --act-range chooses for that channel's values
    /// alone (symmetric ranges only; written as the float fake-quant chain).
    #[arg(long)]
    pub act_per_channel: bool,
    /// Weight storage: packed (a bitmask over pruned zeros + k-bit codes or float32
    /// values, decoded by standard ONNX ops that runtimes fold at load; the default
    /// when pruning or quantizing) or float (dense float32).
    #[arg(long, value_name = "STORAGE", value_parser = ["packed", "float"])]
    pub storage: Option<String>,
    /// Set any recipe key: SECTION.KEY=VALUE or KEY=VALUE, the value in TOML
    /// (repeatable; applied last, after the file and the flags above). Example:
    /// --set prune.rounds=5 --set 'quantize.skip=["*classifier*"]'
    #[arg(long, value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

impl Recipe {
    /// Reads a recipe; errors name the file and the line.
    pub fn from_file(path: &Path) -> Result<Recipe> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses a recipe; errors name `origin` and the line.
    pub fn from_toml(text: &str, origin: &str) -> Result<Recipe> {
        toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let at = line.map(|l| format!(" line {l}")).unwrap_or_default();
            Error::Usage(format!("{origin}{at}: {}", e.message().trim()))
        })
    }

    /// Every layer pattern of the recipe (skip lists and per-layer rules, from the
    /// file or the flags) with the key it came from.
    pub fn patterns(&self) -> Vec<(&str, &'static str)> {
        let mut out: Vec<(&str, &'static str)> = Vec::new();
        if let Some(e) = &self.equalize {
            out.extend(e.skip.iter().map(|p| (p.as_str(), "equalize.skip")));
        }
        if let Some(c) = &self.channels {
            out.extend(c.skip.iter().map(|p| (p.as_str(), "channels.skip")));
            out.extend(
                c.layers
                    .iter()
                    .map(|l| (l.pattern.as_str(), "[[channels.layer]]")),
            );
        }
        if let Some(p) = &self.prune {
            out.extend(
                p.skip
                    .iter()
                    .map(|p| (p.as_str(), "prune.skip (--prune-skip)")),
            );
            out.extend(
                p.layers
                    .iter()
                    .map(|l| (l.pattern.as_str(), "[[prune.layer]]")),
            );
        }
        if let Some(q) = &self.quantize {
            out.extend(q.skip.iter().map(|p| (p.as_str(), "quantize.skip")));
            out.extend(
                q.layers
                    .iter()
                    .map(|l| (l.pattern.as_str(), "[[quantize.layer]] (--layer-bits)")),
            );
        }
        out
    }

    /// Errors on the first layer pattern that matches no node or initializer name
    /// of the model, naming it, where it came from and the nearest layer names
    /// (Jaro-Winkler similarity to the pattern without its wildcards): a rule that
    /// matches nothing would change nothing without a word.
    pub fn check_patterns(&self, model: &crate::onnx::Model) -> Result<()> {
        let g = crate::graph::Graph::of(model)?;
        let mut names: Vec<String> = (0..g.nodes().len())
            .map(|i| g.node_name(i).to_string())
            .collect();
        // Initializers by name, and copies also by the weight they were copied
        // from (the layer rules match that name too: `select::META_ORIGIN`).
        for t in &model.graph().initializer {
            names.push(t.name().to_string());
            names.extend(crate::passes::select::origin(&g, t.name()).map(str::to_string));
        }
        for (pattern, source) in self.patterns() {
            if crate::passes::select::matches_any(pattern, &names) {
                continue;
            }
            let core: String = pattern
                .chars()
                .filter(|c| !matches!(c, '*' | '?' | '[' | ']' | '\\'))
                .collect();
            let mut layers: Vec<String> = Vec::new();
            for l in crate::graph::weighted_layers(&g) {
                layers.extend(l.nodes.iter().map(|&n| g.node_name(n).to_string()));
                layers.push(l.weight.clone());
            }
            layers.sort();
            layers.dedup();
            let mut scored: Vec<(f64, &String)> = layers
                .iter()
                .map(|n| {
                    (
                        strsim::jaro_winkler(&core.to_lowercase(), &n.to_lowercase()),
                        n,
                    )
                })
                .collect();
            scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
            let nearest: Vec<String> = scored
                .iter()
                .take(3)
                .map(|(_, n)| format!("'{n}'"))
                .collect();
            return Err(Error::Usage(format!(
                "{source} pattern '{pattern}' matches no node or weight of the model; nearest layer names: {}",
                if nearest.is_empty() {
                    "none (the model has no weighted layers)".to_string()
                } else {
                    nearest.join(", ")
                }
            )));
        }
        Ok(())
    }

    /// The pipeline the recipe describes, in the fixed order of [`passes::pipeline`].
    pub fn pipeline(&self) -> Result<Pipeline> {
        // Packed storage is the default whenever something is pruned or quantized.
        let pack = match self.storage.as_deref() {
            Some("packed") => true,
            Some("float") => false,
            None => self.prune.is_some() || self.quantize.is_some(),
            Some(other) => {
                return Err(Error::Usage(format!(
                    "storage '{other}': expected 'packed' (bitmask + k-bit codes) or 'float' (dense float32)"
                )))
            }
        };
        let act_quant = match &self.act_quant {
            Some(s) => Some(passes::act_quant::ActQuantConfig {
                qdq_weights: pack,
                ..s.config()?
            }),
            None => None,
        };
        let quantizing = self.quantize.is_some() || self.act_quant.is_some();
        let per_channel_weights = self
            .quantize
            .as_ref()
            .is_none_or(|q| q.per_channel == Some(true));
        Ok(passes::pipeline(passes::Plan {
            bias_correct: quantizing && self.bias_correction.unwrap_or(true),
            fold_bn: self.fold_bn.unwrap_or(true),
            channels: self
                .channels
                .as_ref()
                .map(ChannelSection::config)
                .transpose()?,
            equalize: self
                .equalize
                .as_ref()
                .map(|e| e.config(per_channel_weights))
                .transpose()?,
            prune: self.prune.as_ref().map(PruneSection::config).transpose()?,
            quantize: self.quantize.as_ref().map(|s| s.config()).transpose()?,
            act_quant,
            pack,
        }))
    }

    /// Applies `--set KEY=VALUE` overrides: each is merged into the recipe's TOML
    /// (a dotted key names a section's key) and the result parsed again, so a bad
    /// key or value is the same error a recipe file gives.
    pub fn set(&mut self, sets: &[String]) -> Result<()> {
        if sets.is_empty() {
            return Ok(());
        }
        let mut doc =
            toml::Table::try_from(&*self).map_err(|e| Error::Usage(format!("recipe: {e}")))?;
        for s in sets {
            let (key, value) = s.split_once('=').ok_or_else(|| {
                Error::Usage(format!(
                    "--set '{s}': expected KEY=VALUE (e.g. prune.rounds=5 or fold_bn=false)"
                ))
            })?;
            // The value in TOML; a bare word is taken as a string.
            let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(value.trim().to_string()));
            let path: Vec<&str> = key.trim().split('.').collect();
            let (last, sections) = path.split_last().expect("split gives one part");
            let mut table = &mut doc;
            for sec in sections {
                let entry = table
                    .entry(sec.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                table = entry.as_table_mut().ok_or_else(|| {
                    Error::Usage(format!("--set '{s}': '{sec}' is not a section"))
                })?;
            }
            table.insert(last.to_string(), value);
        }
        let text = toml::to_string(&doc).map_err(|e| Error::Usage(format!("recipe: {e}")))?;
        *self = toml::from_str(&text)
            .map_err(|e| Error::Usage(format!("--set: {}", e.message().trim())))?;
        Ok(())
    }

    /// Merges the command-line flags into the recipe (flags win; a flag that sets a
    /// key of a section the recipe lacks, other than the section's own flag, is an error).
    pub fn apply(&mut self, o: &Overrides) -> Result<()> {
        if o.no_fold_bn {
            self.fold_bn = Some(false);
        }
        if let Some(a) = &o.calib_augment {
            self.preprocess
                .get_or_insert_with(Default::default)
                .calib_augment = Some(a.clone());
        }
        if let Some(mode) = &o.equalize {
            let old = self.equalize.take().unwrap_or_default();
            self.equalize = Some(EqualizeSection {
                mode: Some(mode.clone()),
                ..old
            });
        }
        if let Some(p) = o
            .prune
            .as_ref()
            .filter(|p| p.trim().starts_with("channels:"))
        {
            let section = ChannelSection::from_flag(p)?;
            let old = self.channels.take().unwrap_or_default();
            self.channels = Some(ChannelSection {
                ratio: section.ratio,
                criterion: section.criterion.or(old.criterion),
                ..old
            });
        } else if let Some(p) = &o.prune {
            let mut section = PruneSection::from_flag(p)?;
            if let Some(old) = self.prune.take() {
                section = PruneSection {
                    method: section.method,
                    sparsity: section.sparsity,
                    ..old
                };
            }
            self.prune = Some(section);
        }
        match self.prune.as_mut() {
            Some(section) => {
                section.skip.extend(o.prune_skip.iter().cloned());
                if o.refit {
                    section.refit = Some(true);
                }
            }
            None if o.refit || !o.prune_skip.is_empty() => {
                return Err(Error::Usage(
                    "--refit and --prune-skip need --prune (or a [prune] section in the recipe)"
                        .into(),
                ))
            }
            None => {}
        }
        if o.storage.is_some() {
            self.storage = o.storage.clone();
        }
        if o.no_bias_correction {
            self.bias_correction = Some(false);
        }
        if let Some(spec) = &o.quantize {
            let mut section = QuantizeSection::from_flag(spec)?;
            if let Some(old) = self.quantize.take() {
                section = QuantizeSection {
                    scheme: section.scheme,
                    bits: section.bits,
                    rule: section.rule,
                    ..old
                };
            }
            self.quantize = Some(section);
        }
        match self.quantize.as_mut() {
            Some(q) => {
                if let Some(b) = &o.layer_bits {
                    q.layers.extend(parse_layer_bits(b)?);
                }
                if let Some(v) = &o.qbn {
                    q.qbn = Some(parse_qbn(v)?);
                }
                if o.per_channel {
                    q.per_channel = Some(true);
                }
                if o.avg_weight_bits.is_some() {
                    q.avg_bits = o.avg_weight_bits;
                }
                if o.overflow_rate.is_some() {
                    q.overflow_rate = o.overflow_rate;
                }
                if o.bias_bits.is_some() {
                    q.bias_bits = o.bias_bits;
                }
                if o.rounding.is_some() {
                    q.rounding = o.rounding.clone();
                }
                if o.gptq_damp.is_some() {
                    q.damp = o.gptq_damp;
                }
                if o.act_order.is_some() {
                    q.act_order = o.act_order;
                }
                if o.weight_range.is_some() {
                    q.range = o.weight_range.clone();
                }
            }
            None if o.layer_bits.is_some()
                || o.qbn.is_some()
                || o.per_channel
                || o.avg_weight_bits.is_some()
                || o.bias_bits.is_some()
                || o.rounding.is_some()
                || o.gptq_damp.is_some()
                || o.act_order.is_some()
                || o.weight_range.is_some() =>
            {
                return Err(Error::Usage(
                    "--layer-bits, --qbn, --per-channel, --avg-weight-bits, --bias-bits, --rounding, --gptq-damp, --act-order and --weight-range need --quantize (or a [quantize] section in the recipe)".into(),
                ));
            }
            None => {}
        }
        if let Some(mode) = &o.calib_mode {
            if self.prune.is_none() && self.quantize.is_none() {
                return Err(Error::Usage(
                    "--calib-mode needs --prune sparsegpt or --quantize (it says where their layer inputs come from)".into(),
                ));
            }
            if let Some(p) = self.prune.as_mut() {
                p.calib_mode = Some(mode.clone());
            }
            if let Some(q) = self.quantize.as_mut() {
                q.calib_mode = Some(mode.clone());
            }
        }
        if let Some(b) = o.act_bits {
            let old = self.act_quant.take().unwrap_or_default();
            self.act_quant = Some(ActQuantSection { bits: b, ..old });
        }
        match self.act_quant.as_mut() {
            Some(a) => {
                if o.act_range.is_some() {
                    a.range = o.act_range.clone();
                }
                if o.overflow_rate.is_some() {
                    a.overflow_rate = o.overflow_rate;
                }
                if o.act_keep.is_some() {
                    a.keep = o.act_keep;
                }
                if o.act_search.is_some() {
                    a.search = o.act_search;
                }
                if o.act_per_channel {
                    a.per_channel = Some(true);
                }
            }
            None if o.act_range.is_some()
                || o.act_keep.is_some()
                || o.act_search.is_some()
                || o.act_per_channel =>
            {
                let flag = if o.act_range.is_some() {
                    "--act-range"
                } else if o.act_keep.is_some() {
                    "--act-keep"
                } else if o.act_search.is_some() {
                    "--act-search"
                } else {
                    "--act-per-channel"
                };
                return Err(Error::Usage(format!(
                    "{flag} needs --act-bits (or an [act_quant] section in the recipe)"
                )));
            }
            None => {}
        }
        // Last: a key set by name refines what the file and the flags made.
        self.set(&o.set)
    }
}
