//! Recipes: which passes `optimize` runs, with per-layer settings, in a TOML file.
//! The command-line flags are shorthand for the same settings and win over the file.
//!
//! ```toml
//! fold_bn = true                 # default
//! storage = "packed"             # packed (default when pruning or quantizing) | float
//!
//! [prune]
//! method = "magnitude"           # magnitude | global | nm:2:4 | reweighted
//! sparsity = 0.5
//! skip = ["features.0.*"]        # glob patterns on node or initializer names
//! min_elements = 1000            # default
//! skip_first_conv = true         # default
//! refit = false                  # least-squares refit of survivors (needs --calib)
//! rounds = 3                     # reweighting rounds
//!
//! [[prune.layer]]                # later entries win
//! match = "*classifier*"
//! sparsity = 0.8
//!
//! [quantize]                     # weights (passes/quantize/)
//! scheme = "linear"              # linear | minmax | log | tanh | ternary (rule = twn | msu | ec2t)
//! bits = 8
//! qbn = [9, 8, 8, 6]             # per layer, in layer order (32 = float)
//! per_channel = false            # linear, minmax
//! overflow_rate = 0.0            # fraction of |w| allowed to clip
//! bias_bits = 16                 # optional: biases linear too
//! [[quantize.layer]]             # later entries win
//! match = "*classifier*"
//! bits = 6                       # and/or scheme = "...", skip = true
//!
//! [act_quant]                    # activations (passes/act_quant.rs; needs --calib)
//! bits = 8                       # 8: QuantizeLinear/DequantizeLinear; else fake-quant
//! range = "maxabs"               # maxabs | percentile:99.99 | mse
//! overflow_rate = 0.0
//! placement = "inputs"           # inputs (of weighted layers) | outputs
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::passes::act_quant::{ActQuant, ActQuantSection};
use crate::passes::fold_bn::FoldBatchNorm;
use crate::passes::pack::Pack;
use crate::passes::prune::{LayerRule, Method, Prune, PruneConfig};
use crate::passes::quantize::{Quantize, QuantizeSection};
use crate::passes::Pipeline;

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Fold BatchNormalization into the preceding layer (default true).
    pub fold_bn: Option<bool>,
    pub prune: Option<PruneSection>,
    /// Weight quantization.
    pub quantize: Option<QuantizeSection>,
    /// Calibrated activation quantization.
    pub act_quant: Option<ActQuantSection>,
    /// Weight storage: "packed" (bitmask + k-bit codes, decoded by standard ops; the
    /// default when pruning or quantizing) or "float" (dense float32).
    pub storage: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PruneSection {
    pub method: String,
    pub sparsity: Option<f64>,
    #[serde(default)]
    pub skip: Vec<String>,
    pub min_elements: Option<usize>,
    pub skip_first_conv: Option<bool>,
    pub refit: Option<bool>,
    pub rounds: Option<usize>,
    #[serde(default, rename = "layer")]
    pub layers: Vec<LayerSection>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSection {
    #[serde(rename = "match")]
    pub pattern: String,
    pub sparsity: Option<f64>,
    pub skip: Option<bool>,
}

impl Recipe {
    /// Reads a recipe; errors name the file and the line.
    pub fn from_file(path: &Path) -> Result<Recipe> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let at = line.map(|l| format!(" line {l}")).unwrap_or_default();
            Error::Usage(format!("{}{at}: {}", path.display(), e.message().trim()))
        })
    }

    /// The pipeline the recipe describes, in the fixed order fold-bn, prune, quantize, act-quant.
    pub fn pipeline(&self) -> Result<Pipeline> {
        let mut p = Pipeline::default();
        if self.fold_bn.unwrap_or(true) {
            p.passes.push(Box::new(FoldBatchNorm));
        }
        if let Some(s) = &self.prune {
            p.passes.push(Box::new(Prune(s.config()?)));
        }
        if let Some(s) = &self.quantize {
            p.passes.push(Box::new(Quantize(s.config()?)));
        }
        if let Some(s) = &self.act_quant {
            p.passes.push(Box::new(ActQuant(s.config()?)));
        }
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
        if pack {
            p.passes.push(Box::new(Pack));
        }
        Ok(p)
    }
}

impl PruneSection {
    /// Parses the `--prune METHOD:SPARSITY` shorthand ("magnitude:0.5", "nm:2:4").
    pub fn from_flag(s: &str) -> Result<PruneSection> {
        let bad = || {
            Error::Usage(format!(
                "--prune '{s}': expected METHOD:SPARSITY (magnitude:0.5, global:0.7, reweighted:0.5) or nm:N:M"
            ))
        };
        if s.starts_with("nm:") {
            return Ok(PruneSection {
                method: s.to_string(),
                ..Default::default()
            });
        }
        let (method, sparsity) = s.rsplit_once(':').ok_or_else(bad)?;
        let sparsity: f64 = sparsity.parse().map_err(|_| bad())?;
        Ok(PruneSection {
            method: method.to_string(),
            sparsity: Some(sparsity),
            ..Default::default()
        })
    }

    fn config(&self) -> Result<PruneConfig> {
        let method: Method = self
            .method
            .parse()
            .map_err(|e| Error::Usage(format!("prune method '{}': {e}", self.method)))?;
        let defaults = PruneConfig::default();
        let sparsity = match (&method, self.sparsity) {
            (Method::NM { .. }, _) => 0.0,
            (_, Some(s)) if (0.0..1.0).contains(&s) => s,
            (_, Some(s)) => {
                return Err(Error::Usage(format!(
                    "prune sparsity {s}: must be in [0, 1)"
                )))
            }
            (_, None) => {
                return Err(Error::Usage(format!(
                    "prune method '{}' needs a sparsity",
                    self.method
                )))
            }
        };
        for l in &self.layers {
            if let Some(s) = l.sparsity.filter(|s| !(0.0..1.0).contains(s)) {
                return Err(Error::Usage(format!(
                    "prune layer '{}': sparsity {s} must be in [0, 1)",
                    l.pattern
                )));
            }
        }
        Ok(PruneConfig {
            method,
            sparsity,
            rules: self
                .layers
                .iter()
                .map(|l| LayerRule {
                    pattern: l.pattern.clone(),
                    sparsity: l.sparsity,
                    skip: l.skip.unwrap_or(false),
                })
                .collect(),
            skip: self.skip.clone(),
            min_elements: self.min_elements.unwrap_or(defaults.min_elements),
            skip_first_conv: self.skip_first_conv.unwrap_or(defaults.skip_first_conv),
            refit: self.refit.unwrap_or(defaults.refit),
            rounds: self.rounds.unwrap_or(defaults.rounds),
        })
    }
}
