//! Lossless I/O: every fixture and every ONNX test model decodes, re-encodes and
//! decodes again to the same message (and the same bytes); external data round
//! trips; what we write decodes the same with an independent ONNX schema
//! (the `onnx-protobuf` crate, on the `protobuf` runtime).

use std::path::PathBuf;

use crate::common::*;
use onnx_micronet::onnx::io::Layout;
use onnx_micronet::onnx::{self, proto::ModelProto, SaveOptions};
use onnx_micronet::{decode_model, LoadOptions};
use prost::Message;

/// Second opinion from an independent ONNX schema on another protobuf runtime:
/// `ours` (bytes we wrote) decodes with onnx-protobuf, its fields match `expected`
/// (our decoded message), and when `original` is given, onnx-protobuf decodes both
/// files to equal messages (unknown fields included).
fn second_opinion(ours: &[u8], expected: &ModelProto, original: Option<&[u8]>) {
    use onnx_protobuf::Message as _;
    let theirs = onnx_protobuf::ModelProto::parse_from_bytes(ours)
        .expect("onnx-protobuf decodes our output");
    assert_eq!(theirs.ir_version, expected.ir_version());
    assert_eq!(theirs.producer_name, expected.producer_name());
    assert_eq!(theirs.opset_import.len(), expected.opset_import.len());
    let g = theirs.graph.as_ref().expect("graph");
    let ours_g = expected.graph.as_ref().unwrap();
    assert_eq!(g.node.len(), ours_g.node.len());
    assert_eq!(g.initializer.len(), ours_g.initializer.len());
    for (a, b) in g.initializer.iter().zip(&ours_g.initializer) {
        assert_eq!(a.name, b.name());
        assert_eq!(a.dims, b.dims);
        assert_eq!(a.data_type, b.data_type());
        assert_eq!(
            &a.raw_data[..],
            b.raw_data.as_deref().unwrap_or(&[]),
            "raw_data of {}",
            b.name()
        );
    }
    for (a, b) in g.node.iter().zip(&ours_g.node) {
        assert_eq!(a.op_type, b.op_type());
        assert_eq!(a.name, b.name());
        assert_eq!(a.input, b.input);
        assert_eq!(a.output, b.output);
        assert_eq!(a.attribute.len(), b.attribute.len());
    }
    if let Some(orig) = original {
        let before = onnx_protobuf::ModelProto::parse_from_bytes(orig).unwrap();
        assert!(
            before == theirs,
            "onnx-protobuf decodes input and output differently"
        );
    }
}

fn tmpdir() -> tempfile::TempDir {
    tempfile::tempdir_in(root().join("target")).unwrap()
}

#[test]
fn every_fixture_converts_byte_identically() {
    let dir = tmpdir();
    for f in model_fixtures() {
        let out = dir.path().join("out.onnx");
        let o = cli(&["convert", f.to_str().unwrap(), "-o", out.to_str().unwrap()]);
        assert!(
            o.status.success(),
            "{}: {}",
            f.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        let a = std::fs::read(&f).unwrap();
        let b = std::fs::read(&out).unwrap();
        let ma = ModelProto::decode(&a[..]).unwrap();
        let mb = ModelProto::decode(&b[..]).unwrap();
        assert_eq!(ma, mb, "{}: decoded messages differ", f.display());
        assert!(
            a == b,
            "{}: bytes differ ({} vs {})",
            f.display(),
            a.len(),
            b.len()
        );
        second_opinion(&b, &mb, Some(&a));
    }
}

#[test]
fn dynamo_external_data_round_trips() {
    let src = fixture("mnist_ccexam_dynamo/model.onnx");
    let original = onnx_micronet::load(&src).unwrap();
    assert!(
        !original.external_files.is_empty(),
        "the fixture should use external data"
    );
    let dir = tmpdir();

    // external -> single file: same message with the data inline.
    let single = dir.path().join("single.onnx");
    let o = cli(&[
        "convert",
        src.to_str().unwrap(),
        "-o",
        single.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(&single).unwrap();
    let m = ModelProto::decode(&bytes[..]).unwrap();
    assert_eq!(m, original.proto);
    second_opinion(&bytes, &m, None);

    // single -> external -> load: same message again, one side file.
    let ext = dir.path().join("sub").join("ext.onnx");
    std::fs::create_dir_all(ext.parent().unwrap()).unwrap();
    let o = cli(&[
        "convert",
        single.to_str().unwrap(),
        "-o",
        ext.to_str().unwrap(),
        "--external-data",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let side = ext.with_file_name("ext.onnx.data");
    assert!(side.exists());
    let back = onnx_micronet::load(&ext).unwrap();
    assert_eq!(back.proto, original.proto);
    assert_eq!(back.external_files, vec![side.canonicalize().unwrap()]);
    // The model file itself now holds no large payload.
    let raw = ModelProto::decode(&std::fs::read(&ext).unwrap()[..]).unwrap();
    let inline: usize = raw
        .graph
        .unwrap()
        .initializer
        .iter()
        .map(|t| t.raw_data.as_ref().map_or(0, |r| r.len()))
        .sum();
    assert!(
        inline < 1024 * raw_initializer_count(&original.proto),
        "inline bytes {inline}"
    );
}

fn raw_initializer_count(m: &ModelProto) -> usize {
    m.graph.as_ref().unwrap().initializer.len()
}

#[test]
fn external_data_layout_is_what_the_spec_says() {
    // Tiny model, threshold 0: every initializer goes out, 64-byte aligned.
    let dir = tmpdir();
    let m = onnx::Model {
        proto: tiny_conv(),
        path: None,
        external_files: vec![],
    };
    let out = dir.path().join("m.onnx");
    let r = onnx::save(
        &m,
        &out,
        &SaveOptions {
            layout: Layout::External,
            external_threshold: 0,
        },
    )
    .unwrap();
    let (side, len, count) = r.external.unwrap();
    assert_eq!(count, 2);
    // w: 54 floats = 216 bytes at 0; b: 3 floats at 256 (216 rounded up to 64) -> 268 bytes.
    assert_eq!(len, 256 + 12);
    assert_eq!(std::fs::metadata(&side).unwrap().len(), 268);
    let raw = ModelProto::decode(&std::fs::read(&out).unwrap()[..]).unwrap();
    let b = &raw.graph.as_ref().unwrap().initializer[1];
    let kv: Vec<(&str, &str)> = b
        .external_data
        .iter()
        .map(|e| (e.key(), e.value()))
        .collect();
    assert_eq!(
        kv,
        vec![
            ("location", "m.onnx.data"),
            ("offset", "256"),
            ("length", "12")
        ]
    );
    assert_eq!(onnx_micronet::load(&out).unwrap().proto, tiny_conv());
}

/// The ONNX project's own test models (per-operator node tests and the model
/// zoo topologies) shipped with onnx 1.22.0 in the conformance venv.
fn onnx_test_models() -> Option<Vec<PathBuf>> {
    let py = venv_python()?;
    let data = run_python(
        &py,
        "import onnx, os; print(os.path.join(os.path.dirname(onnx.__file__), 'backend', 'test', 'data'))",
        &[],
    );
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::from(data.trim())];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "onnx") {
                out.push(p);
            }
        }
    }
    out.sort();
    Some(out)
}

#[test]
fn onnx_node_test_models_round_trip() {
    let Some(models) = onnx_test_models() else {
        return;
    };
    assert!(
        models.len() > 1500,
        "expected onnx's ~1,700 test models, found {}",
        models.len()
    );
    let mut byte_identical = 0;
    for p in &models {
        let bytes = std::fs::read(p).unwrap();
        // Structure checks off: a few operator tests are deliberately unusual graphs.
        let m = decode_model(
            bytes.clone().into(),
            p,
            p.parent(),
            &LoadOptions { check_graph: false },
        )
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let again = m.proto.encode_to_vec();
        // Compared as encodings: a few test tensors hold NaN, which is != itself.
        let m2 = ModelProto::decode(&again[..]).unwrap();
        assert!(
            m2.encode_to_vec() == again,
            "{}: decode-encode-decode differs",
            p.display()
        );
        if again == bytes {
            byte_identical += 1;
        }
    }
    // Every file is written by protobuf's canonical serializer, as ours is.
    assert_eq!(
        byte_identical,
        models.len(),
        "byte-identical {byte_identical} of {}",
        models.len()
    );
}

#[test]
fn onnx_node_test_models_pass_the_structure_checks() {
    let Some(models) = onnx_test_models() else {
        return;
    };
    let mut failures = Vec::new();
    for p in &models {
        if let Err(e) = onnx_micronet::load(p) {
            failures.push(format!("{}: {e}", p.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rejected:\n{}",
        failures.len(),
        models.len(),
        failures.join("\n")
    );
}

#[test]
fn inspect_reports_the_fixture_facts() {
    // mobilenetv2_cifar_bn: 52 BatchNormalization nodes kept by the export (fixtures/README.md).
    let f = fixture("mobilenetv2_cifar_bn.onnx");
    let o = cli(&["inspect", f.to_str().unwrap(), "--json"]);
    assert!(o.status.success());
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["batch_normalization_nodes"], 52);
    assert_eq!(j["op_histogram"]["Conv"], 52);
    assert_eq!(j["inputs"][0]["shape"], "[N, 3, 32, 32]");
    let text = String::from_utf8(cli(&["inspect", f.to_str().unwrap()]).stdout).unwrap();
    assert!(text.contains("52 BatchNormalization"), "{text}");
}

#[test]
fn large_model_over_2gib_goes_external() {
    // A 2.2 GB weight in a sparse side file (no disk blocks until written):
    // loading maps it, a plain `convert` must choose external data by itself.
    let dir = tmpdir();
    let n: i64 = 550_000_000; // floats: 2.2e9 bytes > 2 GiB
    let mut m = tiny_conv();
    let g = m.graph.as_mut().unwrap();
    let mut big = tensor_f32("big", &[n], &[]);
    big.raw_data = None;
    big.data_location =
        Some(onnx_micronet::onnx::proto::tensor_proto::DataLocation::External as i32);
    big.external_data = vec![
        kv("location", "big.bin"),
        kv("offset", "0"),
        kv("length", &(n * 4).to_string()),
    ];
    g.initializer.push(big);
    let src = dir.path().join("big.onnx");
    write_model(&src, &m);
    let f = std::fs::File::create(dir.path().join("big.bin")).unwrap();
    f.set_len((n * 4) as u64).unwrap();
    drop(f);

    let out = dir.path().join("out").join("copy.onnx");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let o = cli(&[
        "convert",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::metadata(out.with_file_name("copy.onnx.data"))
            .unwrap()
            .len(),
        (n * 4) as u64,
        "side file: only `big` (w and b are under the 1024-byte threshold)"
    );
    let back = onnx_micronet::load(&out).unwrap();
    let t = back
        .proto
        .graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .find(|t| t.name() == "big")
        .unwrap();
    assert_eq!(t.raw_data.as_ref().unwrap().len(), (n * 4) as usize);
}

pub fn kv(k: &str, v: &str) -> onnx_micronet::onnx::proto::StringStringEntryProto {
    onnx_micronet::onnx::proto::StringStringEntryProto {
        key: Some(k.into()),
        value: Some(v.into()),
    }
}
