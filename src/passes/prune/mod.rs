//! Pruning: set weights of Conv, Gemm and MatMul layers to exact zeros.
//!
//! The weights stay dense float32; the mask is the set of zeros in the written
//! tensor (the score counts them from there). Eligible: the constant weight input
//! (input 1, an initializer) of Conv, Gemm and MatMul, float32, after BN folding.
//! By default tensors under 1,000 elements and the first conv (in topological
//! order) are left alone, as are names matching a skip pattern.
//!
//! Methods, for a layer with n weights and target sparsity s (k = round(s n)):
//!
//! - `magnitude`: zero the k smallest |w| of the layer (ties: lower flat index
//!   first). Existing zeros have |w| = 0, so they count toward k.
//! - `global`: the same over the pool of all eligible layers, k = round(s N) with
//!   N the pool size: one magnitude threshold for the whole model. A layer given its
//!   own sparsity by a rule is pruned alone by magnitude, outside the pool.
//! - `nm:N:M`: each output unit's weights as a row (Conv [Cout, Cin/g kh kw]; Gemm
//!   the column of B it multiplies, i.e. rows of B when transB = 1; MatMul [K, N]:
//!   column n along K), cut into consecutive groups of M; each group keeps its N
//!   largest |w| (a trailing partial group of length L keeps min(N, L)).
//! - `reweighted`: reweighted L1 on the layer's output error. X is the layer's
//!   input as rows (the im2col patches of a Conv, one Gram per group, dim
//!   Cin/g kh kw, honouring pads, strides, dilations and auto_pad; the rows of a
//!   Gemm/MatMul input, dim K), captured by running the model in tract on the
//!   calibration images, image by image, and kept as G = X^T X (f64). A layer that
//!   sees no more rows than its dim d (a dense layer: one row per image) keeps X
//!   itself instead, n x d being smaller than d x d; this also makes its solves
//!   O(n) per weight instead of O(d). G is scaled to mean diagonal 1 and damped,
//!   Gd = G + rho I, rho = 1e-2 (the weights stay near the original in directions
//!   the calibration data does not see, as in OBS/SparseGPT dampening). Each
//!   output unit's row w (original w0) solves
//!
//!   min_w (w - w0)^T Gd (w - w0) + lambda sum_i r_i |w_i|,   r_i = 1 / (|w_i'| + eps)
//!
//!   by coordinate descent (w_i <- soft(w0_i - q_i / c_i, lambda r_i / 2 c_i) with
//!   q_i = (Gd (w - w0))_i minus its own term and c_i = Gd_ii; 4 sweeps a round),
//!   w' the previous round's solution (round 1: w0), over `rounds` rounds; eps =
//!   0.1 mean |w0| of the layer; existing zeros stay zero. lambda is shared by the
//!   layer and found by bisection in log lambda (with interpolation of the zero
//!   counts) on up to 64 evenly spread rows, to within 0.5% of the target; the full
//!   layer is then solved at that lambda and lands exactly on k by ranking: zeros
//!   of the solution first, ordered by their unpenalized value |w0_i - q_i / c_i|,
//!   then nonzeros by |w_i|; the k lowest are zeroed. Within one tensor and without
//!   data (G = I) the problem separates per weight, and every round keeps the
//!   order of |w0|, so the result is the magnitude mask: this method requires
//!   calibration data.
//! - refit (always after `reweighted`, on request after the others): with S the
//!   survivors of a row, the least-squares optimum on the mask,
//!   w_S = w0_S + Gd_SS^{-1} Gd_{S,~S} w0_{~S}: Cholesky up to 256 survivors,
//!   Jacobi-preconditioned conjugate gradients above; from rows X, the smaller of
//!   the primal and the dual (Woodbury) system. Rows in parallel (rayon).
//!
//! Reports give, per layer, the sparsity before and after and, when calibration
//! data was used, the relative output error sum ||X (W - W0)||^2 / ||X W0||^2 on
//! the calibration rows, before and after the refit (for `reweighted`, also with
//! the magnitude mask alone, for comparison), and the seconds spent.
//!
//! Everything is deterministic: orders are total (ties by index), captured sums
//! are merged in order of fixed 8-image chunks whatever the thread count, and
//! per-row solves are independent of each other and of scheduling.

mod mask;
mod solve;

use std::fmt;
use std::str::FromStr;

use ndarray::ArrayD;
use serde::{Deserialize, Serialize};

use super::select::{self, LayerRule as _};
use super::{Context, Pass, PassReport};
use crate::error::{Error, Result};
use crate::graph::layers::WeightSource;
use crate::graph::{set_initializer, weighted_layers, Graph};
use crate::onnx::{DataType, Model, TensorData};

use super::calib::{self, gram, Geom, Rows};

/// A pruning method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Each layer to its target by |w|.
    Magnitude,
    /// One |w| threshold over all eligible layers.
    Global,
    /// N:M structured: at most N nonzeros in every M consecutive weights of a row.
    NM { n: usize, m: usize },
    /// Reweighted L1 on the layer output error, with calibration data.
    Reweighted,
    /// SparseGPT (OBS mask and update, with calibration data): a fraction of
    /// each row, or N of every M when `nm` is given.
    SparseGpt { nm: Option<(usize, usize)> },
}

impl Method {
    pub const HELP: &'static str =
        "magnitude, global, nm:N:M (e.g. nm:2:4), reweighted, sparsegpt or sparsegpt:N:M";

    /// Whether the method needs calibration images.
    pub fn needs_calib(&self) -> bool {
        matches!(self, Method::Reweighted | Method::SparseGpt { .. })
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Method::Magnitude => f.write_str("magnitude"),
            Method::Global => f.write_str("global"),
            Method::NM { n, m } => write!(f, "nm:{n}:{m}"),
            Method::Reweighted => f.write_str("reweighted"),
            Method::SparseGpt { nm: None } => f.write_str("sparsegpt"),
            Method::SparseGpt { nm: Some((n, m)) } => write!(f, "sparsegpt:{n}:{m}"),
        }
    }
}

impl FromStr for Method {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let norm = s.trim().to_ascii_lowercase();
        let bad = || {
            Error::Usage(format!(
                "unknown pruning method '{s}': expected {}",
                Method::HELP
            ))
        };
        match norm.as_str() {
            "magnitude" | "mag" => return Ok(Method::Magnitude),
            "global" => return Ok(Method::Global),
            "reweighted" | "reweighted-l1" | "rl1" => return Ok(Method::Reweighted),
            "sparsegpt" | "sparse-gpt" => return Ok(Method::SparseGpt { nm: None }),
            _ => {}
        }
        let (rest, obs) = match norm.strip_prefix("sparsegpt:") {
            Some(r) => (r, true),
            None => (norm.strip_prefix("nm:").ok_or_else(bad)?, false),
        };
        let (n, m) = rest.split_once(':').ok_or_else(|| {
            Error::Usage(format!(
                "pruning method '{s}': N:M needs two numbers, e.g. nm:2:4"
            ))
        })?;
        let parse = |x: &str| {
            x.trim().parse::<usize>().map_err(|_| {
                Error::Usage(format!(
                    "pruning method '{s}': '{x}' is not a whole number (e.g. nm:2:4)"
                ))
            })
        };
        let (n, m) = (parse(n)?, parse(m)?);
        if n == 0 || n >= m {
            return Err(Error::Usage(format!(
                "pruning method '{s}': N:M needs 1 <= N < M (e.g. nm:2:4 keeps 2 of every 4)"
            )));
        }
        Ok(if obs {
            Method::SparseGpt { nm: Some((n, m)) }
        } else {
            Method::NM { n, m }
        })
    }
}

/// Parses `METHOD[:SPARSITY]` as given to `--prune` (the one grammar of the flag
/// and of the recipe's `method`/`sparsity`): `magnitude:0.5`, `global:70%`,
/// `reweighted:0.6`, `nm:2:4` (N:M takes no sparsity). Returns the method and the
/// sparsity when one was given.
pub fn parse_spec(spec: &str) -> Result<(Method, Option<f64>)> {
    let s = spec.trim();
    let lower = s.to_ascii_lowercase();
    if lower.starts_with("nm:")
        || lower.matches(':').count() == 2 && lower.starts_with("sparsegpt:")
    {
        return Ok((lower.parse()?, None));
    }
    match s.split_once(':') {
        None => Ok((s.parse()?, None)),
        Some((m, sp)) => Ok((m.parse()?, Some(parse_sparsity(sp)?))),
    }
}

/// A sparsity as a fraction (`0.5`) or a percentage (`50%`), in [0, 1].
pub fn parse_sparsity(s: &str) -> Result<f64> {
    let t = s.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| Error::Usage(format!("sparsity '{s}' is not a number (e.g. 0.5 or 50%)")))?;
    check_sparsity(v, "sparsity")?;
    Ok(v)
}

fn check_sparsity(v: f64, what: &str) -> Result<()> {
    if !(0.0..=1.0).contains(&v) {
        return Err(Error::Usage(format!(
            "{what} {v} is outside [0, 1] (a fraction of zeros, e.g. 0.5)"
        )));
    }
    Ok(())
}

/// The `[prune]` recipe section.
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
    /// SparseGPT's layer inputs: parallel (the float model) or sequential[:K]
    /// (the model pruned up to each layer, in K groups of layers).
    pub calib_mode: Option<String>,
    /// SparseGPT's per-layer sparsities: "uniform" (each layer its target) or
    /// "error" (chosen by the layers' output errors so that the pool of layers
    /// without a rule of their own reaches the target overall).
    pub allocate: Option<String>,
    /// SparseGPT's dampening of H, a fraction of its mean diagonal (default 0.01).
    pub damp: Option<f64>,
    /// Sequential and asymmetric stages run with the activation quantizers of
    /// `[act_quant]` in place (default true when both are asked).
    pub act_aware: Option<bool>,
    #[serde(default, rename = "layer")]
    pub layers: Vec<LayerSection>,
}

/// A `[[prune.layer]]` rule.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSection {
    #[serde(rename = "match")]
    pub pattern: String,
    pub sparsity: Option<f64>,
    pub skip: Option<bool>,
}

impl PruneSection {
    /// Parses the `--prune METHOD:SPARSITY` shorthand ([`parse_spec`]: "magnitude:0.5",
    /// "global:70%", "nm:2:4").
    pub fn from_flag(s: &str) -> Result<PruneSection> {
        let bad = |e: Error| {
            Error::Usage(format!(
                "--prune '{s}': expected METHOD:SPARSITY (magnitude:0.5, global:70%, reweighted:0.5, sparsegpt:0.5) or nm:N:M / sparsegpt:N:M ({e})"
            ))
        };
        let (method, sparsity) = parse_spec(s).map_err(bad)?;
        if !matches!(
            method,
            Method::NM { .. } | Method::SparseGpt { nm: Some(_) }
        ) && sparsity.is_none()
        {
            return Err(bad(Error::Usage(format!("'{method}' needs a sparsity"))));
        }
        Ok(PruneSection {
            method: method.to_string(),
            sparsity,
            ..Default::default()
        })
    }

    /// Checks the section and makes the pass's configuration.
    pub fn config(&self) -> Result<PruneConfig> {
        let method: Method = self
            .method
            .parse()
            .map_err(|e| Error::Usage(format!("prune method '{}': {e}", self.method)))?;
        let defaults = PruneConfig::default();
        let sparsity = match (&method, self.sparsity) {
            (Method::NM { .. } | Method::SparseGpt { nm: Some(_) }, _) => 0.0,
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
            calib_mode: match &self.calib_mode {
                Some(m) => m.parse()?,
                None => defaults.calib_mode,
            },
            act_aware: self.act_aware.unwrap_or(defaults.act_aware),
            act_sim: None,
            allocation: match self.allocate.as_deref() {
                None | Some("uniform") => Allocation::Uniform,
                Some("error") => Allocation::Error,
                Some("network") => Allocation::Network,
                Some(other) => {
                    return Err(Error::Usage(format!(
                        "prune.allocate = '{other}': expected 'uniform', 'error' or 'network'"
                    )))
                }
            },
            damp: match self.damp {
                None => defaults.damp,
                Some(f) if f > 0.0 && f.is_finite() => f,
                Some(f) => {
                    return Err(Error::Usage(format!(
                        "prune.damp = {f}: must be positive (a fraction of the mean diagonal of H, e.g. 0.01)"
                    )))
                }
            },
        })
    }
}

/// A per-layer rule (from a recipe): a glob on the node name or the weight
/// initializer name (`*`, `?`, `[abc]`, `[!a-z]`, `\` escapes). For each layer,
/// the matching rules apply in order, so later ones win: a rule sets the layer's
/// skip flag to its `skip`, and its sparsity when it gives one. Rules do not lift
/// the default skips (small tensors, first conv); set `min_elements` /
/// `skip_first_conv` for that.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerRule {
    pub pattern: String,
    pub sparsity: Option<f64>,
    pub skip: bool,
}

impl select::LayerRule for LayerRule {
    fn pattern(&self) -> &str {
        &self.pattern
    }
}

/// What to prune and how.
#[derive(Debug, Clone, PartialEq)]
pub struct PruneConfig {
    pub method: Method,
    /// Target fraction of zeros per layer (global: over all eligible weights); ignored by N:M.
    pub sparsity: f64,
    /// Per-layer rules; later rules win.
    pub rules: Vec<LayerRule>,
    /// Glob patterns (node or initializer names) never pruned.
    pub skip: Vec<String>,
    /// Tensors with fewer elements are left alone.
    pub min_elements: usize,
    /// Leave the first Conv (in topological order) alone.
    pub skip_first_conv: bool,
    /// Least-squares refit of the surviving weights (needs calibration data); `reweighted` always refits.
    pub refit: bool,
    /// Reweighting rounds of `reweighted`.
    pub rounds: usize,
    /// Where SparseGPT's layer inputs come from.
    pub calib_mode: calib::CalibMode,
    /// SparseGPT: one sparsity for all layers, or each layer's chosen by its
    /// errors (see [`allocate_by_error`]).
    pub allocation: Allocation,
    /// SparseGPT's dampening of H, a fraction of its mean diagonal.
    pub damp: f64,
    /// Capture sequential/asymmetric stages with activation quantization
    /// simulated (recipe `act_aware`).
    pub act_aware: bool,
    /// The activation quantization simulated in those captures: the pipeline
    /// sets it from `[act_quant]` when `act_aware`.
    pub act_sim: Option<crate::passes::act_quant::ActQuantConfig>,
}

/// How SparseGPT's per-layer sparsities are chosen (`prune.allocate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Every layer its target.
    Uniform,
    /// By the layers' own relative output errors.
    Error,
    /// By the layers' errors, each weighted by its measured effect on the network's
    /// output (one run of the model per layer on the calibration images).
    Network,
}

impl Default for PruneConfig {
    fn default() -> Self {
        PruneConfig {
            method: Method::Magnitude,
            sparsity: 0.5,
            rules: Vec::new(),
            skip: Vec::new(),
            min_elements: 1000,
            skip_first_conv: true,
            refit: false,
            rounds: 3,
            calib_mode: calib::CalibMode::Parallel,
            allocation: Allocation::Uniform,
            damp: calib::obs::DEFAULT_DAMP,
            act_aware: true,
            act_sim: None,
        }
    }
}

/// The pruning pass.
pub struct Prune(pub PruneConfig);

/// Why `reweighted` needs `--calib`.
pub const REWEIGHTED_NEEDS_CALIB: &str =
    "prune method 'reweighted' needs calibration images (--calib DATA): \
within one tensor, reweighted L1 without data converges to exactly the magnitude mask, \
so it minimizes each layer's output error on the calibration images' activations instead";

/// Why `sparsegpt` needs `--calib`.
pub const SPARSEGPT_NEEDS_CALIB: &str =
    "prune method 'sparsegpt' needs calibration images (--calib DATA): \
SparseGPT chooses each layer's mask and updates the surviving weights through the inverse Hessian of the layer's inputs on them";

/// Why `--refit` needs `--calib`.
pub const REFIT_NEEDS_CALIB: &str = "--refit needs calibration images (--calib DATA): \
the least-squares refit of the surviving weights solves on the Gram matrix of each layer's input activations";

/// One eligible weight tensor (possibly read by several nodes).
struct Layer {
    init: String,
    nodes: Vec<usize>,
    node_names: Vec<String>,
    shape: Vec<usize>,
    w0: Vec<f32>,
    /// Row layout for N:M and the solves; Err: why there is none.
    rows: std::result::Result<Rows, String>,
    /// Calibration geometry, one per consuming node; Err: why there is none.
    geoms: std::result::Result<Vec<Geom>, String>,
    target: f64,
    /// The sparsity came from a rule (global: pruned alone).
    own_target: bool,
}

impl Layer {
    fn numel(&self) -> usize {
        self.w0.len()
    }
}

fn pct(zeros: usize, n: usize) -> String {
    format!("{:.2}%", 100.0 * zeros as f64 / n.max(1) as f64)
}

/// The layers as found in the graph, plus skip items for the report.
fn find_layers(graph: &Graph, cfg: &PruneConfig, report: &mut PassReport) -> Result<Vec<Layer>> {
    let first_conv = graph.nodes_of_type("Conv").next();
    // Weight initializer -> eligible consumers (Conv, Gemm, MatMul), in topological
    // order of first use; weights that are not initializers are reported per node.
    let mut order: Vec<(String, Vec<usize>)> = Vec::new();
    let mut refused: std::collections::HashMap<usize, String> = Default::default();
    for l in weighted_layers(graph) {
        let nodes: Vec<usize> = l
            .nodes
            .iter()
            .copied()
            .filter(|&i| matches!(graph.node(i).op_type(), "Conv" | "Gemm" | "MatMul"))
            .collect();
        if nodes.is_empty() {
            continue;
        }
        let why = match l.source {
            WeightSource::Initializer => {
                order.push((l.weight, nodes));
                continue;
            }
            WeightSource::Overridable => format!(
                "weight {}: left as is",
                graph.not_fixed(&l.weight).expect("overridable")
            ),
            _ => format!("weight '{}' is not an initializer", l.weight),
        };
        for n in nodes {
            refused.insert(n, why.clone());
        }
    }
    for &i in graph.topo_order() {
        if let Some(why) = refused.remove(&i) {
            report.skipped(graph.node_name(i), why);
        }
    }

    let mut layers = Vec::new();
    for (init, nodes) in order {
        let node_names: Vec<String> = nodes
            .iter()
            .map(|&i| graph.node_name(i).to_string())
            .collect();
        let t = graph.initializer(&init).expect("checked");
        // Any other use of the tensor (not as input 1 of an eligible node) would change too.
        let other_use = graph
            .consumers(&init)
            .iter()
            .copied()
            .find(|&c| {
                !nodes.contains(&c)
                    || graph.node(c).input.iter().filter(|s| **s == init).count() > 1
            })
            .or_else(|| {
                nodes
                    .iter()
                    .copied()
                    .find(|&c| graph.node(c).input.first().is_some_and(|s| *s == init))
            });
        if let Some(c) = other_use {
            report.skipped(
                &init,
                format!(
                    "also read by node '{}' ({}) other than as its weight",
                    graph.node_name(c),
                    graph.node(c).op_type()
                ),
            );
            continue;
        }
        if graph.is_output(&init) {
            report.skipped(&init, "is a graph output");
            continue;
        }
        if t.data_type() != DataType::Float as i32 {
            report.skipped(&init, "not float32");
            continue;
        }
        let names: Vec<&str> = std::iter::once(init.as_str())
            .chain(select::origin(graph, &init))
            .chain(node_names.iter().map(String::as_str))
            .collect();
        if let Some(p) = select::first_match(&cfg.skip, &names) {
            report.skipped(&init, format!("matches skip pattern '{p}'"));
            continue;
        }
        let mut target = cfg.sparsity;
        let mut own_target = false;
        let mut rule_skip: Option<&str> = None;
        for r in select::matching(&cfg.rules, &names) {
            rule_skip = r.skip.then_some(r.pattern());
            if let Some(s) = r.sparsity {
                target = s;
                own_target = true;
            }
        }
        if let Some(p) = rule_skip {
            report.skipped(&init, format!("matches skip pattern '{p}'"));
            continue;
        }
        if cfg.skip_first_conv && first_conv.is_some_and(|f| nodes.contains(&f)) {
            report.skipped(&init, "first conv");
            continue;
        }
        let data = TensorData::from_proto(t)?;
        let TensorData::F32(arr) = data else {
            report.skipped(&init, "not float32");
            continue;
        };
        if arr.len() < cfg.min_elements {
            report.skipped(&init, format!("under {} elements", cfg.min_elements));
            continue;
        }
        let shape = arr.shape().to_vec();
        let w0: Vec<f32> = arr.iter().copied().collect();

        let mut rows: std::result::Result<Rows, String> = Err(String::new());
        let mut geoms: std::result::Result<Vec<Geom>, String> = Ok(Vec::new());
        for (i, &n) in nodes.iter().enumerate() {
            let node = graph.node(n);
            let r = calib::rows_of(node, &shape);
            if i == 0 {
                rows = r;
            } else if let (Ok(a), Ok(b)) = (&rows, &r) {
                if a != b {
                    rows = Err("its nodes read it in different layouts".into());
                }
            }
            if let Ok(gs) = geoms.as_mut() {
                match calib::geom_of(node, &shape) {
                    Ok(g) => gs.push(g),
                    Err(e) => geoms = Err(e),
                }
            }
        }
        if let Ok(gs) = &geoms {
            let (g0, d0) = (gs[0].groups(), gs[0].dim());
            if gs.iter().any(|g| g.groups() != g0 || g.dim() != d0) {
                geoms = Err("its nodes read it in different layouts".into());
            } else if let Ok(r) = &rows {
                if r.len != d0 || r.count % g0 != 0 {
                    geoms = Err("its rows do not match its input patches".into());
                }
            }
        }
        layers.push(Layer {
            init,
            nodes,
            node_names,
            shape,
            w0,
            rows,
            geoms,
            target,
            own_target,
        });
    }
    Ok(layers)
}

/// Calibration data for the solves of one layer.
struct Calibrated {
    stats: Vec<gram::Stats>,
    dim: usize,
    /// SparseGPT's dampening of H, a fraction of its mean diagonal (`prune.damp`).
    damp: f64,
}

impl Pass for Prune {
    fn name(&self) -> &'static str {
        "prune"
    }

    fn run(&self, model: &mut Model, cx: &Context) -> Result<PassReport> {
        let cfg = &self.0;
        check_sparsity(cfg.sparsity, "prune sparsity")?;
        for r in &cfg.rules {
            if let Some(s) = r.sparsity {
                check_sparsity(s, &format!("sparsity of rule '{}'", r.pattern))?;
            }
        }
        let needs_calib = cfg.method.needs_calib() || cfg.refit;
        if cfg.refit && matches!(cfg.calib_mode, calib::CalibMode::Asymmetric(_)) {
            return Err(Error::Usage(
                "prune refit re-solves the survivors on the float model's inputs and would undo the asymmetric fit (calib_mode = \"asymmetric\"): drop --refit, or use sequential or parallel calibration".into(),
            ));
        }
        if needs_calib && cx.calib.is_none_or(|d| d.is_empty()) {
            return Err(Error::Usage(
                match cfg.method {
                    Method::Reweighted => REWEIGHTED_NEEDS_CALIB,
                    Method::SparseGpt { .. } => SPARSEGPT_NEEDS_CALIB,
                    _ => REFIT_NEEDS_CALIB,
                }
                .into(),
            ));
        }
        if cfg.allocation != Allocation::Uniform && cfg.method != (Method::SparseGpt { nm: None }) {
            return Err(Error::Usage(format!(
                "prune.allocate = 'error' chooses SparseGPT's per-layer sparsities from errors measured on the float model's inputs: it needs --prune sparsegpt:S (got {})",
                cfg.method,
            )));
        }
        let rounds = cfg.rounds.max(1);

        let mut report = PassReport::new(self.name());
        let layers = {
            let view = Graph::of(model)?;
            find_layers(&view, cfg, &mut report)?
        };

        // Masks (true = zero) of the layers that are pruned, by index into `layers`.
        let mut masks: Vec<Option<Vec<bool>>> = vec![None; layers.len()];
        let mut notes: Vec<Vec<String>> = vec![Vec::new(); layers.len()];
        // Weights a method solved for directly (SparseGPT: mask and update).
        let mut solved: Vec<Option<Vec<f32>>> = vec![None; layers.len()];

        // Calibration: the Gram matrices of the layers that use them.
        let mut calibrated: Vec<Option<Calibrated>> = (0..layers.len()).map(|_| None).collect();
        // Sequential stages (SparseGPT only), and whether each layer is fit to the
        // float model's output (asymmetric: the model before the first lossy pass,
        // beside the model pruned so far).
        let (sequential, original) = match (cfg.method, cfg.calib_mode) {
            (Method::SparseGpt { .. }, calib::CalibMode::Sequential(k)) => (Some(k), None),
            (Method::SparseGpt { .. }, calib::CalibMode::Asymmetric(k)) => (
                Some(k),
                // Borrowed: no model-sized copy when the pipeline holds one already.
                Some(match cx.reference {
                    Some(r) => std::borrow::Cow::Borrowed(r),
                    None => std::borrow::Cow::Owned(model.clone()),
                }),
            ),
            _ => (None, None),
        };
        // Sequential stages with an allocation: the sparsities are chosen on the
        // float model's inputs (one parallel capture), then each layer is pruned
        // at its sparsity in the stages.
        if needs_calib && (sequential.is_none() || cfg.allocation != Allocation::Uniform) {
            let data = cx.calib.expect("checked above");
            let input_shape = cx.input_shape_for(data);
            let mut wanted = Vec::new();
            for (i, l) in layers.iter().enumerate() {
                match (&l.geoms, &l.rows) {
                    (Ok(gs), Ok(_)) => wanted.push((i, gs.clone())),
                    (Err(e), _) | (_, Err(e)) => notes[i].push(format!("no calibration ({e})")),
                }
            }
            let start = std::time::Instant::now();
            let (grams, too_big) = gram::collect(
                model,
                &input_shape,
                data.images.view(),
                cx.threads.max(1),
                &wanted,
                gram::Capture::Grams,
            )?;
            if !wanted.is_empty() {
                let as_rows = grams
                    .iter()
                    .filter(|c| matches!(c.stats.first(), Some(gram::Stats::Rows { .. })))
                    .count();
                report.changed(
                    "calibration",
                    format!(
                        "{} images: inputs of {} layers captured in {:.2}s ({} as Gram matrices, {as_rows} as rows)",
                        data.len(),
                        grams.len(),
                        start.elapsed().as_secs_f64(),
                        grams.len() - as_rows
                    ),
                );
            }
            for (i, why) in too_big {
                notes[i].push(format!("no calibration ({why})"));
            }
            for c in grams {
                let i = c.layer;
                let dim = layers[i].geoms.as_ref().expect("wanted")[0].dim();
                calibrated[i] = Some(Calibrated {
                    stats: c.stats,
                    dim,
                    damp: cfg.damp,
                });
            }
            notes.iter_mut().for_each(|n| n.dedup());
        }

        // Each layer's sparsity: its rule's, or what an allocation chose.
        let mut targets: Vec<f64> = layers.iter().map(|l| l.target).collect();
        match cfg.method {
            Method::Magnitude | Method::Reweighted => {
                for (i, l) in layers.iter().enumerate() {
                    let k = (l.target * l.numel() as f64).round() as usize;
                    if cfg.method == Method::Reweighted {
                        if let (Some(c), Ok(rows)) = (&calibrated[i], &l.rows) {
                            let start = std::time::Instant::now();
                            let p = solve::Problem::new(&l.w0, rows, &c.stats, c.dim);
                            let (mask, lambda) = p.reweighted_mask(k, rounds);
                            notes[i].push(format!(
                                "reweighted L1, lambda {lambda:.3e}, {rounds} rounds, {:.2}s",
                                start.elapsed().as_secs_f64()
                            ));
                            masks[i] = Some(mask);
                            continue;
                        }
                        notes[i].push("magnitude mask".into());
                    }
                    masks[i] = Some(mask::magnitude(&l.w0, k));
                }
            }
            Method::Global => {
                let pool: Vec<usize> = (0..layers.len())
                    .filter(|&i| !layers[i].own_target)
                    .collect();
                let total: usize = pool.iter().map(|&i| layers[i].numel()).sum();
                let k = (cfg.sparsity * total as f64).round() as usize;
                let weights: Vec<&[f32]> = pool.iter().map(|&i| layers[i].w0.as_slice()).collect();
                let (pool_masks, threshold) = mask::global(&weights, k);
                for (&i, m) in pool.iter().zip(pool_masks) {
                    masks[i] = Some(m);
                }
                if !pool.is_empty() {
                    let zeros: usize = pool
                        .iter()
                        .map(|&i| {
                            masks[i]
                                .as_ref()
                                .expect("set")
                                .iter()
                                .filter(|z| **z)
                                .count()
                        })
                        .sum();
                    report.changed(
                        "global",
                        format!(
                            "{} of {total} weights in {} layers zeroed ({}), |w| <= {threshold:.4e}",
                            zeros,
                            pool.len(),
                            pct(zeros, total)
                        ),
                    );
                }
                for (i, l) in layers.iter().enumerate() {
                    if l.own_target {
                        let k = (l.target * l.numel() as f64).round() as usize;
                        masks[i] = Some(mask::magnitude(&l.w0, k));
                        notes[i].push("own sparsity from a rule, pruned alone by magnitude".into());
                    }
                }
            }
            Method::NM { n, m } => {
                for (i, l) in layers.iter().enumerate() {
                    match &l.rows {
                        Ok(rows) => masks[i] = Some(mask::nm(&l.w0, rows, n, m)),
                        Err(e) => report.skipped(&l.init, format!("no N:M row layout: {e}")),
                    }
                }
            }
            Method::SparseGpt { nm } => {
                if cfg.allocation != Allocation::Uniform {
                    let pool: Vec<usize> = (0..layers.len())
                        .filter(|&i| {
                            !layers[i].own_target
                                && calibrated[i].is_some()
                                && layers[i].rows.is_ok()
                        })
                        .collect();
                    let start = std::time::Instant::now();
                    let weights = match cfg.allocation {
                        Allocation::Network => Some(network_weights(
                            model,
                            cx,
                            &layers,
                            &calibrated,
                            &pool,
                            cfg.sparsity,
                        )?),
                        _ => None,
                    };
                    let plan = allocate_by_error(
                        &layers,
                        &calibrated,
                        &pool,
                        cfg.sparsity,
                        weights.as_deref(),
                    );
                    let total: usize = pool.iter().map(|&i| layers[i].numel()).sum();
                    let zeros: usize = plan.iter().map(|c| c.zeros).sum();
                    report.changed(
                        "allocation",
                        format!(
                            "{} of {total} weights in {} layers zeroed ({}, target {}): each layer's sparsity chosen from {:?} to minimize the sum of the layers' relative output errors{} (Lagrangian, lambda {:.3e}), {:.2}s",
                            zeros,
                            pool.len(),
                            pct(zeros, total),
                            pct((cfg.sparsity * total as f64).round() as usize, total),
                            ALLOCATION_CANDIDATES,
                            if weights.is_some() {
                                format!(
                                    ", each weighted by its effect on the network's output (measured with that layer alone at {} on {} images)",
                                    pct((cfg.sparsity * 1000.0).round() as usize, 1000),
                                    NETWORK_IMAGES.min(cx.calib.map_or(0, |d| d.len()))
                                )
                            } else {
                                String::new()
                            },
                            plan.first().map_or(0.0, |c| c.lambda),
                            start.elapsed().as_secs_f64()
                        ),
                    );
                    for c in plan {
                        targets[c.layer] = c.sparsity;
                        if sequential.is_some() {
                            // Pruned again in the stages, at this sparsity.
                            notes[c.layer].push(format!(
                                "allocated sparsity {:.0}% (SparseGPT output error {:.2}% on the float model's inputs)",
                                100.0 * c.sparsity,
                                100.0 * c.error
                            ));
                            continue;
                        }
                        notes[c.layer].push(format!(
                            "allocated sparsity {:.0}% (SparseGPT output error {:.2}%)",
                            100.0 * c.sparsity,
                            100.0 * c.error
                        ));
                        masks[c.layer] = Some(c.weights.iter().map(|v| *v == 0.0).collect());
                        solved[c.layer] = Some(c.weights);
                    }
                }
                // Sequential: capture each group of layers on the model pruned so far.
                if let Some(k) = sequential {
                    let wanted: Vec<(usize, Vec<Geom>)> = layers
                        .iter()
                        .enumerate()
                        .filter_map(|(i, l)| match (&l.geoms, &l.rows) {
                            (Ok(gs), Ok(_)) => Some((i, gs.clone())),
                            (Err(e), _) | (_, Err(e)) => {
                                notes[i].push(format!("no calibration ({e})"));
                                None
                            }
                        })
                        .collect();
                    let k = k.clamp(1, wanted.len().max(1));
                    let per = wanted.len().div_ceil(k).max(1);
                    let start = std::time::Instant::now();
                    let mut stages = 0;
                    // The act-quant pass's quantizers in place in each stage's
                    // model (ranges measured once, on the model before pruning).
                    let sim = match &cfg.act_sim {
                        Some(ac) => crate::passes::act_quant::Simulation::calibrate(ac, model, cx)?
                            .filter(|s| !s.is_empty()),
                        None => None,
                    };
                    for stage in wanted.chunks(per) {
                        stages += 1;
                        let simulated = sim.as_ref().map(|s| s.apply(model)).transpose()?;
                        let (current, stage) = match &simulated {
                            None => (&*model, stage.to_vec()),
                            Some(s) => (&s.model, s.rebind(stage.to_vec())),
                        };
                        let stage = &stage[..];
                        let (mut caught, too_big, _) = match &original {
                            None => calib::capture(current, cx, stage)?,
                            Some(o) => calib::paired::capture(
                                o,
                                current,
                                cx,
                                stage,
                                &|i| layers[i].shape.len(),
                                &|i| layers[i].node_names.join(", "),
                                false,
                            )?,
                        };
                        for (i, why) in too_big {
                            notes[i].push(format!("no calibration ({why})"));
                            // Not the float capture of an allocation either.
                            calibrated[i] = None;
                        }
                        let g = model.graph_mut();
                        for (pos, (i, _)) in stage.iter().enumerate() {
                            let (Some(c), Ok(rows)) = (caught.remove(i), &layers[*i].rows) else {
                                continue;
                            };
                            let l = &layers[*i];
                            let sparsity = match nm {
                                Some((n, m)) => calib::obs::Sparsity::NM { n, m },
                                None => calib::obs::Sparsity::Fraction(targets[*i]),
                            };
                            let t = std::time::Instant::now();
                            let (c, result) = match original {
                                None => {
                                    let c = Calibrated {
                                        stats: c.stats,
                                        dim: c.dim,
                                        damp: cfg.damp,
                                    };
                                    let r = sparsegpt(&l.w0, rows, &c, sparsity);
                                    (c, r)
                                }
                                // Asymmetric: a stage's first layer fit to the float
                                // model's output; its later layers on the float
                                // model's inputs (as quantize does: their compressed
                                // inputs are not captured yet).
                                Some(_) => {
                                    let own = match calib::paired::original_only(&c, rows.len) {
                                        Ok(own) => Calibrated {
                                            stats: own.stats,
                                            dim: own.dim,
                                            damp: cfg.damp,
                                        },
                                        Err(why) => {
                                            notes[*i].push(format!("no calibration ({why})"));
                                            calibrated[*i] = None;
                                            continue;
                                        }
                                    };
                                    let r = if pos == 0 {
                                        let reference = original.as_ref().and_then(|o| {
                                            calib::paired::reference_weight(o, &l.init, l.w0.len())
                                        });
                                        sparsegpt_asymmetric(
                                            &l.w0,
                                            rows,
                                            &c,
                                            sparsity,
                                            reference.as_deref(),
                                            cfg.damp,
                                        )
                                    } else {
                                        sparsegpt(&l.w0, rows, &own, sparsity)
                                    };
                                    (own, r)
                                }
                            };
                            match result {
                                Ok(w) => {
                                    let arr = ArrayD::from_shape_vec(l.shape.clone(), w.clone())
                                        .expect("same shape");
                                    set_initializer(g, &l.init, &TensorData::F32(arr));
                                    notes[*i].push(format!(
                                        "SparseGPT{} in {:.2}s",
                                        if original.is_some() && pos == 0 {
                                            " asymmetric (fit to the float model's output)"
                                        } else {
                                            ""
                                        },
                                        t.elapsed().as_secs_f64()
                                    ));
                                    masks[*i] = Some(w.iter().map(|v| *v == 0.0).collect());
                                    solved[*i] = Some(w);
                                }
                                // Retried after the stages on the same statistics (the
                                // float inputs' H when asymmetric), else magnitude.
                                Err(why) if original.is_some() && pos == 0 => notes[*i]
                                    .push(format!("the asymmetric fit failed ({why}): SparseGPT on the float model's inputs")),
                                Err(why) => notes[*i].push(format!("magnitude mask: {why}")),
                            }
                            calibrated[*i] = Some(c);
                        }
                    }
                    report.changed(
                        "calibration",
                        format!(
                            "{} images: inputs of {} layers captured in {stages} stages on the model pruned so far{}{}, {:.2}s",
                            cx.calib.map_or(0, |d| d.len()),
                            wanted.len(),
                            if original.is_some() {
                                " beside the float model (asymmetric: each stage's first layer fit to the float model's output)"
                            } else {
                                ""
                            },
                            sim.as_ref().map_or(String::new(), |s| format!("; {}", s.describe())),
                            start.elapsed().as_secs_f64()
                        ),
                    );
                }
                let total = layers.len();
                crate::passes::solve_progress("SparseGPT", 0, total);
                for (i, l) in layers.iter().enumerate() {
                    crate::passes::solve_progress("SparseGPT", i + 1, total);
                    if solved[i].is_some() {
                        continue;
                    }
                    let sparsity = match nm {
                        Some((n, m)) => calib::obs::Sparsity::NM { n, m },
                        None => calib::obs::Sparsity::Fraction(targets[i]),
                    };
                    let (Some(c), Ok(rows)) = (&calibrated[i], &l.rows) else {
                        // No calibration for this layer: the magnitude mask of the same shape.
                        masks[i] = match (nm, &l.rows) {
                            (Some((n, m)), Ok(rows)) => Some(mask::nm(&l.w0, rows, n, m)),
                            (Some(_), Err(e)) => {
                                report.skipped(&l.init, format!("no N:M row layout: {e}"));
                                None
                            }
                            (None, _) => {
                                let k = (targets[i] * l.numel() as f64).round() as usize;
                                Some(mask::magnitude(&l.w0, k))
                            }
                        };
                        notes[i].push("magnitude mask".into());
                        continue;
                    };
                    let start = std::time::Instant::now();
                    match sparsegpt(&l.w0, rows, c, sparsity) {
                        Ok(w) => {
                            notes[i].push(format!(
                                "SparseGPT in {:.2}s",
                                start.elapsed().as_secs_f64()
                            ));
                            masks[i] = Some(w.iter().map(|v| *v == 0.0).collect());
                            solved[i] = Some(w);
                        }
                        Err(why) => {
                            let k = (targets[i] * l.numel() as f64).round() as usize;
                            masks[i] = Some(match nm {
                                Some((n, m)) => mask::nm(&l.w0, rows, n, m),
                                None => mask::magnitude(&l.w0, k),
                            });
                            notes[i].push(format!("magnitude mask: {why}"));
                        }
                    }
                }
            }
        }

        // Values: refit where calibrated, else the original survivors.
        let refit = cfg.method == Method::Reweighted || cfg.refit;
        let mut new_weights: Vec<Option<Vec<f32>>> = vec![None; layers.len()];
        for (i, l) in layers.iter().enumerate() {
            let Some(mask) = &masks[i] else { continue };
            let mut w: Vec<f32> = solved[i].take().unwrap_or_else(|| apply(&l.w0, mask));
            if let (Some(c), Ok(rows)) = (&calibrated[i], &l.rows) {
                let p = solve::Problem::new(&l.w0, rows, &c.stats, c.dim);
                let base = p.output_error(&w);
                if matches!(cfg.method, Method::SparseGpt { .. }) {
                    // What SparseGPT bought over the magnitude mask of the same shape.
                    let k = mask.iter().filter(|z| **z).count();
                    let mag = match (cfg.method, &l.rows) {
                        (Method::SparseGpt { nm: Some((n, m)) }, Ok(rows)) => {
                            mask::nm(&l.w0, rows, n, m)
                        }
                        _ => mask::magnitude(&l.w0, k),
                    };
                    let mag_err = p.output_error(&apply(&l.w0, &mag));
                    report.errors.push(crate::passes::LayerError {
                        layer: l.node_names.join(", "),
                        method: cfg.method.to_string(),
                        nearest: mag_err,
                        after: base,
                    });
                    notes[i].push(format!(
                        "output error {:.2}% (the magnitude mask alone: {:.2}%)",
                        100.0 * base,
                        100.0 * mag_err
                    ));
                }
                if refit {
                    let start = std::time::Instant::now();
                    w = p.refit(mask);
                    let secs = start.elapsed().as_secs_f64();
                    let after = p.output_error(&w);
                    let mag_err = if cfg.method != Method::Reweighted {
                        String::new()
                    } else {
                        let k = mask.iter().filter(|z| **z).count();
                        format!(
                            " (the magnitude mask alone: {:.2}%)",
                            100.0 * p.output_error(&apply(&l.w0, &mask::magnitude(&l.w0, k)))
                        )
                    };
                    notes[i].push(format!(
                        "refit on {} images in {secs:.2}s: output error {:.2}% before refit, {:.2}% after{mag_err}",
                        cx.calib.map_or(0, |d| d.len()),
                        100.0 * base,
                        100.0 * after
                    ));
                } else if !matches!(cfg.method, Method::SparseGpt { .. }) {
                    notes[i].push(format!("output error {:.2}%", 100.0 * base));
                }
            }
            new_weights[i] = Some(w);
        }

        let g = model.graph_mut();
        for (i, l) in layers.iter().enumerate() {
            let Some(w) = new_weights[i].take() else {
                continue;
            };
            let before = l.w0.iter().filter(|x| **x == 0.0).count();
            let after = w.iter().filter(|x| **x == 0.0).count();
            let n = l.numel();
            let mut what = String::new();
            if l.nodes.len() > 1 {
                let names: Vec<String> = l.node_names.iter().map(|s| format!("'{s}'")).collect();
                what.push_str(&format!(
                    "shared by nodes {}: pruned once; ",
                    names.join(", ")
                ));
            }
            what.push_str(&format!(
                "sparsity {} -> {} ({after} of {n} zeroed)",
                pct(before, n),
                pct(after, n)
            ));
            if !matches!(
                cfg.method,
                Method::Global | Method::NM { .. } | Method::SparseGpt { nm: Some(_) }
            ) {
                let k = (targets[i] * n as f64).round() as usize;
                if before > k {
                    what.push_str(&format!("; already above the target {}", pct(k, n)));
                }
            }
            for note in &notes[i] {
                what.push_str("; ");
                what.push_str(note);
            }
            let arr = ArrayD::from_shape_vec(l.shape.clone(), w).expect("same shape");
            set_initializer(g, &l.init, &TensorData::F32(arr));
            report.changed(&l.init, what);
        }
        Ok(report)
    }
}

/// SparseGPT on one layer (see `calib::obs`): the pruned and updated weights,
/// or why the layer's Hessian could not be factored.
fn sparsegpt(
    w0: &[f32],
    rows: &Rows,
    c: &Calibrated,
    sparsity: calib::obs::Sparsity,
) -> std::result::Result<Vec<f32>, String> {
    let factors = factors_of(c)?;
    Ok(sparsegpt_with(w0, rows, c, &factors, sparsity))
}

/// SparseGPT fit to the float model's output (asymmetric calibration,
/// `calib::paired`): `c` holds the paired statistics (dimension 2d) of the
/// pruned model's inputs beside the float model's; the mask and update run on
/// the target w* = w + (H~ + lambda I)^-1 (C w_ref - H~ w) with H~ (the
/// least-squares fit of ||X~ w' - X w_ref||^2, w_ref the float model's weight
/// `reference`, `None`: w0), zeros of `w0` kept.
fn sparsegpt_asymmetric(
    w0: &[f32],
    rows: &Rows,
    c: &calib::Calibrated,
    sparsity: calib::obs::Sparsity,
    reference: Option<&[f32]>,
    damp: f64,
) -> std::result::Result<Vec<f32>, String> {
    use calib::obs;
    let (blocks, factors) = calib::paired::split(c, rows.len, damp, false)?;
    let layer = obs::Layer {
        rows,
        groups: c.stats.len(),
        factors: &factors,
    };
    let target = calib::paired::layer_targets(&layer, &blocks, w0, reference, damp)?;
    Ok(layer.solve_masked(&target, Some(w0), None, sparsity))
}

/// The Cholesky factors of a layer's inverse Hessians (one per group).
fn factors_of(c: &Calibrated) -> std::result::Result<Vec<calib::obs::Factor>, String> {
    use calib::obs;
    c.stats
        .iter()
        .map(|st| obs::Factor::new(&obs::hessian(st, c.dim), c.dim, c.damp, false))
        .collect()
}

fn sparsegpt_with(
    w0: &[f32],
    rows: &Rows,
    c: &Calibrated,
    factors: &[calib::obs::Factor],
    sparsity: calib::obs::Sparsity,
) -> Vec<f32> {
    let layer = calib::obs::Layer {
        rows,
        groups: c.stats.len(),
        factors,
    };
    layer.solve(w0, None, sparsity, true)
}

/// The per-layer sparsities `prune.allocate = "error"` chooses from.
pub const ALLOCATION_CANDIDATES: [f64; 12] =
    [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95];

/// Calibration images the network-sensitivity runs use (the first ones).
pub const NETWORK_IMAGES: usize = 32;

/// Per pooled layer, how much of the network's output one unit of its relative
/// output error moves: with that layer alone pruned by SparseGPT at the target,
/// the relative change of the model's outputs ||y_l - y||^2 / ||y||^2 on the first
/// [`NETWORK_IMAGES`] calibration images, divided by the layer's own error at that
/// sparsity. Layers without a factorization get weight 1.
fn network_weights(
    model: &Model,
    cx: &Context,
    layers: &[Layer],
    calibrated: &[Option<Calibrated>],
    pool: &[usize],
    target: f64,
) -> Result<Vec<f64>> {
    let probe = calib::OutputProbe::new(model, cx, NETWORK_IMAGES)?;
    let mut out = Vec::with_capacity(pool.len());
    for &i in pool {
        let (l, c) = (&layers[i], calibrated[i].as_ref().expect("pooled"));
        let rows = l.rows.as_ref().expect("pooled");
        let Ok(factors) = factors_of(c) else {
            out.push(1.0);
            continue;
        };
        let w = sparsegpt_with(
            &l.w0,
            rows,
            c,
            &factors,
            calib::obs::Sparsity::Fraction(target),
        );
        let e = solve::Problem::new(&l.w0, rows, &c.stats, c.dim).output_error(&w);
        let mut m = model.clone();
        let arr = ArrayD::from_shape_vec(l.shape.clone(), w).expect("same shape");
        set_initializer(m.graph_mut(), &l.init, &TensorData::F32(arr));
        let d = probe.relative_change(&m)?;
        out.push(match d {
            Some(d) if e > 0.0 => d / e,
            _ => 1.0,
        });
    }
    Ok(out)
}

/// One layer's allocated sparsity.
struct Allocated {
    layer: usize,
    sparsity: f64,
    zeros: usize,
    error: f64,
    weights: Vec<f32>,
    lambda: f64,
}

/// Per-layer sparsities for a target over a pool of layers, in the spirit of OBC's
/// SPDY (Frantar and Alistarh, 2022) with the layers' own errors as the cost
/// (times a per-layer weight when given, see [`network_weights`]): for
/// every layer l and candidate s in [`ALLOCATION_CANDIDATES`], SparseGPT's relative
/// output error e_l(s) = ||X (W_s - W)||^2 / ||X W||^2 on the calibration rows; then
/// the Lagrangian choice s_l(lambda) = argmin_s e_l(s) - lambda n_l s / N (n_l the
/// layer's weights, N the pool's), with lambda bisected (on a log scale) to the
/// smallest value whose zeros reach round(target N). Layers whose Hessian cannot
/// be factored keep the uniform target with the magnitude mask.
fn allocate_by_error(
    layers: &[Layer],
    calibrated: &[Option<Calibrated>],
    pool: &[usize],
    target: f64,
    weights: Option<&[f64]>,
) -> Vec<Allocated> {
    use rayon::prelude::*;
    let total: usize = pool.iter().map(|&i| layers[i].numel()).sum();
    // errors[k][j]: layer pool[k] at candidate j (None: no factorization).
    let table: Vec<Option<Vec<(f64, usize)>>> = pool
        .par_iter()
        .map(|&i| {
            let (l, c) = (&layers[i], calibrated[i].as_ref().expect("pooled"));
            let rows = l.rows.as_ref().expect("pooled");
            let factors = factors_of(c).ok()?;
            let p = solve::Problem::new(&l.w0, rows, &c.stats, c.dim);
            Some(
                ALLOCATION_CANDIDATES
                    .iter()
                    .map(|&s| {
                        if s == 0.0 {
                            // Nothing to prune: the layer as it is.
                            return (0.0, l.w0.iter().filter(|v| **v == 0.0).count());
                        }
                        let w = sparsegpt_with(
                            &l.w0,
                            rows,
                            c,
                            &factors,
                            calib::obs::Sparsity::Fraction(s),
                        );
                        let zeros = w.iter().filter(|v| **v == 0.0).count();
                        (p.output_error(&w), zeros)
                    })
                    .collect(),
            )
        })
        .collect();
    let want = (target * total as f64).round() as usize;
    let choose = |lambda: f64| -> (Vec<usize>, usize) {
        let mut picks = Vec::with_capacity(pool.len());
        let mut zeros = 0;
        for (k, row) in table.iter().enumerate() {
            let n = layers[pool[k]].numel();
            let j = match row {
                None => {
                    // Uniform target (magnitude mask): counted at its target.
                    zeros += (layers[pool[k]].target * n as f64).round() as usize;
                    usize::MAX
                }
                Some(row) => {
                    let wk = weights.map_or(1.0, |w| w[k]);
                    let j = (0..row.len())
                        .min_by(|&a, &b| {
                            let cost =
                                |j: usize| wk * row[j].0 - lambda * row[j].1 as f64 / total as f64;
                            cost(a).total_cmp(&cost(b))
                        })
                        .expect("candidates");
                    zeros += row[j].1;
                    j
                }
            };
            picks.push(j);
        }
        (picks, zeros)
    };
    let (mut lo, mut hi) = (1e-8f64.ln(), 1e4f64.ln());
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if choose(mid.exp()).1 >= want {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let lambda = hi.exp();
    let (picks, _) = choose(lambda);
    pool.iter()
        .zip(picks)
        .zip(&table)
        .filter(|((_, j), _)| *j != usize::MAX)
        .map(|((&i, j), row)| {
            let (l, c) = (&layers[i], calibrated[i].as_ref().expect("pooled"));
            let rows = l.rows.as_ref().expect("pooled");
            let s = ALLOCATION_CANDIDATES[j];
            let weights = if s == 0.0 {
                l.w0.clone()
            } else {
                let factors = factors_of(c).expect("factored above");
                sparsegpt_with(&l.w0, rows, c, &factors, calib::obs::Sparsity::Fraction(s))
            };
            let (error, zeros) = row.as_ref().expect("factored")[j];
            Allocated {
                layer: i,
                sparsity: s,
                zeros,
                error,
                weights,
                lambda,
            }
        })
        .collect()
}

/// The weights with the masked ones zeroed.
fn apply(w0: &[f32], mask: &[bool]) -> Vec<f32> {
    w0.iter()
        .zip(mask)
        .map(|(&x, &z)| if z { 0.0 } else { x })
        .collect()
}
