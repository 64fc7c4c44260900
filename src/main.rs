//! The `onnx-micronet` command line: parse flags, call the library, print.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use onnx_micronet::onnx::{self, io::Layout, SaveOptions};
use onnx_micronet::optimize;
use onnx_micronet::passes::Context as PassContext;
use onnx_micronet::recipe::{PruneSection, Recipe};
use onnx_micronet::score::{
    self, AccMode, BnMode, OutputSize, ScoreOptions, SparsePolicy, TernaryMode, Track,
};
use onnx_micronet::validate;

/// Compress trained ONNX image classifiers and tell the truth about what it bought.
///
/// onnx-micronet loads a model exported with torch.onnx.export (or any ONNX
/// producer), folds BatchNorm, prunes, quantizes and packs weights, writes an ONNX
/// file any runtime can run, and scores it by the NeurIPS 2019 MicroNet rules.
///
/// Exit codes: 0 success, 2 bad input or usage (the message names the file, node,
/// tensor or option), 1 anything else.
#[derive(Parser)]
#[command(
    name = "onnx-micronet",
    version,
    propagate_version = true,
    max_term_width = 100
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per run: the size of the biggest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Show what a model holds: versions, inputs and outputs, op histogram,
    /// parameters by element type, BatchNorm count, sparsity of each weight.
    ///
    /// Example:
    ///   onnx-micronet inspect fixtures/mobilenetv2_cifar_bn.onnx
    ///   onnx-micronet inspect model.onnx --json > model.json
    Inspect {
        /// The ONNX model (a single file, or a model with external data beside it).
        model: PathBuf,
        /// Print JSON instead of the text report.
        #[arg(long)]
        json: bool,
        /// In the text report, list weights with at least this many elements.
        #[arg(long, value_name = "N", default_value_t = 1000)]
        min_elements: usize,
    },
    /// Rewrite a model without changing it: decode, check, encode. Lossless (every
    /// field is kept) and useful to move between single-file and external-data layouts.
    ///
    /// The output is written to a temporary file and renamed into place; the input
    /// is never written. Models over 2 GiB are written with external data.
    ///
    /// Examples:
    ///   onnx-micronet convert model.onnx -o copy.onnx
    ///   onnx-micronet convert dynamo/model.onnx -o single.onnx        (pull external data in)
    ///   onnx-micronet convert big.onnx -o out/big.onnx --external-data (writes out/big.onnx.data)
    Convert {
        /// The ONNX model to read.
        model: PathBuf,
        /// Where to write the model.
        #[arg(short, long, value_name = "OUT")]
        output: PathBuf,
        /// Write initializers to one side file `<OUT>.data` next to the output
        /// (default: one file, unless it would pass protobuf's 2 GiB limit).
        #[arg(long)]
        external_data: bool,
        /// With --external-data: initializers smaller than this many bytes stay in the model file.
        #[arg(
            long,
            value_name = "BYTES",
            default_value_t = 1024,
            requires = "external_data"
        )]
        external_threshold: usize,
    },
    /// Score a model by the MicroNet challenge rules: parameter storage and math
    /// operations per layer and in total, and the score against the track's baseline.
    ///
    /// Counted from the ONNX file itself: shapes from tract's analysis, sparsity from
    /// the exact zeros of each weight, bit widths from what the file stores
    /// (DequantizeLinear types, Q/DQ activations, verified scheme claims). An
    /// unquantized model gets the 16-bit freebie (params and multiplies at 16 bits,
    /// adds at 32); quantizing anything cancels it everywhere.
    ///
    /// Examples:
    ///   onnx-micronet score model.onnx
    ///   onnx-micronet score mobilenet_v2.onnx --track imagenet --json report.json
    ///   onnx-micronet score model.onnx --input-shape 1,3,32,32 --accumulation tree --json -
    Score {
        /// The ONNX model.
        model: PathBuf,
        #[command(flatten)]
        counting: CountingArgs,
        /// Write the report as JSON to FILE ('-' for standard output, replacing the table).
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Write the report as Markdown (for a submission README) to FILE.
        #[arg(long, value_name = "FILE")]
        markdown: Option<PathBuf>,
    },
    /// Measure accuracy in tract (an independent runtime) on labelled images: top-1 and
    /// top-5 of each model, and with a second model their top-1 agreement and the
    /// largest and mean absolute logit difference, plus images per second.
    ///
    /// Data formats (detected from PATH, or --data-format): CIFAR-10/100 binary
    /// (a .bin file or a folder of them), IDX (MNIST, Fashion-MNIST; .gz accepted),
    /// NumPy .npy/.npz, or a folder of PNG/JPEG images (labels from class subfolders,
    /// foolbox-style `<set>_<idx>_<label>` names, or a labels.txt/labels.csv).
    ///
    /// Examples:
    ///   onnx-micronet validate model.onnx --data cifar-10-batches-bin/test_batch.bin --preprocess cifar
    ///   onnx-micronet validate model.onnx small.onnx --data imagenet-val/ --preprocess imagenet --limit 1000
    ///   onnx-micronet validate mnist.onnx --data t10k-images-idx3-ubyte.gz --json -
    Validate {
        /// The model to measure.
        model: PathBuf,
        /// A second model to compare with the first (e.g. the compressed one).
        other: Option<PathBuf>,
        #[command(flatten)]
        data: DataArgs,
        /// Write the report as JSON to FILE ('-' for standard output, replacing the text).
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// Compress a model: fold BatchNorm, prune, ... as a recipe or the flags say, write
    /// the result, and print what each pass did and the MicroNet score before and
    /// after. With --data, both models run in tract and their accuracy is reported
    /// beside the score; --min-accuracy / --max-drop make a shortfall exit with code 3
    /// and no output file.
    ///
    /// Examples:
    ///   onnx-micronet optimize model.onnx -o small.onnx
    ///   onnx-micronet optimize model.onnx -o small.onnx --prune magnitude:0.5 --data test/ --preprocess cifar
    ///   onnx-micronet optimize model.onnx -o small.onnx --prune reweighted:0.7 --calib train/ --calib-samples 128
    ///   onnx-micronet optimize model.onnx -o small.onnx --recipe recipe.toml --dry-run
    Optimize {
        /// The ONNX model to compress (never written).
        model: PathBuf,
        /// Where to write the compressed model.
        #[arg(short, long, value_name = "OUT")]
        output: PathBuf,
        /// A TOML recipe naming the passes and per-layer settings (see README); flags override it.
        #[arg(long, value_name = "FILE")]
        recipe: Option<PathBuf>,
        /// Do not fold BatchNormalization (folding is on by default).
        #[arg(long)]
        no_fold_bn: bool,
        /// Prune: magnitude:S (each layer to sparsity S), global:S (one threshold), nm:N:M
        /// (N of every M kept), reweighted:S (reweighted L1 on calibration data, needs --calib).
        #[arg(long, value_name = "METHOD:SPARSITY")]
        prune: Option<String>,
        /// Never prune weights whose node or initializer name matches this glob (repeatable).
        #[arg(long, value_name = "PATTERN")]
        prune_skip: Vec<String>,
        /// After pruning, refit the surviving weights by least squares on calibration data (needs --calib).
        #[arg(long)]
        refit: bool,
        #[command(flatten)]
        quant: QuantArgs,
        /// Calibration images (any --data format; labels not needed).
        #[arg(long, value_name = "PATH")]
        calib: Option<PathBuf>,
        /// How many calibration images to use.
        #[arg(long, value_name = "N", default_value_t = 256)]
        calib_samples: usize,
        /// Weight storage: packed (a bitmask over pruned zeros + k-bit codes or float32
        /// values, decoded by standard ONNX ops that runtimes fold at load; the default
        /// when pruning or quantizing) or float (dense float32).
        #[arg(long, value_name = "STORAGE", value_parser = ["packed", "float"])]
        storage: Option<String>,
        /// Labelled images: validate the original and the written model on them.
        #[arg(long, value_name = "PATH")]
        data: Option<PathBuf>,
        #[command(flatten)]
        prep: PrepArgs,
        /// Fail (exit 3, no output) when the written model's top-1 is below this (0.75 or 75).
        #[arg(long, value_name = "X", requires = "data")]
        min_accuracy: Option<f64>,
        /// Fail (exit 3, no output) when top-1 drops by more than this (0.01 or 1 for one point).
        #[arg(long, value_name = "D", requires = "data")]
        max_drop: Option<f64>,
        /// Print the plan and the predicted score without writing anything.
        #[arg(long)]
        dry_run: bool,
        /// Also write the whole report as JSON.
        #[arg(long, value_name = "FILE")]
        report: Option<PathBuf>,
        /// Write initializers to one side file `<OUT>.data`.
        #[arg(long)]
        external_data: bool,
        #[command(flatten)]
        counting: CountingArgs,
    },
}

/// Where the images come from and how they are prepared (validate, calibration, optimize --data).
#[derive(clap::Args, Debug)]
struct DataArgs {
    /// Labelled images (see the formats above).
    #[arg(long, value_name = "PATH")]
    data: PathBuf,
    #[command(flatten)]
    prep: PrepArgs,
    /// Model input shape when it is not fixed in the model (e.g. 1,3,32,32).
    #[arg(long, value_name = "DIMS", value_parser = parse_shape)]
    input_shape: Vec<Vec<usize>>,
}

/// How images are read and prepared, and how many threads run them (validate, optimize).
#[derive(clap::Args, Debug, Clone)]
struct PrepArgs {
    /// Preprocessing preset: imagenet (short side 256/224 of the input, centre crop, /255,
    /// ImageNet mean/std), cifar (/255, CIFAR mean/std), mnist (/255, 0.1307/0.3081),
    /// raw (0..255 floats). Default: mnist for 1-channel inputs, imagenet from 128 px, else cifar.
    #[arg(long, value_name = "PRESET", value_parser = ["imagenet", "cifar", "mnist", "raw"])]
    preprocess: Option<String>,
    /// Force the data format instead of detecting it: cifar10, cifar100, idx, npy, npz, images.
    #[arg(long, value_name = "FORMAT")]
    data_format: Option<onnx_micronet::data::Format>,
    /// Use only the first N images of --data.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// Worker threads, each running one image at a time (default: all cores).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
}

/// Weight and activation quantization flags of `optimize` (shorthand for the recipe's
/// [quantize] and [act_quant] sections, which they override).
#[derive(clap::Args, Debug)]
struct QuantArgs {
    /// Quantize weights: linear:B, minmax:B, log:B, tanh:B (B bits), or ternary:twn,
    /// ternary:msu, ternary:ec2t (e.g. --quantize linear:8).
    #[arg(long, value_name = "SCHEME:BITS")]
    quantize: Option<String>,
    /// Bits for named layers: NAME=BITS,... (node or weight names, globs allowed; 32 = float).
    #[arg(long, value_name = "NAME=BITS,..")]
    layer_bits: Option<String>,
    /// Bits per weighted layer in layer order (topological order of Conv/ConvTranspose/Gemm/MatMul
    /// with a constant weight), e.g. 9,8,8,6; its length must equal the layer count.
    #[arg(long, value_name = "B,B,..")]
    qbn: Option<String>,
    /// One grid per output channel (linear, minmax).
    #[arg(long)]
    per_channel: bool,
    /// Fraction of values allowed to clip when choosing a range (weights and activations; default 0).
    #[arg(long, value_name = "R")]
    overflow_rate: Option<f64>,
    /// Quantize biases too (linear, B bits); by default they stay float.
    #[arg(long, value_name = "B")]
    bias_bits: Option<u32>,
    /// Quantize activations to B bits (8: QuantizeLinear/DequantizeLinear; else a fake-quant
    /// chain), ranges calibrated on --calib.
    #[arg(long, value_name = "B")]
    act_bits: Option<u32>,
    /// Activation range: maxabs (with --overflow-rate; power-of-two scales), percentile:P,
    /// mse, or minmax (asymmetric, with a zero point: for shifted ranges like BN after ReLU).
    #[arg(long, value_name = "RANGE")]
    act_range: Option<String>,
}

impl QuantArgs {
    fn apply(&self, r: &mut Recipe) -> anyhow::Result<()> {
        use onnx_micronet::passes::act_quant::ActQuantSection;
        use onnx_micronet::passes::quantize::{parse_layer_bits, parse_qbn, QuantizeSection};
        if let Some(spec) = &self.quantize {
            let mut section = QuantizeSection::from_flag(spec)?;
            if let Some(old) = r.quantize.take() {
                section = QuantizeSection {
                    scheme: section.scheme,
                    bits: section.bits,
                    rule: section.rule,
                    ..old
                };
            }
            r.quantize = Some(section);
        }
        match r.quantize.as_mut() {
            Some(q) => {
                if let Some(b) = &self.layer_bits {
                    q.layers.extend(parse_layer_bits(b)?);
                }
                if let Some(v) = &self.qbn {
                    q.qbn = Some(parse_qbn(v)?);
                }
                if self.per_channel {
                    q.per_channel = Some(true);
                }
                if self.overflow_rate.is_some() {
                    q.overflow_rate = self.overflow_rate;
                }
                if self.bias_bits.is_some() {
                    q.bias_bits = self.bias_bits;
                }
            }
            None if self.layer_bits.is_some()
                || self.qbn.is_some()
                || self.per_channel
                || self.bias_bits.is_some() =>
            {
                return Err(onnx_micronet::Error::Usage(
                    "--layer-bits, --qbn, --per-channel and --bias-bits need --quantize (or a [quantize] section in the recipe)".into(),
                )
                .into());
            }
            None => {}
        }
        if let Some(b) = self.act_bits {
            let old = r.act_quant.take().unwrap_or_default();
            r.act_quant = Some(ActQuantSection { bits: b, ..old });
        }
        match r.act_quant.as_mut() {
            Some(a) => {
                if self.act_range.is_some() {
                    a.range = self.act_range.clone();
                }
                if self.overflow_rate.is_some() {
                    a.overflow_rate = self.overflow_rate;
                }
            }
            None if self.act_range.is_some() => {
                return Err(onnx_micronet::Error::Usage(
                    "--act-range needs --act-bits (or an [act_quant] section in the recipe)".into(),
                )
                .into());
            }
            None => {}
        }
        Ok(())
    }
}

/// The counting options (micronet-rules.md section 5.1), shared by `score` and `optimize`.
#[derive(clap::Args, Debug)]
struct CountingArgs {
    /// Challenge track: its baseline normalizes the score.
    /// cifar100 = WideResNet-28-10 (36.5M params, 10.49B ops); imagenet = MobileNetV2-1.4 (6.9M, 1170M).
    /// Default: imagenet for inputs from 128 px or 1000 classes, else cifar100 (the report says so).
    #[arg(long, value_enum)]
    track: Option<Track>,
    /// Custom baseline parameter count (overrides the track's).
    #[arg(long, value_name = "N")]
    baseline_params: Option<f64>,
    /// Custom baseline operation count (overrides the track's).
    #[arg(long, value_name = "N")]
    baseline_ops: Option<f64>,
    /// Input shape, comma-separated (repeat for several inputs, in order). Default: the
    /// declared shape with a symbolic batch set to 1. Example: --input-shape 1,3,224,224
    #[arg(long, value_name = "DIMS", value_parser = parse_shape)]
    input_shape: Vec<Vec<usize>>,
    /// Count an unquantized model at 32 bits instead of taking the 16-bit freebie.
    #[arg(long)]
    no_freebie: bool,
    /// Conv/FC accumulation adds: fp32 (REF), fp16, tree (integer adder tree, 2n, 2n+1, ...
    /// bits per level; integer layers only), fixed-int (every add as wide as the widest level).
    #[arg(long, value_enum, default_value = "fp32")]
    accumulation: AccMode,
    /// Bits of element-wise adds (bias, residual, BN, pooling and activation adds).
    #[arg(long, value_name = "BITS", default_value_t = 32, value_parser = parse_add_bits)]
    elementwise_add_bits: u32,
    /// Ternary weights: sparse-binary-plus-scale (MSUNet) or two-masks-two-centroids (EC2T).
    #[arg(long, value_enum, default_value = "sparse-binary-plus-scale")]
    ternary_mode: TernaryMode,
    /// BatchNormalization: fold-bias (NB), fold-mul-only (MSU3), unfolded (MSU1), ignore, scale-bias-fp16 (RIAIR).
    #[arg(long, value_enum, default_value = "fold-bias")]
    bn_mode: BnMode,
    /// Per-element cost of an activation op, overriding the table: OP=MULTS,ADDS
    /// (repeatable). Example: --act-cost HardSwish=3,1
    #[arg(long, value_name = "OP=M,A", value_parser = parse_act_cost)]
    act_cost: Vec<(String, (f64, f64))>,
    /// Sparse weight storage: mask-if-any-zero (REF), min (cheaper of dense and masked),
    /// threshold:T (mask at sparsity >= T, e.g. threshold:0.5 as MSUNet-v1).
    #[arg(long, value_name = "POLICY", default_value = "mask-if-any-zero")]
    sparse_storage: SparsePolicy,
    /// Output sizes: graph (tract's shapes) or ref (REF's conv formula, for parity checks).
    #[arg(long, value_enum, default_value = "graph")]
    output_size: OutputSize,
    /// Max pooling comparisons: counted (k*k-1 per output, as multiplies like REF's relu) or free.
    #[arg(long, value_name = "HOW", default_value = "counted", value_parser = ["counted", "free"])]
    max_pool: String,
    /// Fail when a node's op is not in the counting table (default: list it as uncounted).
    #[arg(long)]
    strict: bool,
}

impl CountingArgs {
    /// The counting options for `model`; the track, when not given, is inferred from
    /// the model (the report says so).
    fn options(&self, model: &onnx::Model) -> anyhow::Result<ScoreOptions> {
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
            count_max_pool: self.max_pool == "counted",
            strict: self.strict,
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

fn parse_shape(s: &str) -> Result<Vec<usize>, String> {
    s.split(',')
        .map(|d| {
            d.trim()
                .parse::<usize>()
                .map_err(|_| format!("'{s}': expected comma-separated dims, e.g. 1,3,32,32"))
        })
        .collect()
}

fn parse_act_cost(s: &str) -> Result<(String, (f64, f64)), String> {
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

/// Why the rewritten model's accuracy falls short of the gate, if it does.
fn accuracy_shortfall(
    v: &validate::Report,
    min_accuracy: Option<f64>,
    max_drop: Option<f64>,
) -> Option<String> {
    let frac = |x: f64| if x > 1.0 { x / 100.0 } else { x };
    let (orig, new) = (v.runs.first()?.top1?, v.runs.get(1)?.top1?);
    if let Some(m) = min_accuracy.map(frac) {
        if new < m {
            return Some(format!(
                "top-1 {:.2}% is below --min-accuracy {:.2}%",
                100.0 * new,
                100.0 * m
            ));
        }
    }
    if let Some(d) = max_drop.map(frac) {
        if orig - new > d {
            return Some(format!(
                "top-1 dropped {:.2} points ({:.2}% -> {:.2}%), more than --max-drop {:.2}",
                100.0 * (orig - new),
                100.0 * orig,
                100.0 * new,
                100.0 * d
            ));
        }
    }
    None
}

/// Loads the data the way the first model's input wants it and runs one or two models.
fn run_validation(
    first: &onnx::Model,
    first_path: &std::path::Path,
    second: Option<(&onnx::Model, &PathBuf)>,
    args: &DataArgs,
) -> anyhow::Result<validate::Report> {
    let geometry = validate::input_geometry(first, &args.input_shape)?;
    let prep = &args.prep;
    let preset = prep
        .preprocess
        .clone()
        .unwrap_or_else(|| validate::default_preset(geometry.2, geometry.3).to_string());
    let data = validate::load_data(&args.data, &preset, prep.data_format, prep.limit, &geometry)?;
    let threads = prep
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut models = vec![(first_path.display().to_string(), first)];
    if let Some((m, p)) = second {
        models.push((p.display().to_string(), m));
    }
    let named: Vec<(&str, &onnx::Model)> = models.iter().map(|(n, m)| (n.as_str(), *m)).collect();
    let bars: Vec<indicatif::ProgressBar> = named
        .iter()
        .map(|(n, _)| {
            let bar = indicatif::ProgressBar::new(data.images.shape()[0] as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_message(n.to_string());
            bar
        })
        .collect();
    let report = validate::validate(&named, &geometry.0, &data, threads, &|k, done| {
        bars[k].set_position(done as u64)
    })?;
    for b in &bars {
        b.finish_and_clear();
    }
    eprintln!("preprocess: {preset}");
    Ok(report)
}

/// Prints to standard output; a closed pipe (`| head`) ends the output quietly.
fn out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|_| stdout.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

/// Writes `text` to FILE atomically, or to standard output for '-'.
fn emit(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    if path.as_os_str() == "-" {
        return out(&format!("{text}\n"));
    }
    onnx::io::write_atomically(path, |f| std::io::Write::write_all(f, text.as_bytes()))?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Panics inside tract are turned into errors by the engine: keep them quiet.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !onnx_micronet::engine::in_guarded_call() {
            default_hook(info)
        }
    }));
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // One line, whatever the model's names hold (control characters escaped).
            let line: String = format!("{e:#}")
                .chars()
                .flat_map(|c| {
                    let esc: Vec<char> = if c.is_control() {
                        c.escape_default().collect()
                    } else {
                        vec![c]
                    };
                    esc
                })
                .collect();
            eprintln!("error: {line}");
            let usage = e
                .chain()
                .any(|c| c.downcast_ref::<onnx_micronet::Error>().is_some());
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Inspect {
            model,
            json,
            min_elements,
        } => {
            let m = onnx::load(&model)?;
            let report = onnx_micronet::inspect::inspect(&m)?;
            if json {
                out(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
            } else {
                out(&report.to_text(min_elements))?;
            }
        }
        Command::Convert {
            model,
            output,
            external_data,
            external_threshold,
        } => {
            let m = onnx::load(&model)?;
            let opts = SaveOptions {
                layout: if external_data {
                    Layout::External
                } else {
                    Layout::Auto
                },
                external_threshold,
            };
            let r = onnx::save(&m, &output, &opts)
                .with_context(|| format!("writing {}", output.display()))?;
            let mut line = format!("wrote {} ({} bytes)", r.path.display(), r.model_bytes);
            if let Some((p, n, count)) = &r.external {
                line += &format!(" + {} ({n} bytes, {count} tensors)", p.display());
            }
            out(&format!("{line}\n"))?;
        }
        Command::Validate {
            model,
            other,
            data,
            json,
        } => {
            let first = onnx::load(&model)?;
            let second = other.as_ref().map(|p| onnx::load(p)).transpose()?;
            let report =
                run_validation(&first, &model, second.as_ref().zip(other.as_ref()), &data)?;
            let json_to_stdout = json.as_deref().is_some_and(|p| p.as_os_str() == "-");
            if !json_to_stdout {
                out(&report.to_text())?;
            }
            if let Some(path) = &json {
                emit(path, &serde_json::to_string_pretty(&report)?)?;
            }
        }
        Command::Optimize {
            model,
            output,
            recipe,
            no_fold_bn,
            prune,
            prune_skip,
            refit,
            quant,
            calib,
            calib_samples,
            storage,
            data,
            prep,
            min_accuracy,
            max_drop,
            dry_run,
            report,
            external_data,
            counting,
        } => {
            let original = onnx::load(&model)?;
            let mut r = match &recipe {
                Some(p) => Recipe::from_file(p)?,
                None => Recipe::default(),
            };
            if no_fold_bn {
                r.fold_bn = Some(false);
            }
            if let Some(p) = &prune {
                let mut section = PruneSection::from_flag(p)?;
                if let Some(old) = r.prune.take() {
                    section.layers = old.layers;
                    section.skip = old.skip;
                    section.min_elements = old.min_elements;
                    section.skip_first_conv = old.skip_first_conv;
                    section.refit = old.refit;
                    section.rounds = old.rounds;
                }
                r.prune = Some(section);
            }
            if let Some(section) = r.prune.as_mut() {
                section.skip.extend(prune_skip.iter().cloned());
                if refit {
                    section.refit = Some(true);
                }
            } else if refit || !prune_skip.is_empty() {
                anyhow::bail!(
                    "--refit and --prune-skip need --prune (or a [prune] section in the recipe)"
                );
            }
            if storage.is_some() {
                r.storage = storage.clone();
            }
            quant.apply(&mut r)?;
            let opts = counting.options(&original)?;
            let threads = prep
                .threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let geometry = validate::input_geometry(&original, &counting.input_shape);
            let preset_for =
                |g: &(Vec<usize>, onnx_micronet::data::Layout, usize, usize, usize)| {
                    prep.preprocess
                        .clone()
                        .unwrap_or_else(|| validate::default_preset(g.2, g.3).to_string())
                };
            let calib_data = match &calib {
                Some(p) => {
                    let g = geometry
                        .as_ref()
                        .map_err(|e| anyhow::anyhow!("--calib: {e}"))?;
                    Some(validate::load_data(
                        p,
                        &preset_for(g),
                        prep.data_format,
                        Some(calib_samples),
                        g,
                    )?)
                }
                None => None,
            };
            let cx = PassContext {
                calib: calib_data.as_ref(),
                input_shape: geometry.as_ref().map(|g| g.0.clone()).unwrap_or_default(),
                threads,
            };
            let (optimized, passes) = optimize::run(&original, &r, &cx)?;
            let (before, mut after) = optimize::scores(&original, &optimized, &opts)?;
            let validation = match &data {
                Some(d) => {
                    let args = DataArgs {
                        data: d.clone(),
                        prep: PrepArgs {
                            threads: Some(threads),
                            ..prep.clone()
                        },
                        input_shape: counting.input_shape.clone(),
                    };
                    let out_name = output.display().to_string();
                    Some(run_validation(
                        &original,
                        &model,
                        Some((&optimized, &PathBuf::from(out_name))),
                        &args,
                    )?)
                }
                None => None,
            };
            let mut rep = optimize::OptimizeReport {
                input: model.display().to_string(),
                output: None,
                recipe: r,
                passes,
                before,
                after: after.clone(),
                validation,
            };
            if let Some(v) = &rep.validation {
                if let Some(why) = accuracy_shortfall(v, min_accuracy, max_drop) {
                    out(&rep.to_text())?;
                    eprintln!("error: {why}; nothing written");
                    return Ok(ExitCode::from(3));
                }
            }
            if !dry_run {
                let save = SaveOptions {
                    layout: if external_data {
                        Layout::External
                    } else {
                        Layout::Auto
                    },
                    ..SaveOptions::default()
                };
                onnx::save(&optimized, &output, &save)
                    .with_context(|| format!("writing {}", output.display()))?;
                // The written file holds exactly `optimized` (saving is lossless, byte for
                // byte: tests/io_roundtrip.rs), so its score is the one computed above.
                after.model = Some(output.display().to_string());
                rep.after = after;
                rep.output = Some(output.display().to_string());
            } else {
                eprintln!("dry run: nothing written; the 'after' column is the predicted score");
            }
            out(&rep.to_text())?;
            if let Some(path) = &report {
                emit(path, &serde_json::to_string_pretty(&rep)?)?;
            }
        }
        Command::Score {
            model,
            counting,
            json,
            markdown,
        } => {
            let m = onnx::load(&model)?;
            let report = score::score(&m, &counting.options(&m)?)?;
            let json_to_stdout = json.as_deref().is_some_and(|p| p.as_os_str() == "-");
            if !json_to_stdout {
                out(&report.to_text())?;
            }
            if let Some(path) = &json {
                emit(path, &serde_json::to_string_pretty(&report)?)?;
            }
            if let Some(path) = &markdown {
                emit(path, &report.to_markdown())?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_add_bits(s: &str) -> Result<u32, String> {
    match s {
        "32" => Ok(32),
        "16" => Ok(16),
        _ => Err(format!("'{s}': element-wise add bits are 32 or 16")),
    }
}
