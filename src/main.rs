//! The `onnx-micronet` command line: parse flags (`cli.rs`), call the library,
//! print. One short function per subcommand; one place maps errors to exit codes.

mod cli;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use cli::{Cli, Command, DataArgs, PrepArgs};
use onnx_micronet::onnx::{self, io::Layout, SaveOptions};
use onnx_micronet::optimize;
use onnx_micronet::passes::Context as PassContext;
use onnx_micronet::recipe::{Overrides, Recipe};
use onnx_micronet::score::{self, Counting};
use onnx_micronet::validate;

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
        .unwrap_or_else(|| geometry.default_preset().to_string());
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
    let report = validate::validate(&named, &geometry.shape, &data, threads, &|k, done| {
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
        } => inspect(&model, json, min_elements),
        Command::Convert {
            model,
            output,
            external_data,
            external_threshold,
        } => convert(&model, &output, external_data, external_threshold),
        Command::Score {
            model,
            counting,
            json,
            markdown,
        } => score(&model, &counting, json.as_deref(), markdown.as_deref()),
        Command::Validate {
            model,
            other,
            data,
            json,
        } => validate(&model, other.as_deref(), &data, json.as_deref()),
        Command::Optimize {
            model,
            output,
            recipe,
            overrides,
            calib,
            calib_samples,
            data,
            prep,
            min_accuracy,
            max_drop,
            dry_run,
            report,
            external_data,
            counting,
        } => optimize(OptimizeArgs {
            model,
            output,
            recipe,
            overrides,
            calib,
            calib_samples,
            data,
            prep,
            min_accuracy,
            max_drop,
            dry_run,
            report,
            external_data,
            counting,
        }),
    }
}

/// Prints the report as text, or as JSON to a file or standard output ('-').
fn emit_report<T: serde::Serialize>(
    text: impl FnOnce() -> String,
    value: &T,
    json: Option<&Path>,
) -> anyhow::Result<()> {
    let json_to_stdout = json.is_some_and(|p| p.as_os_str() == "-");
    if !json_to_stdout {
        out(&text())?;
    }
    if let Some(path) = json {
        emit(path, &serde_json::to_string_pretty(value)?)?;
    }
    Ok(())
}

fn inspect(model: &Path, json: bool, min_elements: usize) -> anyhow::Result<ExitCode> {
    let m = onnx_micronet::load(model)?;
    let report = onnx_micronet::inspect::inspect(&m)?;
    if json {
        out(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
    } else {
        out(&report.to_text(min_elements))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn convert(
    model: &Path,
    output: &Path,
    external_data: bool,
    external_threshold: usize,
) -> anyhow::Result<ExitCode> {
    let m = onnx_micronet::load(model)?;
    let opts = SaveOptions {
        layout: if external_data {
            Layout::External
        } else {
            Layout::Auto
        },
        external_threshold,
    };
    let r =
        onnx::save(&m, output, &opts).with_context(|| format!("writing {}", output.display()))?;
    let mut line = format!("wrote {} ({} bytes)", r.path.display(), r.model_bytes);
    if let Some((p, n, count)) = &r.external {
        line += &format!(" + {} ({n} bytes, {count} tensors)", p.display());
    }
    out(&format!("{line}\n"))?;
    Ok(ExitCode::SUCCESS)
}

fn score(
    model: &Path,
    counting: &Counting,
    json: Option<&Path>,
    markdown: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let m = onnx_micronet::load(model)?;
    let report = score::score(&m, &counting.resolve(&m)?)?;
    emit_report(|| report.to_text(), &report, json)?;
    if let Some(path) = markdown {
        emit(path, &report.to_markdown())?;
    }
    Ok(ExitCode::SUCCESS)
}

fn validate(
    model: &Path,
    other: Option<&Path>,
    data: &DataArgs,
    json: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let first = onnx_micronet::load(model)?;
    let second = other.map(onnx_micronet::load).transpose()?;
    let other = other.map(Path::to_path_buf);
    let report = run_validation(&first, model, second.as_ref().zip(other.as_ref()), data)?;
    emit_report(|| report.to_text(), &report, json)?;
    Ok(ExitCode::SUCCESS)
}

/// The flags of `optimize`, as parsed.
struct OptimizeArgs {
    model: PathBuf,
    output: PathBuf,
    recipe: Option<PathBuf>,
    overrides: Overrides,
    calib: Option<PathBuf>,
    calib_samples: usize,
    data: Option<PathBuf>,
    prep: PrepArgs,
    min_accuracy: Option<f64>,
    max_drop: Option<f64>,
    dry_run: bool,
    report: Option<PathBuf>,
    external_data: bool,
    counting: Counting,
}

fn optimize(a: OptimizeArgs) -> anyhow::Result<ExitCode> {
    let original = onnx_micronet::load(&a.model)?;
    let mut r = match &a.recipe {
        Some(p) => Recipe::from_file(p)?,
        None => Recipe::default(),
    };
    r.apply(&a.overrides)?;
    let opts = a.counting.resolve(&original)?;
    let threads = a
        .prep
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let geometry = validate::input_geometry(&original, &a.counting.input_shape);
    let calib_data = match &a.calib {
        Some(p) => {
            let g = geometry
                .as_ref()
                .map_err(|e| anyhow::anyhow!("--calib: {e}"))?;
            let preset = a
                .prep
                .preprocess
                .clone()
                .unwrap_or_else(|| g.default_preset().to_string());
            Some(validate::load_data(
                p,
                &preset,
                a.prep.data_format,
                Some(a.calib_samples),
                g,
            )?)
        }
        None => None,
    };
    let cx = PassContext {
        calib: calib_data.as_ref(),
        input_shape: geometry
            .as_ref()
            .map(|g| g.shape.clone())
            .unwrap_or_default(),
        threads,
    };
    let (optimized, passes) = optimize::run(&original, &r, &cx)?;
    let (before, mut after) = optimize::scores(&original, &optimized, &opts)?;
    let validation = match &a.data {
        Some(d) => {
            let args = DataArgs {
                data: d.clone(),
                prep: PrepArgs {
                    threads: Some(threads),
                    ..a.prep.clone()
                },
                input_shape: a.counting.input_shape.clone(),
            };
            Some(run_validation(
                &original,
                &a.model,
                Some((&optimized, &a.output)),
                &args,
            )?)
        }
        None => None,
    };
    let mut rep = optimize::OptimizeReport {
        input: a.model.display().to_string(),
        output: None,
        recipe: r,
        passes,
        before,
        after: after.clone(),
        validation,
    };
    if let Some(v) = &rep.validation {
        if let Some(why) = accuracy_shortfall(v, a.min_accuracy, a.max_drop) {
            out(&rep.to_text())?;
            eprintln!("error: {why}; nothing written");
            return Ok(ExitCode::from(3));
        }
    }
    if !a.dry_run {
        let save = SaveOptions {
            layout: if a.external_data {
                Layout::External
            } else {
                Layout::Auto
            },
            ..SaveOptions::default()
        };
        onnx::save(&optimized, &a.output, &save)
            .with_context(|| format!("writing {}", a.output.display()))?;
        // The written file holds exactly `optimized` (saving is lossless, byte for
        // byte: tests/io_roundtrip.rs), so its score is the one computed above.
        after.model = Some(a.output.display().to_string());
        rep.after = after;
        rep.output = Some(a.output.display().to_string());
    } else {
        eprintln!("dry run: nothing written; the 'after' column is the predicted score");
    }
    out(&rep.to_text())?;
    if let Some(path) = &a.report {
        emit(path, &serde_json::to_string_pretty(&rep)?)?;
    }
    Ok(ExitCode::SUCCESS)
}
