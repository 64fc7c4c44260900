//! The score as a referee of other tools' quantized models: onnxruntime's
//! quantize_static (QDQ with int8 and int4 weights, QOperator) and
//! quantize_dynamic outputs (made in the test by tests/referee/ort_quantize.py)
//! of a small real-shaped CNN, counted against a hand derivation, and of the
//! committed CIFAR MobileNetV2 fixture, counted completely (`--strict` clean) and,
//! for the QDQ forms, layer by layer against the same hand derivation.

use std::path::Path;

use crate::common::*;
use onnx_micronet::onnx::{Model, TensorData};
use onnx_micronet::score::{self, ScoreOptions};

/// x [1,3,8,8] -> Conv(W [4,3,3,3], B [4], pads 1) -> Relu -> GlobalAveragePool
/// -> Flatten -> Gemm(W2 [10,4], transB 1, B2 [10]) -> y [1,10], seeded weights.
const TINY: &str = r#"import sys, numpy as np, onnx
from onnx import helper as h, TensorProto as T, numpy_helper as nh
rng = np.random.default_rng(1)
W = rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3
B = rng.standard_normal(4).astype(np.float32) * 0.1
W2 = rng.standard_normal((10, 4)).astype(np.float32) * 0.3
B2 = rng.standard_normal(10).astype(np.float32) * 0.1
nodes = [h.make_node('Conv', ['x', 'W', 'B'], ['c'], pads=[1, 1, 1, 1], name='conv'),
         h.make_node('Relu', ['c'], ['r'], name='relu'),
         h.make_node('GlobalAveragePool', ['r'], ['p'], name='gap'),
         h.make_node('Flatten', ['p'], ['f'], name='flatten'),
         h.make_node('Gemm', ['f', 'W2', 'B2'], ['y'], transB=1, name='fc')]
g = h.make_graph(nodes, 'tiny', [h.make_tensor_value_info('x', T.FLOAT, [1, 3, 8, 8])],
                 [h.make_tensor_value_info('y', T.FLOAT, [1, 10])],
                 [nh.from_array(W, 'W'), nh.from_array(B, 'B'), nh.from_array(W2, 'W2'), nh.from_array(B2, 'B2')])
m = h.make_model(g, opset_imports=[h.make_opsetid('', 13)]); m.ir_version = 7
onnx.save(m, sys.argv[1])"#;

fn quantized_forms(py: &Path, model: &Path, dir: &Path, images: Option<&Path>) {
    let script = root().join("tests/referee/ort_quantize.py");
    let mut cmd = std::process::Command::new(py);
    cmd.arg(&script).arg(model).arg(dir).arg("--n").arg("4");
    if let Some(i) = images {
        cmd.arg("--images").arg(i);
    }
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn init(m: &Model, name: &str) -> TensorData {
    let t = m
        .graph()
        .initializer
        .iter()
        .find(|t| t.name() == name)
        .unwrap();
    TensorData::from_proto(t).unwrap()
}

/// Storage bits of a weight with these codes at `bits` (REF's rule: a one-bit mask
/// over the tensor once any code is zero, the weights' zero points being 0).
fn weight_bits(codes: &TensorData, bits: f64) -> f64 {
    let n = codes.len() as f64;
    let zeros = codes.zeros() as f64;
    if zeros > 0.0 {
        (n - zeros) * bits + n
    } else {
        n * bits
    }
}

#[test]
fn onnxruntime_quantized_forms_count_by_hand() {
    let Some(py) = venv_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let tiny = dir.path().join("tiny.onnx");
    run_python(&py, TINY, &[tiny.to_str().unwrap()]);
    quantized_forms(&py, &tiny, dir.path(), None);
    let load = |f: &str| onnx_micronet::load(&dir.path().join(format!("{f}.onnx"))).unwrap();
    let opts = ScoreOptions::default();
    let score = |m: &Model| score::score(m, &opts).unwrap();

    // QDQ, int8 weights (per channel, symmetric: zero points all 0, not counted),
    // uint8 activations. In bits:
    //   conv: W codes (8 bits, mask if any code is 0) + 4 scales x 32
    //         + bias: 4 int32 + its 4 scales x 32 (zero points 0)
    //   fc:   W2 codes + 10 scales x 32 + bias 10 int32 + 10 scales x 32
    //   activations: x scale 32 + x zero point 8 (143), r scale 32 (zero point 0),
    //         p scale 32 (zero point 0), y scale 32 + y zero point 8 (151) = 144
    let m = load("qdq_int8");
    let (w, w2) = (init(&m, "W_quantized"), init(&m, "W2_quantized"));
    let conv = weight_bits(&w, 8.0) + 4.0 * 32.0 + 4.0 * 32.0 + 4.0 * 32.0;
    let fc = weight_bits(&w2, 8.0) + 10.0 * 32.0 + 10.0 * 32.0 + 10.0 * 32.0;
    let acts = 144.0;
    let r = score(&m);
    assert!(r.complete && r.uncounted.is_empty(), "{:?}", r.uncounted);
    let layer = |r: &score::Report, name: &str| {
        r.layers
            .iter()
            .find(|l| l.name == name)
            .unwrap_or_else(|| panic!("no layer {name}"))
            .clone()
    };
    assert_eq!(layer(&r, "conv").params, conv / 32.0);
    assert_eq!(layer(&r, "fc").params, fc / 32.0);
    assert_eq!(
        layer(&r, "(activation scales and zero points)").params,
        acts / 32.0
    );
    assert_eq!(r.totals.params, (conv + fc + acts) / 32.0);
    // conv multiplies: nonzero weights x 64 positions, at max(8, 8) bits.
    let nnz = (w.len() - w.zeros()) as f64;
    assert_eq!(layer(&r, "conv").mults, nnz * 64.0 * 8.0 / 32.0);
    assert_eq!(
        (layer(&r, "conv").weight_bits, layer(&r, "conv").act_bits),
        (Some(8), 8)
    );
    let qdq_params = r.totals.params;

    // QDQ, int4 weights: the same with 4-bit codes (int4 zero points 0).
    let m = load("qdq_int4");
    let (w, w2) = (init(&m, "W_quantized"), init(&m, "W2_quantized"));
    assert_eq!(w.data_type(), onnx_micronet::onnx::DataType::Int4);
    let conv = weight_bits(&w, 4.0) + 4.0 * 32.0 + 4.0 * 32.0 + 4.0 * 32.0;
    let fc = weight_bits(&w2, 4.0) + 10.0 * 32.0 + 10.0 * 32.0 + 10.0 * 32.0;
    let r = score(&m);
    assert!(r.complete);
    assert_eq!(r.totals.params, (conv + fc + acts) / 32.0);
    assert_eq!(layer(&r, "conv").weight_bits, Some(4));
    // A multiply reads a 4-bit weight and an 8-bit activation: 8 bits.
    let nnz = (w.len() - w.zeros()) as f64;
    assert_eq!(layer(&r, "conv").mults, nnz * 64.0 * 8.0 / 32.0);

    // QOperator (QLinearConv, QLinearGlobalAveragePool, QGemm): the same weights and
    // activation scales; biases are int32 with no stored scale (x scale x w scale),
    // so 4 + 10 scales fewer: 14 parameters.
    let m = load("qoperator");
    let r = score(&m);
    assert!(r.complete, "{:?}", r.uncounted);
    assert_eq!(qdq_params - r.totals.params, 14.0);
    assert_eq!(layer(&r, "conv_quant").act_bits, 8);

    // Dynamic (ConvInteger, MatMulInteger, DynamicQuantizeLinear): int8 weights at 8
    // bits, one per-tensor weight scale each (read by the Mul of the scales), float
    // biases (no freebie: 32 bits), no stored activation scales (computed per input).
    let m = load("dynamic");
    let (w, w2) = (init(&m, "W_quantized"), init(&m, "W2_quantized"));
    let r = score(&m);
    assert!(r.complete, "{:?}", r.uncounted);
    let want = weight_bits(&w, 8.0) + weight_bits(&w2, 8.0) + 2.0 * 32.0 + (4.0 + 10.0) * 32.0;
    assert_eq!(r.totals.params, want / 32.0);
    // The range search of each DynamicQuantizeLinear: 2 comparisons per input element
    // at 32 bits (x: 192 elements; f: 4).
    let dq: f64 = r
        .layers
        .iter()
        .filter(|l| l.op_type == "DynamicQuantizeLinear")
        .map(|l| l.raw_mults)
        .sum();
    assert_eq!(dq, 2.0 * (192.0 + 4.0));
}

#[test]
fn onnxruntime_outputs_of_a_real_cnn_score_completely() {
    let Some(py) = venv_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    quantized_forms(
        &py,
        &fixture("mobilenetv2_cifar_bn.onnx"),
        dir.path(),
        Some(&fixture("data/foolbox/cifar100")),
    );
    let float = onnx_micronet::load(&fixture("mobilenetv2_cifar_bn.onnx")).unwrap();
    let opts = ScoreOptions {
        strict: true,
        ..Default::default()
    };
    let f = score::score(&float, &opts).unwrap();
    let mut scores = Vec::new();
    for form in ["qdq_int8", "qdq_int4", "qoperator", "dynamic"] {
        let m = onnx_micronet::load(&dir.path().join(format!("{form}.onnx"))).unwrap();
        // --strict: every node is in the counting table.
        let r = score::score(&m, &opts).unwrap_or_else(|e| panic!("{form}: {e}"));
        assert!(r.complete, "{form}");
        // Every weighted layer of the float model is counted, with its weight's size
        // (dynamic quantization turns the classifier's Gemm [100, 1280] into a
        // MatMul of the transposed [1280, 100]).
        let weighted = |r: &score::Report| {
            let mut v: Vec<usize> = r
                .layers
                .iter()
                .filter_map(|l| l.weight_shape.as_ref().map(|s| s.iter().product()))
                .collect();
            v.sort();
            v
        };
        assert_eq!(weighted(&r), weighted(&f), "{form}");
        if form.starts_with("qdq") {
            // Per layer by hand, as in the tiny model above: per-channel codes at 8
            // (or 4) bits, plus a one-bit mask over the tensor when a code is 0,
            // plus 3 x 32 bits per output channel (weight scale, int32 bias, bias
            // scale; zero points 0, not counted). Output channels: axis 0 of the
            // Conv weight [C, K/g, kh, kw] and of the Gemm weight [C, K] (transB).
            let bits = if form == "qdq_int8" { 8.0 } else { 4.0 };
            for l in r.layers.iter().filter(|l| l.weight_shape.is_some()) {
                let shape = l.weight_shape.as_ref().unwrap();
                let n = shape.iter().product::<usize>() as f64;
                let zeros = (l.sparsity.unwrap_or(0.0) * n).round();
                let mask = if zeros > 0.0 { n } else { 0.0 };
                let want = ((n - zeros) * bits + mask + 3.0 * 32.0 * shape[0] as f64) / 32.0;
                assert!(
                    (l.params - want).abs() < 1e-9,
                    "{form} {}: {} params vs {want} by hand",
                    l.name,
                    l.params
                );
                assert_eq!(l.weight_bits, Some(bits as u32), "{form} {}", l.name);
            }
        }
        scores.push((form, r.score, r.totals.params));
    }
    eprintln!(
        "float {:.4} ({} params); {scores:?}",
        f.score, f.totals.params
    );
    // int4 weights take fewer parameters than int8, and every quantized form less
    // than half of the float model's (unquantized: 16-bit freebie).
    assert!(scores[1].2 < scores[0].2);
    for (form, s, _) in &scores {
        assert!(*s < f.score, "{form}: {s} vs float {}", f.score);
    }
}
