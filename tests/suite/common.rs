//! Shared test helpers: paths to fixtures and the conformance venv, running the
//! CLI, and tiny models built with the prost types.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use onnx_micronet::onnx::proto::{
    tensor_shape_proto::{dimension::Value as Dim, Dimension},
    type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};
use onnx_micronet::onnx::{AttributeType, DataType};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(rel: &str) -> PathBuf {
    root().join("fixtures").join(rel)
}

/// The committed single-file model fixtures.
pub fn model_fixtures() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("fixtures"))
        .expect("fixtures/")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    v.sort();
    assert!(v.len() >= 4, "expected the committed fixtures, found {v:?}");
    v
}

/// The conformance venv's python, made by `make test`. Under `make test`
/// (ONNX_MICRONET_REQUIRE_VENV=1) a missing venv fails the test instead of skipping.
pub fn venv_python() -> Option<PathBuf> {
    let venv = std::env::var_os("ONNX_MICRONET_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv"));
    let py = venv.join("bin/python");
    if py.exists() {
        return Some(py);
    }
    if std::env::var_os("ONNX_MICRONET_REQUIRE_VENV").is_some() {
        panic!(
            "conformance venv missing at {}: run `make venv`",
            venv.display()
        );
    }
    eprintln!(
        "note: no conformance venv at {}; run `make test` for the full suite",
        venv.display()
    );
    None
}

/// Runs python code in the venv with args; panics with its stderr on failure.
pub fn run_python(py: &Path, code: &str, args: &[&str]) -> String {
    let out = Command::new(py)
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "python failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_onnx-micronet"))
        .args(args)
        .output()
        .expect("binary runs")
}

/// `optimize SRC -o DIR/TAG.onnx --report DIR/TAG.json ARGS...`, which must
/// succeed; returns the JSON report.
pub fn optimize_report(dir: &Path, tag: &str, src: &Path, args: &[&str]) -> serde_json::Value {
    let out = dir.join(format!("{tag}.onnx"));
    let rep = dir.join(format!("{tag}.json"));
    let mut all = vec![
        "optimize",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--report",
        rep.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    let o = cli(&all);
    assert!(
        o.status.success(),
        "{tag}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(&rep).unwrap()).unwrap()
}

/// Runs the CLI expecting failure with exit code 2 and a one-line error; returns stderr.
pub fn cli_fails(args: &[&str]) -> String {
    let out = cli(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(2),
        "args {args:?}: want exit 2, got {:?}; stderr: {stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "panic on {args:?}: {stderr}");
    assert!(stderr.starts_with("error: "), "stderr: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "want one line, got: {stderr}"
    );
    stderr
}

pub fn tensor_f32(name: &str, dims: &[i64], values: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(DataType::Float as i32),
        raw_data: Some(
            values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
        ),
        ..Default::default()
    }
}

pub fn value_info(name: &str, dims: &[i64]) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DataType::Float as i32),
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| Dimension {
                            value: Some(Dim::DimValue(d)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

pub fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(v),
        ..Default::default()
    }
}

pub fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}

pub fn model(graph: GraphProto, opset: i64) -> ModelProto {
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(opset),
        }],
        producer_name: Some("onnx-micronet-tests".into()),
        graph: Some(graph),
        ..Default::default()
    }
}

/// x[1,2,4,4] -> Conv(w[3,2,3,3], b[3], pads 1) -> Relu -> y[1,3,4,4].
pub fn tiny_conv() -> ModelProto {
    let w: Vec<f32> = (0..54)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) / 10.0)
        .collect();
    let mut conv = node("Conv", "conv", &["x", "w", "b"], &["c"]);
    conv.attribute.push(attr_ints("pads", &[1, 1, 1, 1]));
    model(
        GraphProto {
            name: Some("tiny".into()),
            node: vec![conv, node("Relu", "relu", &["c"], &["y"])],
            initializer: vec![
                tensor_f32("w", &[3, 2, 3, 3], &w),
                tensor_f32("b", &[3], &[0.1, -0.2, 0.3]),
            ],
            input: vec![value_info("x", &[1, 2, 4, 4])],
            output: vec![value_info("y", &[1, 3, 4, 4])],
            ..Default::default()
        },
        13,
    )
}

pub fn write_model(path: &Path, m: &ModelProto) {
    use prost::Message;
    std::fs::write(path, m.encode_to_vec()).unwrap();
}

/// Writes an f32 array as a NumPy .npy file (v1.0, little-endian, C order), for the
/// onnxruntime side of a comparison.
pub fn write_npy<D: ndarray::Dimension>(path: &Path, a: &ndarray::Array<f32, D>) {
    use std::io::Write;
    let shape: Vec<String> = a.shape().iter().map(|d| d.to_string()).collect();
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({},), }}",
        shape.join(", ")
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    f.write_all(b"\x93NUMPY\x01\x00").unwrap();
    f.write_all(&(header.len() as u16).to_le_bytes()).unwrap();
    f.write_all(header.as_bytes()).unwrap();
    for v in a.iter() {
        f.write_all(&v.to_le_bytes()).unwrap();
    }
}

/// The 1x1x4x4 -> 2x2x2 conv of the test models (w [2,1,3,3], no padding), in f64:
/// x already on its grid.
pub fn conv_f64(x: &[f64], w: &[f32]) -> Vec<f64> {
    let mut out = Vec::new();
    for c in 0..2 {
        for oy in 0..2 {
            for ox in 0..2 {
                let mut acc = 0.0;
                for ky in 0..3 {
                    for kx in 0..3 {
                        acc += x[(oy + ky) * 4 + ox + kx] * w[c * 9 + ky * 3 + kx] as f64;
                    }
                }
                out.push(acc);
            }
        }
    }
    out
}

/// The `what` of every `changed` line of one pass's report.
pub fn changed_whats(pass: &serde_json::Value) -> Vec<&str> {
    pass["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["what"].as_str().unwrap())
        .collect()
}

/// The entry of pass `name` in an `optimize --report` JSON value.
pub fn report_pass<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["passes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pass"] == name)
        .unwrap_or_else(|| panic!("no pass '{name}' in {}", report["passes"]))
}
