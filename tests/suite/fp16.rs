//! FP16 storage (repr/scheme/fp16.rs): the grid by hand, its claim and proof,
//! the score's 16-bit counts, float16 activations, and the CLI end to end on a
//! real model with tract and onnxruntime.

use crate::common::*;
use ndarray::{Array4, ArrayD, IxDyn};
use onnx_micronet::data::Dataset;
use onnx_micronet::onnx::proto::{GraphProto, ModelProto};
use onnx_micronet::onnx::{Model, TensorData};
use onnx_micronet::passes::act_quant::{ActQuant, ActQuantSection};
use onnx_micronet::passes::quantize::{
    fp16, quantize_tensor, QuantConfig, Quantize, QuantizeSection, Scheme,
};
use onnx_micronet::passes::{Context, Pass};
use onnx_micronet::repr::claim;
use onnx_micronet::score::{self, ScoreOptions};

fn wrap(proto: ModelProto) -> Model {
    Model {
        proto,
        path: None,
        external_files: vec![],
    }
}

/// x [1,1,4,4] -> Conv(w [2,1,3,3]) -> y [1,2,2,2].
fn conv_model() -> ModelProto {
    // No zero among them: (k - 4.5) / 10 for k = i * 5 mod 9 in 0..9.
    let w: Vec<f32> = (0..18).map(|i| ((i * 5 % 9) as f32 - 4.5) / 10.0).collect();
    model(
        GraphProto {
            name: Some("c".into()),
            node: vec![node("Conv", "conv", &["x", "w"], &["y"])],
            initializer: vec![tensor_f32("w", &[2, 1, 3, 3], &w)],
            input: vec![value_info("x", &[1, 1, 4, 4])],
            output: vec![value_info("y", &[1, 2, 2, 2])],
            ..Default::default()
        },
        13,
    )
}

#[test]
fn fp16_grid_by_hand() {
    // 0.1 = 1.6 x 2^-4: 10 mantissa bits give 1638/1024 (1.599609375, the nearer of
    // 1638 and 1639 / 1024), so 1638 x 2^-14; 1/3 = 1.0101010101|01.. x 2^-2 rounds
    // down to 1365/1024 x 2^-2 = 5460 x 2^-14; 70000 > 65504 clips; 1e-9 and
    // -1e-30 would round to zero and become +-2^-24; -2.5 and 0 are halves already.
    let w = [0.1f32, 1.0 / 3.0, 70000.0, 1e-9, -1e-30, -2.5, 0.0];
    let (q, clipped) = fp16::fp16(&w);
    let s24 = 2f32.powi(-24);
    assert_eq!(
        q,
        vec![
            1638.0 / 16384.0,
            5460.0 / 16384.0,
            65504.0,
            s24,
            -s24,
            -2.5,
            0.0
        ]
    );
    assert_eq!(clipped, 1);
    assert!(q.iter().all(|v| fp16::is_half(*v)));
    assert!(!fp16::is_half(0.1));
}

#[test]
fn fp16_claim_is_written_and_proved() {
    let w = ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![0.1f32, -0.2, 0.3, 0.0]).unwrap();
    let q = quantize_tensor(&w, Scheme::Fp16, 16, &QuantConfig::default(), Some(0), 2);
    let keys: Vec<(&str, &str)> = q.meta.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(
        keys,
        vec![
            ("onnx_micronet.scheme", "fp16"),
            ("onnx_micronet.bits", "16")
        ]
    );
    let mut t = TensorData::F32(q.values.clone()).to_proto("w");
    claim::write(&mut t, &q.meta);
    let c = claim::verify(&t, &q.values).unwrap().unwrap();
    assert_eq!((c.scheme, c.bits), (Scheme::Fp16, 16));
    // The same claim on values that are not halves is refused, naming the value.
    let err = claim::verify(&t, &w).unwrap_err().to_string();
    assert!(
        err.contains("tensor 'w': claims fp16 but value 0.1 is not a float16 value"),
        "{err}"
    );
    // The flag and the recipe take fp16 without bits; other widths are refused.
    let s = QuantizeSection::from_flag("fp16").unwrap();
    assert_eq!(
        (s.config().unwrap().scheme, s.config().unwrap().bits),
        (Scheme::Fp16, 16)
    );
    let bad = QuantizeSection {
        scheme: "fp16".into(),
        bits: Some(8),
        ..Default::default()
    };
    assert!(bad
        .config()
        .unwrap_err()
        .to_string()
        .contains("fp16 weights take 16 bits"));
}

fn quantized(act_bits: Option<u32>) -> Model {
    let mut m = wrap(conv_model());
    Quantize(QuantConfig {
        scheme: Scheme::Fp16,
        bits: 16,
        ..Default::default()
    })
    .run(&mut m, &Context::default())
    .unwrap();
    if let Some(bits) = act_bits {
        // One image, x = i / 10 for i in 0..16.
        let x: Vec<f32> = (0..16).map(|i| i as f32 / 10.0).collect();
        let data = Dataset {
            images: Array4::from_shape_vec((1, 1, 4, 4), x).unwrap(),
            labels: vec![None],
            names: vec!["calib".into()],
            description: "hand-made".into(),
            warnings: Vec::new(),
        };
        let cx = Context {
            reference: None,
            // Float16 rounding has no range to measure: it runs without images.
            calib: (bits != 16).then_some(&data),
            input_shape: vec![1, 1, 4, 4],
            threads: 1,
            ..Default::default()
        };
        let cfg = ActQuantSection {
            bits,
            ..Default::default()
        }
        .config()
        .unwrap();
        ActQuant(cfg).run(&mut m, &cx).unwrap();
    }
    m
}

#[test]
fn score_counts_fp16_weights_at_16_bits() {
    let no_freebie = ScoreOptions {
        freebie: false,
        ..Default::default()
    };
    // The float model without the freebie: 18 weights x 32 bits = 18 params.
    let f = score::score(&wrap(conv_model()), &no_freebie).unwrap();
    assert_eq!(f.totals.params, 18.0);
    // fp16 weights: 18 x 16 / 32 = 9 params, with or without the freebie (16 is not
    // below 16: the model stays unquantized and keeps the freebie).
    let m = quantized(None);
    for o in [ScoreOptions::default(), no_freebie] {
        let r = score::score(&m, &o).unwrap();
        let conv = r.layers.iter().find(|l| l.name == "conv").unwrap();
        assert_eq!((conv.weight_bits, r.totals.params), (Some(16), 9.0));
        assert!(!r.quantized);
    }
    // With 8-bit activations on top: quantized, no freebie; the 8 outputs x 9
    // multiplies count at max(16, 8) = 16 bits: 72 x 16/32 = 36.
    let m = quantized(Some(8));
    let r = score::score(&m, &ScoreOptions::default()).unwrap();
    let conv = r.layers.iter().find(|l| l.name == "conv").unwrap();
    assert!(r.quantized && !r.freebie_applied);
    assert_eq!((conv.weight_bits, conv.act_bits), (Some(16), 8));
    assert_eq!((conv.raw_mults, conv.mults), (72.0, 36.0));
    assert_eq!(conv.params, 9.0);
}

#[test]
fn float16_activations_round_and_count_at_16_bits() {
    let m = quantized(Some(16));
    // The chain is Cast(to FLOAT16) -> Cast(to FLOAT) on the conv input.
    let ops: Vec<&str> = m.graph().node.iter().map(|n| n.op_type()).collect();
    assert_eq!(ops, vec!["Cast", "Cast", "Conv"]);
    let r = score::score(&m, &ScoreOptions::default()).unwrap();
    let conv = r.layers.iter().find(|l| l.name == "conv").unwrap();
    assert_eq!(conv.act_bits, 16);
    // 16 bits is not below 16: the model keeps the freebie.
    assert!(!r.quantized && r.freebie_applied);
    // tract computes the conv of the float16-rounded input: x = 0.1 -> 1638 x 2^-14, ...
    let x: Vec<f32> = (0..16).map(|i| i as f32 / 10.0).collect();
    let plan = onnx_micronet::engine::plan(&m, &[1, 1, 4, 4]).unwrap();
    let images = Array4::from_shape_vec((1, 1, 4, 4), x.clone()).unwrap();
    let y = onnx_micronet::engine::run_images(&plan, images.view(), 1, &|_| {}).unwrap();
    let w = {
        let t = m
            .graph()
            .initializer
            .iter()
            .find(|t| t.name() == "w")
            .unwrap();
        TensorData::from_proto(t).unwrap().to_f32()
    };
    let (xh, _) = fp16::fp16(&x);
    let xh: Vec<f64> = xh.iter().map(|v| *v as f64).collect();
    let want = conv_f64(&xh, w.as_slice().unwrap());
    for (g, w) in y.iter().zip(&want) {
        assert!((*g as f64 - w).abs() < 1e-6, "{y:?} vs {want:?}");
    }
}

#[test]
fn cli_fp16_on_mnist_halves_the_file_and_keeps_every_prediction() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m16.onnx");
    let report = dir.path().join("r.json");
    let o = cli(&[
        "optimize",
        fixture("mnist_ccexam.onnx").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--quantize",
        "fp16",
        "--data",
        fixture("data/mnist-digits-1000").to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let before = std::fs::metadata(fixture("mnist_ccexam.onnx"))
        .unwrap()
        .len();
    let after = std::fs::metadata(&out).unwrap().len();
    // Four float16 weight tensors (float32 biases) plus their Cast decoders.
    let ratio = after as f64 / before as f64;
    assert!(
        (0.49..0.52).contains(&ratio),
        "{after} / {before} = {ratio}"
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let agree = r["validation"]["agreement"]["top1_agreement"]
        .as_f64()
        .unwrap();
    assert_eq!(agree, 1.0, "top-1 agreement on 1,000 digits");
    let layers = r["after"]["layers"].as_array().unwrap();
    for l in layers.iter().filter(|l| l["weight_bits"].is_number()) {
        assert_eq!(l["weight_bits"], 16, "{}", l["name"]);
        assert_eq!(l["sparsity"], 0.0, "fp16 made no zeros: {}", l["name"]);
    }
    // onnxruntime (default session and no optimizations) runs it and agrees with tract.
    let Some(py) = venv_python() else { return };
    let code = r#"import sys, numpy as np, onnxruntime as ort
x = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)
outs = []
for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
    o = ort.SessionOptions(); o.graph_optimization_level = level
    a = ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider'])
    b = ort.InferenceSession(sys.argv[2], o, providers=['CPUExecutionProvider'])
    ya = a.run(None, {a.get_inputs()[0].name: x})[0]; yb = b.run(None, {b.get_inputs()[0].name: x})[0]
    outs.append(int((ya.argmax(1) == yb.argmax(1)).sum()))
print(outs[0], outs[1])"#;
    let got = run_python(
        &py,
        code,
        &[
            fixture("mnist_ccexam.onnx").to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(got.trim(), "8 8");
}
