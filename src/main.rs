//! The `onnx-micronet` command line: parse flags, call the library, print.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use onnx_micronet::onnx::{self, io::Layout, SaveOptions};

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
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_text(min_elements));
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
            print!("wrote {} ({} bytes)", r.path.display(), r.model_bytes);
            if let Some((p, n, count)) = &r.external {
                print!(" + {} ({n} bytes, {count} tensors)", p.display());
            }
            println!();
        }
    }
    Ok(ExitCode::SUCCESS)
}
