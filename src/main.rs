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
use onnx_micronet::recipe::{Overrides, PreprocessSection, Recipe};
use onnx_micronet::score::{self, Counting};
use onnx_micronet::validate;

/// The accuracy gates of `optimize`.
struct Gates {
    min_accuracy: Option<f64>,
    max_drop: Option<f64>,
    min_agreement: Option<f64>,
}

impl Gates {
    fn any(&self) -> bool {
        self.min_accuracy.is_some() || self.max_drop.is_some() || self.min_agreement.is_some()
    }

    /// A gate that cannot be evaluated on this data is an error before any work.
    fn check(&self, data: &onnx_micronet::data::Dataset) -> anyhow::Result<()> {
        if (self.min_accuracy.is_some() || self.max_drop.is_some()) && !data.is_labelled() {
            let n = data.labels.iter().filter(|l| l.is_some()).count();
            anyhow::bail!(onnx_micronet::Error::Usage(format!(
                "--min-accuracy and --max-drop need labelled --data ({n} of {} images are labelled: {}); use --min-agreement to gate on agreement with the original",
                data.len(),
                data.description
            )));
        }
        Ok(())
    }

    /// Why the rewritten model falls short, if it does.
    fn shortfall(&self, v: &validate::Report) -> Option<String> {
        let frac = |x: f64| if x > 1.0 { x / 100.0 } else { x };
        if let (Some(m), Some(a)) = (self.min_agreement.map(frac), &v.agreement) {
            if a.top1_agreement < m {
                return Some(format!(
                    "top-1 agreement with the original {:.2}% is below --min-agreement {:.2}%",
                    100.0 * a.top1_agreement,
                    100.0 * m
                ));
            }
        }
        let (orig, new) = (v.runs.first()?.top1?, v.runs.get(1)?.top1?);
        if let Some(m) = self.min_accuracy.map(frac) {
            if new < m {
                return Some(format!(
                    "top-1 {:.2}% is below --min-accuracy {:.2}%",
                    100.0 * new,
                    100.0 * m
                ));
            }
        }
        if let Some(d) = self.max_drop.map(frac) {
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
}

/// Images prepared for a model's input, with the preset used.
struct Prepared {
    data: onnx_micronet::data::Dataset,
    geometry: validate::Geometry,
    preset: String,
}

/// Loads images the way `model`'s input wants them; prints the data's warnings.
fn prepare(
    model: &onnx::Model,
    path: &Path,
    prep: &PrepArgs,
    input_shape: &[Vec<usize>],
    limit: Option<usize>,
) -> anyhow::Result<Prepared> {
    let geometry = validate::input_geometry(model, input_shape)?;
    let preset = prep
        .preprocess
        .clone()
        .unwrap_or_else(|| geometry.default_preset().to_string());
    // timm's crop_pct: scale_size = floor(img_size / crop_pct) on the short side.
    let resize = match prep.crop_pct {
        Some(p) if !(p > 0.0 && p <= 1.0) => anyhow::bail!(onnx_micronet::Error::Usage(format!(
            "--crop-pct {p}: expected a fraction in (0, 1], e.g. 0.875"
        ))),
        Some(p) => Some((geometry.height.min(geometry.width) as f64 / p).floor() as usize),
        None => prep.resize,
    };
    let adjust = validate::Adjust {
        mean: prep.mean.clone(),
        std: prep.std.clone(),
        resize,
        interpolation: prep
            .interpolation
            .as_deref()
            .map(|i| i.parse().map_err(onnx_micronet::Error::Usage))
            .transpose()?,
    };
    let data =
        validate::load_data_with(path, &preset, &adjust, prep.data_format, limit, &geometry)?;
    for w in &data.warnings {
        eprintln!("warning: {}: {w}", path.display());
    }
    let mut preset = preset;
    for (flag, v) in [("mean", &adjust.mean), ("std", &adjust.std)] {
        if let Some(v) = v {
            let v: Vec<String> = v.iter().map(|x| x.to_string()).collect();
            preset.push_str(&format!(", {flag} {}", v.join(",")));
        }
    }
    if let Some(s) = adjust.resize {
        preset.push_str(&format!(", resize {s}"));
    }
    if let Some(i) = adjust.interpolation {
        preset.push_str(&format!(", {i}"));
    }
    Ok(Prepared {
        data,
        geometry,
        preset,
    })
}

/// The preprocessing flags over the recipe's `[preprocess]` section (the flags
/// win); the recipe then records the settings used, so that it reproduces the run.
fn merge_preprocess(r: &mut Recipe, flags: &PrepArgs) -> anyhow::Result<PrepArgs> {
    let sec = r.preprocess.clone().unwrap_or_default();
    sec.check()?;
    let mut p = flags.clone();
    p.preprocess = p.preprocess.or(sec.preset);
    p.mean = p.mean.or(sec.mean);
    p.std = p.std.or(sec.std);
    if p.crop_pct.is_none() {
        p.resize = p.resize.or(sec.resize);
    }
    p.crop_pct = p
        .crop_pct
        .or(sec.crop_pct.filter(|_| flags.resize.is_none()));
    p.interpolation = p.interpolation.or(sec.interpolation);
    let used = PreprocessSection {
        preset: p.preprocess.clone(),
        mean: p.mean.clone(),
        std: p.std.clone(),
        resize: p.resize,
        crop_pct: p.crop_pct,
        interpolation: p.interpolation.clone(),
        calib_augment: sec.calib_augment.clone(),
    };
    r.preprocess = (used != PreprocessSection::default()).then_some(used);
    Ok(p)
}

fn threads(prep: &PrepArgs) -> usize {
    prep.threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// A progress-bar callback: a bar appears at `done == 0` (with `template`, the
/// message `what`), moves with `done` and is cleared at `total`.
fn progress_bars(template: &'static str) -> impl Fn(&str, usize, usize) + Send + Sync {
    let bar: std::sync::Mutex<Option<indicatif::ProgressBar>> = std::sync::Mutex::new(None);
    move |what, done, total| {
        let mut b = bar.lock().expect("no poisoned lock");
        if done == 0 {
            let p = indicatif::ProgressBar::new(total as u64);
            p.set_style(
                indicatif::ProgressStyle::with_template(template)
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            p.set_message(what.to_string());
            *b = Some(p);
        } else if let Some(p) = b.as_ref() {
            p.set_position(done as u64);
            if done >= total {
                p.finish_and_clear();
                *b = None;
            }
        }
    }
}

/// Progress bars for the calibration runs (images) and the per-layer solvers
/// (GPTQ, SparseGPT, channel selection: layers).
fn show_calibration_progress() {
    let images = progress_bars("calibration run [{bar:30}] {pos}/{len} images {per_sec} eta {eta}");
    onnx_micronet::engine::set_capture_progress(move |done, total| images("", done, total));
    onnx_micronet::passes::set_solve_progress(progress_bars(
        "{msg} [{bar:30}] {pos}/{len} layers eta {eta}",
    ));
}

/// Runs one or two models on prepared data, with progress bars.
fn run_validation(
    models: &[(String, &onnx::Model)],
    p: &Prepared,
    threads: usize,
) -> anyhow::Result<validate::Report> {
    run_validation_reusing(None, models, p, threads)
}

/// [`run_validation`], with the first model's run taken as given when `first` is
/// (the original model's, measured once for all the plans of a search).
fn run_validation_reusing(
    first: Option<&validate::ModelRun>,
    models: &[(String, &onnx::Model)],
    p: &Prepared,
    threads: usize,
) -> anyhow::Result<validate::Report> {
    let mut runs = Vec::new();
    for (k, (name, m)) in models.iter().enumerate() {
        if let (0, Some(run)) = (k, first) {
            runs.push(run.clone());
            continue;
        }
        let bar = indicatif::ProgressBar::new(p.data.images.shape()[0] as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message(name.to_string());
        runs.push(validate::run_model(
            name,
            m,
            &p.geometry.shape,
            &p.data,
            threads,
            &|done| bar.set_position(done as u64),
        )?);
        bar.finish_and_clear();
    }
    let report = validate::compare(runs, &p.data, threads)?;
    eprintln!("preprocess: {}", p.preset);
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
            html,
        } => score(
            &model,
            &counting,
            json.as_deref(),
            markdown.as_deref(),
            html.as_deref(),
        ),
        Command::Validate {
            model,
            other,
            data,
            json,
            html,
        } => validate(
            &model,
            other.as_deref(),
            &data,
            json.as_deref(),
            html.as_deref(),
        ),
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
            min_agreement,
            dry_run,
            verbose,
            markdown,
            report,
            html,
            search,
            search_steps,
            target_score,
            plan,
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
            gates: Gates {
                min_accuracy,
                max_drop,
                min_agreement,
            },
            dry_run,
            verbose,
            markdown,
            report,
            html,
            search,
            search_steps,
            target_score,
            plan,
            external_data,
            counting,
        }),
    }
}

/// One line when only weights or only activations are quantized: quantizing
/// anything below 16 bits cancels the rules' 16-bit freebie (float32 counts as
/// 16-bit only in a model with no quantization), so the operations that still
/// read float32 count at 32 bits and the score may be worse than the original's.
fn half_quantized_note(
    r: &Recipe,
    before: &onnx_micronet::score::Report,
    after: &onnx_micronet::score::Report,
) -> Option<String> {
    let (w, a) = (r.quantize.is_some(), r.act_quant.is_some());
    let what = match (w, a) {
        (true, false) => "only weights are quantized: multiplies still read float32 activations",
        (false, true) => "only activations are quantized: multiplies still read float32 weights",
        _ => return None,
    };
    let fix = if w {
        "quantize activations too (--act-bits 8 --calib DATA)"
    } else {
        "quantize weights too (--quantize linear:8)"
    };
    let worse = if after.score > before.score {
        format!(
            ", and the score is worse than the original's ({:.3}x)",
            after.score / before.score
        )
    } else {
        String::new()
    };
    Some(format!(
        "note: {what}, which count at 32 bits once anything is quantized (the 16-bit freebie is for unquantized models){worse}; {fix}"
    ))
}

/// SHA-256 of a file, hex, read in 1 MiB blocks.
fn sha256_of(path: &Path) -> anyhow::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Records in the model's `metadata_props` how it was made: the tool version,
/// the recipe in force (TOML: every flag that changes the model is in it), the
/// calibration images (their description and count, when used), the input file's
/// name and its SHA-256 (of the .onnx file itself; external data files are not
/// hashed). Not the command line: output paths and thread counts do not change
/// the model, and the same model is written byte for byte whatever they are.
/// Keys from an earlier run of the tool are replaced. `hash`: the input file's
/// SHA-256 ([`sha256_of`]).
fn stamp_provenance(
    m: &mut onnx::Model,
    input: &Path,
    hash: &str,
    recipe: &Recipe,
    calib: Option<&Prepared>,
) -> anyhow::Result<()> {
    let hash = hash.to_string();
    let mut entries = vec![
        (
            "onnx-micronet.version",
            env!("CARGO_PKG_VERSION").to_string(),
        ),
        ("onnx-micronet.recipe", toml::to_string(recipe)?),
        (
            "onnx-micronet.input",
            input
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        ),
        ("onnx-micronet.input_sha256", hash),
    ];
    if let Some(c) = calib {
        entries.push((
            "onnx-micronet.calibration",
            format!(
                "{} images: {} (preprocessing '{}')",
                c.data.len(),
                c.data.description,
                c.preset
            ),
        ));
    }
    let props = &mut m.proto.metadata_props;
    props.retain(|p| !p.key().starts_with("onnx-micronet."));
    for (k, v) in entries {
        props.push(onnx::proto::StringStringEntryProto {
            key: Some(k.to_string()),
            value: Some(v),
        });
    }
    Ok(())
}

/// Checks output paths (with the option that names each) before any work.
fn check_outputs(paths: &[(Option<&Path>, &str)]) -> anyhow::Result<()> {
    for (p, what) in paths {
        if let Some(p) = p {
            onnx::io::check_output_path(p, what)?;
        }
    }
    Ok(())
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
    onnx::io::check_output_path(output, "-o")?;
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
    html: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    check_outputs(&[(json, "--json"), (markdown, "--markdown"), (html, "--html")])?;
    let m = onnx_micronet::load(model)?;
    let report = score::score(&m, &counting.resolve(&m)?)?;
    emit_report(|| report.to_text(), &report, json)?;
    if let Some(path) = markdown {
        emit(path, &report.to_markdown())?;
    }
    if let Some(path) = html {
        let weights = onnx_micronet::html::collect_weights(None, &m)?;
        emit(path, &onnx_micronet::html::score_page(&report, &weights)?)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn validate(
    model: &Path,
    other: Option<&Path>,
    data: &DataArgs,
    json: Option<&Path>,
    html: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    check_outputs(&[(json, "--json"), (html, "--html")])?;
    let first = onnx_micronet::load(model)?;
    let second = other.map(onnx_micronet::load).transpose()?;
    let p = prepare(
        &first,
        &data.data,
        &data.prep,
        &data.input_shape,
        data.prep.limit,
    )?;
    let mut models = vec![(model.display().to_string(), &first)];
    if let (Some(m), Some(path)) = (&second, other) {
        models.push((path.display().to_string(), m));
    }
    let report = run_validation(&models, &p, threads(&data.prep))?;
    emit_report(|| report.to_text(), &report, json)?;
    if let Some(path) = html {
        emit(path, &onnx_micronet::html::validate_page(&report)?)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// One plan built and measured by `optimize`.
struct Built {
    model: onnx::Model,
    passes: Vec<onnx_micronet::passes::PassReport>,
    snapshot: Option<onnx::Model>,
    before: score::Report,
    after: score::Report,
    validation: Option<validate::Report>,
    seconds: f64,
}

/// What `--search` found: the chosen plan (its recipe and build), if any passed,
/// and every plan measured.
type Searched = (Option<(Recipe, Built)>, Vec<optimize::SearchRow>);

/// `--search`: the smallest mean weight width whose model passes the gates, by
/// bisection between 2 bits and the recipe's avg_bits (built and measured first:
/// if it fails, nothing passes), then `steps` more builds. Every plan measured
/// is a row of the table; the chosen one (the smallest passing) is marked.
fn search_avg_bits(
    r: &Recipe,
    gates: &Gates,
    steps: usize,
    build: &dyn Fn(&Recipe) -> anyhow::Result<Built>,
) -> anyhow::Result<Searched> {
    let (top, with) = width_axis(r);
    let mut rows = Vec::new();
    let mut best: Option<(Recipe, Built)> = None;
    let (mut lo, mut hi) = (2.0f64, top);
    let mut next = Some(top);
    let mut step = 0;
    while let Some(bits) = next {
        let recipe = with(bits);
        eprintln!("search: building the plan with mean weight width <= {bits:.3} bits");
        let b = build(&recipe)?;
        let v = b.validation.as_ref().expect("--data checked");
        let passed = gates.shortfall(v).is_none();
        rows.push(optimize::SearchRow::of(
            bits, &b.after, v, passed, b.seconds,
        ));
        if passed {
            hi = bits;
            best = Some((recipe, b));
        } else {
            lo = bits;
        }
        step += 1;
        next = (best.is_some() && step <= steps && hi - lo > 0.05)
            .then(|| ((lo + hi) / 2.0 * 100.0).round() / 100.0);
    }
    if let Some((_, b)) = &best {
        let chosen = b.after.score;
        for row in &mut rows {
            row.chosen = row.passed && row.score == chosen;
        }
    }
    Ok((best, rows))
}

/// The recipe's mean weight width (checked to be set) and the recipe at any
/// other mean width: the axis both searches bisect.
fn width_axis(r: &Recipe) -> (f64, impl Fn(f64) -> Recipe + '_) {
    let top = r
        .quantize
        .as_ref()
        .and_then(|q| q.avg_bits)
        .expect("checked");
    let with = move |bits: f64| {
        let mut r = r.clone();
        if let Some(q) = r.quantize.as_mut() {
            q.avg_bits = Some(bits);
        }
        r
    };
    (top, with)
}

/// The chosen plan, the table of plans built and the lowest score seen.
type TargetSearched = (Option<(Recipe, Built)>, Vec<optimize::SearchRow>, f64);

/// `--target-score S`: bisects the mean weight width in [2, B] for the largest
/// whose plan scores at most `target` (the score falls as the width does, so the
/// plans that fit form an interval from 2 bits up): the lowest estimated error
/// within the score. Returns the chosen plan (none when even 2 bits scores
/// above `target`), the table of every plan built (`passed`: within the score)
/// and the lowest score seen.
fn search_target_score(
    r: &Recipe,
    target: f64,
    steps: usize,
    build: &dyn Fn(&Recipe) -> anyhow::Result<Built>,
) -> anyhow::Result<TargetSearched> {
    let (top, with) = width_axis(r);
    let mut rows = Vec::new();
    let mut best: Option<(Recipe, Built)> = None;
    let mut lowest = f64::INFINITY;
    // fit: the widest width known to fit; over: the narrowest known to score
    // above; floor: the widest budget no allocation can meet (the layers outside
    // it already take more).
    let (mut fit, mut over, mut floor) = (None::<f64>, None::<f64>, None::<f64>);
    let mut next = Some(top);
    let mut step = 0;
    while let Some(bits) = next {
        let recipe = with(bits);
        eprintln!("target score: building the plan with mean weight width <= {bits:.3} bits");
        match build(&recipe) {
            Ok(b) => {
                let v = b.validation.as_ref().expect("--data checked");
                let fits = b.after.score <= target;
                lowest = lowest.min(b.after.score);
                rows.push(optimize::SearchRow::of(bits, &b.after, v, fits, b.seconds));
                if fits {
                    fit = Some(bits);
                    best = Some((recipe, b));
                } else {
                    over = Some(bits);
                }
            }
            Err(e)
                if bits < top
                    && e.chain().any(|c| {
                        matches!(
                            c.downcast_ref::<onnx_micronet::Error>(),
                            Some(onnx_micronet::Error::Budget(_))
                        )
                    }) =>
            {
                eprintln!(
                    "target score: {bits:.3} bits is below what the fixed layers take: {e:#}"
                );
                floor = Some(bits);
            }
            Err(e) => return Err(e),
        }
        step += 1;
        // Bisect between the widest known to fit (or, before any, the narrowest
        // width worth trying) and the narrowest known not to.
        let low = fit.or(floor);
        next = match (fit, over) {
            // The widest plan fits: nothing wider to look for.
            (Some(_), None) => None,
            _ if step > steps => None,
            // Not even the widest fits: try 2 bits first, then up from what
            // cannot be built.
            (None, Some(_)) if low.is_none() => Some(2.0),
            (_, Some(h)) => {
                let l = low.expect("set");
                (h - l > 0.05).then(|| ((l + h) / 2.0 * 100.0).round() / 100.0)
            }
            (None, None) => None,
        };
    }
    if let Some((r, b)) = &best {
        let bits = r.quantize.as_ref().and_then(|q| q.avg_bits);
        let chosen = b.after.score;
        for row in &mut rows {
            row.chosen = row.passed && Some(row.avg_bits) == bits && row.score == chosen;
        }
    }
    Ok((best, rows, lowest))
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
    gates: Gates,
    dry_run: bool,
    verbose: bool,
    markdown: Option<PathBuf>,
    report: Option<PathBuf>,
    html: Option<PathBuf>,
    search: bool,
    search_steps: usize,
    target_score: Option<f64>,
    plan: Option<PathBuf>,
    external_data: bool,
    counting: Counting,
}

fn optimize(a: OptimizeArgs) -> anyhow::Result<ExitCode> {
    // Every output path first: a bad one fails before any work.
    let model_out = (!a.dry_run).then_some(a.output.as_path());
    check_outputs(&[
        (model_out, "-o"),
        (a.report.as_deref(), "--report"),
        (a.markdown.as_deref(), "--markdown"),
        (a.html.as_deref(), "--html"),
        (a.plan.as_deref(), "--plan"),
    ])?;
    let original = onnx_micronet::load(&a.model)?;
    let mut r = match &a.recipe {
        Some(p) => Recipe::from_file(p)?,
        None => Recipe::default(),
    };
    r.apply(&a.overrides)?;
    r.check_patterns(&original)?;
    let mut a = a;
    a.prep = merge_preprocess(&mut r, &a.prep)?;
    let opts = a.counting.resolve(&original)?;
    let threads = threads(&a.prep);
    // The evaluation data first: a gate it cannot answer fails before any work.
    let eval = match &a.data {
        Some(d) => {
            let p = prepare(&original, d, &a.prep, &a.counting.input_shape, a.prep.limit)?;
            a.gates.check(&p.data)?;
            Some(p)
        }
        None if a.gates.any() => {
            anyhow::bail!(onnx_micronet::Error::Usage(
                "--min-accuracy, --max-drop and --min-agreement need --data".into()
            ))
        }
        None => None,
    };
    let calib = match &a.calib {
        Some(p) => {
            let mut c = prepare(
                &original,
                p,
                &a.prep,
                &a.counting.input_shape,
                Some(a.calib_samples),
            )?;
            let augment = r
                .preprocess
                .as_ref()
                .and_then(|s| s.calib_augment.as_deref());
            if augment == Some("flip") {
                c.data = c.data.with_mirrors(c.geometry.layout);
            }
            Some(c)
        }
        None => None,
    };
    if let (Some(e), Some(c)) = (&eval, &calib) {
        let shared = e.data.also_in(&c.data);
        if !shared.is_empty() {
            eprintln!(
                "warning: {} of the {} evaluation images are also calibration images (same content), e.g. '{}': agreement and accuracy on them are in-sample; use disjoint sets",
                shared.len(),
                e.data.len(),
                shared[0]
            );
        }
    }
    if calib.is_some() {
        show_calibration_progress();
    }
    let geometry = validate::input_geometry(&original, &a.counting.input_shape).ok();
    if a.search {
        let ok = r.quantize.as_ref().is_some_and(|q| q.avg_bits.is_some());
        if !ok || !a.gates.any() || eval.is_none() || calib.is_none() {
            anyhow::bail!(onnx_micronet::Error::Usage(
                "--search bisects the mean weight width: it needs --avg-weight-bits B (the largest width tried), an accuracy gate (--min-agreement, --max-drop or --min-accuracy), --data and --calib".into()
            ));
        }
    }
    if let Some(s) = a.target_score {
        let ok = r.quantize.as_ref().is_some_and(|q| q.avg_bits.is_some());
        if !ok || eval.is_none() || calib.is_none() || !(s.is_finite() && s > 0.0) {
            anyhow::bail!(onnx_micronet::Error::Usage(format!(
                "--target-score {s}: bisects the mean weight width for the largest plan scoring at most S > 0: it needs --avg-weight-bits B (the largest width tried), --data and --calib"
            )));
        }
    }
    // Shared by the plans of a --search (allocations differ only in their budget).
    let memo = onnx_micronet::passes::quantize::AllocationMemo::default();
    let cx = PassContext {
        reference: None,
        calib: calib.as_ref().map(|c| &c.data),
        input_shape: geometry.map(|g| g.shape).unwrap_or_default(),
        threads,
        memo: (a.search || a.target_score.is_some()).then_some(&memo),
    };
    // The original model's run on --data, measured once for every plan built.
    let original_run: std::cell::OnceCell<validate::ModelRun> = std::cell::OnceCell::new();
    // One plan built and measured: the model, its pass reports, the snapshot for
    // the HTML histograms, the scores, the validation.
    // The input's hash (for the provenance) and the original's score are the same
    // for every plan: computed once, beside the first plan's passes.
    let input_hash: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let before_score: std::sync::OnceLock<score::Report> = std::sync::OnceLock::new();
    let build = |r: &Recipe| -> anyhow::Result<Built> {
        let start = std::time::Instant::now();
        let (fixed, run) = rayon::join(
            || -> anyhow::Result<()> {
                if input_hash.get().is_none() {
                    let _ = input_hash.set(sha256_of(&a.model)?);
                }
                if before_score.get().is_none() {
                    let _ = before_score.set(score::score(&original, &opts)?);
                }
                Ok(())
            },
            || optimize::run_with_snapshot(&original, r, &cx, a.html.is_some()),
        );
        let (mut optimized, passes, snapshot) = run?;
        fixed?;
        let hash = input_hash.get().expect("set above");
        let before = before_score.get().expect("set above").clone();
        // Provenance before scoring: the file's bytes (and so its size) include it.
        stamp_provenance(&mut optimized, &a.model, hash, r, calib.as_ref())?;
        let mut after = score::score(&optimized, &opts)?;
        // A model whose widths an allocation chose records the plan that
        // reproduces it (the widths pinned), and is scored with that record.
        if r.quantize.as_ref().is_some_and(|q| q.avg_bits.is_some()) {
            let plan = optimize::plan_of(r, &after);
            stamp_provenance(&mut optimized, &a.model, hash, &plan, calib.as_ref())?;
            after = score::score(&optimized, &opts)?;
        }
        let validation = match &eval {
            Some(p) => {
                let v = run_validation_reusing(
                    original_run.get(),
                    &[
                        (a.model.display().to_string(), &original),
                        (a.output.display().to_string(), &optimized),
                    ],
                    p,
                    threads,
                )?;
                if let Some(first) = v.runs.first() {
                    let _ = original_run.set(first.clone());
                }
                Some(v)
            }
            None => None,
        };
        Ok(Built {
            model: optimized,
            passes,
            snapshot,
            before,
            after,
            validation,
            seconds: start.elapsed().as_secs_f64(),
        })
    };
    // A search: its plans, the chosen one (if any passes) and what to say if none does.
    let searched = if let Some(target) = a.target_score {
        let (b, rows, lowest) = search_target_score(&r, target, a.search_steps, &build)?;
        Some((b, rows, format!(
            "no mean weight width down to 2 bits scores at most --target-score {target} (the lowest score of the plans built: {lowest:.4})"
        )))
    } else if a.search {
        let (b, rows) = search_avg_bits(&r, &a.gates, a.search_steps, &build)?;
        Some((
            b,
            rows,
            "no mean width up to --avg-weight-bits passes the accuracy gate".to_string(),
        ))
    } else {
        None
    };
    let mut search = Vec::new();
    let built = match searched {
        None => build(&r)?,
        Some((chosen, rows, none)) => {
            search = rows;
            match chosen {
                Some((recipe, b)) => {
                    r = recipe;
                    b
                }
                None => {
                    eprint!("{}", optimize::search_table(&search));
                    eprintln!("error: {none}; nothing written");
                    return Ok(ExitCode::from(3));
                }
            }
        }
    };
    let Built {
        model: optimized,
        passes,
        snapshot,
        before,
        mut after,
        validation,
        ..
    } = built;
    if let Some(note) = half_quantized_note(&r, &before, &after) {
        eprintln!("{note}");
    }
    if let Some(path) = &a.plan {
        emit(path, &toml::to_string(&optimize::plan_of(&r, &after))?)?;
    }
    let mut rep = optimize::OptimizeReport {
        plan: passes.iter().map(|p| p.pass.clone()).collect(),
        input: a.model.display().to_string(),
        output: None,
        recipe: r,
        passes,
        before,
        after: after.clone(),
        validation,
        search,
    };
    if let Some(v) = &rep.validation {
        if let Some(why) = a.gates.shortfall(v) {
            out(&rep.to_text(a.verbose))?;
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
        // byte: tests/suite/io_roundtrip.rs), so its score is the one computed above.
        after.model = Some(a.output.display().to_string());
        rep.after = after;
        rep.output = Some(a.output.display().to_string());
    } else {
        eprintln!("dry run: nothing written; the 'after' column is the predicted score");
    }
    out(&rep.to_text(a.verbose))?;
    if let Some(path) = &a.report {
        emit(path, &serde_json::to_string_pretty(&rep)?)?;
    }
    if let Some(path) = &a.markdown {
        emit(path, &rep.to_markdown())?;
    }
    if let Some(path) = &a.html {
        let weights = onnx_micronet::html::collect_weights(snapshot.as_ref(), &optimized)?;
        emit(path, &onnx_micronet::html::optimize_page(&rep, &weights)?)?;
    }
    Ok(ExitCode::SUCCESS)
}
