//! Bad input gets one clear line naming the problem, exit code 2, no panic, no
//! output file, and the input is never touched.

use std::path::Path;

use crate::common::*;
use onnx_micronet::onnx::proto::{tensor_proto::DataLocation, StringStringEntryProto};

fn kv(k: &str, v: &str) -> StringStringEntryProto {
    StringStringEntryProto {
        key: Some(k.into()),
        value: Some(v.into()),
    }
}

fn dir() -> tempfile::TempDir {
    tempfile::tempdir_in(root().join("target")).unwrap()
}

/// inspect and convert both fail on `model` with a message containing every `needle`,
/// and convert leaves no output (nor temporary file) behind.
fn rejects(model: &Path, needles: &[&str]) {
    let m = model.to_str().unwrap();
    let err = cli_fails(&["inspect", m]);
    for n in needles {
        assert!(err.contains(n), "inspect {m}: '{n}' not in: {err}");
    }
    let out_dir = dir();
    let out = out_dir.path().join("out.onnx");
    let err = cli_fails(&["convert", m, "-o", out.to_str().unwrap()]);
    for n in needles {
        assert!(err.contains(n), "convert {m}: '{n}' not in: {err}");
    }
    let left: Vec<_> = std::fs::read_dir(out_dir.path()).unwrap().collect();
    assert!(left.is_empty(), "convert left files behind: {left:?}");
}

#[test]
fn truncated_file() {
    let d = dir();
    let bytes = std::fs::read(fixture("mnist_ccexam.onnx")).unwrap();
    for cut in [1, 10, bytes.len() / 3, bytes.len() - 1] {
        let p = d.path().join(format!("cut{cut}.onnx"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        rejects(&p, &[p.to_str().unwrap()]);
    }
}

#[test]
fn random_bytes_and_empty_file() {
    let d = dir();
    // A fixed xorshift stream: deterministic "random" bytes.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for (i, len) in [7usize, 100, 4096, 100_000].into_iter().enumerate() {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let p = d.path().join(format!("random{i}.onnx"));
        std::fs::write(&p, bytes).unwrap();
        rejects(&p, &[p.to_str().unwrap()]);
    }
    let p = d.path().join("empty.onnx");
    std::fs::write(&p, b"").unwrap();
    rejects(&p, &["the file is empty"]);
    rejects(
        &d.path().join("missing.onnx"),
        &["missing.onnx", "No such file"],
    );
}

#[test]
fn missing_value() {
    let d = dir();
    let mut m = tiny_conv();
    m.graph.as_mut().unwrap().node[1].input[0] = "nowhere".into();
    let p = d.path().join("m.onnx");
    write_model(&p, &m);
    rejects(
        &p,
        &["node 'relu' (Relu) uses value 'nowhere', which nothing defines"],
    );
}

#[test]
fn cycle() {
    let d = dir();
    let mut m = tiny_conv();
    let g = m.graph.as_mut().unwrap();
    // conv reads relu's output, relu reads conv's: a 2-node cycle.
    g.node[0].input[0] = "y".into();
    g.input.clear();
    let p = d.path().join("m.onnx");
    write_model(&p, &m);
    rejects(&p, &["cycle through node 'conv' (Conv)"]);
}

#[test]
fn value_defined_twice() {
    let d = dir();
    let mut m = tiny_conv();
    m.graph.as_mut().unwrap().node[1].output[0] = "c".into();
    let p = d.path().join("m.onnx");
    write_model(&p, &m);
    rejects(
        &p,
        &[
            "node 'relu' (Relu) writes value 'c'",
            "already the output of node 'conv'",
        ],
    );
}

#[test]
fn initializer_size_disagrees_with_dims() {
    let d = dir();
    let mut m = tiny_conv();
    // b declares 3 floats (12 bytes) but holds 2 (8 bytes).
    m.graph.as_mut().unwrap().initializer[1] = tensor_f32("b", &[3], &[1.0, 2.0]);
    let p = d.path().join("m.onnx");
    write_model(&p, &m);
    rejects(
        &p,
        &[
            "tensor 'b'",
            "raw_data has 8 bytes but [3] x float32 needs 12",
        ],
    );
}

#[test]
fn absurd_and_overflowing_dims() {
    let d = dir();
    // 2^40 x 2^40 elements over 4 bytes: must fail on the size check, not allocate.
    let mut m = tiny_conv();
    m.graph.as_mut().unwrap().initializer[1] = tensor_f32("b", &[1 << 40, 1 << 20], &[1.0]);
    let p = d.path().join("absurd.onnx");
    write_model(&p, &m);
    rejects(&p, &["tensor 'b'", "raw_data has 4 bytes"]);

    let mut m = tiny_conv();
    m.graph.as_mut().unwrap().initializer[1] =
        tensor_f32("b", &[1 << 40, 1 << 40, 1 << 40], &[1.0]);
    let p = d.path().join("overflow.onnx");
    write_model(&p, &m);
    rejects(&p, &["tensor 'b'", "overflow"]);

    let mut m = tiny_conv();
    m.graph.as_mut().unwrap().initializer[1] = tensor_f32("b", &[-3], &[1.0, 2.0, 3.0]);
    let p = d.path().join("negative.onnx");
    write_model(&p, &m);
    rejects(&p, &["tensor 'b'", "negative dimension -3"]);
}

#[test]
fn unsupported_element_type() {
    let d = dir();
    let mut m = tiny_conv();
    m.graph.as_mut().unwrap().initializer[1].data_type = Some(99);
    let p = d.path().join("m.onnx");
    write_model(&p, &m);
    rejects(&p, &["tensor 'b'", "unknown element type code 99"]);
}

#[test]
fn no_graph() {
    let d = dir();
    let mut m = tiny_conv();
    m.graph = None;
    let p = d.path().join("m.onnx");
    write_model(&p, &m);
    rejects(&p, &["the model has no graph"]);
}

fn external_model(d: &Path, location: &str) -> std::path::PathBuf {
    let mut m = tiny_conv();
    let b = &mut m.graph.as_mut().unwrap().initializer[1];
    b.raw_data = None;
    b.data_location = Some(DataLocation::External as i32);
    b.external_data = vec![
        kv("location", location),
        kv("offset", "0"),
        kv("length", "12"),
    ];
    let p = d.join("ext.onnx");
    write_model(&p, &m);
    p
}

#[test]
fn external_data_that_escapes_the_model_folder_is_refused() {
    let outer = dir();
    let inner = outer.path().join("model");
    std::fs::create_dir_all(&inner).unwrap();
    let secret = outer.path().join("secret.bin");
    std::fs::write(&secret, [0u8; 12]).unwrap();

    let p = external_model(&inner, "../secret.bin");
    rejects(
        &p,
        &[
            "tensor 'b'",
            "location '../secret.bin' leaves the model's folder",
        ],
    );

    let p = external_model(&inner, secret.to_str().unwrap());
    rejects(&p, &["tensor 'b'", "is absolute"]);

    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(&secret, inner.join("link.bin")).unwrap();
        let p = external_model(&inner, "link.bin");
        rejects(&p, &["tensor 'b'", "outside the model's folder"]);
    }

    let p = external_model(&inner, "absent.bin");
    rejects(&p, &["tensor 'b'", "cannot open"]);

    // Inside the folder but too short: 8 bytes for a 12-byte tensor.
    std::fs::write(inner.join("short.bin"), [0u8; 8]).unwrap();
    let p = external_model(&inner, "short.bin");
    rejects(&p, &["tensor 'b'", "past the end of 'short.bin' (8 bytes)"]);

    // And the same file done right loads.
    std::fs::write(inner.join("ok.bin"), [0u8; 12]).unwrap();
    let p = external_model(&inner, "ok.bin");
    assert!(cli(&["inspect", p.to_str().unwrap()]).status.success());
}

#[test]
fn convert_never_writes_its_input() {
    let d = dir();
    let src = d.path().join("m.onnx");
    std::fs::copy(fixture("mnist_ccexam.onnx"), &src).unwrap();
    let before = std::fs::read(&src).unwrap();
    let mtime = std::fs::metadata(&src).unwrap().modified().unwrap();
    let err = cli_fails(&[
        "convert",
        src.to_str().unwrap(),
        "-o",
        src.to_str().unwrap(),
    ]);
    assert!(err.contains("it is an input of this run"), "{err}");
    // Through another spelling of the same path.
    let other = d.path().join(".").join("m.onnx");
    cli_fails(&[
        "convert",
        src.to_str().unwrap(),
        "-o",
        other.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&src).unwrap(), before);
    assert_eq!(std::fs::metadata(&src).unwrap().modified().unwrap(), mtime);

    // Nor an input's external data file.
    let inner = d.path().join("e");
    std::fs::create_dir_all(&inner).unwrap();
    std::fs::write(inner.join("ok.bin"), [7u8; 12]).unwrap();
    let p = external_model(&inner, "ok.bin");
    let err = cli_fails(&[
        "convert",
        p.to_str().unwrap(),
        "-o",
        inner.join("ok.bin").to_str().unwrap(),
    ]);
    assert!(err.contains("it is an input of this run"), "{err}");
    assert_eq!(std::fs::read(inner.join("ok.bin")).unwrap(), [7u8; 12]);
}

#[test]
fn usage_errors_exit_2() {
    let o = cli(&["convert", "x.onnx"]);
    assert_eq!(o.status.code(), Some(2));
    let o = cli(&["frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
}

/// A bad output path fails at once, before loading, calibrating or validating:
/// exit 2, one line naming the option and the path, no temporary file left.
#[test]
fn bad_output_paths_fail_before_any_work() {
    let d = dir();
    let model = fixture("mnist_ccexam.onnx");
    let m = model.to_str().unwrap();
    let missing = d.path().join("missing_dir").join("out.onnx");
    // The calibration folder does not exist either: the output error comes first,
    // so no calibration (or any other work) ran before it.
    let nowhere = d.path().join("no_such_images");
    let err = cli_fails(&[
        "optimize",
        m,
        "-o",
        missing.to_str().unwrap(),
        "--quantize",
        "linear:8",
        "--act-bits",
        "8",
        "--calib",
        nowhere.to_str().unwrap(),
    ]);
    assert!(err.contains("-o '"), "{err}");
    assert!(err.contains("missing_dir' does not exist"), "{err}");
    assert!(!err.contains(".onnx-micronet-"), "{err}");
    // A folder given as the output.
    let folder = format!("{}/", d.path().display());
    let err = cli_fails(&["optimize", m, "-o", &folder]);
    assert!(err.contains("is a folder: give a file path"), "{err}");
    let err = cli_fails(&["convert", m, "-o", d.path().to_str().unwrap()]);
    assert!(err.contains("is a folder"), "{err}");
    // The report path too, and score's outputs.
    let out = d.path().join("ok.onnx");
    let err = cli_fails(&[
        "optimize",
        m,
        "-o",
        out.to_str().unwrap(),
        "--report",
        missing.to_str().unwrap(),
    ]);
    assert!(err.contains("--report '"), "{err}");
    let err = cli_fails(&["score", m, "--markdown", missing.to_str().unwrap()]);
    assert!(err.contains("--markdown '"), "{err}");
    assert!(!out.exists());
    let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A layer rule that matches nothing is an error naming the pattern, where it came
/// from and the nearest layer names (exit 2), from a flag and from a recipe; the
/// shipped recipe's "*classifier*" rule matches the EfficientNet-style fixture's
/// `classifier` and so runs there.
#[test]
fn layer_patterns_that_match_nothing_are_errors_with_the_nearest_names() {
    let d = dir();
    let model = fixture("mnist_ccexam.onnx");
    let m = model.to_str().unwrap();
    let out = d.path().join("o.onnx");
    let o = out.to_str().unwrap();
    let err = cli_fails(&[
        "optimize",
        m,
        "-o",
        o,
        "--quantize",
        "linear:8",
        "--layer-bits",
        "*clasifier.2*=6",
    ]);
    assert!(
        err.contains("[[quantize.layer]] (--layer-bits) pattern '*clasifier.2*' matches no node or weight of the model; nearest layer names: '"),
        "{err}"
    );
    // The nearest name is the one the typo meant.
    assert!(err.contains("classifier.2"), "{err}");
    let err = cli_fails(&[
        "optimize",
        m,
        "-o",
        o,
        "--prune",
        "magnitude:0.5",
        "--prune-skip",
        "features.9*",
    ]);
    assert!(
        err.contains("prune.skip (--prune-skip) pattern 'features.9*'"),
        "{err}"
    );
    let recipe = d.path().join("r.toml");
    std::fs::write(
        &recipe,
        "[prune]\nmethod = \"magnitude\"\nsparsity = 0.5\n[[prune.layer]]\nmatch = \"fc*\"\nsparsity = 0.9\n",
    )
    .unwrap();
    let err = cli_fails(&["optimize", m, "-o", o, "--recipe", recipe.to_str().unwrap()]);
    assert!(err.contains("[[prune.layer]] pattern 'fc*'"), "{err}");
    assert!(!out.exists());
    // A pattern that matches runs.
    let ok = cli(&[
        "optimize",
        fixture("efficientnet_style_bn.onnx").to_str().unwrap(),
        "-o",
        o,
        "--quantize",
        "minmax:6",
        "--layer-bits",
        "*classifier*=8",
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}
