//! The command line's flags: clap structs only. Library options are derived
//! where they are defined (`score::Counting`, `recipe::Overrides`) and flattened
//! in here; `main.rs` turns these into library calls.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use onnx_micronet::recipe::Overrides;
use onnx_micronet::score::options::parse_shape;
use onnx_micronet::score::Counting;

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
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per run: the size of the biggest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum Command {
    /// Show what a model holds: versions, inputs and outputs, op histogram,
    /// parameters by element type, BatchNorm count, sparsity of each weight.
    ///
    /// Example:
    ///   onnx-micronet inspect fixtures/mobilenetv2_cifar_bn.onnx
    ///   onnx-micronet inspect model.onnx --json > model.json
    #[command(verbatim_doc_comment)]
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
    #[command(verbatim_doc_comment)]
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
    #[command(verbatim_doc_comment)]
    Score {
        /// The ONNX model.
        model: PathBuf,
        #[command(flatten)]
        counting: Counting,
        /// Write the report as JSON to FILE ('-' for standard output, replacing the table).
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Write the report as Markdown (for a submission README) to FILE.
        #[arg(long, value_name = "FILE")]
        markdown: Option<PathBuf>,
        /// Write a self-contained HTML report (tables and SVG plots, no network) to FILE.
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
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
    ///   onnx-micronet validate model.onnx --data cifar-10-batches-bin/test_batch.bin
    ///   onnx-micronet validate model.onnx small.onnx --data imagenet-val/ --limit 1000
    ///   onnx-micronet validate mnist.onnx --data t10k-images-idx3-ubyte.gz --json -
    #[command(verbatim_doc_comment)]
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
        /// Write a self-contained HTML report (tables and SVG plots, no network) to FILE.
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
    },
    /// Compress a model: fold BatchNorm, prune, ... as a recipe or the flags say, write
    /// the result, and print what each pass did and the MicroNet score before and
    /// after. With --data, both models run in tract and their accuracy is reported
    /// beside the score; --min-accuracy / --max-drop make a shortfall exit with code 3
    /// and no output file.
    ///
    /// Examples:
    ///   onnx-micronet optimize model.onnx -o small.onnx
    ///   onnx-micronet optimize m.onnx -o s.onnx --prune magnitude:0.5 --data test/ --preprocess cifar
    ///   onnx-micronet optimize m.onnx -o s.onnx --quantize fp16 --data test/ --min-agreement 0.99
    ///   onnx-micronet optimize m.onnx -o s.onnx --prune reweighted:0.7 --calib train/ --calib-samples 128
    ///   onnx-micronet optimize model.onnx -o small.onnx --recipe recipe.toml --dry-run
    #[command(verbatim_doc_comment)]
    Optimize {
        /// The ONNX model to compress (never written).
        model: PathBuf,
        /// Where to write the compressed model.
        #[arg(short, long, value_name = "OUT")]
        output: PathBuf,
        /// A TOML recipe naming the passes and per-layer settings (see README); flags override it.
        #[arg(long, value_name = "FILE")]
        recipe: Option<PathBuf>,
        #[command(flatten)]
        overrides: Overrides,
        /// Calibration images (any --data format; labels not needed).
        #[arg(long, value_name = "PATH")]
        calib: Option<PathBuf>,
        /// How many calibration images to use.
        #[arg(long, value_name = "N", default_value_t = 256)]
        calib_samples: usize,
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
        /// Fail (exit 3, no output) when the written model's top-1 agrees with the
        /// original's on less than this share of the images (0.9 or 90; labels not needed).
        #[arg(long, value_name = "A", requires = "data")]
        min_agreement: Option<f64>,
        /// Print the plan and the predicted score without writing anything.
        #[arg(long)]
        dry_run: bool,
        /// Print every change and every layer left alone, with the reason (by
        /// default: one line per pass).
        #[arg(long, short = 'v')]
        verbose: bool,
        /// Also write the before/after table as Markdown to FILE.
        #[arg(long, value_name = "FILE")]
        markdown: Option<PathBuf>,
        /// Also write the whole report as JSON.
        #[arg(long, value_name = "FILE")]
        report: Option<PathBuf>,
        /// Search the mean weight width: bisect between 2 bits and --avg-weight-bits
        /// for the smallest whose model passes the accuracy gate (--min-agreement,
        /// --max-drop or --min-accuracy), building and measuring each plan on --data
        /// (1 + --search-steps builds); the table of every plan measured is printed
        /// and written.
        #[arg(long)]
        search: bool,
        /// Bisection steps of --search / --target-score after the first build.
        #[arg(long, value_name = "N", default_value_t = 4)]
        search_steps: usize,
        /// The lowest-error plan within a MicroNet score: bisect the mean weight
        /// width between 2 bits and --avg-weight-bits for the largest whose model
        /// scores at most S (each plan built, scored and measured on --data; an
        /// accuracy gate, if given, must then hold for the chosen plan). Needs
        /// --avg-weight-bits, --calib and --data.
        #[arg(long, value_name = "S", conflicts_with = "search")]
        target_score: Option<f64>,
        /// Write the chosen plan as a recipe (per-layer bits pinned) to FILE.
        #[arg(long, value_name = "FILE")]
        plan: Option<PathBuf>,
        /// Also write a self-contained HTML report (tables and SVG plots: score per
        /// layer, bits and sparsity, weight histograms with their grids, activation
        /// ranges, per-layer errors, accuracy) to FILE.
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
        /// Write initializers to one side file `<OUT>.data`.
        #[arg(long)]
        external_data: bool,
        #[command(flatten)]
        counting: Counting,
    },
}

/// Where the images come from and how they are prepared (validate, calibration, optimize --data).
#[derive(clap::Args, Debug)]
pub struct DataArgs {
    /// Labelled images (see the formats above).
    #[arg(long, value_name = "PATH")]
    pub data: PathBuf,
    #[command(flatten)]
    pub prep: PrepArgs,
    /// Model input shape when it is not fixed in the model (e.g. 1,3,32,32).
    #[arg(long, value_name = "DIMS", value_parser = parse_shape)]
    pub input_shape: Vec<Vec<usize>>,
}

/// How images are read and prepared, and how many threads run them (validate, optimize).
#[derive(clap::Args, Debug, Clone)]
pub struct PrepArgs {
    /// Preprocessing preset: imagenet (short side 256/224 of the input, centre crop, /255,
    /// ImageNet mean/std), cifar (/255, CIFAR mean/std), mnist (/255, 0.1307/0.3081),
    /// raw (0..255 floats). Default: mnist for 1-channel inputs, imagenet from 128 px, else cifar.
    #[arg(long, value_name = "PRESET", value_parser = ["imagenet", "cifar", "mnist", "raw"])]
    pub preprocess: Option<String>,
    /// Per-channel mean subtracted after scaling to 0..1, overriding the preset's
    /// (e.g. --mean 0.5,0.5,0.5 for EfficientNet-Lite / Inception-style models).
    #[arg(long, value_name = "M,M,M", value_delimiter = ',')]
    pub mean: Option<Vec<f32>>,
    /// Per-channel std divided by, overriding the preset's (e.g. --std 0.5,0.5,0.5).
    #[arg(long, value_name = "S,S,S", value_delimiter = ',')]
    pub std: Option<Vec<f32>>,
    /// Resize the short side to S before the centre crop (torchvision Resize(S) +
    /// CenterCrop), overriding the preset's (imagenet: round(H * 256/224)).
    #[arg(long, value_name = "S")]
    pub resize: Option<usize>,
    /// The centre crop as a fraction of the resized short side (timm's crop_pct,
    /// e.g. 0.875): the short side is resized to floor(input / P) before the crop
    /// to the model's input size. Instead of --resize.
    #[arg(long, value_name = "P", conflicts_with = "resize")]
    pub crop_pct: Option<f64>,
    /// The resize filter: bilinear (torchvision's default), bicubic (timm's usual
    /// choice) or nearest, each as Pillow computes it. The crop is the model's input
    /// size; --resize sets the crop fraction (timm's crop_pct = input / S).
    #[arg(long, value_name = "FILTER", value_parser = ["bilinear", "bicubic", "nearest"])]
    pub interpolation: Option<String>,
    /// Force the data format instead of detecting it: cifar10, cifar100, idx, npy, npz, images.
    #[arg(long, value_name = "FORMAT")]
    pub data_format: Option<onnx_micronet::data::Format>,
    /// Use only the first N images of --data.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Worker threads, each running one image at a time (default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}
