//! The `onnx-micronet` command line: parse flags, call the library, print.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use onnx_micronet::onnx::{self, io::Layout, SaveOptions};
use onnx_micronet::score::{
    self, AccMode, BnMode, OutputSize, ScoreOptions, SparsePolicy, TernaryMode, Track,
};

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
}

/// The counting options (micronet-rules.md section 5.1), shared by `score` and `optimize`.
#[derive(clap::Args, Debug)]
struct CountingArgs {
    /// Challenge track: its baseline normalizes the score.
    /// cifar100 = WideResNet-28-10 (36.5M params, 10.49B ops); imagenet = MobileNetV2-1.4 (6.9M, 1170M).
    #[arg(long, value_enum, default_value = "cifar100")]
    track: Track,
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
    fn options(&self) -> ScoreOptions {
        let mut o = ScoreOptions {
            track: self.track,
            baseline: self.track.baseline(),
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
        o
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
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
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
        Command::Score {
            model,
            counting,
            json,
            markdown,
        } => {
            let m = onnx::load(&model)?;
            let report = score::score(&m, &counting.options())?;
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
