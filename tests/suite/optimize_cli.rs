//! `optimize` end to end from the CLI: BN folding on a real fixture, accuracy beside
//! the score with --data, and the accuracy gate (exit 3, no output file).

use crate::common::*;

#[test]
fn folds_every_bn_and_reports_accuracy_beside_the_score() {
    let d = tempfile::tempdir_in(root().join("target")).unwrap();
    let out = d.path().join("small.onnx");
    let report = d.path().join("report.json");
    let m = fixture("mobilenetv2_cifar_bn.onnx");
    let data = fixture("data/foolbox/cifar10");
    let o = cli(&[
        "optimize",
        m.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--preprocess",
        "cifar",
        "--report",
        report.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    // 52 BN folded, none left; the written model has no BatchNormalization.
    let fold = &j["passes"][0];
    assert_eq!(fold["pass"], "fold-bn");
    assert_eq!(fold["skipped"].as_array().unwrap().len(), 0);
    let folded = fold["changed"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["what"].as_str().unwrap().starts_with("folded"))
        .count();
    assert_eq!(folded, 52);
    let inspect = cli(&["inspect", out.to_str().unwrap(), "--json"]);
    let ij: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(ij["batch_normalization_nodes"], 0);
    // Default counting already treats BN as a folded bias (NB), so the score is unchanged.
    assert_eq!(j["before"]["totals"], j["after"]["totals"]);
    // Both models ran on the same 20 images and agree on every top-1.
    assert_eq!(j["validation"]["runs"].as_array().unwrap().len(), 2);
    assert_eq!(j["validation"]["agreement"]["top1_agreement"], 1.0);
    assert!(
        j["validation"]["agreement"]["max_abs_logit_diff"]
            .as_f64()
            .unwrap()
            < 1e-3
    );
}

#[test]
fn accuracy_gate_exits_3_and_writes_nothing() {
    let d = tempfile::tempdir_in(root().join("target")).unwrap();
    let out = d.path().join("gated.onnx");
    let m = fixture("mnist_ccexam.onnx");
    let data = fixture("data/mnist-digits-1000/images-idx3-ubyte.gz");
    let args = |gate: &[&str]| {
        let mut v = vec![
            "optimize",
            m.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--limit",
            "500",
        ];
        v.extend_from_slice(gate);
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    // The net gets 499/500 of these digits (99.8% of the first 500): 99.9% is out of reach.
    let a = args(&["--min-accuracy", "99.9"]);
    let o = cli(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("below --min-accuracy 99.90%"));
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(d.path()).unwrap().count(),
        0,
        "no temporary file left"
    );
    // No pass changes this BN-free net: no drop, the gate passes and the file is written.
    let a = args(&["--max-drop", "0"]);
    let o = cli(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.exists());
}

#[test]
fn dry_run_writes_nothing_and_bad_recipes_exit_2() {
    let d = tempfile::tempdir_in(root().join("target")).unwrap();
    let out = d.path().join("x.onnx");
    let m = fixture("cifar10_keras_bn.onnx");
    let o = cli(&[
        "optimize",
        m.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--dry-run",
    ]);
    assert!(o.status.success());
    assert!(!out.exists());
    let recipe = d.path().join("r.toml");
    std::fs::write(
        &recipe,
        "fold_bn = true\n[prune]\nmethod = \"magnitude\"\nsparsity = 1.5\n",
    )
    .unwrap();
    let err = cli_fails(&[
        "optimize",
        m.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--recipe",
        recipe.to_str().unwrap(),
    ]);
    assert!(err.contains("sparsity 1.5: must be in [0, 1)"), "{err}");
    std::fs::write(&recipe, "fold_bn = true\nprun = 3\n").unwrap();
    let err = cli_fails(&[
        "optimize",
        m.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--recipe",
        recipe.to_str().unwrap(),
    ]);
    assert!(err.contains("r.toml line 2: unknown field `prun`"), "{err}");
    let err = cli_fails(&[
        "optimize",
        m.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--prune",
        "magnitude",
    ]);
    assert!(err.contains("--prune 'magnitude'"), "{err}");
    assert!(!out.exists());
}

#[test]
fn wilson_intervals_by_hand() {
    use onnx_micronet::validate::wilson;
    // 19 of 20: p = 0.95, z^2 = 3.8415, 1 + z^2/n = 1.19207; centre
    // (0.95 + 0.096037) / 1.19207 = 0.87748; half-width 1.959964 / 1.19207 x
    // sqrt(0.95 x 0.05 / 20 + 3.8415 / 1600) = 1.64418 x 0.069108 = 0.11362:
    // [0.7639, 0.9911] (the "95% agreement with 20 images is [76%, 99%]").
    let (lo, hi) = wilson(19, 20);
    assert!(
        (lo - 0.7639).abs() < 1e-4 && (hi - 0.9911).abs() < 1e-4,
        "{lo} {hi}"
    );
    // 0 of 10: centre = half-width = (3.8415 / 20) / 1.38415 = 0.13877: [0, 0.2775].
    let (lo, hi) = wilson(0, 10);
    assert!(lo == 0.0 && (hi - 0.2775).abs() < 1e-4, "{lo} {hi}");
    // 644 of 644 is not [1, 1]: (0.9941, 1).
    let (lo, hi) = wilson(644, 644);
    assert!((lo - 0.99407).abs() < 1e-4 && hi == 1.0, "{lo} {hi}");
}

#[test]
fn intervals_changed_images_and_overlapping_sets_are_reported() {
    // Calibration and evaluation on the same 20 digits: a warning names the overlap;
    // 20 images: a warning that one image is 5 points; the agreement carries its
    // Wilson interval and the JSON lists the images whose prediction changed.
    let d = tempfile::tempdir_in(root().join("target")).unwrap();
    let out = d.path().join("q.onnx");
    let report = d.path().join("r.json");
    let m = fixture("mnist_ccexam.onnx");
    let data = fixture("data/mnist-digits-1000/images-idx3-ubyte.gz");
    let o = cli(&[
        "optimize",
        m.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--quantize",
        "linear:3",
        "--calib",
        data.to_str().unwrap(),
        "--calib-samples",
        "20",
        "--data",
        data.to_str().unwrap(),
        "--limit",
        "20",
        "--report",
        report.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(
        stderr.contains("warning: 20 of the 20 evaluation images are also calibration images"),
        "{stderr}"
    );
    let all = format!("{stdout}{stderr}");
    assert!(
        all.contains("warning: 20 images: one image is 5.0 points"),
        "{all}"
    );
    assert!(all.contains("[95% CI "), "{all}");
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let v = &j["validation"];
    let a = &v["agreement"];
    let agree = a["top1_agreement"].as_f64().unwrap();
    let changed = v["changed_images"].as_array().unwrap();
    // The changed images are exactly the disagreements.
    assert_eq!(
        changed.len(),
        ((1.0 - agree) * 20.0).round() as usize,
        "{a}"
    );
    let (lo, hi) = (
        a["top1_agreement_interval"][0].as_f64().unwrap(),
        a["top1_agreement_interval"][1].as_f64().unwrap(),
    );
    let same = (agree * 20.0).round() as usize;
    assert_eq!((lo, hi), onnx_micronet::validate::wilson(same, 20));
    assert!(lo <= agree && agree <= hi);
}

/// Quantizing only weights cancels the 16-bit freebie: one line says so, with the
/// fix, and that the score got worse when it did.
#[test]
fn weight_only_quantization_says_the_freebie_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("w12.onnx");
    let o = cli(&[
        "optimize",
        fixture("efficientnet_style_bn.onnx").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--quantize",
        "linear:12",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("note: only weights are quantized"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains("--act-bits 8 --calib DATA"), "{line}");
    // Measured: 1.046x the original's score.
    assert!(
        line.contains("the score is worse than the original's (1.0"),
        "{line}"
    );
}

/// When accuracy collapses, the report says what to try: without calibration, to
/// calibrate; the flags for the passes that ran.
#[test]
fn a_collapse_says_what_to_try() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("p99.onnx");
    let o = cli(&[
        "optimize",
        fixture("mnist_ccexam.onnx").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--prune",
        "magnitude:0.995",
        "--data",
        fixture("data/mnist-digits-1000").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("accuracy collapsed"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains("No per-layer errors were measured: calibrate (--calib DATA)"),
        "{line}"
    );
    assert!(line.contains("Try: a lower sparsity"), "{line}");
    // A model that keeps its accuracy gets no such line.
    let o = cli(&[
        "optimize",
        fixture("mnist_ccexam.onnx").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--prune",
        "magnitude:0.1",
        "--data",
        fixture("data/mnist-digits-1000").to_str().unwrap(),
    ]);
    assert!(o.status.success());
    assert!(!String::from_utf8_lossy(&o.stdout).contains("accuracy collapsed"));
}

/// By default one line per pass and a pointer to --verbose; --verbose lists every
/// change with its reason; --markdown writes the before/after table with the
/// accuracy and its interval.
#[test]
fn summary_by_default_details_with_verbose_and_a_markdown_table() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("p.onnx");
    let md = dir.path().join("t.md");
    let args = |verbose: bool| {
        let mut a = vec![
            "optimize".to_string(),
            fixture("mnist_ccexam.onnx").display().to_string(),
            "-o".into(),
            out.display().to_string(),
            "--prune".into(),
            "magnitude:0.5".into(),
            "--data".into(),
            fixture("data/mnist-digits-1000").display().to_string(),
            "--markdown".into(),
            md.display().to_string(),
        ];
        if verbose {
            a.push("--verbose".into());
        }
        a
    };
    let run = |v: bool| {
        let a = args(v);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let o = cli(&a);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (
            String::from_utf8_lossy(&o.stdout).to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let (short, _) = run(false);
    assert!(
        short.starts_with("plan: fold-bn -> prune -> pack\n"),
        "{short}"
    );
    assert!(short.contains("prune ("), "{short}");
    assert!(!short.contains("  changed  "), "{short}");
    assert!(short.contains("--verbose prints them"), "{short}");
    let (long, _) = run(true);
    assert!(long.contains("  changed  "), "{long}");
    assert!(!long.contains("--verbose prints them"), "{long}");
    let table = std::fs::read_to_string(&md).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines[1], "|---|---:|---:|---:|");
    assert!(
        lines[2].starts_with("| MicroNet score (Cifar100 track) | 0.0064 |"),
        "{table}"
    );
    assert!(
        table.contains("| top-1 (1000 labelled images, 95% interval) | 99.80% [99.3-99.9] |"),
        "{table}"
    );
    assert!(
        table.contains("| top-1 agreement with the original (1000 images) | |"),
        "{table}"
    );
}

/// Every written model carries its provenance: tool version, recipe, input name
/// and SHA-256, and the calibration images when used.
#[test]
fn written_models_carry_their_provenance() {
    use prost::Message;
    use sha2::Digest;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("p.onnx");
    let input = fixture("mnist_ccexam.onnx");
    let o = cli(&[
        "optimize",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--prune",
        "magnitude:0.5",
        "--quantize",
        "linear:8",
        "--act-bits",
        "8",
        "--calib",
        fixture("data/foolbox/mnist").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = onnx_micronet::onnx::proto::ModelProto::decode(&*std::fs::read(&out).unwrap()).unwrap();
    let get = |k: &str| {
        m.metadata_props
            .iter()
            .find(|p| p.key() == k)
            .unwrap_or_else(|| panic!("no {k}: {:?}", m.metadata_props))
            .value()
            .to_string()
    };
    assert_eq!(get("onnx-micronet.version"), env!("CARGO_PKG_VERSION"));
    assert_eq!(get("onnx-micronet.input"), "mnist_ccexam.onnx");
    let want: String = sha2::Sha256::digest(std::fs::read(&input).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(get("onnx-micronet.input_sha256"), want);
    let recipe = get("onnx-micronet.recipe");
    assert!(
        recipe.contains("[prune]") && recipe.contains("sparsity = 0.5"),
        "{recipe}"
    );
    let calib = get("onnx-micronet.calibration");
    assert!(calib.starts_with("20 images: "), "{calib}");
    assert!(calib.contains("preprocessing: 28x28x1 (HxWxC)"), "{calib}");
    // The recipe recorded reproduces the run: parsed back, it is a valid recipe.
    let r: onnx_micronet::recipe::Recipe = toml::from_str(&recipe).unwrap();
    assert!(r.quantize.is_some() && r.act_quant.is_some());
}

/// The preprocessing actually applied is in the reports (text and JSON), with the
/// preset's adjustments.
#[test]
fn preprocessing_is_recorded_in_the_json() {
    let o = cli(&[
        "validate",
        fixture("efficientnet_style_bn.onnx").to_str().unwrap(),
        "--data",
        fixture("data/foolbox/cifar10").to_str().unwrap(),
        "--preprocess",
        "imagenet",
        "--mean",
        "0.5,0.5,0.5",
        "--std",
        "0.5",
        "--resize",
        "72",
        "--interpolation",
        "bicubic",
        "--json",
        "-",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let data = j["data"].as_str().unwrap();
    assert!(data.contains("; preprocessing: "), "{data}");
    assert!(
        data.contains(
            "preprocessing: 64x64x3 (HxWxC) NCHW RGB, bicubic short side 72 + centre crop, /255"
        ),
        "{data}"
    );
    assert!(data.contains("mean [0.5, 0.5, 0.5], std [0.5]"), "{data}");
}

/// A recipe's `[preprocess]` section prepares the images as the flags would
/// (the same data description and the same top-1 to the last image), the flags
/// win over it, the written recipe records what was used, and a bad value is an
/// error naming the key.
#[test]
fn recipes_carry_preprocessing_and_flags_win() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("efficientnet_style_bn.onnx");
    let data = fixture("data/foolbox/cifar10");
    let recipe = dir.path().join("r.toml");
    std::fs::write(
        &recipe,
        "[preprocess]\npreset = \"imagenet\"\nmean = [0.5, 0.5, 0.5]\nstd = [0.5, 0.5, 0.5]\nresize = 72\ninterpolation = \"bicubic\"\n",
    )
    .unwrap();
    let run = |extra: &[&str]| -> serde_json::Value {
        let out = dir.path().join("o.onnx");
        let rep = dir.path().join("rep.json");
        let mut a = vec![
            "optimize",
            model.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--report",
            rep.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        let o = cli(&a);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_str(&std::fs::read_to_string(&rep).unwrap()).unwrap()
    };
    let by_recipe = run(&["--recipe", recipe.to_str().unwrap()]);
    let by_flags = run(&[
        "--preprocess",
        "imagenet",
        "--mean",
        "0.5,0.5,0.5",
        "--std",
        "0.5,0.5,0.5",
        "--resize",
        "72",
        "--interpolation",
        "bicubic",
    ]);
    let desc = |j: &serde_json::Value| j["validation"]["data"].as_str().unwrap().to_string();
    assert_eq!(desc(&by_recipe), desc(&by_flags));
    assert!(
        desc(&by_recipe).contains(
            "bicubic short side 72 + centre crop, /255, mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5]"
        ),
        "{}",
        desc(&by_recipe)
    );
    assert_eq!(
        by_recipe["validation"]["runs"][0]["top1"],
        by_flags["validation"]["runs"][0]["top1"]
    );
    // Both reports' recipes record the settings used.
    for j in [&by_recipe, &by_flags] {
        let p = &j["recipe"]["preprocess"];
        assert_eq!(p["preset"], "imagenet");
        assert_eq!(p["resize"], 72);
        assert_eq!(p["interpolation"], "bicubic");
        assert_eq!(p["std"], serde_json::json!([0.5, 0.5, 0.5]));
    }
    // A flag wins over the recipe's key.
    let mixed = run(&["--recipe", recipe.to_str().unwrap(), "--resize", "64"]);
    assert!(
        desc(&mixed).contains("bicubic short side 64"),
        "{}",
        desc(&mixed)
    );
    assert_eq!(mixed["recipe"]["preprocess"]["resize"], 64);
    // timm's crop_pct: the 64 px input with crop_pct 0.875 resizes the short
    // side to floor(64 / 0.875) = floor(73.14) = 73; the recipe's resize yields to it.
    let pct = run(&["--recipe", recipe.to_str().unwrap(), "--crop-pct", "0.875"]);
    assert!(
        desc(&pct).contains("bicubic short side 73"),
        "{}",
        desc(&pct)
    );
    assert_eq!(pct["recipe"]["preprocess"]["crop_pct"], 0.875);
    assert!(pct["recipe"]["preprocess"]["resize"].is_null());
    // A bad value names the section and key.
    std::fs::write(&recipe, "[preprocess]\ninterpolation = \"lanczos\"\n").unwrap();
    let err = crate::common::cli_fails(&[
        "optimize",
        model.to_str().unwrap(),
        "-o",
        dir.path().join("x.onnx").to_str().unwrap(),
        "--recipe",
        recipe.to_str().unwrap(),
    ]);
    assert!(
        err.contains("[preprocess] interpolation = 'lanczos'"),
        "{err}"
    );
}

/// `--act-order` takes an optional value so that a flag can undo a recipe's
/// `act_order = true`: no flag keeps the recipe's value, `--act-order false`
/// overrides it, bare `--act-order` means true; and like the other GPTQ flags it
/// needs a [quantize] section.
#[test]
fn act_order_flag_overrides_the_recipe_both_ways() {
    let d = tempfile::tempdir_in(root().join("target")).unwrap();
    let out = d.path().join("x.onnx");
    let m = fixture("cifar10_keras_bn.onnx");
    let recipe = d.path().join("r.toml");
    let act_order = |recipe_text: &str, flags: &[&str]| -> serde_json::Value {
        std::fs::write(&recipe, recipe_text).unwrap();
        let mut args = vec!["--recipe", recipe.to_str().unwrap(), "--dry-run"];
        args.extend_from_slice(flags);
        optimize_report(d.path(), "x", &m, &args)["recipe"]["quantize"]["act_order"].clone()
    };
    let on = "[quantize]\nscheme = \"minmax\"\nbits = 4\nact_order = true\n";
    let unset = "[quantize]\nscheme = \"minmax\"\nbits = 4\n";
    assert_eq!(act_order(on, &[]), serde_json::json!(true));
    assert_eq!(
        act_order(on, &["--act-order", "false"]),
        serde_json::json!(false)
    );
    assert_eq!(act_order(unset, &["--act-order"]), serde_json::json!(true));
    assert_eq!(act_order(unset, &[]), serde_json::Value::Null);
    assert!(!out.exists());
    let err = cli_fails(&[
        "optimize",
        m.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--act-order",
        "false",
    ]);
    assert!(
        err.contains("--act-order and --weight-range need --quantize"),
        "{err}"
    );
}

/// `optimize` on the Keras CIFAR-10 CNN with `args` and its foolbox images as
/// calibration; the JSON report.
fn keras_cifar_report(dir: &std::path::Path, tag: &str, args: &[&str]) -> serde_json::Value {
    let calib = fixture("data/foolbox/cifar10");
    let mut all = args.to_vec();
    all.extend(["--calib", calib.to_str().unwrap()]);
    optimize_report(dir, tag, &fixture("cifar10_keras_bn.onnx"), &all)
}

/// The activation bits the written model's score reads for each weighted layer.
fn weighted_act_bits(rep: &serde_json::Value) -> Vec<u64> {
    rep["after"]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| matches!(l["op_type"].as_str(), Some("Conv" | "Gemm" | "MatMul")))
        .map(|l| l["act_bits"].as_u64().unwrap())
        .collect()
}

/// `optimize` with `flag value` and no activation quantization fails with a usage
/// error naming the flag, and writes nothing.
fn needs_act_bits(dir: &std::path::Path, flag: &str, value: &str) {
    let out = dir.join("none.onnx");
    let m = fixture("cifar10_keras_bn.onnx");
    let err = cli_fails(&[
        "optimize",
        m.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        flag,
        value,
    ]);
    assert!(err.contains(&format!("{flag} needs --act-bits")), "{err}");
    assert!(!out.exists());
}

#[test]
fn act_keep_holds_the_most_sensitive_activations_at_16_bits() {
    // The Keras CIFAR-10 CNN at 8-bit weights and activations, the 3 activations whose
    // 8-bit quantization alone moves the output most kept at float16: the report
    // ranks every quantized activation, the 3 kept are ranks 1-3 with the largest
    // measured changes, and the written model's score reads exactly their 3
    // readers at 16 bits, every other weighted layer at 8.
    let d = tempfile::tempdir_in(root().join("target")).unwrap();
    let rep = keras_cifar_report(
        d.path(),
        "keep",
        &[
            "--quantize",
            "linear:8",
            "--per-channel",
            "--act-bits",
            "8",
            "--act-keep",
            "3",
        ],
    );
    assert_eq!(rep["recipe"]["act_quant"]["keep"], serde_json::json!(3));
    let act = report_pass(&rep, "act-quant");
    let mut ranked: Vec<(usize, f64, bool)> = Vec::new();
    for item in act["changed"].as_array().unwrap() {
        let what = item["what"].as_str().unwrap();
        let Some(rest) = what.split("output change ").nth(1) else {
            continue;
        };
        let mut parts = rest.split(", rank ");
        let change: f64 = parts.next().unwrap().parse().unwrap();
        let rank: usize = parts
            .next()
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let kept = what.contains("kept at 16 bits");
        assert_eq!(kept, what.starts_with("16-bit"), "{what}");
        ranked.push((rank, change, kept));
    }
    ranked.sort_by_key(|r| r.0);
    let n = ranked.len();
    assert!(n > 5, "{n} activations ranked");
    assert_eq!(
        ranked.iter().map(|r| r.0).collect::<Vec<_>>(),
        (1..=n).collect::<Vec<_>>()
    );
    assert!(ranked.windows(2).all(|w| w[0].1 >= w[1].1), "{ranked:?}");
    assert!(ranked.iter().all(|r| r.2 == (r.0 <= 3)), "{ranked:?}");
    let weighted = weighted_act_bits(&rep);
    assert_eq!(
        weighted.iter().filter(|&&b| b == 16).count(),
        3,
        "{weighted:?}"
    );
    assert!(weighted.iter().all(|&b| b == 16 || b == 8), "{weighted:?}");

    // At 16 bits everything is already kept: the report says the flag did nothing.
    let rep = keras_cifar_report(
        d.path(),
        "keep16",
        &[
            "--quantize",
            "linear:8",
            "--act-bits",
            "16",
            "--act-keep",
            "3",
        ],
    );
    let act = report_pass(&rep, "act-quant");
    let skipped = act["skipped"].to_string();
    assert!(
        skipped.contains("keep = 3 has nothing to keep: every activation is already at 16 bits"),
        "{skipped}"
    );

    // Without activation quantization there is nothing to keep: a usage error.
    needs_act_bits(d.path(), "--act-keep", "3");
}

#[test]
fn act_search_from_the_cli() {
    // --act-search 1 at 4 bits on a real CIFAR-10 model: the recipe records it,
    // the report gives the search's line (runs = 1 + 8 per activation, the
    // output error not above the range's) and each moved scale's factor.
    let d = tempfile::tempdir_in(root().join("target")).unwrap();
    let rep = keras_cifar_report(
        d.path(),
        "search",
        &[
            "--quantize",
            "linear:8",
            "--per-channel",
            "--act-bits",
            "4",
            "--act-range",
            "percentile:99.99",
            "--act-search",
            "1",
        ],
    );
    assert_eq!(rep["recipe"]["act_quant"]["search"], serde_json::json!(1));
    let act = report_pass(&rep, "act-quant");
    let items = act["changed"].as_array().unwrap();
    let line = items
        .iter()
        .find(|i| i["target"] == "range search")
        .unwrap_or_else(|| panic!("{act}"))["what"]
        .as_str()
        .unwrap()
        .to_string();
    let quantized = items
        .iter()
        .filter(|i| i["what"].as_str().unwrap().starts_with("4-bit"))
        .count();
    assert!(quantized > 3, "{act}");
    assert!(
        line.starts_with(&format!(
            "1 round(s) over {quantized} activations, {} model runs",
            1 + 8 * quantized
        )),
        "{line}"
    );
    let errors = line.split("||y_float||^2 ").nth(1).unwrap();
    let mut e = errors.split(" -> ");
    let before: f64 = e.next().unwrap().parse().unwrap();
    let after: f64 = e
        .next()
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(after <= before && before > 0.0, "{line}");
    let moved = items
        .iter()
        .filter(|i| {
            i["what"]
                .as_str()
                .unwrap()
                .contains("; range search: scale x ")
        })
        .count();
    assert!(line.contains(&format!(": {moved} scales moved")), "{line}");

    // The 20 foolbox images are fewer than the default 32: all of them.
    assert!(
        line.contains(" model runs on 20 calibration images"),
        "{line}"
    );

    // act_quant.search_images sets how many; 0 is a usage error.
    let args = |n: &'static str| {
        [
            "--quantize",
            "linear:8",
            "--act-bits",
            "4",
            "--act-search",
            "1",
            "--set",
            n,
        ]
    };
    let rep = keras_cifar_report(d.path(), "search5", &args("act_quant.search_images=5"));
    let act = report_pass(&rep, "act-quant").to_string();
    assert!(act.contains(" model runs on 5 calibration images"), "{act}");
    let out = d.path().join("zero.onnx");
    let m = fixture("cifar10_keras_bn.onnx");
    let calib = fixture("data/foolbox/cifar10");
    let mut all = vec!["optimize", m.to_str().unwrap(), "-o", out.to_str().unwrap()];
    all.extend(args("act_quant.search_images=0"));
    all.extend(["--calib", calib.to_str().unwrap()]);
    let err = cli_fails(&all);
    assert!(err.contains("search_images = 0"), "{err}");
    assert!(!out.exists());

    // Without activation quantization there is nothing to search: a usage error.
    needs_act_bits(d.path(), "--act-search", "1");
}

#[test]
fn act_per_channel_from_the_cli() {
    // --act-per-channel on the Keras CIFAR-10 CNN at 8-bit weights and
    // activations: the recipe records it; the activations with a channel axis
    // get one scale per channel (the report says how many, each its own
    // percentile grid) on the fake-quant chain, which the score reads as 8 bits
    // for every weighted layer; tract and onnxruntime run the written model alike.
    let d = tempfile::tempdir_in(root().join("target")).unwrap();
    let flags = [
        "--quantize",
        "linear:8",
        "--per-channel",
        "--act-bits",
        "8",
        "--act-range",
        "percentile:99.99",
        "--act-per-channel",
    ];
    let rep = keras_cifar_report(d.path(), "pc", &flags);
    assert_eq!(
        rep["recipe"]["act_quant"]["per_channel"],
        serde_json::json!(true)
    );
    let act = report_pass(&rep, "act-quant");
    let lines: Vec<&str> = act["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["what"].as_str().unwrap())
        .filter(|w| w.starts_with("8-bit"))
        .collect();
    let per_channel = lines
        .iter()
        .filter(|w| {
            w.contains("; per channel: ")
                && w.contains("(each channel's own percentile:99.99 grid")
                && w.starts_with("8-bit signed fake-quant")
                    | w.starts_with("8-bit unsigned fake-quant")
        })
        .count();
    assert!(
        per_channel > 3 && per_channel + 1 >= lines.len(),
        "{lines:#?}"
    );
    // The image (3 channels) is the first layer's input.
    assert!(
        lines.iter().any(|w| w.contains("per channel: 3 scales")),
        "{lines:#?}"
    );
    let weighted = weighted_act_bits(&rep);
    assert!(
        weighted.len() > 3 && weighted.iter().all(|&b| b == 8),
        "{weighted:?}"
    );
    let rel = d.path().join("pc.onnx");
    let rel = format!("../{}", rel.strip_prefix(root()).unwrap().to_str().unwrap());
    crate::validate_ort::check(&rel, "data/foolbox/cifar10", "raw", 20);

    // A zero point per channel is not offered; and it needs --act-bits.
    let out = d.path().join("none.onnx");
    let m = fixture("cifar10_keras_bn.onnx");
    let calib = fixture("data/foolbox/cifar10");
    let err = cli_fails(&[
        "optimize",
        m.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--act-bits",
        "8",
        "--act-range",
        "minmax",
        "--act-per-channel",
        "--calib",
        calib.to_str().unwrap(),
    ]);
    assert!(
        err.contains("per-channel activations take a symmetric range"),
        "{err}"
    );
    let err = cli_fails(&[
        "optimize",
        m.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--act-per-channel",
    ]);
    assert!(err.contains("--act-per-channel needs --act-bits"), "{err}");
    assert!(!out.exists());
}
