//! `optimize` end to end from the CLI: BN folding on a real fixture, accuracy beside
//! the score with --data, and the accuracy gate (exit 3, no output file).

mod common;

use common::*;

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
