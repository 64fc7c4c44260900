//! Equalization (`--equalize`): hand-computed CLE scales on a two-layer Gemm
//! network, and the function kept on real fixtures (ReLU networks, and ReLU6
//! through the Relu + per-channel Min rewrite) in tract.

use crate::common::*;
use ndarray::{Array4, ArrayD};
use onnx_micronet::engine;
use onnx_micronet::onnx::proto::GraphProto;
use onnx_micronet::onnx::{Model, TensorData};

/// A deterministic input in [-amp, amp).
fn input(shape: [usize; 4], amp: f32) -> Array4<f32> {
    let mut x: u32 = 2024;
    Array4::from_shape_simple_fn(shape, || {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        (((x >> 8) as f32 / (1u32 << 24) as f32) * 2.0 - 1.0) * amp
    })
}

fn outputs(m: &Model, x: &Array4<f32>) -> Vec<f32> {
    let s = x.shape();
    let p = engine::plan(m, &[1, s[1], s[2], s[3]]).unwrap();
    engine::run_images(&p, x.view(), 1, &|_| {})
        .unwrap()
        .iter()
        .copied()
        .collect()
}

fn init(m: &Model, name: &str) -> ArrayD<f32> {
    let t = m
        .graph()
        .initializer
        .iter()
        .find(|t| t.name() == name)
        .unwrap_or_else(|| panic!("no initializer {name}"));
    TensorData::from_proto(t).unwrap().to_f32()
}

fn ops(m: &Model) -> Vec<String> {
    m.graph()
        .node
        .iter()
        .map(|n| n.op_type().to_string())
        .collect()
}

/// Runs `optimize FIXTURE --equalize MODE` (plus `extra`) and returns the
/// original and the output model with the text report.
fn equalize(fixture: &std::path::Path, extra: &[&str]) -> (Model, Model, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("eq.onnx");
    let mut args = vec![
        "optimize",
        fixture.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--verbose",
    ];
    args.extend_from_slice(extra);
    let o = cli(&args);
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{text}");
    (
        onnx_micronet::load(fixture).unwrap(),
        onnx_micronet::load(&out).unwrap(),
        text,
    )
}

/// Largest |a - b| / max(1, max |a|).
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let top = a.iter().fold(1f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (u, v)| m.max((u - v).abs())) / top
}

#[test]
fn cle_scales_by_hand_on_two_gemms() {
    // x[1,2] -> Gemm(W1, transB) -> Relu -> Gemm(W2, transB) -> y[1,2].
    // W1 rows (output channels of L1): [4, 0] (r1 = 4) and [0, 1] (r1 = 1).
    // W2 columns (input channels of L2): [1, 1] (r2 = 1) and [4, 4] (r2 = 4).
    // s_i = sqrt(r1_i / r2_i): s = [2, 0.5]; W1 rows / s: [2, 0], [0, 2];
    // b1 / s: [1, 1] / [2, 0.5] = [0.5, 2]; W2 columns x s: [2, 2], [2, 2].
    // Every range is now 2, so a second sweep moves nothing.
    let mut g1 = node("Gemm", "l1", &["x", "w1", "b1"], &["h"]);
    g1.attribute.push(attr_int("transB", 1));
    let mut g2 = node("Gemm", "l2", &["r", "w2", "b2"], &["y"]);
    g2.attribute.push(attr_int("transB", 1));
    let m = model(
        GraphProto {
            name: Some("pair".into()),
            node: vec![g1, node("Relu", "relu", &["h"], &["r"]), g2],
            initializer: vec![
                tensor_f32("w1", &[2, 2], &[4.0, 0.0, 0.0, 1.0]),
                tensor_f32("b1", &[2], &[1.0, 1.0]),
                tensor_f32("w2", &[2, 2], &[1.0, 4.0, 1.0, 4.0]),
                tensor_f32("b2", &[2], &[0.0, 0.0]),
            ],
            input: vec![value_info("x", &[1, 2])],
            output: vec![value_info("y", &[1, 2])],
            ..Default::default()
        },
        13,
    );
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("pair.onnx");
    write_model(&src, &m);
    let (_, out, text) = equalize(&src, &["--equalize", "cle"]);
    assert_eq!(
        init(&out, "w1").iter().copied().collect::<Vec<_>>(),
        [2.0, 0.0, 0.0, 2.0]
    );
    assert_eq!(
        init(&out, "b1").iter().copied().collect::<Vec<_>>(),
        [0.5, 2.0]
    );
    assert_eq!(
        init(&out, "w2").iter().copied().collect::<Vec<_>>(),
        [2.0; 4]
    );
    assert!(text.contains("1 pairs, 2 sweeps"), "{text}");
    assert!(text.contains("scales in [5.000e-1, 2.000e0]"), "{text}");
}

#[test]
fn cle_keeps_relu_networks() {
    // MNIST CNN: Conv -> Relu -> MaxPool -> Conv ...; CIFAR-10 Keras: Conv -> BN -> Relu -> Conv.
    for (f, shape) in [
        ("mnist_ccexam.onnx", [4, 1, 28, 28]),
        ("cifar10_keras_bn.onnx", [4, 3, 32, 32]),
    ] {
        let (a, b, text) = equalize(&fixture(f), &["--equalize", "cle"]);
        let pairs = text
            .lines()
            .find(|l| l.contains("cle:"))
            .unwrap_or_else(|| panic!("{f}: no cle line in {text}"));
        assert!(!pairs.contains(" 0 pairs"), "{f}: {pairs}");
        // The weights did move (scales other than 1), and the function did not.
        assert!(
            !text.contains("scales in [1.000e0, 1.000e0]"),
            "{f}: {text}"
        );
        let x = input(shape, 1.0);
        let d = rel_diff(&outputs(&a, &x), &outputs(&b, &x));
        assert!(d <= 1e-5, "{f}: relative output difference {d}");
    }
}

#[test]
fn relu6_is_rewritten_exactly_or_dropped_on_request() {
    // MobileNetV2 (CIFAR): Conv -> Clip(0, 6) -> depthwise -> Clip(0, 6) -> Conv.
    // Inputs of amplitude 4 push many activations past 6, so a dropped upper
    // bound shows.
    let f = fixture("mobilenetv2_cifar_bn.onnx");
    let x = input([2, 3, 32, 32], 4.0);
    let (a, b, text) = equalize(&f, &["--equalize", "cle"]);
    let clips_before = ops(&a).iter().filter(|o| *o == "Clip").count();
    let mins = ops(&b).iter().filter(|o| *o == "Min").count();
    assert!(
        mins > 0 && mins <= clips_before,
        "{mins} Min of {clips_before} Clip"
    );
    assert_eq!(
        ops(&b).iter().filter(|o| *o == "Clip").count() + mins,
        clips_before
    );
    assert!(text.contains("rewritten as Relu + Min with one bound per channel (exact)"));
    let (ya, yb) = (outputs(&a, &x), outputs(&b, &x));
    let d = rel_diff(&ya, &yb);
    // float32 rounding through 50 layers with BN folded as well: measured 1.9e-5.
    assert!(d <= 5e-5, "relative output difference {d}");

    // Residual streams scaled as one (project convs' rows, expand convs' columns,
    // the Adds between): still the same function.
    let (_, s, text) = equalize(&f, &["--equalize", "cle", "--set", "equalize.streams=true"]);
    assert!(
        text.contains("a stream of 3 values through 1 Adds"),
        "{text}"
    );
    let d = rel_diff(&ya, &outputs(&s, &x));
    assert!(d <= 5e-5, "streams: relative output difference {d}");

    let (_, c, text) = equalize(
        &f,
        &[
            "--equalize",
            "cle",
            "--set",
            "equalize.across_clip=\"relu\"",
        ],
    );
    assert!(text.contains("CHANGES THE FUNCTION"), "{text}");
    assert_eq!(ops(&c).iter().filter(|o| *o == "Min").count(), 0);
    let d = rel_diff(&ya, &outputs(&c, &x));
    assert!(d > 1e-3, "dropping ReLU6's bound should show: {d}");

    let (_, d_model, text) = equalize(
        &f,
        &["--equalize", "cle", "--set", "equalize.across_clip=\"no\""],
    );
    assert!(text.contains("across_clip = no"), "{text}");
    assert_eq!(ops(&d_model).iter().filter(|o| *o == "Min").count(), 0);
}

#[test]
fn bad_modes_and_missing_data_are_named() {
    let f = fixture("mnist_ccexam.onnx");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.onnx");
    let err = cli_fails(&[
        "optimize",
        f.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--equalize",
        "smoothquant:2",
    ]);
    assert!(err.contains("smoothquant[:A] with 0 <= A <= 1"), "{err}");
    let err = cli_fails(&[
        "optimize",
        f.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--equalize",
        "smoothquant",
    ]);
    assert!(err.contains("needs calibration images"), "{err}");
    assert!(!out.exists());
}
