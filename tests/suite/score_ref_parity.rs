//! Parity of `onnx-micronet score` with an independent count: the Python script
//! `tests/conformance/ref_count.py`, written from micronet-rules.md (REF's formulas
//! plus the project's documented conventions), sharing no code with `src/score/`.
//! Totals (params, mults, adds, raw_mults, raw_adds) must agree to 1e-9 relative,
//! with and without the 16-bit freebie, and so must every node both sides name.
//!
//! Fixtures: the three real classifiers, the committed EfficientNet-style model
//! (SE blocks, swish as Sigmoid + Mul, residual Adds, BN kept), and a 60%
//! magnitude-pruned variant of it generated at test time (exercises the bitmask
//! storage, per-channel sparsity and all-zero output channels).

use std::path::{Path, PathBuf};

use crate::common::*;
use serde_json::Value;

const FIELDS: [&str; 5] = ["params", "mults", "adds", "raw_mults", "raw_adds"];
const REL_TOL: f64 = 1e-9;

/// Runs a script file of tests/conformance with the venv's python, through `run_python`.
fn run_script(py: &Path, script: &str, args: &[&str]) -> String {
    let path = root().join("tests/conformance").join(script);
    let mut all = vec![path.to_str().unwrap()];
    all.extend_from_slice(args);
    run_python(
        py,
        "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
        &all,
    )
}

fn close(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= REL_TOL * a.abs().max(b.abs())
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("'{key}' is not a number in {v}"))
}

/// Scores `model` both ways and returns the mismatches (empty = parity).
fn compare(py: &Path, model: &Path, freebie: bool) -> Vec<String> {
    let m = model.to_str().unwrap();
    let mut cli_args = vec!["score", m, "--json", "-"];
    let mut ref_args = vec![m];
    if !freebie {
        cli_args.push("--no-freebie");
        ref_args.push("--no-freebie");
    }
    let out = cli(&cli_args);
    assert!(
        out.status.success(),
        "score {m}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rust: Value = serde_json::from_slice(&out.stdout).expect("score --json - prints JSON");
    let reference: Value =
        serde_json::from_str(&run_script(py, "ref_count.py", &ref_args)).expect("ref JSON");

    let label = format!(
        "{} ({})",
        model.file_name().unwrap().to_string_lossy(),
        if freebie { "freebie" } else { "no freebie" }
    );
    let mut bad = Vec::new();
    assert_eq!(rust["freebie_applied"].as_bool(), Some(freebie), "{label}");
    let t = &rust["totals"];
    println!("{label}");
    for f in FIELDS {
        let (a, b) = (num(t, f), num(&reference, f));
        println!("  {f:<9} rust {a:>16.3}  ref {b:>16.3}");
        if !close(a, b) {
            bad.push(format!("{label}: total {f}: rust {a} vs ref {b}"));
        }
    }
    for side in [&rust, &reference] {
        let unc = side["uncounted"].as_array().unwrap();
        if !unc.is_empty() {
            bad.push(format!("{label}: uncounted nodes: {unc:?}"));
        }
    }

    // Per node, where both sides name the node; a node only one side lists must cost nothing.
    let per_node = reference["per_node"].as_object().unwrap();
    let layers = rust["layers"].as_array().unwrap();
    let mut matched = 0;
    for l in layers {
        let name = l["name"].as_str().unwrap();
        match per_node.get(name) {
            Some(r) => {
                matched += 1;
                for f in FIELDS {
                    let (a, b) = (num(l, f), num(r, f));
                    if !close(a, b) {
                        bad.push(format!(
                            "{label}: node '{name}' ({}): {f}: rust {a} vs ref {b}",
                            l["op_type"].as_str().unwrap_or("?")
                        ));
                    }
                }
            }
            None if FIELDS.iter().any(|f| num(l, f) != 0.0) => {
                bad.push(format!("{label}: node '{name}' counted by rust only: {l}"))
            }
            None => {}
        }
    }
    let rust_names: Vec<&str> = layers.iter().map(|l| l["name"].as_str().unwrap()).collect();
    for (name, r) in per_node {
        if !rust_names.contains(&name.as_str()) && FIELDS.iter().any(|f| num(r, f) != 0.0) {
            bad.push(format!("{label}: node '{name}' counted by ref only: {r}"));
        }
    }
    assert!(
        matched > 0 && matched == layers.len(),
        "{label}: only {matched} of {} rust layers matched a ref node by name",
        layers.len()
    );
    bad
}

fn check(py: &Path, model: &Path) {
    let mut bad = compare(py, model, true);
    bad.extend(compare(py, model, false));
    assert!(
        bad.is_empty(),
        "{} mismatch(es):\n{}",
        bad.len(),
        bad.join("\n")
    );
}

fn tmpdir() -> tempfile::TempDir {
    tempfile::tempdir_in(root().join("target")).unwrap()
}

#[test]
fn mobilenetv2_cifar_bn() {
    let Some(py) = venv_python() else { return };
    check(&py, &fixture("mobilenetv2_cifar_bn.onnx"));
}

#[test]
fn cifar10_keras_bn() {
    let Some(py) = venv_python() else { return };
    check(&py, &fixture("cifar10_keras_bn.onnx"));
}

#[test]
fn mnist_ccexam() {
    let Some(py) = venv_python() else { return };
    check(&py, &fixture("mnist_ccexam.onnx"));
}

#[test]
fn efficientnet_style_bn() {
    let Some(py) = venv_python() else { return };
    check(&py, &fixture("efficientnet_style_bn.onnx"));
}

/// The committed fixture is what the generator writes (seeded, byte-reproducible).
#[test]
fn efficientnet_style_bn_regenerates_byte_identically() {
    let Some(py) = venv_python() else { return };
    let dir = tmpdir();
    let out: PathBuf = dir.path().join("e.onnx");
    run_script(
        &py,
        "make_efficientnet_style.py",
        &["-o", out.to_str().unwrap(), "--no-check"],
    );
    let committed = std::fs::read(fixture("efficientnet_style_bn.onnx")).unwrap();
    assert!(
        std::fs::read(&out).unwrap() == committed,
        "fixtures/efficientnet_style_bn.onnx differs from what make_efficientnet_style.py writes"
    );
}

#[test]
fn efficientnet_style_sparse() {
    let Some(py) = venv_python() else { return };
    let dir = tmpdir();
    let model = dir.path().join("efficientnet_style_sparse.onnx");
    run_script(
        &py,
        "make_efficientnet_style.py",
        &["-o", model.to_str().unwrap(), "--sparsity", "0.6"],
    );
    // The variant really is sparse where intended: every Conv ~60%, the Gemm dense.
    let out = cli(&["score", model.to_str().unwrap(), "--json", "-"]);
    assert!(out.status.success());
    let rust: Value = serde_json::from_slice(&out.stdout).unwrap();
    for l in rust["layers"].as_array().unwrap() {
        let s = l["sparsity"].as_f64();
        match l["op_type"].as_str().unwrap() {
            "Conv" => {
                let s = s.unwrap();
                assert!((0.55..=0.65).contains(&s), "{}: sparsity {s}", l["name"]);
                assert!(l["note"].as_str().unwrap_or("").contains("mask"), "{l}");
            }
            "Gemm" => assert_eq!(s, Some(0.0)),
            _ => {}
        }
    }
    check(&py, &model);
}
