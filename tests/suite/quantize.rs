//! Weight quantization (passes/quantize/) and calibrated activation quantization
//! (passes/act_quant.rs): each grid by hand, the QBN order, the claims `score`
//! reads back, Q/DQ numerics in tract (against a hand computation and
//! onnxruntime), recipe errors and the CLI end to end.

use crate::common::*;
use ndarray::{Array4, ArrayD, IxDyn};
use onnx_micronet::data::Dataset;
use onnx_micronet::onnx::proto::{GraphProto, ModelProto};
use onnx_micronet::onnx::{Model, TensorData};
use onnx_micronet::passes::act_quant::{ActQuant, ActQuantSection};
use onnx_micronet::passes::calib::obs::Damp;
use onnx_micronet::passes::quantize::{
    linear, log, quantize_tensor, tanh, ternary, QuantConfig, Quantize, QuantizeSection, Scheme,
    TernaryRule,
};
use onnx_micronet::passes::{Context, Pass, PassReport};
use onnx_micronet::recipe::Recipe;
use onnx_micronet::score::{self, ScoreOptions};

fn arr(shape: &[usize], v: &[f32]) -> ArrayD<f32> {
    ArrayD::from_shape_vec(IxDyn(shape), v.to_vec()).unwrap()
}

fn close(a: f64, b: f64) {
    assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} != {b}");
}

fn wrap(proto: ModelProto) -> Model {
    Model {
        proto,
        path: None,
        external_files: vec![],
    }
}

fn claims(m: &Model, name: &str) -> Vec<(String, String)> {
    let t = m
        .graph()
        .initializer
        .iter()
        .find(|t| t.name() == name)
        .unwrap();
    onnx_micronet::passes::quantize::claim_keys(t)
}

fn meta_of(m: &Model, name: &str, key: &str) -> Option<String> {
    claims(m, name)
        .into_iter()
        .find(|(k, _)| k == &format!("onnx_micronet.{key}"))
        .map(|(_, v)| v)
}

fn values(m: &Model, name: &str) -> Vec<f32> {
    let t = m
        .graph()
        .initializer
        .iter()
        .find(|t| t.name() == name)
        .unwrap();
    TensorData::from_proto(t)
        .unwrap()
        .to_f32()
        .iter()
        .copied()
        .collect()
}

#[test]
fn linear_grid_and_overflow_rule_by_hand() {
    // max|w| = 1.5: I = ceil(log2(1.5 + 1e-12)) = 1, sf = 4 - 1 - 1 = 2, d = 0.25, codes in [-8, 7].
    // 0.3/0.25 + 0.5 = 1.7 -> 1; -0.7 -> -2.3 -> -3; 1.2 -> 5.3 -> 5; 0.05 -> 0.7 -> 0; -1.5 -> -5.5 -> -6.
    let w = [0.3, -0.7, 1.2, 0.05, 0.0, -1.5];
    let (q, d, sf, clipped) = linear::linear(&w, 4, 0.0);
    assert_eq!((d, sf, clipped), (0.25, 2, 0));
    assert_eq!(q, vec![0.25, -0.75, 1.25, 0.0, 0.0, -1.5]);

    // Overflow rule: 10 values, rate 0.1 -> index floor(0.1 * 10) = 1 of |w| sorted descending
    // (4.0, 0.9, ...) -> v = 0.9, I = ceil(log2 0.9) = 0, sf = 3, d = 0.125. 4.0 / 0.125 = 32 -> clipped to 7
    // -> 0.875; 0.9 -> 7.7 -> 7 -> 0.875; -0.8 -> -5.9 -> -6 -> -0.75; 0.1 -> 1.3 -> 1 -> 0.125.
    let w = [4.0, 0.9, -0.8, 0.7, 0.6, 0.5, -0.4, 0.3, 0.2, 0.1];
    assert_eq!(linear::integral_part(&w, 0.1), 0);
    let (q, d, sf, clipped) = linear::linear(&w, 4, 0.1);
    assert_eq!((d, sf, clipped), (0.125, 3, 1));
    assert_eq!(q[..3], [0.875, 0.875, -0.75]);
    assert_eq!(q[9], 0.125);
    // Rate 0: v = 4.0 exactly, and seed 000's +1e-12 makes I = ceil(log2(4 + 1e-12)) = 3, not 2:
    // sf = 0, d = 1; 0.9 -> 1.4 -> 1; -0.8 -> -0.3 -> -1; 0.4 -> 0.9 -> 0.
    assert_eq!(linear::integral_part(&w, 0.0), 3);
    let (q, d, _, clipped) = linear::linear(&w, 4, 0.0);
    assert_eq!((d, clipped), (1.0, 0));
    assert_eq!(q[..4], [4.0, 1.0, -1.0, 1.0]);
    assert_eq!(q[6], 0.0);
}

#[test]
fn minmax_grid_by_hand() {
    // [-1, 2], 2 bits: n = 3, s = 3/3 = 1, z = round(1/1) = 1. -1 -> floor(-0.5) + 1 = 0 -> -1;
    // 0 -> 1 -> 0; 0.5 -> floor(1.0) + 1 = 2 -> 1; 2 -> 3 -> 2.
    let (q, s, z, c) = linear::minmax(&[-1.0, 0.0, 0.5, 2.0], 2);
    assert_eq!((s, z, c), (1.0, 1, 0));
    assert_eq!(q, vec![-1.0, 0.0, 1.0, 2.0]);
    // [-0.3, 0.9], 2 bits: s = f32(1.2 / 3) = 0.4, z = round(0.3 / 0.4 = 0.75) = 1 (0 nudged onto code 1);
    // -0.3 -> floor(-0.25) + 1 = 0 -> (0 - 1) * 0.4; 0.9 -> floor(2.75) + 1 = 3 -> (3 - 1) * 0.4.
    let (q, s, z, _) = linear::minmax(&[-0.3, 0.9, 0.0], 2);
    assert_eq!((s, z), (0.4f32, 1));
    assert_eq!(q, vec![-0.4f32, 2.0 * 0.4f32, 0.0]);
}

#[test]
fn per_channel_against_per_tensor() {
    // Conv weight [2,1,1,2]: channel 0 = [0.1, -0.2], channel 1 = [3.0, 1.0]; linear 4 bits.
    let w = arr(&[2, 1, 1, 2], &[0.1, -0.2, 3.0, 1.0]);
    let cfg = QuantConfig::default();
    // Per tensor: max 3 -> I = 2, sf = 1, d = 0.5: 0.1 -> 0.7 -> 0; -0.2 -> 0.1 -> 0; channel 0 vanishes.
    let t = quantize_tensor(&w, Scheme::Linear, 4, &cfg, Some(0), 9);
    assert_eq!(
        t.values.iter().copied().collect::<Vec<_>>(),
        vec![0.0, 0.0, 3.0, 1.0]
    );
    // Per channel: channel 0 max 0.2 -> I = ceil(log2 0.2) = -2, sf = 5, d = 1/32: 0.1 * 32 + 0.5 = 3.7 -> 3
    // -> 0.09375; -0.2 * 32 + 0.5 = -5.9 -> -6 -> -0.1875. Channel 1 as per tensor.
    let pc = QuantConfig {
        per_channel: true,
        ..Default::default()
    };
    let t = quantize_tensor(&w, Scheme::Linear, 4, &pc, Some(0), 9);
    assert_eq!(
        t.values.iter().copied().collect::<Vec<_>>(),
        vec![0.09375, -0.1875, 3.0, 1.0]
    );
    let meta: Vec<(String, String)> = t
        .meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    assert!(
        meta.contains(&("onnx_micronet.axis".into(), "0".into())),
        "{meta:?}"
    );
    assert!(
        meta.contains(&("onnx_micronet.step".into(), "0.03125,0.5".into())),
        "{meta:?}"
    );
    // minmax per channel: channel 1 [3, 1] widens to [0, 3]: s = 0.2, z = 0 for 4 bits (15 levels).
    let t = quantize_tensor(&w, Scheme::MinMax, 4, &pc, Some(0), 9);
    let zp = t
        .meta
        .iter()
        .find(|(k, _)| *k == "onnx_micronet.zero_point")
        .unwrap();
    // channel 0: [-0.2, 0.1]: s = f32(0.3/15) = 0.02, z = round(0.2/0.02) = 10.
    assert_eq!(zp.1, "10,0");
}

#[test]
fn log_and_tanh_by_hand() {
    // 3 bits: L = 2^2 - 1 = 3 exponents, emax = round(log2 1.0) = 0, emin = -2.
    // -0.3: round(log2 0.3 = -1.74) = -2 -> -0.25; 0.2: round(-2.32) = -2 -> 0.25;
    // 0.13 < 2^-2 range: 0.13 >= 2^-3 -> 2^-2; 0.1 < 2^-3 -> 0; 3.0: round(1.58) = 2 > emax -> 1 (clipped).
    let w = [1.0, -0.3, 0.2, 0.13, 0.1, 0.0, 3.0];
    let (q, emax, emin, clipped) = log::log(&w, 3, 1.0 / 7.0);
    // overflow rate 1/7: index 1 of |w| sorted descending (3.0, 1.0, ...) -> v = 1.0.
    assert_eq!((emax, emin, clipped), (0, -2, 1));
    assert_eq!(q, vec![1.0, -0.25, 0.25, 0.25, 0.0, 0.0, 1.0]);

    // tanh, 2 bits: n = 3. 0.5: tanh = 0.46212, (1.46212)/2 * 3 + 0.5 = 2.693 -> code 2 -> 2*2/3 - 1 = 1/3
    // -> artanh(1/3) = 0.346574; -2: tanh = -0.96403 -> 0.054 + 0.5 -> code 0, clamped to 1 (clipped) -> -1/3.
    let (q, clipped) = tanh::tanh(&[0.5, -2.0, 0.0], 2);
    assert_eq!(clipped, 1);
    let a = (1.0f64 / 3.0).atanh() as f32;
    assert_eq!(q, vec![a, -a, 0.0]);
    assert!((a - 0.346_573_6).abs() < 1e-6);
}

#[test]
fn ternary_rules_by_hand() {
    // twn: mean|w| = (0.9 + 0.5 + 0.1 + 0.05 + 0 + 0.45) / 6 = 1/3, delta = 0.7/3 = 0.2333;
    // survivors 0.9, -0.5, 0.45 -> alpha = 1.85 / 3 = 0.616667.
    let w = [0.9, -0.5, 0.1, -0.05, 0.0, 0.45];
    let (q, delta, alpha) = ternary::twn(&w);
    close(delta, 0.7 / 3.0);
    close(alpha, 1.85 / 3.0);
    let a = (1.85f64 / 3.0) as f32;
    assert_eq!(q, vec![a, -a, 0.0, 0.0, 0.0, a]);

    // msu: w = [2, -2, 0.5, -0.5, 0, 0], mean 0, std (n - 1) = sqrt(8.5 / 5) = 1.30384;
    // z = +-1.534 (kept, > 0.67749) and +-0.3835 (dropped); zeros stay. nnz = 2, fan_in = 3 (w [2,3,1,1]):
    // m = sqrt(2/3 * 6/2) = sqrt(2).
    let w = [2.0, -2.0, 0.5, -0.5, 0.0, 0.0];
    let (q, m) = ternary::msu(&w, 3, 0.67749);
    close(m, 2f64.sqrt());
    let s = 2f64.sqrt() as f32;
    assert_eq!(q, vec![s, -s, 0.0, 0.0, 0.0, 0.0]);

    // ec2t, lambda 0: twn's start (mean|w| = 3.17/6, delta = 0.36983) puts 1.0, 1.2 in w_p = 1.1 and
    // -0.9 in w_n = -0.9; plain nearest-centroid keeps that. A large lambda (100) makes a nonzero
    // code cost 100 * s2 * log2(1/P) >> any distortion: everything goes to the zero cluster.
    let w = [1.0, 1.2, -0.9, 0.05, -0.02, 0.0];
    let (q, wn, wp, _) = ternary::ec2t(&w, 0.0);
    close(wn, -0.9f32 as f64);
    close(wp, (1.0f32 as f64 + 1.2f32 as f64) / 2.0);
    assert_eq!(q[3..], [0.0, 0.0, 0.0]);
    assert_eq!(q[0], q[1]);
    let (q, ..) = ternary::ec2t(&w, 100.0);
    assert!(q.iter().all(|v| *v == 0.0), "{q:?}");
}

#[test]
fn zeros_stay_zero_under_every_scheme() {
    let w: Vec<f32> = (0..64)
        .map(|i| {
            if i % 3 == 0 {
                0.0
            } else {
                ((i * 37 % 29) as f32 - 14.0) / 9.0
            }
        })
        .collect();
    let a = arr(&[4, 16], &w);
    let cfg = QuantConfig::default();
    for (s, b) in [
        (Scheme::Linear, 3),
        (Scheme::MinMax, 3),
        (Scheme::Log, 3),
        (Scheme::Tanh, 3),
        (Scheme::Ternary(TernaryRule::Twn), 2),
        (Scheme::Ternary(TernaryRule::Msu), 2),
        (Scheme::Ternary(TernaryRule::Ec2t), 2),
    ] {
        let q = quantize_tensor(&a, s, b, &cfg, Some(0), 16);
        for (x, y) in w.iter().zip(q.values.iter()) {
            if *x == 0.0 {
                assert_eq!(*y, 0.0, "{s}: a zero moved");
            }
        }
        let distinct: std::collections::BTreeSet<u32> =
            q.values.iter().map(|v| v.to_bits()).collect();
        assert!(distinct.len() <= 1 << b, "{s}: {} values", distinct.len());
    }
}

/// mnist_ccexam: Conv, Conv, Gemm, Gemm (4 weighted layers).
fn mnist() -> Model {
    onnx_micronet::load(&fixture("mnist_ccexam.onnx")).unwrap()
}

#[test]
fn qbn_follows_layer_order_and_must_match_its_length() {
    let mut m = mnist();
    let cfg = QuantConfig {
        qbn: vec![9, 8, 32, 6],
        ..Default::default()
    };
    let r = Quantize(cfg).run(&mut m, &Context::default()).unwrap();
    // The report lists the layers in order, [#0] .. [#3]; #2 is left float (32).
    assert!(
        r.changed[0]
            .target
            .starts_with("[#0] /features/features.0/Conv"),
        "{:?}",
        r.changed
    );
    assert!(r.changed[1]
        .target
        .starts_with("[#1] /features/features.3/Conv"));
    assert!(r
        .skipped
        .iter()
        .any(|s| s.target.starts_with("[#2]") && s.what.contains("32 bits")));
    assert_eq!(
        meta_of(&m, "features.0.weight", "bits").as_deref(),
        Some("9")
    );
    assert_eq!(
        meta_of(&m, "features.3.weight", "bits").as_deref(),
        Some("8")
    );
    assert_eq!(meta_of(&m, "classifier.0.weight", "bits"), None);
    assert_eq!(
        meta_of(&m, "classifier.2.weight", "bits").as_deref(),
        Some("6")
    );
    // The score reads the same widths back.
    let rep = score::score(&m, &ScoreOptions::default()).unwrap();
    let bits: Vec<Option<u32>> = rep
        .layers
        .iter()
        .filter(|l| l.weight_bits.is_some())
        .map(|l| l.weight_bits)
        .collect();
    assert_eq!(bits, vec![Some(9), Some(8), Some(32), Some(6)]);

    // Re-running is a no-op: every tensor already carries a verified claim.
    let before = m.proto.clone();
    let cfg = QuantConfig {
        qbn: vec![9, 8, 32, 6],
        ..Default::default()
    };
    let r = Quantize(cfg).run(&mut m, &Context::default()).unwrap();
    assert!(r.changed.is_empty(), "{:?}", r.changed);
    assert_eq!(m.proto, before);

    let err = Quantize(QuantConfig {
        qbn: vec![8, 8, 8],
        ..Default::default()
    })
    .run(&mut mnist(), &Context::default())
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("--qbn has 3 entries but the model has 4 weighted layers"),
        "{err}"
    );
}

/// x[1,1,4,4] -> Conv(w[2,1,3,3]) -> y[1,2,2,2]; w_i = ((5i mod 9) - 4) / 4, so zeros at i = 8, 17.
fn conv_model() -> ModelProto {
    let w: Vec<f32> = (0..18).map(|i| ((i * 5 % 9) as f32 - 4.0) / 4.0).collect();
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

fn calib_set() -> Dataset {
    // One image, x = i / 4 for i in 0..16: [0, 3.75], never negative.
    let x: Vec<f32> = (0..16).map(|i| i as f32 / 4.0).collect();
    Dataset {
        images: Array4::from_shape_vec((1, 1, 4, 4), x).unwrap(),
        labels: vec![None],
        names: vec!["calib".into()],
        description: "hand-made".into(),
        warnings: Vec::new(),
    }
}

fn quantize_conv(act_bits: u32) -> Model {
    let mut m = wrap(conv_model());
    Quantize(QuantConfig {
        bits: 4,
        ..Default::default()
    })
    .run(&mut m, &Context::default())
    .unwrap();
    let data = calib_set();
    let cx = Context {
        reference: None,
        calib: Some(&data),
        input_shape: vec![1, 1, 4, 4],
        threads: 1,
        ..Default::default()
    };
    let cfg = ActQuantSection {
        bits: act_bits,
        ..Default::default()
    }
    .config()
    .unwrap();
    ActQuant(cfg).run(&mut m, &cx).unwrap();
    m
}

fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

/// conv(clamp(round(x / s), 0, hi) * s, w) by hand, in f64.
fn conv_by_hand(x: &[f32], w: &[f32], s: f64, hi: f64) -> Vec<f64> {
    let xq: Vec<f64> = x
        .iter()
        .map(|v| round_half_even(*v as f64 / s).clamp(0.0, hi) * s)
        .collect();
    conv_f64(&xq, w)
}

fn tract_run(m: &Model, x: &[f32]) -> Vec<f32> {
    let plan = onnx_micronet::engine::plan(m, &[1, 1, 4, 4]).unwrap();
    let images = Array4::from_shape_vec((1, 1, 4, 4), x.to_vec()).unwrap();
    let y = onnx_micronet::engine::run_images(&plan, images.view(), 1, &|_| {}).unwrap();
    y.iter().copied().collect()
}

/// `got` equals `want` within 1e-5, element by element.
fn assert_close(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-5, "{what}: {got:?} vs {want:?}");
    }
}

/// The model run in onnxruntime on one 1x1x4x4 image (None without the venv).
fn ort_run(m: &Model, x: &[f32], optimizations: bool) -> Option<Vec<f64>> {
    let py = venv_python()?;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.onnx");
    onnx_micronet::onnx::save(m, &path, &Default::default()).unwrap();
    let xs: Vec<String> = x.iter().map(|v| format!("{v:?}")).collect();
    let code = "import sys, numpy as np, onnxruntime as ort\n\
o = ort.SessionOptions()\n\
if sys.argv[3] == 'off': o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL\n\
s = ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider'])\n\
x = np.array([float(v) for v in sys.argv[2].split(',')], dtype=np.float32).reshape(1, 1, 4, 4)\n\
print(','.join(repr(float(v)) for v in s.run(None, {'x': x})[0].ravel()))";
    let opt = if optimizations { "on" } else { "off" };
    let out = run_python(&py, code, &[path.to_str().unwrap(), &xs.join(","), opt]);
    Some(out.trim().split(',').map(|v| v.parse().unwrap()).collect())
}

#[test]
fn qdq_at_8_bits_runs_in_tract_and_onnxruntime_as_computed_by_hand() {
    let m = quantize_conv(8);
    // Calibration max 3.75, unsigned: I = ceil(log2 3.75) = 2, sf = 8 - 2 = 6, scale 2^-6, uint8 zero point.
    let ops: Vec<&str> = m.graph().node.iter().map(|n| n.op_type()).collect();
    assert_eq!(ops, vec!["QuantizeLinear", "DequantizeLinear", "Conv"]);
    let scale = values(&m, "x_act_scale");
    assert_eq!(scale, vec![0.015625]);
    let zp = m
        .graph()
        .initializer
        .iter()
        .find(|t| t.name() == "x_act_zp")
        .unwrap();
    assert_eq!(zp.data_type(), onnx_micronet::onnx::DataType::Uint8 as i32);

    // A test image with values outside the calibrated range: -0.2 clips to 0, 4.3 to 255/64.
    let x: Vec<f32> = (0..16).map(|i| ((i as f32 * 0.37) % 4.5) - 0.2).collect();
    let w = values(&m, "w");
    let want = conv_by_hand(&x, &w, 1.0 / 64.0, 255.0);
    let got: Vec<f64> = tract_run(&m, &x).iter().map(|v| *v as f64).collect();
    assert_close(&got, &want, "tract vs hand");

    // The score reads 4-bit weights and 8-bit inputs: 16 nonzeros * 4 bits + 18 mask bits
    // + the grid's one 32-bit step = 114 bits = 3.5625 params; 16 nonzero taps * 4
    // positions = 64 multiplies at max(4, 8) = 8 bits -> 16.
    let rep = score::score(&m, &ScoreOptions::default()).unwrap();
    let conv = rep.layers.iter().find(|l| l.name == "conv").unwrap();
    assert_eq!((conv.weight_bits, conv.act_bits), (Some(4), 8));
    close(conv.params, 3.5625);
    close(conv.raw_mults, 64.0);
    close(conv.mults, 16.0);
    assert!(rep.quantized && !rep.freebie_applied);

    // onnxruntime on the same file and image.
    if let Some(ort) = ort_run(&m, &x, false) {
        assert_close(&got, &ort, "tract vs onnxruntime");
    }
}

#[test]
fn fake_quant_at_6_bits_is_read_back_and_runs_as_computed() {
    let m = quantize_conv(6);
    // Unsigned, 6 bits: sf = 6 - 2 = 4, scale 1/16, Clip [0, 63].
    let ops: Vec<&str> = m.graph().node.iter().map(|n| n.op_type()).collect();
    assert_eq!(ops, vec!["Div", "Round", "Clip", "Mul", "Conv"]);
    assert_eq!(values(&m, "x_act_scale"), vec![0.0625]);
    assert_eq!(values(&m, "x_act_hi"), vec![63.0]);
    let x: Vec<f32> = (0..16).map(|i| ((i as f32 * 0.37) % 4.5) - 0.2).collect();
    let want = conv_by_hand(&x, &values(&m, "w"), 1.0 / 16.0, 63.0);
    let got: Vec<f64> = tract_run(&m, &x).iter().map(|v| *v as f64).collect();
    assert_close(&got, &want, "tract vs hand");
    // 64 multiplies at max(4, 6) = 6 bits -> 12.
    let rep = score::score(&m, &ScoreOptions::default()).unwrap();
    let conv = rep.layers.iter().find(|l| l.name == "conv").unwrap();
    assert_eq!(conv.act_bits, 6);
    close(conv.mults, 12.0);
}

#[test]
fn score_rejects_contradicting_claims() {
    let mut m = wrap(conv_model());
    Quantize(QuantConfig {
        scheme: Scheme::MinMax,
        bits: 4,
        ..Default::default()
    })
    .run(&mut m, &Context::default())
    .unwrap();
    // w in [-1, 1]: s = f32(2/15) = 0.13333334, a hair above 2/15, so -lo/s = 7.4999996 and z = 7.
    assert_eq!(meta_of(&m, "w", "zero_point").as_deref(), Some("7"));
    assert!(score::score(&m, &ScoreOptions::default()).is_ok());
    let t = m
        .graph_mut()
        .initializer
        .iter_mut()
        .find(|t| t.name() == "w")
        .unwrap();
    for p in t.metadata_props.iter_mut() {
        if p.key() == "onnx_micronet.step" {
            p.value = Some("0.3".into());
        }
    }
    let err = score::score(&m, &ScoreOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("tensor 'w': claims minmax but value"), "{err}");

    // A symmetric ternary rule with asymmetric levels.
    let mut m = wrap(conv_model());
    Quantize(QuantConfig {
        scheme: Scheme::Ternary(TernaryRule::Ec2t),
        bits: 2,
        ..Default::default()
    })
    .run(&mut m, &Context::default())
    .unwrap();
    assert_eq!(meta_of(&m, "w", "rule").as_deref(), Some("ec2t"));
    let t = m
        .graph_mut()
        .initializer
        .iter_mut()
        .find(|t| t.name() == "w")
        .unwrap();
    let mut v: Vec<f32> = TensorData::from_proto(t)
        .unwrap()
        .to_f32()
        .iter()
        .copied()
        .collect();
    let neg = v.iter().copied().find(|x| *x < 0.0).unwrap();
    let pos = v.iter().copied().find(|x| *x > 0.0).unwrap();
    v.iter_mut()
        .filter(|x| **x < 0.0)
        .for_each(|x| *x = -pos * 0.5);
    let _ = neg;
    let new = tensor_f32("w", &[2, 1, 3, 3], &v);
    t.raw_data = new.raw_data;
    for p in t.metadata_props.iter_mut() {
        if p.key() == "onnx_micronet.rule" {
            p.value = Some("twn".into());
        }
    }
    let err = score::score(&m, &ScoreOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("rule twn is symmetric"), "{err}");
}

#[test]
fn recipe_errors_name_the_option() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[quantize]\nscheme = \"linear\"\nbitz = 8\n", "line 3"),
        (
            "[quantize]\nscheme = \"cubic\"\nbits = 8\n",
            "unknown quantization scheme 'cubic'",
        ),
        (
            "[quantize]\nscheme = \"ternary\"\nbits = 4\n",
            "ternary weights take 2 bits",
        ),
        (
            "[quantize]\nscheme = \"log\"\nbits = 6\nper_channel = true\n",
            "--per-channel is for linear and minmax",
        ),
        ("[quantize]\nscheme = \"linear\"\n", "needs bits"),
        (
            "[quantize]\nscheme = \"linear\"\nbits = 40\n",
            "linear takes 2 to 24 bits",
        ),
        (
            "[act_quant]\nbits = 8\nrange = \"median\"\n",
            "--act-range 'median'",
        ),
        ("[act_quant]\nbits = 1\n", "--act-bits 1"),
        (
            "[quantize]\nscheme = \"minmax\"\nbits = 4\ndamp = \"sometimes\"\n",
            "damp 'sometimes': expected a positive fraction",
        ),
        (
            "[quantize]\nscheme = \"minmax\"\nbits = 4\ndamp = -0.1\n",
            "damp '-0.1'",
        ),
        (
            "[prune]\nmethod = \"sparsegpt\"\nsparsity = 0.5\ndamp = 0\n",
            "prune.damp = 0: must be positive",
        ),
    ];
    for (text, want) in cases {
        let p = dir.path().join("r.toml");
        std::fs::write(&p, text).unwrap();
        let err = Recipe::from_file(&p)
            .and_then(|r| r.pipeline().map(|_| ()))
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{text:?}: {err}");
    }
    // The shipped example recipes parse.
    for e in std::fs::read_dir(root().join("fixtures/recipes")).unwrap() {
        let p = e.unwrap().path();
        let r = Recipe::from_file(&p).unwrap();
        r.pipeline()
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    // damp = "auto" or a number, in a recipe as on the command line.
    for (text, want) in [
        ("damp = \"auto\"", Damp::Auto),
        ("damp = \"AUTO\"", Damp::Auto),
        ("damp = 0.1", Damp::Fixed(0.1)),
        ("damp = 1", Damp::Fixed(1.0)),
    ] {
        let p = dir.path().join("d.toml");
        std::fs::write(
            &p,
            format!("[quantize]\nscheme = \"minmax\"\nbits = 4\n{text}\n"),
        )
        .unwrap();
        let r = Recipe::from_file(&p).unwrap();
        assert_eq!(r.quantize.as_ref().unwrap().damp, Some(want), "{text}");
        assert_eq!(
            r.quantize.as_ref().unwrap().config().unwrap().damp,
            want,
            "{text}"
        );
    }
    let s = QuantizeSection::from_flag("ternary:msu").unwrap();
    assert_eq!(
        s.config().unwrap().scheme,
        Scheme::Ternary(TernaryRule::Msu)
    );
}

#[test]
fn cli_end_to_end_on_mnist() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q.onnx");
    let data = fixture("data/mnist-digits-1000");
    let (o, d) = (out.to_str().unwrap(), data.to_str().unwrap());
    let r = cli(&[
        "optimize",
        fixture("mnist_ccexam.onnx").to_str().unwrap(),
        "-o",
        o,
        "--quantize",
        "linear:8",
        "--layer-bits",
        "*classifier.0*=6",
        "--act-bits",
        "8",
        "--calib",
        d,
        "--calib-samples",
        "16",
        "--data",
        d,
        "--limit",
        "100",
        "--verbose",
    ]);
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(
        stdout.contains("[#2] /classifier/classifier.0/Gemm: linear 6-bit"),
        "{stdout}"
    );
    let m = onnx_micronet::load(&out).unwrap();
    let rep = score::score(&m, &ScoreOptions::default()).unwrap();
    let w: Vec<(Option<u32>, u32)> = rep
        .layers
        .iter()
        .filter(|l| l.weight_bits.is_some())
        .map(|l| (l.weight_bits, l.act_bits))
        .collect();
    assert_eq!(
        w,
        vec![(Some(8), 8), (Some(8), 8), (Some(6), 8), (Some(8), 8)]
    );
    // Top-1 of both models on 100 real digits is printed; the quantized one keeps within a point.
    let acc: Vec<f64> = stdout
        .lines()
        .filter(|l| l.contains("top-1 ") && !l.starts_with("agreement"))
        .map(|l| {
            l.split("top-1 ")
                .nth(1)
                .unwrap()
                .split('%')
                .next()
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(acc.len(), 2, "{stdout}");
    assert!(acc[1] >= acc[0] - 1.0, "{acc:?}");

    // Usage errors: exit 2, one line, no output written.
    let bad = dir.path().join("bad.onnx");
    let b = bad.to_str().unwrap();
    let m = fixture("mnist_ccexam.onnx");
    let m = m.to_str().unwrap();
    for (args, want) in [
        (
            &["--quantize", "linear:8", "--qbn", "8,8"][..],
            "--qbn has 2 entries but the model has 4 weighted layers",
        ),
        (
            &["--act-bits", "8"],
            "needs calibration images (--calib DATA)",
        ),
        (&["--per-channel"], "need --quantize"),
        (&["--quantize", "linear:x"], "--quantize 'linear:x'"),
    ] {
        let e = cli_fails(&[&["optimize", m, "-o", b][..], args].concat());
        assert!(e.contains(want), "{args:?}: {e}");
    }
    assert!(!bad.exists());
}

/// Activation quantization with the asymmetric `minmax` range on a shifted input.
fn quantize_conv_minmax(act_bits: u32) -> Model {
    quantize_conv_range(act_bits, "minmax")
}

/// Activation quantization with range `range` on a shifted input.
fn quantize_conv_range(act_bits: u32, range: &str) -> Model {
    let mut m = wrap(conv_model());
    // Calibration x = i / 4 - 1 for i in 0..16: [-1, 2.75].
    let x: Vec<f32> = (0..16).map(|i| i as f32 / 4.0 - 1.0).collect();
    let data = Dataset {
        images: Array4::from_shape_vec((1, 1, 4, 4), x).unwrap(),
        labels: vec![None],
        names: vec!["calib".into()],
        description: "hand-made".into(),
        warnings: Vec::new(),
    };
    let cx = Context {
        reference: None,
        calib: Some(&data),
        input_shape: vec![1, 1, 4, 4],
        threads: 1,
        ..Default::default()
    };
    // Q/DQ at 8 bits although the weights stay float (onnxruntime's default
    // session would re-quantize them; these numerics are checked with it off).
    let cfg = ActQuantSection {
        bits: act_bits,
        range: Some(range.into()),
        qdq: Some("always".into()),
        ..Default::default()
    }
    .config()
    .unwrap();
    ActQuant(cfg).run(&mut m, &cx).unwrap();
    m
}

#[test]
fn minmax_activation_range_is_asymmetric_with_a_zero_point() {
    // 8 bits: [lo, hi] = [-1, 2.75], scale = 3.75 / 255, zero point = round(1 / scale)
    // = round(255 / 3.75) = 68; uint8 Q/DQ.
    let m = quantize_conv_minmax(8);
    let ops: Vec<&str> = m.graph().node.iter().map(|n| n.op_type()).collect();
    assert_eq!(ops, vec!["QuantizeLinear", "DequantizeLinear", "Conv"]);
    let s = (3.75f64 / 255.0) as f32;
    assert_eq!(values(&m, "x_act_scale"), vec![s]);
    let zp = m
        .graph()
        .initializer
        .iter()
        .find(|t| t.name() == "x_act_zp")
        .unwrap();
    assert_eq!(zp.data_type(), onnx_micronet::onnx::DataType::Uint8 as i32);
    assert_eq!(
        TensorData::from_proto(zp).unwrap().to_f32()[IxDyn(&[])],
        68.0
    );
    // Inputs a quarter step off the grid (no rounding ties, whether a runtime divides
    // or multiplies by 1/s): k = round(x / s) is exact; codes k + 68 clip to [0, 255],
    // so k in [-68, 187]; k = -80 clips to -68 (= -1.0), k = 200 to 187 (= 2.75).
    let ks: Vec<i32> = vec![
        -80, -68, -40, -1, 0, 1, 7, 30, 64, 100, 150, 186, 187, 200, -3, 12,
    ];
    let x: Vec<f32> = ks.iter().map(|&k| (k as f32 + 0.25) * s).collect();
    let xq: Vec<f64> = ks
        .iter()
        .map(|&k| k.clamp(-68, 187) as f64 * s as f64)
        .collect();
    let want = conv_f64(&xq, &values(&m, "w"));
    let got: Vec<f64> = tract_run(&m, &x).iter().map(|v| *v as f64).collect();
    assert_close(&got, &want, "tract vs hand");
    // The score still reads 8-bit activations (uint8), whatever the zero point.
    let rep = score::score(&m, &ScoreOptions::default()).unwrap();
    let conv = rep.layers.iter().find(|l| l.name == "conv").unwrap();
    assert_eq!(conv.act_bits, 8);
    // onnxruntime with its default optimizations.
    if let Some(ort) = ort_run(&m, &x, true) {
        assert_close(&ort, &want, "onnxruntime vs hand");
    }

    // 6 bits: scale = 3.75 / 63, zero point round(63 / 3.75) = round(16.8) = 17, so
    // round(x / s) clips to [-17, 63 - 17] = [-17, 46]: still 64 levels, read as 6 bits.
    let m = quantize_conv_minmax(6);
    assert_eq!(values(&m, "x_act_scale"), vec![(3.75f64 / 63.0) as f32]);
    assert_eq!(values(&m, "x_act_lo"), vec![-17.0]);
    assert_eq!(values(&m, "x_act_hi"), vec![46.0]);
    let rep = score::score(&m, &ScoreOptions::default()).unwrap();
    let conv = rep.layers.iter().find(|l| l.name == "conv").unwrap();
    assert_eq!(conv.act_bits, 6);
}

#[test]
fn asym_percentile_clips_each_tail_and_runs_alike_in_tract_and_onnxruntime() {
    // Calibration x = i / 4 - 1, i < 16: negatives -1, -0.75, -0.5, -0.25 and 0 .. 2.75.
    // asym-percentile:80: 20% may clip, 10% a side: rank floor(0.1 * 16) = 1 from
    // each side's extreme.
    // Positive side: 2.75 (1 seen), 2.5 (2 > 1): 2.5 = 2 (1 + 8/32) is in the bin
    // whose upper edge is 2 (1 + 9/32) = 2.5625. Negative side: 1 (1), 0.75 (2 > 1):
    // 0.75 = 0.5 (1 + 16/32), upper edge 0.5 (1 + 17/32) = 0.765625.
    // [lo, hi] = [-0.765625, 2.5625]: scale = 3.328125 / 255 = 0.0130515, zero point
    // round(0.765625 / scale) = round(58.662) = 59; k = round(x / s) in [-59, 196].
    let m = quantize_conv_range(8, "asym-percentile:80");
    let ops: Vec<&str> = m.graph().node.iter().map(|n| n.op_type()).collect();
    assert_eq!(ops, vec!["QuantizeLinear", "DequantizeLinear", "Conv"]);
    let s = (3.328125f64 / 255.0) as f32;
    assert_eq!(values(&m, "x_act_scale"), vec![s]);
    let zp = m
        .graph()
        .initializer
        .iter()
        .find(|t| t.name() == "x_act_zp")
        .unwrap();
    assert_eq!(zp.data_type(), onnx_micronet::onnx::DataType::Uint8 as i32);
    assert_eq!(
        TensorData::from_proto(zp).unwrap().to_f32()[IxDyn(&[])],
        59.0
    );
    // Inputs a quarter step off the grid (no ties): -70 clips to -59 (the seen -1
    // becomes -0.770), 210 to 196 (2.75 becomes 2.558).
    let ks: Vec<i32> = vec![
        -70, -59, -58, -20, -1, 0, 1, 13, 50, 99, 150, 195, 196, 210, -7, 33,
    ];
    let x: Vec<f32> = ks.iter().map(|&k| (k as f32 + 0.25) * s).collect();
    let xq: Vec<f64> = ks
        .iter()
        .map(|&k| k.clamp(-59, 196) as f64 * s as f64)
        .collect();
    let want = conv_f64(&xq, &values(&m, "w"));
    let got: Vec<f64> = tract_run(&m, &x).iter().map(|v| *v as f64).collect();
    assert_close(&got, &want, "tract vs hand");
    let rep = score::score(&m, &ScoreOptions::default()).unwrap();
    let conv = rep.layers.iter().find(|l| l.name == "conv").unwrap();
    assert_eq!(conv.act_bits, 8);
    // onnxruntime, default session and optimizations off: the same outputs.
    for opt in [true, false] {
        if let Some(ort) = ort_run(&m, &x, opt) {
            assert_close(&ort, &got, "onnxruntime vs tract");
        }
    }

    // asym-mse on the same 16 values keeps [-1, 2.75] whole (clipping the spread
    // values costs more than the finer step saves): minmax's grid, scale 3.75 / 255,
    // zero point 68.
    let m = quantize_conv_range(8, "asym-mse");
    assert_eq!(values(&m, "x_act_scale"), vec![(3.75f64 / 255.0) as f32]);
}

/// x[1,1,4,4] -> Conv(w1[2,1,3,3], pads 1) -> Clip(0, 6) -> Conv(w2[1,2,1,1]) -> y[1,1,4,4];
/// with `clip_out_too`, the Clip's output is also a graph output (so nothing may absorb it).
fn relu6_model(clip_out_too: bool) -> ModelProto {
    let w1: Vec<f32> = (0..18).map(|i| ((i * 5 % 9) as f32 - 3.0) / 4.0).collect();
    let mut c1 = node("Conv", "conv1", &["x", "w1"], &["h"]);
    c1.attribute.push(attr_ints("pads", &[1, 1, 1, 1]));
    let mut outputs = vec![value_info("y", &[1, 1, 4, 4])];
    if clip_out_too {
        outputs.push(value_info("r", &[1, 2, 4, 4]));
    }
    model(
        GraphProto {
            name: Some("relu6".into()),
            node: vec![
                c1,
                node("Clip", "relu6", &["h", "lo", "hi"], &["r"]),
                node("Conv", "conv2", &["r", "w2"], &["y"]),
            ],
            initializer: vec![
                tensor_f32("w1", &[2, 1, 3, 3], &w1),
                tensor_f32("lo", &[], &[0.0]),
                tensor_f32("hi", &[], &[6.0]),
                tensor_f32("w2", &[1, 2, 1, 1], &[0.5, -1.0]),
            ],
            input: vec![value_info("x", &[1, 1, 4, 4])],
            output: outputs,
            ..Default::default()
        },
        13,
    )
}

fn act_quant_relu6(clip_out_too: bool, placement: &str) -> (Model, PassReport) {
    act_quant_on_calib_set(
        relu6_model(clip_out_too),
        ActQuantSection {
            bits: 8,
            placement: Some(placement.into()),
            range: Some("minmax".into()),
            qdq: Some("always".into()),
            ..Default::default()
        },
    )
}

/// `proto` through the activation quantization `section`, calibrated on `calib_set`.
fn act_quant_on_calib_set(proto: ModelProto, section: ActQuantSection) -> (Model, PassReport) {
    let mut m = wrap(proto);
    let data = calib_set();
    let cx = Context {
        reference: None,
        calib: Some(&data),
        input_shape: vec![1, 1, 4, 4],
        threads: 1,
        ..Default::default()
    };
    let r = ActQuant(section.config().unwrap())
        .run(&mut m, &cx)
        .unwrap();
    (m, r)
}

#[test]
fn quantizers_absorb_relu6_exactly_and_sit_after_it() {
    // The range is measured on the Clip's output, so the minmax grid [0, 255 s]
    // (zero point 0: the output is never negative) tops out at or below 6 and
    // saturates where the Clip clamps: Q(Clip(h, 0, 6)) = Q(h) for every h, and
    // the Clip goes. (A maxabs grid at 6 would be 2^-5 x 255 = 7.97 > 6: kept.)
    let (m, r) = act_quant_relu6(false, "inputs");
    let ops: Vec<&str> = m.graph().node.iter().map(|n| n.op_type()).collect();
    assert!(!ops.contains(&"Clip"), "{ops:?}");
    assert!(m.graph().initializer.iter().all(|t| t.name() != "hi"));
    let line = r
        .changed
        .iter()
        .find(|i| i.target == "r")
        .unwrap_or_else(|| panic!("{:?}", r.changed));
    assert!(line.what.contains("absorbs Clip 'relu6'"), "{}", line.what);
    // The same quantizers with the Clip kept (its output is also a graph output):
    // y is bit for bit the same on an image whose conv1 output exceeds both 6
    // and the grid's top, and goes below 0.
    let (kept, _) = act_quant_relu6(true, "inputs");
    assert!(kept.graph().node.iter().any(|n| n.op_type() == "Clip"));
    let x: Vec<f32> = (0..16).map(|i| (i as f32 - 5.0) * 1.7).collect();
    let (a, b) = (tract_run(&m, &x), tract_run(&kept, &x));
    assert_eq!(a, b[..a.len()]);
    assert!(a.iter().any(|v| *v != 0.0));

    // Outputs placement: the quantizer goes after the Clip (absorbing it), and
    // the report names the layer that reads it, not the one that produced it.
    let (m, r) = act_quant_relu6(false, "outputs");
    assert!(!m.graph().node.iter().any(|n| n.op_type() == "Clip"));
    let line = r.changed.iter().find(|i| i.target == "r").unwrap();
    assert!(line.what.contains("(read by conv2)"), "{}", line.what);
    let (kept, _) = act_quant_relu6(true, "outputs");
    assert!(kept.graph().node.iter().any(|n| n.op_type() == "Clip"));
    let (a, b) = (tract_run(&m, &x), tract_run(&kept, &x));
    assert_eq!(a, b[..a.len()]);
}

#[test]
fn bias_correction_zeroes_the_mean_output_shift_on_the_calibration_rows() {
    // x [1, 2, 1, 2] -> Conv(W [2, 2, 1, 1], b [2]) -> y: a 1x1 conv, every output
    // position one row x = (x0, x1). Reference W = [[1, 2], [3, -1]], b = [0.5, 0].
    // Compressed W' = [[1, 2.5], [2.5, -1]] (as if rounded), b unchanged.
    // Calibration: 2 images x 2 positions, rows (1, 0), (0, 1), (2, 1), (1, 2):
    // E[x] = (1, 1). Shift per output channel: (W - W') E[x] = (0 - 0.5, 0.5 + 0)
    // = (-0.5, 0.5), so b' = (0.5 - 0.5, 0 + 0.5) = (0, 0.5), and the mean output
    // of the compressed layer over the rows equals the reference's.
    use onnx_micronet::passes::bias_correct::BiasCorrect;
    let build = |w: &[f32]| {
        let conv = node("Conv", "conv", &["x", "w", "b"], &["y"]);
        wrap(model(
            GraphProto {
                name: Some("bc".into()),
                node: vec![conv],
                initializer: vec![
                    tensor_f32("w", &[2, 2, 1, 1], w),
                    tensor_f32("b", &[2], &[0.5, 0.0]),
                ],
                input: vec![value_info("x", &[1, 2, 1, 2])],
                output: vec![value_info("y", &[1, 2, 1, 2])],
                ..Default::default()
            },
            13,
        ))
    };
    let reference = build(&[1.0, 2.0, 3.0, -1.0]);
    let mut m = build(&[1.0, 2.5, 2.5, -1.0]);
    // images[n, c, 0, p]: image 0 rows (1, 0), (0, 1); image 1 rows (2, 1), (1, 2).
    let images =
        Array4::from_shape_vec((2, 2, 1, 2), vec![1.0, 0.0, 0.0, 1.0, 2.0, 1.0, 1.0, 2.0]).unwrap();
    let data = Dataset {
        images: images.clone(),
        labels: vec![None, None],
        names: vec!["a".into(), "b".into()],
        description: "hand-made".into(),
        warnings: Vec::new(),
    };
    let cx = Context {
        reference: Some(&reference),
        calib: Some(&data),
        input_shape: vec![1, 2, 1, 2],
        threads: 1,
        ..Default::default()
    };
    BiasCorrect.run(&mut m, &cx).unwrap();
    let b = m
        .graph()
        .initializer
        .iter()
        .find(|t| t.name() == "b")
        .map(|t| TensorData::from_proto(t).unwrap().to_f32())
        .unwrap();
    assert_eq!(b.as_slice().unwrap(), &[0.0, 0.5]);
    // The mean output shift on the calibration rows is zero, measured in tract.
    let mean = |m: &Model| {
        let plan = onnx_micronet::engine::plan(m, &[1, 2, 1, 2]).unwrap();
        let y = onnx_micronet::engine::run_images(&plan, images.view(), 1, &|_| {}).unwrap();
        // y: [2 images, 4 values] = [c0p0, c0p1, c1p0, c1p1] per image.
        let y: Vec<f32> = y.iter().copied().collect();
        let m0 = (y[0] + y[1] + y[4] + y[5]) / 4.0;
        let m1 = (y[2] + y[3] + y[6] + y[7]) / 4.0;
        (m0, m1)
    };
    let (r, c) = (mean(&reference), mean(&m));
    assert!(
        (r.0 - c.0).abs() < 1e-6 && (r.1 - c.1).abs() < 1e-6,
        "{r:?} vs {c:?}"
    );
    // And the reference means by hand: W E[x] + b = (3.5, 2).
    assert!(
        (r.0 - 3.5).abs() < 1e-6 && (r.1 - 2.0).abs() < 1e-6,
        "{r:?}"
    );
}

/// `--avg-weight-bits B` (seed 004's avg_bit_weights budget): every layer's bits
/// chosen from 2..8 by its measured errors, the parameter-weighted mean width of
/// the written model (read back by `score`) at most B and close to it, the widths
/// mixed, more bits for a larger budget with smaller errors; bad uses exit 2.
#[test]
fn avg_weight_bits_allocates_within_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    // 37 weighted layers (convs, depthwise convs, SE's 1x1 convs, the classifier).
    let model = fixture("efficientnet_style_bn.onnx");
    let calib = fixture("data/foolbox/cifar10");
    let run = |extra: &[&str]| -> serde_json::Value {
        let out = dir.path().join("o.onnx");
        let rep = dir.path().join("r.json");
        let mut a = vec![
            "optimize",
            model.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--calib",
            calib.to_str().unwrap(),
            "--quantize",
            "minmax:4",
            "--per-channel",
            "--report",
            rep.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        let o = cli(&a);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_str(&std::fs::read_to_string(&rep).unwrap()).unwrap()
    };
    // (mean width over all weights, distinct widths, summed layer errors)
    let measure = |j: &serde_json::Value| -> (f64, usize, f64) {
        let (mut bits, mut n) = (0.0, 0.0);
        let mut widths = std::collections::BTreeSet::new();
        for l in j["after"]["layers"].as_array().unwrap() {
            let (Some(b), Some(shape)) = (l["weight_bits"].as_u64(), l["weight_shape"].as_array())
            else {
                continue;
            };
            let numel: u64 = shape.iter().map(|d| d.as_u64().unwrap()).product();
            bits += (numel * b) as f64;
            n += numel as f64;
            widths.insert(b);
        }
        let q = report_pass(j, "quantize");
        let err: f64 = q["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["after"].as_f64().unwrap())
            .sum();
        (bits / n, widths.len(), err)
    };
    let (mean, widths, err) = measure(&run(&["--avg-weight-bits", "3.5"]));
    assert!(mean <= 3.5 && mean > 3.4, "mean width {mean}");
    assert!(widths >= 3, "{widths} distinct widths");
    // A larger budget: a larger mean, still within it, and the allocation line.
    let j = run(&["--avg-weight-bits", "5"]);
    let (mean5, _, err5) = measure(&j);
    assert!(mean5 <= 5.0 && mean5 > 4.9 && mean5 > mean, "{mean5}");
    assert!(
        err5 < err,
        "summed layer errors {err5} at 5 bits vs {err} at 3.5"
    );
    let q = &report_pass(&j, "quantize")["changed"];
    let line = q
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["target"] == "allocation")
        .unwrap()["what"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        line.starts_with(&format!("mean weight width {mean5:.3} bits")),
        "{line}"
    );
    // Bad uses name the problem.
    let out = dir.path().join("x.onnx");
    let e = cli_fails(&[
        "optimize",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--quantize",
        "minmax:4",
        "--avg-weight-bits",
        "4",
    ]);
    assert!(e.contains("avg_bits") && e.contains("--calib"), "{e}");
    let e = cli_fails(&[
        "optimize",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--quantize",
        "ternary",
        "--avg-weight-bits",
        "4",
    ]);
    assert!(e.contains("avg_bits") && e.contains("ternary"), "{e}");
    assert!(!out.exists());
}

/// `--search`: the mean width bisected between 2 bits and --avg-weight-bits, each
/// plan built and measured; the smallest passing plan written, the table in the
/// JSON; the plan recipe (`--plan`) reproduces the written file byte for byte; a
/// gate nothing passes exits 3 with nothing written.
#[test]
fn search_finds_the_smallest_passing_width_and_its_plan_reproduces_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).display().to_string();
    let model = fixture("efficientnet_style_bn.onnx").display().to_string();
    let data = fixture("data/foolbox/cifar10").display().to_string();
    let base = [
        "optimize",
        &model,
        "--calib",
        &data,
        "--data",
        &data,
        "--quantize",
        "minmax:4",
        "--per-channel",
        "--avg-weight-bits",
        "6",
        "--search",
        "--search-steps",
        "1",
    ];
    let mut a: Vec<&str> = base.to_vec();
    let (out, rep, plan, html) = (p("s.onnx"), p("s.json"), p("plan.toml"), p("s.html"));
    a.extend([
        "-o",
        &out,
        "--min-agreement",
        "0.9",
        "--report",
        &rep,
        "--plan",
        &plan,
        "--html",
        &html,
    ]);
    let o = cli(&a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&rep).unwrap()).unwrap();
    // Two builds: the top (6 bits), then the middle of [2, 6]; both keep all 20
    // images' top-1 classes (measured: 100% agreement), so 4 bits is chosen.
    let rows = j["search"].as_array().unwrap();
    let col = |k: &str| rows.iter().map(|r| r[k].clone()).collect::<Vec<_>>();
    assert_eq!(col("avg_bits"), [6.0, 4.0]);
    assert_eq!(col("passed"), [true, true]);
    assert_eq!(col("chosen"), [false, true]);
    let mean = rows[1]["mean_bits"].as_f64().unwrap();
    assert!(mean <= 4.0 && mean > 3.9, "{mean}");
    assert_eq!(rows[1]["score"], j["after"]["score"]);
    // The HTML report has the search's plot (its rendering: tests/suite/html_report.rs).
    let page = std::fs::read_to_string(&html).unwrap();
    assert_eq!(page.matches("data-plot=\"pareto\"").count(), 1);
    // The plan pins every layer's width; optimizing with it writes the same bytes.
    let text = std::fs::read_to_string(&plan).unwrap();
    assert_eq!(text.matches("[[quantize.layer]]").count(), 37, "{text}");
    assert!(!text.contains("avg_bits"), "{text}");
    let again = p("again.onnx");
    let o = cli(&[
        "optimize", &model, "--calib", &data, "--recipe", &plan, "-o", &again,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&again).unwrap(),
        "the plan's rebuild differs from the searched model"
    );
    // Nothing passes top-1 >= 99% on this model (10% in float): exit 3, no file.
    let mut a: Vec<&str> = base.to_vec();
    let none = p("none.onnx");
    a.extend(["-o", &none, "--min-accuracy", "0.99"]);
    let o = cli(&a);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!std::path::Path::new(&none).exists());
}

/// `--target-score S`: bisects the mean weight width for the widest plan scoring
/// at most S; the written file scores as the report says, its plan rebuilds it
/// byte for byte, an unreachable score exits 3 writing nothing, and the flag
/// without --data is a usage error.
#[test]
fn target_score_keeps_the_widest_plan_within_the_score() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).display().to_string();
    let model = fixture("efficientnet_style_bn.onnx").display().to_string();
    let data = fixture("data/foolbox/cifar10").display().to_string();
    let base = [
        "optimize",
        &model,
        "--calib",
        &data,
        "--quantize",
        "minmax:4",
        "--per-channel",
        "--avg-weight-bits",
        "6",
        "--search-steps",
        "3",
    ];
    let (out, rep, plan) = (p("t.onnx"), p("t.json"), p("plan.toml"));
    let mut a: Vec<&str> = base.to_vec();
    // Measured on this fixture: 6 bits scores 0.00127, 2 bits 0.00071, so a
    // target of 0.001 lies between and the bisection runs.
    a.extend([
        "--data",
        &data,
        "--target-score",
        "0.001",
        "-o",
        &out,
        "--report",
        &rep,
        "--plan",
        &plan,
    ]);
    let o = cli(&a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&rep).unwrap()).unwrap();
    let rows = j["search"].as_array().unwrap();
    let col = |k: &str| rows.iter().map(|r| r[k].clone()).collect::<Vec<_>>();
    // The widest first (too high), then 2 bits (fits), then halving [2, 6].
    assert_eq!(col("avg_bits"), [6.0, 2.0, 4.0, 3.0]);
    let score = j["after"]["score"].as_f64().unwrap();
    assert!(score <= 0.001, "{score}");
    let chosen: Vec<&serde_json::Value> = rows.iter().filter(|r| r["chosen"] == true).collect();
    assert_eq!(chosen.len(), 1);
    let best = chosen[0]["avg_bits"].as_f64().unwrap();
    for r in rows {
        let (bits, s) = (
            r["avg_bits"].as_f64().unwrap(),
            r["score"].as_f64().unwrap(),
        );
        // Fits exactly when within the score; nothing wider than the chosen fits.
        assert_eq!(r["passed"], s <= 0.001, "{r}");
        assert!(bits <= best || s > 0.001, "{r}");
    }
    assert_eq!(chosen[0]["score"], j["after"]["score"]);
    let s = cli(&["score", &out, "--json", "-"]);
    let sj: serde_json::Value = serde_json::from_slice(&s.stdout).unwrap();
    assert_eq!(sj["score"], j["after"]["score"]);
    // The chosen plan (built from the search's reused capture and table) is the
    // file a fresh build of its plan writes.
    let again = p("again.onnx");
    let o = cli(&[
        "optimize", &model, "--calib", &data, "--recipe", &plan, "-o", &again,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&again).unwrap());
    // Below what 2 bits scores: exit 3, nothing written.
    let none = p("none.onnx");
    let mut a: Vec<&str> = base.to_vec();
    a.extend(["--data", &data, "--target-score", "0.0001", "-o", &none]);
    let o = cli(&a);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("--target-score 0.0001"));
    assert!(!std::path::Path::new(&none).exists());
    // Without --data: a usage error naming the flag.
    let mut a: Vec<&str> = base.to_vec();
    a.extend(["--target-score", "0.001", "-o", &none]);
    let o = cli(&a);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("--target-score"));
}

/// Every weighted layer of `model` (in layer order) with its calibration
/// geometries, and its weight's rank.
#[allow(clippy::type_complexity)]
fn layer_geometries(
    model: &Model,
) -> (
    Vec<(usize, Vec<onnx_micronet::passes::calib::Geom>)>,
    Vec<usize>,
) {
    use onnx_micronet::graph::{weighted_layers, Graph};
    let g = Graph::of(model).unwrap();
    let mut wanted = Vec::new();
    let mut ranks = Vec::new();
    for (i, l) in weighted_layers(&g).iter().enumerate() {
        let t = model
            .graph()
            .initializer
            .iter()
            .find(|t| t.name() == l.weight)
            .unwrap();
        let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        let (_, geoms) = onnx_micronet::passes::calib::layout(&g, &l.nodes, &shape).unwrap();
        wanted.push((i, geoms));
        ranks.push(shape.len());
    }
    (wanted, ranks)
}

/// `n` pseudo-random 3x32x32 images, uniform in [-1, 1) (xorshift64 from `seed`).
fn xorshift_images(n: usize, seed: u64) -> Array4<f32> {
    let mut s = seed;
    let v: Vec<f32> = (0..n * 3 * 32 * 32)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect();
    Array4::from_shape_vec((n, 3, 32, 32), v).unwrap()
}

/// Paired capture (asymmetric calibration, `passes::calib::paired`) of a model
/// beside itself: for every weighted layer of the CIFAR MobileNetV2 (the plain
/// stem conv, the 1x1 convs, the stride-1 and stride-2 depthwise convs with 32 to
/// 960 groups, the Gemm) the three blocks of the doubled Gram matrix equal the
/// layer's own Gram matrix as the plain capture takes it (H~ = C = H = X^T X):
/// the pairing puts x~ and x, group by group, where the doubled geometry reads them.
#[test]
fn paired_capture_of_a_model_beside_itself_repeats_its_gram() {
    use onnx_micronet::passes::calib::{self, obs, paired};
    let model = onnx_micronet::onnx::load(&fixture("mobilenetv2_cifar_bn.onnx")).unwrap();
    // Six pseudo-random images, 3x32x32.
    let data = Dataset {
        images: xorshift_images(6, 0x9E37_79B9_7F4A_7C15),
        labels: vec![None; 6],
        names: (0..6).map(|i| format!("noise {i}")).collect(),
        description: "noise".into(),
        warnings: Vec::new(),
    };
    let cx = Context {
        calib: Some(&data),
        threads: 2,
        ..Default::default()
    };
    let (wanted, ranks) = layer_geometries(&model);
    assert_eq!(wanted.len(), 53);
    let depthwise = wanted.iter().filter(|(_, gs)| gs[0].groups() > 1).count();
    assert_eq!(depthwise, 17);
    let (plain, left, _) = calib::capture(&model, &cx, &wanted).unwrap();
    assert!(left.is_empty(), "{left:?}");
    let pairs: Vec<paired::Pair> = wanted
        .iter()
        .map(|(i, gs)| paired::Pair {
            key: i.to_string(),
            geom: &gs[0],
            rank: ranks[*i],
            original: gs[0].input().to_string(),
        })
        .collect();
    let doubled: Vec<(usize, Vec<calib::Geom>)> = wanted
        .iter()
        .zip(&pairs)
        .map(|((i, _), p)| (*i, vec![paired::doubled_geom(p)]))
        .collect();
    let both = paired::side_by_side(&model, &model, &pairs).unwrap();
    let (two, left, _) = calib::capture(&both, &cx, &doubled).unwrap();
    assert!(left.is_empty(), "{left:?}");
    for (i, gs) in &wanted {
        let (p, q) = (&plain[i], &two[i]);
        let d = gs[0].dim();
        assert_eq!((q.dim, q.groups), (2 * d, p.groups), "layer {i}");
        for (sp, sq) in p.stats.iter().zip(&q.stats) {
            // Both captures scale G by its mean diagonal: compare unscaled (the
            // sums run in a different order: equal to float rounding, 1e-6).
            let h: Vec<f64> = obs::hessian(sp, d).iter().map(|v| v * p.scale).collect();
            let (ht, c, ho) = paired::blocks(sq, d);
            let norm = h.iter().map(|v| v * v).sum::<f64>().sqrt();
            for block in [&ht, &c, &ho] {
                let diff = h
                    .iter()
                    .zip(block.iter())
                    .map(|(a, b)| (a - b * q.scale).powi(2))
                    .sum::<f64>()
                    .sqrt();
                assert!(diff <= 1e-6 * norm, "layer {i}: {diff} vs {norm}");
            }
        }
    }
}

/// The two folds of a capture (`calib::capture_folds`, for `--gptq-damp auto`)
/// on 24 noise images of the CIFAR MobileNetV2 (three chunks of 8: fold 0 takes
/// chunks 0 and 2, images 0-7 and 16-23; fold 1 takes chunk 1, images 8-15):
/// for every weighted layer that keeps a Gram, each fold equals a plain capture
/// of its own images (unscaled; 1e-6 relative), and the two sum to the capture
/// of all 24 (1e-12). Layers that see no more rows than inputs keep their rows,
/// and their folds are the rows of each half.
#[test]
fn capture_folds_are_the_captures_of_the_two_halves() {
    use onnx_micronet::passes::calib::{self, obs};
    let model = onnx_micronet::onnx::load(&fixture("mobilenetv2_cifar_bn.onnx")).unwrap();
    let all = xorshift_images(24, 0x2545_F491_4F6C_DD1D);
    let set = |idx: &[usize]| Dataset {
        images: all.select(ndarray::Axis(0), idx),
        labels: vec![None; idx.len()],
        names: idx.iter().map(|i| format!("noise {i}")).collect(),
        description: "noise".into(),
        warnings: Vec::new(),
    };
    let every: Vec<usize> = (0..24).collect();
    let even: Vec<usize> = (0..8).chain(16..24).collect();
    let odd: Vec<usize> = (8..16).collect();
    let (wanted, _) = layer_geometries(&model);
    let capture = |idx: &[usize], folds: bool| {
        let data = set(idx);
        let cx = Context {
            calib: Some(&data),
            threads: 2,
            ..Default::default()
        };
        calib::capture_folds(&model, &cx, &wanted, folds).unwrap().0
    };
    let (full, a, b) = (
        capture(&every, true),
        capture(&even, false),
        capture(&odd, false),
    );
    let unscaled = |st: &calib::Stats, d: usize, scale: f64| -> Vec<f64> {
        obs::hessian(st, d).iter().map(|v| v * scale).collect()
    };
    let mut row_folds = 0;
    for (i, gs) in &wanted {
        let d = gs[0].dim();
        let f = &full[i];
        assert_eq!(f.folds.len(), 2, "layer {i}");
        if let calib::Stats::Rows { n, .. } = f.stats[0] {
            row_folds += 1;
            // Rows per image: 1 (the Gemm) or 16; fold 0 has 16 images, fold 1 has 8.
            let per_image = n / 24;
            for (k, images) in [16, 8].into_iter().enumerate() {
                match f.folds[k][0] {
                    calib::Stats::Rows { n, .. } => assert_eq!(n, per_image * images),
                    _ => panic!("layer {i}: fold {k} of kept rows is a Gram"),
                }
            }
        }
        for (g, st) in f.stats.iter().enumerate() {
            let h = unscaled(st, d, f.scale);
            let norm = h.iter().map(|v| v * v).sum::<f64>().sqrt();
            let close = |x: &[f64], y: &[f64], tol: f64, what: &str| {
                let diff = x
                    .iter()
                    .zip(y)
                    .map(|(p, q)| (p - q).powi(2))
                    .sum::<f64>()
                    .sqrt();
                assert!(
                    diff <= tol * norm,
                    "layer {i} group {g} {what}: {diff} vs {norm}"
                );
            };
            let fa = unscaled(&f.folds[0][g], d, f.scale);
            let fb = unscaled(&f.folds[1][g], d, f.scale);
            // A capture of 8 images may keep its rows where the fold sums a Gram:
            // the same products summed in another order (1e-6).
            close(
                &fa,
                &unscaled(&a[i].stats[g], d, a[i].scale),
                1e-6,
                "fold 0",
            );
            close(
                &fb,
                &unscaled(&b[i].stats[g], d, b[i].scale),
                1e-6,
                "fold 1",
            );
            let sum: Vec<f64> = fa.iter().zip(&fb).map(|(p, q)| p + q).collect();
            close(&sum, &h, 1e-12, "sum");
        }
    }
    // 53 layers: the Gemm (24 rows for 1280 inputs) and the projection convs of
    // blocks 14-17 (24 images x 4 x 4 positions = 384 rows for 576 or 960 inputs)
    // keep their rows.
    assert_eq!(row_folds, 5);
    // A plain capture keeps no folds.
    assert!(capture(&every, false).values().all(|c| c.folds.is_empty()));
}

/// `--gptq-damp auto` (the default) and `--calib-augment flip` from the CLI, on
/// the CIFAR MobileNetV2 with the 20 foolbox images at 4-bit per-channel minmax:
/// the capture sees 40 images (each and its mirror), the recipe records the
/// augmentation, and every GPTQ layer reports the dampening its 2-fold
/// cross-validation chose (one of 0.003 .. 1) with the held-out error; a fixed
/// `--gptq-damp 0.01` reports none. A bad augmentation is a usage error naming
/// the option, on the command line and in a recipe.
#[test]
fn auto_damp_and_mirrored_calibration_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("mobilenetv2_cifar_bn.onnx");
    let data = fixture("data/foolbox/cifar100");
    let c = data.to_str().unwrap();
    let base = ["--calib", c, "--quantize", "minmax:4", "--per-channel"];
    let auto = optimize_report(
        dir.path(),
        "auto",
        &src,
        &[&base[..], &["--calib-augment", "flip"]].concat(),
    );
    assert_eq!(auto["recipe"]["preprocess"]["calib_augment"], "flip");
    let q = report_pass(&auto, "quantize");
    let calibration = q["changed"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["target"] == "calibration")
        .map(|c| c["what"].as_str().unwrap().to_string())
        .unwrap();
    assert!(calibration.starts_with("40 images:"), "{calibration}");
    let methods: Vec<String> = q["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["method"].as_str().unwrap().to_string())
        .filter(|m| m.starts_with("GPTQ"))
        .collect();
    assert!(methods.len() >= 40, "{methods:?}");
    let allowed = ["0.003", "0.01", "0.03", "0.1", "0.3", "1"];
    for m in &methods {
        let rest = m
            .strip_prefix("GPTQ, damp ")
            .unwrap_or_else(|| panic!("{m}"));
        let (f, why) = rest.split_once(' ').unwrap();
        assert!(allowed.contains(&f), "{m}");
        assert!(
            why.starts_with("(2-fold cross-validation: held-out error "),
            "{m}"
        );
    }
    // Several dampenings are chosen: the choice is per layer.
    let chosen: std::collections::BTreeSet<&str> = methods
        .iter()
        .map(|m| m.split(' ').nth(2).unwrap())
        .collect();
    assert!(chosen.len() >= 3, "{chosen:?}");
    let fixed = optimize_report(
        dir.path(),
        "fixed",
        &src,
        &[&base[..], &["--gptq-damp", "0.01"]].concat(),
    );
    let q = report_pass(&fixed, "quantize");
    assert!(q["errors"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["method"] == "GPTQ" || e["method"] == "nearest"));
    let out = dir.path().join("x.onnx");
    let o = cli(&[
        "optimize",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--calib",
        c,
        "--quantize",
        "minmax:4",
        "--calib-augment",
        "rotate",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("invalid value 'rotate' for '--calib-augment"),
        "{err}"
    );
    let recipe = dir.path().join("r.toml");
    std::fs::write(
        &recipe,
        "[quantize]\nscheme = \"minmax\"\nbits = 4\n[preprocess]\ncalib_augment = \"rotate\"\n",
    )
    .unwrap();
    let err = cli_fails(&[
        "optimize",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--recipe",
        recipe.to_str().unwrap(),
    ]);
    assert!(err.contains("calib_augment = 'rotate'"), "{err}");
    assert!(!out.exists());
}

/// `--calib-mode asymmetric` from the CLI (GPTAQ's asymmetric calibration: each
/// layer fit to the float model's output from the compressed model's inputs), at
/// 4-bit per-channel minmax on the CIFAR MobileNetV2 with the 20 foolbox images
/// (calibration and evaluation alike):
/// - `asymmetric:1`, one stage: no layer is compressed before the capture, so
///   X~ = X and the fit is plain GPTQ's: the per-layer errors equal parallel
///   calibration's (1e-3 relative: the paired Gram sums run in another order);
/// - one stage per layer: every calibrated layer is "GPTQ asymmetric", the report
///   says how many stages ran, and on the calibration images (what the fit
///   minimizes; with 20 images this is in-sample, not an accuracy claim) the
///   logits move less from the float model's than with parallel GPTQ (mean
///   |logit diff| measured 0.098 against 0.113).
#[test]
fn asymmetric_calibration_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("mobilenetv2_cifar_bn.onnx");
    let data = fixture("data/foolbox/cifar100");
    let (c, d) = (data.to_str().unwrap(), data.to_str().unwrap());
    let run = |mode: &str| -> serde_json::Value {
        optimize_report(
            dir.path(),
            mode,
            &src,
            &[
                "--calib",
                c,
                "--data",
                d,
                "--quantize",
                "minmax:4",
                "--per-channel",
                "--calib-mode",
                mode,
                // One dampening for both modes: `auto` would choose each layer's
                // from errors that differ in the last bits between the plain and
                // the paired capture.
                "--gptq-damp",
                "0.01",
            ],
        )
    };
    let quantize =
        |j: &serde_json::Value| -> serde_json::Value { report_pass(j, "quantize").clone() };
    let errors = |j: &serde_json::Value| -> std::collections::BTreeMap<String, (String, f64)> {
        quantize(j)["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["layer"].as_str().unwrap().to_string(),
                    (
                        e["method"].as_str().unwrap().to_string(),
                        e["after"].as_f64().unwrap(),
                    ),
                )
            })
            .collect()
    };
    let mean_diff = |j: &serde_json::Value| {
        j["validation"]["agreement"]["mean_abs_logit_diff"]
            .as_f64()
            .unwrap()
    };
    let parallel = run("parallel");
    let one = run("asymmetric:1");
    let per_layer = run("asymmetric");
    let (p, o) = (errors(&parallel), errors(&one));
    assert_eq!(p.len(), 47, "{p:?}");
    assert_eq!(p.keys().collect::<Vec<_>>(), o.keys().collect::<Vec<_>>());
    for (layer, (_, e)) in &p {
        let f = o[layer].1;
        assert!(
            (e - f).abs() <= 1e-3 * e,
            "{layer}: parallel {e}, asymmetric:1 {f}"
        );
    }
    let a = errors(&per_layer);
    assert_eq!(a.len(), 47);
    assert!(a.values().all(|(m, _)| m == "GPTQ asymmetric"), "{a:?}");
    // 53 weighted layers captured, one stage each; 6 of them have fewer
    // calibration rows than inputs and stay at nearest rounding.
    let calibration = quantize(&per_layer)["changed"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["target"] == "calibration")
        .map(|c| c["what"].as_str().unwrap().to_string());
    assert!(
        calibration.as_deref().is_some_and(
            |s| s.contains("inputs of 53 layers") && s.contains("(asymmetric: 53 stages")
        ),
        "{calibration:?}"
    );
    let (dp, da) = (mean_diff(&parallel), mean_diff(&per_layer));
    assert!(
        da < 0.95 * dp,
        "mean |logit diff|: asymmetric {da}, parallel {dp}"
    );
}

/// The relu6 model's activations at 3 bits (maxabs) on `calib_set`, with
/// `keep` of them at 16 bits by sensitivity and `skip` left float.
fn act_quant_mixed(keep: usize, skip: &[&str]) -> (Model, PassReport) {
    act_quant_on_calib_set(
        relu6_model(false),
        ActQuantSection {
            bits: 3,
            keep: Some(keep),
            skip: skip.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        },
    )
}

/// ||a - b||^2 / ||b||^2.
fn relative_change(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    d / b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>()
}

#[test]
fn mixed_precision_keeps_the_most_output_sensitive_activations_at_16_bits() {
    // Two activations: x (read by conv1) and r (the Clip's output, read by conv2),
    // at 3 bits (x = i / 4 in [0, 3.75]: maxabs scale 2^-(3 - 2) = 0.5, so the odd
    // quarters round; at 4 bits the grid 0.25 would hold x exactly).
    // Each one's sensitivity, measured independently: the model with only that
    // one quantized (the other skipped), run in tract on the calibration image,
    // ||y_t - y||^2 / ||y||^2 against the float model.
    let x: Vec<f32> = calib_set().images.iter().copied().collect();
    let y = tract_run(&wrap(relu6_model(false)), &x);
    let alone = |t: &str| {
        let other = if t == "x" { "r" } else { "x" };
        let (m, _) = act_quant_mixed(0, &[other]);
        relative_change(&tract_run(&m, &x), &y)
    };
    let (sx, sr) = (alone("x"), alone("r"));
    assert!(
        sx > 0.0 && sr > 0.0 && (sx - sr).abs() > 0.1 * sx.max(sr),
        "{sx} {sr}"
    );
    let (top, other) = if sx > sr { ("x", "r") } else { ("r", "x") };
    let (reader_top, reader_other) = if top == "x" {
        ("conv1", "conv2")
    } else {
        ("conv2", "conv1")
    };

    // keep = 1: the pass measures the same numbers (printed to 4 digits), ranks
    // them, and keeps the larger at 16 bits (an int16 grid); the other stays
    // on its 3-bit grid.
    let (m, r) = act_quant_mixed(1, &[]);
    let line = |v: &str| {
        r.changed
            .iter()
            .find(|i| i.target == v)
            .unwrap()
            .what
            .clone()
    };
    let reported = |v: &str| -> f64 {
        let l = line(v);
        let s = l.split("output change ").nth(1).unwrap();
        s.split(',').next().unwrap().parse().unwrap()
    };
    for (v, s) in [("x", sx), ("r", sr)] {
        assert!(
            (reported(v) - s).abs() <= 5e-4 * s,
            "{v}: {} vs {s}",
            line(v)
        );
    }
    assert!(
        line(top).contains("rank 1 of 2, kept at 16 bits"),
        "{}",
        line(top)
    );
    assert!(line(top).starts_with("16-bit"), "{}", line(top));
    assert!(line(other).contains("rank 2 of 2") && line(other).starts_with("3-bit"));
    assert!(r.changed.iter().any(|i| i.target == "mixed precision"));
    let rep = score::score(&m, &ScoreOptions::default()).unwrap();
    let bits_of = |name: &str| rep.layers.iter().find(|l| l.name == name).unwrap().act_bits;
    assert_eq!((bits_of(reader_top), bits_of(reader_other)), (16, 3));
    // The kept one on a 16-bit integer grid (the fake-quant chain's Clip bounds):
    // both values are non-negative (x = i / 4, r after a Clip at 0), so unsigned
    // [0, 65535].
    let kept_hi = values(&m, &format!("{top}_act_hi"));
    assert_eq!(
        (values(&m, &format!("{top}_act_lo")), kept_hi),
        (vec![0.0], vec![65535.0])
    );
    assert!(m.graph().node.iter().all(|n| n.op_type() != "Cast"));
    // onnxruntime runs the mixed model as tract does.
    let got: Vec<f64> = tract_run(&m, &x).iter().map(|v| *v as f64).collect();
    if let Some(ort) = ort_run(&m, &x, true) {
        assert_close(&ort, &got, "onnxruntime vs tract");
    }
    // Keeping the more sensitive one moves the output less than keeping the other
    // (the other's alone, the first's left float).
    let (swapped, _) = act_quant_mixed(0, &[other]);
    let kept = relative_change(&tract_run(&m, &x), &y);
    let swapped = relative_change(&tract_run(&swapped, &x), &y);
    assert!(kept < swapped, "{kept} {swapped}");

    // keep = 2 (all): both on 16-bit grids, nothing at 3 bits.
    let (m, _) = act_quant_mixed(2, &[]);
    let rep = score::score(&m, &ScoreOptions::default()).unwrap();
    let bits_of = |name: &str| rep.layers.iter().find(|l| l.name == name).unwrap().act_bits;
    assert_eq!((bits_of("conv1"), bits_of("conv2")), (16, 16));
}

/// x (the calibration image, x = i / 4, i = 0..15) through 1x1 convs with
/// weights `w1` (x -> h, one output channel per weight) and `w2` (h -> y, one
/// input channel per weight), the activations at `bits` (maxabs) with `search`
/// rounds of range search; `skip`: values left float.
fn act_search_model(
    w1: &[f32],
    w2: &[f32],
    bits: u32,
    search: usize,
    skip: &[&str],
) -> (Model, PassReport) {
    act_two_convs(
        w1,
        w2,
        ActQuantSection {
            bits,
            search: Some(search),
            skip: skip.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        },
    )
}

/// [`act_search_model`]'s two 1x1 convs with any `[act_quant]` section.
fn act_two_convs(w1: &[f32], w2: &[f32], section: ActQuantSection) -> (Model, PassReport) {
    let c = w1.len() as i64;
    let proto = model(
        GraphProto {
            name: Some("two_convs".into()),
            node: vec![
                node("Conv", "conv1", &["x", "w1"], &["h"]),
                node("Conv", "conv2", &["h", "w2"], &["y"]),
            ],
            initializer: vec![
                tensor_f32("w1", &[c, 1, 1, 1], w1),
                tensor_f32("w2", &[1, c, 1, 1], w2),
            ],
            input: vec![value_info("x", &[1, 1, 4, 4])],
            output: vec![value_info("y", &[1, 1, 4, 4])],
            ..Default::default()
        },
        13,
    );
    act_quant_on_calib_set(proto, section)
}

fn line_of(r: &PassReport, target: &str) -> String {
    r.changed
        .iter()
        .find(|i| i.target == target)
        .unwrap_or_else(|| panic!("no line for {target}: {:?}", r.changed))
        .what
        .clone()
}

#[test]
fn range_search_keeps_the_candidate_scale_with_the_least_output_error() {
    // y = x through identity convs, only x quantized, at 2 bits: x = i / 4 in
    // [0, 3.75], maxabs scale 2^-(2 - ceil(log2 3.75)) = 1, levels {0, 1, 2, 3}.
    // ||y||^2 = sum (i / 4)^2 = 1240 / 16 = 77.5. Squared error of
    // s * clip(round_even(x / s), 0, 3) over the 16 values, by candidate s:
    //   1    : x = .5 -> 0, .75 -> 1, 1.5 -> 2 (even), 2.5 -> 2 (even), 3.5.. -> 3:
    //          4 (.25^2) + 2 (.5^2) ... = 2.0           (relative 2.0 / 77.5 = 2.5806e-2)
    //   0.5  : top level 1.5, 18.0;   0.65: 9.7375;   0.8: 4.78;   0.9: 2.89
    //   1.12 : levels {0, 1.12, 2.24, 3.36}: 1.564     (relative 2.0181e-2)
    //   1.25 : 1.875;   1.5: 3.25;   2: 5.5
    // so one round keeps 1.12. A second round tries 1.12 x the same factors
    // (1.008: 1.920, 1.2544: 1.896, ...): none beats 1.564, the scale stays.
    for rounds in [1, 2] {
        let (m, r) = act_search_model(&[1.0], &[1.0], 2, rounds, &["h"]);
        let search = line_of(&r, "range search");
        assert!(
            search.contains("2.5806e-2 -> 2.0181e-2") && search.contains("1 scales moved"),
            "{search}"
        );
        assert!(
            search.contains(&format!("{} model runs", 1 + 8 * rounds)),
            "{search}"
        );
        let x = line_of(&r, "x");
        assert!(x.contains("scale x 1.120 of the maxabs grid"), "{x}");
        assert_eq!(values(&m, "x_act_scale"), vec![1.12f32]);
        // The written model computes the searched grid: 1.12 * {0, 1, 2, 3}.
        let input: Vec<f32> = calib_set().images.iter().copied().collect();
        let s = 1.12f32;
        let want: Vec<f32> = [
            0., 0., 0., 1., 1., 1., 1., 2., 2., 2., 2., 2., 3., 3., 3., 3.,
        ]
        .iter()
        .map(|q: &f32| q * s)
        .collect();
        assert_eq!(tract_run(&m, &input), want);
    }
    // search = 0: the maxabs grid, byte for byte the pass without the search.
    let (m0, r0) = act_search_model(&[1.0], &[1.0], 2, 0, &["h"]);
    assert_eq!(values(&m0, "x_act_scale"), vec![1.0f32]);
    assert!(r0.changed.iter().all(|i| i.target != "range search"));
}

#[test]
fn range_search_weighs_errors_by_what_they_do_downstream() {
    // h = (x, 10 x): channel 0 in [0, 3.75], channel 1 in [0, 37.5]; y = h0 +
    // 0.001 h1, so channel 1 hardly matters downstream. Only h quantized, at 4
    // bits: maxabs over both channels gives scale 2^-(4 - ceil(log2 37.5)) = 4,
    // levels 0, 4, .., 60, and channel 0 (what y is made of) rounds to 0 or 4.
    // A per-tensor criterion sees channel 1's range; the search sees y's error,
    // halves the scale in each of its 3 rounds (4 -> 2 -> 1 -> 0.5), clipping
    // channel 1 (its error x 0.001) to resolve channel 0, and the output error
    // falls by more than 10x.
    let (m, r) = act_search_model(&[1.0, 10.0], &[1.0, 0.001], 4, 3, &["x"]);
    assert_eq!(values(&m, "h_act_scale"), vec![0.5f32]);
    let h = line_of(&r, "h");
    assert!(h.contains("scale x 0.125 of the maxabs grid"), "{h}");
    // The reported errors are those of the written models, measured here.
    let input: Vec<f32> = calib_set().images.iter().copied().collect();
    let proto_y = |w: &Model| tract_run(w, &input);
    let (m0, _) = act_search_model(&[1.0, 10.0], &[1.0, 0.001], 4, 0, &["x"]);
    let (f, _) = act_search_model(&[1.0, 10.0], &[1.0, 0.001], 16, 0, &["x", "h"]);
    let y = proto_y(&f);
    let (before, after) = (
        relative_change(&proto_y(&m0), &y),
        relative_change(&proto_y(&m), &y),
    );
    assert!(after < 0.1 * before, "{before} -> {after}");
    let search = line_of(&r, "range search");
    assert!(
        search.contains(&format!("{before:.4e} -> {after:.4e}")),
        "{search} vs {before:.4e} -> {after:.4e}"
    );
}

#[test]
fn per_channel_activation_grids_by_hand() {
    use onnx_micronet::graph::Graph;
    use onnx_micronet::repr::act::ActBits;
    // h = (x, 10 x) with x = i / 4, i = 0..15: channel 0 in [0, 3.75], channel 1
    // in [0, 37.5]; y = h0 + 0.001 h1; only h quantized, 4 bits, maxabs, never
    // negative (unsigned, levels 0..15). Per tensor: v = 37.5, I = ceil(log2
    // 37.5) = 6, scale 2^-(4 - 6) = 4, and channel 0 rounds to 0 or 4. Per
    // channel: channel 0's max 3.75 gives I = 2, scale 2^-(4 - 2) = 0.25 (x / 0.25
    // = i exactly: channel 0 is kept whole); channel 1's max 37.5 gives 4. So
    // h1 -> 4 round_even(2.5 i / 4) = 4 round_even(0.625 i):
    //   0.625 i = 0, .625, 1.25, 1.875, 2.5, 3.125, 3.75, 4.375, 5, 5.625, 6.25,
    //             6.875, 7.5, 8.125, 8.75, 9.375
    //   rounded = 0, 1, 1, 2, 2, 3, 4, 4, 5, 6, 6, 7, 8, 8, 9, 9 (2.5 -> 2, 7.5 -> 8)
    // and y = i / 4 + 0.004 rounded.
    let section = |per_channel: bool| ActQuantSection {
        bits: 4,
        skip: vec!["x".into()],
        per_channel: Some(per_channel),
        ..Default::default()
    };
    let (m, r) = act_two_convs(&[1.0, 10.0], &[1.0, 0.001], section(true));
    let scale = m
        .graph()
        .initializer
        .iter()
        .find(|t| t.name() == "h_act_scale")
        .unwrap();
    assert_eq!(scale.dims, vec![2, 1, 1]);
    assert_eq!(values(&m, "h_act_scale"), vec![0.25f32, 4.0]);
    let h = line_of(&r, "h");
    assert!(
        h.contains("per channel: 2 scales in [0.25, 4.0] (each channel's own maxabs grid"),
        "{h}"
    );
    let rounded = [
        0., 1., 1., 2., 2., 3., 4., 4., 5., 6., 6., 7., 8., 8., 9., 9.,
    ];
    let want: Vec<f32> = rounded
        .iter()
        .enumerate()
        .map(|(i, q)| i as f32 / 4.0 + 0.001 * (4.0 * q))
        .collect();
    let input: Vec<f32> = calib_set().images.iter().copied().collect();
    let y = tract_run(&m, &input);
    for (a, b) in y.iter().zip(&want) {
        assert!((a - b).abs() < 1e-6, "{y:?} vs {want:?}");
    }
    // The score reads the per-channel chain as 4-bit activations.
    let g = Graph::of(&m).unwrap();
    let conv2_input = g.node(g.producer("y").unwrap().0).input[0].clone();
    assert_eq!(ActBits::new(&g).of(&conv2_input), Some(4));

    // Per tensor: one scale, 4, and a larger output error.
    let (m1, r1) = act_two_convs(&[1.0, 10.0], &[1.0, 0.001], section(false));
    assert_eq!(values(&m1, "h_act_scale"), vec![4.0f32]);
    assert!(!line_of(&r1, "h").contains("per channel"));
    let (f, _) = act_search_model(&[1.0, 10.0], &[1.0, 0.001], 16, 0, &["x", "h"]);
    let y_float = tract_run(&f, &input);
    assert!(
        relative_change(&y, &y_float) < 0.01 * relative_change(&tract_run(&m1, &input), &y_float)
    );

    // A zero point per channel is not offered: the asymmetric ranges are refused.
    let err = ActQuantSection {
        range: Some("minmax".into()),
        ..section(true)
    }
    .config()
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("per-channel activations take a symmetric range"),
        "{err}"
    );
}

/// x[1,2,1,1] -> Conv w1 = diag(0.3, 0.3) (left float) -> Relu -> Conv w2 = [1, 1]
/// -> y[1,1,1,1]: the second layer's input h = 0.3 x is never on an 8-bit
/// activation grid.
fn act_aware_model() -> ModelProto {
    model(
        GraphProto {
            name: Some("act_aware".into()),
            node: vec![
                node("Conv", "conv1", &["x", "w1"], &["c"]),
                node("Relu", "relu", &["c"], &["h"]),
                node("Conv", "conv2", &["h", "w2"], &["y"]),
            ],
            initializer: vec![
                tensor_f32("w1", &[2, 2, 1, 1], &[0.3, 0.0, 0.0, 0.3]),
                tensor_f32("w2", &[1, 2, 1, 1], &[1.0, 1.0]),
            ],
            input: vec![value_info("x", &[1, 2, 1, 1])],
            output: vec![value_info("y", &[1, 1, 1, 1])],
            ..Default::default()
        },
        13,
    )
}

/// `optimize` of [`act_aware_model`] in DIR/TAG.onnx, calibrated on the four
/// images x = (1, 1), (0.5, 0.25), (0.25, 0.5), (0.75, 1) with asymmetric
/// calibration and 8-bit maxabs activations, plus `extra`. Returns the report and
/// the calibration line of `pass`.
fn act_aware_run(
    dir: &std::path::Path,
    tag: &str,
    pass: &str,
    extra: &[&str],
) -> (serde_json::Value, String) {
    let src = dir.join("m.onnx");
    write_model(&src, &act_aware_model());
    let x = Array4::from_shape_vec(
        (4, 2, 1, 1),
        vec![1.0, 1.0, 0.5, 0.25, 0.25, 0.5, 0.75, 1.0],
    )
    .unwrap();
    let npy = dir.join("x.npy");
    write_npy(&npy, &x);
    let mut args = vec![
        "--calib",
        npy.to_str().unwrap(),
        "--preprocess",
        "raw",
        "--calib-mode",
        "asymmetric",
        "--act-bits",
        "8",
        "--act-range",
        "maxabs",
        "--no-bias-correction",
    ];
    args.extend_from_slice(extra);
    let j = optimize_report(dir, tag, &src, &args);
    let p = report_pass(&j, pass);
    let line = p["changed"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["target"] == "calibration")
        .map(|c| c["what"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("{p}"));
    (j, line)
}

/// Asymmetric GPTQ with `--act-bits` fits each layer on inputs with the act-quant
/// pass's quantizers in place (recipe `quantize.act_aware`, on by default), by hand.
/// Four images x = (1, 1), (0.5, 0.25), (0.25, 0.5), (0.75, 1). maxabs grids
/// (unsigned: nothing is negative): x's max 1 gives I = ceil(log2(1 + 1e-12)) = 1,
/// scale 2^-(8-1) = 1/128, and every x is on it; h = 0.3 x has max 0.3, I = -1,
/// scale 2^-9 = 1/512, and h/s = 153.6, 76.8, 38.4, 115.2 round to 154, 77, 38,
/// 115: errors (+0.4, +0.2, -0.4, -0.2)/512. w2 = (1, 1) is on its 8-bit minmax
/// grid [0, 1], so round-to-nearest leaves it and its error against the float
/// model's output is the input's alone: per image the summed errors of h,
/// (0.4 + 0.4, 0.2 - 0.4, -0.4 + 0.2, -0.2 + 0.4)/512 = (0.8, -0.2, -0.2, 0.2)/512,
/// squared 0.76/512^2 = 2.89917e-6, over sum (h1 + h2)^2 = 0.6^2 + 0.225^2 +
/// 0.225^2 + 0.525^2 = 0.736875: 3.93442e-6. Without the simulation the layer
/// sees the float h: 0.
#[test]
fn asymmetric_gptq_sees_the_activation_quantizers_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let run = |tag: &str, extra: &[&str]| {
        let mut args = vec![
            "--quantize",
            "minmax:8",
            "--per-channel",
            "--layer-bits",
            "w1=32",
            "--gptq-damp",
            "0.01",
        ];
        args.extend_from_slice(extra);
        let (j, line) = act_aware_run(dir.path(), tag, "quantize", &args);
        let q = report_pass(&j, "quantize");
        let e = q["errors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["layer"] == "conv2")
            .unwrap_or_else(|| panic!("{q}"))
            .clone();
        (e, line)
    };
    let (on, line) = run("on", &[]);
    let want = (0.76 / 512f64.powi(2)) / 0.736875;
    let nearest = on["nearest"].as_f64().unwrap();
    assert!((nearest - want).abs() <= 1e-3 * want, "{nearest} vs {want}");
    assert!(on["after"].as_f64().unwrap() <= nearest, "{on}");
    assert!(
        line.contains("with the 2 activation quantizers of the act-quant pass simulated"),
        "{line}"
    );
    let (off, line) = run("off", &["--set", "quantize.act_aware=false"]);
    assert_eq!(off["nearest"].as_f64().unwrap(), 0.0, "{off}");
    assert!(!line.contains("simulated"), "{line}");
}

/// The quantizers `Simulation` writes are the pass's own: on the model it was
/// calibrated on, the same model bytes as running act-quant; on a copy with a
/// changed weight, the pass's output with that weight changed; a model with other
/// nodes is refused.
#[test]
fn simulated_activation_quantization_is_the_pass() {
    use onnx_micronet::passes::act_quant::Simulation;
    use prost::Message;
    let m0 = wrap(relu6_model(false));
    let data = calib_set();
    let cx = Context {
        reference: None,
        calib: Some(&data),
        input_shape: vec![1, 1, 4, 4],
        threads: 1,
        ..Default::default()
    };
    for section in [
        ActQuantSection {
            bits: 8,
            ..Default::default()
        },
        ActQuantSection {
            bits: 4,
            range: Some("mse".into()),
            per_channel: Some(true),
            ..Default::default()
        },
    ] {
        let cfg = section.config().unwrap();
        let sim = Simulation::calibrate(&cfg, &m0, &cx).unwrap().unwrap();
        assert_eq!(sim.len(), 2);
        let mut pass = m0.clone();
        ActQuant(cfg.clone()).run(&mut pass, &cx).unwrap();
        let simulated = sim.apply(&m0).unwrap().model;
        assert_eq!(
            simulated.proto.encode_to_vec(),
            pass.proto.encode_to_vec(),
            "{cfg:?}"
        );
        // A changed weight: the simulation keeps it and the ranges of m0.
        let w1 = TensorData::F32(arr(&[2, 1, 3, 3], &[0.5; 18]));
        let mut changed = m0.clone();
        onnx_micronet::graph::edit::set_initializer(changed.graph_mut(), "w1", &w1);
        let mut want = pass.clone();
        onnx_micronet::graph::edit::set_initializer(want.graph_mut(), "w1", &w1);
        assert_eq!(
            sim.apply(&changed).unwrap().model.proto.encode_to_vec(),
            want.proto.encode_to_vec()
        );
        let mut other = m0.clone();
        other.graph_mut().node.pop();
        let Err(err) = sim.apply(&other) else {
            panic!("a model with a node less was accepted");
        };
        let err = err.to_string();
        assert!(err.contains("nodes changed"), "{err}");
    }
}

/// SparseGPT's asymmetric stages see the activation quantizers too: the report
/// says so, and conv2's surviving weight is fit on the quantized h (by the
/// numbers of `asymmetric_gptq_sees_the_activation_quantizers_by_hand`, q(h)
/// differs from h on every image, so the fit moves), while without the
/// simulation it is fit on the float h.
#[test]
fn asymmetric_sparsegpt_sees_the_activation_quantizers() {
    let dir = tempfile::tempdir().unwrap();
    let run = |tag: &str, extra: &[&str]| {
        let mut args = vec![
            "--prune",
            "sparsegpt:0.5",
            "--prune-skip",
            "w1",
            "--set",
            "prune.min_elements=1",
            "--set",
            "prune.skip_first_conv=false",
        ];
        args.extend_from_slice(extra);
        let (_, line) = act_aware_run(dir.path(), tag, "prune", &args);
        let m = onnx_micronet::onnx::load(&dir.path().join(format!("{tag}.onnx"))).unwrap();
        let g = onnx_micronet::graph::Graph::of(&m).unwrap();
        let w2: Vec<f32> = onnx_micronet::repr::weight(&g, "w2")
            .unwrap()
            .unwrap()
            .values
            .iter()
            .copied()
            .collect();
        (line, w2)
    };
    let (line, on) = run("on", &[]);
    assert!(
        line.contains("with the 2 activation quantizers of the act-quant pass simulated"),
        "{line}"
    );
    let (line, off) = run("off", &["--set", "prune.act_aware=false"]);
    assert!(!line.contains("simulated"), "{line}");
    // One of the two weights pruned in both; the survivor refit differently.
    assert_eq!(on.iter().filter(|v| **v == 0.0).count(), 1, "{on:?}");
    assert_eq!(off.iter().filter(|v| **v == 0.0).count(), 1, "{off:?}");
    assert_ne!(on, off);
}
