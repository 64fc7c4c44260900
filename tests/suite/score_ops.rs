//! Hand-computed counts, one small graph per op kind and option. The arithmetic
//! sits beside each assertion.
//!
//! The shared convolution is `tiny_conv` (tests/common): x[1,2,4,4] -> Conv(w[3,2,3,3],
//! b[3], pads 1) -> y[1,3,4,4], so P = 4*4 = 16 output positions per channel.
//! w[i] = ((7i mod 11) - 5) / 10 is zero where 7i = 5 (mod 11), i = 7, 18, 29, 40, 51:
//! channel 0 (i 0..17) has 1 zero, channel 1 (18..35) 2, channel 2 (36..53) 2,
//! so n_c = [17, 16, 16], nnz = 49 of 54 (sparsity 5/54).

use crate::common::*;
use onnx_micronet::onnx::proto::{GraphProto, ModelProto, StringStringEntryProto, TensorProto};
use onnx_micronet::onnx::{DataType, Model};
use onnx_micronet::score::{
    self, AccMode, BnMode, Report, ScoreOptions, SparsePolicy, TernaryMode,
};

fn run(m: ModelProto, opts: &ScoreOptions) -> Report {
    let model = Model {
        proto: m,
        path: None,
        external_files: vec![],
    };
    score::score(&model, opts).unwrap()
}

fn layer<'a>(r: &'a Report, name: &str) -> &'a score::Layer {
    r.layers
        .iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| panic!("no layer {name} in {:?}", r.layers))
}

fn close(a: f64, b: f64) {
    assert!((a - b).abs() <= 1e-9 * b.abs().max(1.0), "{a} != {b}");
}

fn no_freebie() -> ScoreOptions {
    ScoreOptions {
        freebie: false,
        ..Default::default()
    }
}

#[test]
fn conv_with_bias_sparse_freebie() {
    let r = run(tiny_conv(), &ScoreOptions::default());
    assert!(r.freebie_applied && !r.quantized);
    let c = layer(&r, "conv");
    // raw mults = sum n_c * P = 49 * 16 = 784; raw adds = sum (n_c - 1) * P + bias P*C = 46*16 + 48 = 784.
    close(c.raw_mults, 784.0);
    close(c.raw_adds, 784.0);
    // freebie: mults at 16/32, adds at 32/32.
    close(c.mults, 392.0);
    close(c.adds, 784.0);
    // storage: 49 nonzeros * 16 + 54 mask bits = 838; bias 3 * 16 = 48; (838 + 48) / 32 = 27.6875.
    close(c.params, 27.6875);
    close(c.sparsity.unwrap(), 5.0 / 54.0);
    // relu: 1 mult per element, 48 elements at 16 bits = 24.
    close(layer(&r, "relu").mults, 24.0);
    // score (cifar100): params 27.6875 / 36.5e6 + ops (392 + 784 + 24) / 10.49e9.
    close(r.score, 27.6875 / 36.5e6 + 1200.0 / 10.49e9);
}

#[test]
fn conv_without_freebie_and_storage_policies() {
    let r = run(tiny_conv(), &no_freebie());
    let c = layer(&r, "conv");
    // 49 * 32 + 54 = 1622 bits + bias 96 = 1718 -> 53.6875; mults 784 at 32 bits.
    close(c.params, 53.6875);
    close(c.mults, 784.0);
    // threshold:0.5: sparsity 5/54 < 0.5 -> dense 54 * 16 = 864 (+48 bias) = 912 -> 28.5.
    let opts = ScoreOptions {
        sparse_storage: SparsePolicy::Threshold(0.5),
        ..Default::default()
    };
    close(layer(&run(tiny_conv(), &opts), "conv").params, 28.5);
    // min: masked 838 < dense 864 -> masked, as the default.
    let opts = ScoreOptions {
        sparse_storage: SparsePolicy::Min,
        ..Default::default()
    };
    close(layer(&run(tiny_conv(), &opts), "conv").params, 27.6875);
}

fn int8_tensor(name: &str, dims: &[i64], v: &[i8]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(DataType::Int8 as i32),
        raw_data: Some(v.iter().map(|&x| x as u8).collect::<Vec<u8>>().into()),
        ..Default::default()
    }
}

/// tiny_conv with its weight stored as int8 codes decoded by DequantizeLinear
/// (scale 0.1, zero point 0): w = q * 0.1 with q = (7i mod 11) - 5, the same zeros.
fn dq_conv(quantize_input: bool) -> ModelProto {
    let mut m = tiny_conv();
    let g = m.graph.as_mut().unwrap();
    let q: Vec<i8> = (0..54).map(|i| ((i * 7 % 11) as i8) - 5).collect();
    g.initializer[0] = int8_tensor("wq", &[3, 2, 3, 3], &q);
    g.initializer.push(tensor_f32("ws", &[], &[0.1]));
    g.initializer.push(int8_tensor("wz", &[], &[0]));
    let mut nodes = vec![node(
        "DequantizeLinear",
        "dq_w",
        &["wq", "ws", "wz"],
        &["w"],
    )];
    if quantize_input {
        // x -> QuantizeLinear(int8) -> DequantizeLinear -> conv: 8-bit activations.
        g.initializer.push(tensor_f32("xs", &[], &[0.05]));
        g.initializer.push(int8_tensor("xz", &[], &[0]));
        nodes.push(node("QuantizeLinear", "q_x", &["x", "xs", "xz"], &["xq"]));
        nodes.push(node(
            "DequantizeLinear",
            "dq_x",
            &["xq", "xs", "xz"],
            &["xd"],
        ));
        g.node[0].input[0] = "xd".into();
    }
    nodes.append(&mut g.node);
    g.node = nodes;
    m
}

#[test]
fn int8_weight_through_dequantize_linear() {
    let r = run(dq_conv(false), &ScoreOptions::default());
    assert!(
        r.quantized && !r.freebie_applied,
        "an int8 weight cancels the freebie"
    );
    let c = layer(&r, "conv");
    assert_eq!(c.weight_bits, Some(8));
    assert_eq!(c.act_bits, 32);
    // storage: 49 * 8 + 54 = 446 bits; float32 bias 3 * 32 = 96; the one 32-bit
    // scale of the DequantizeLinear (a runtime needs it; its zero point is 0, the
    // default, nothing to store): 574 / 32 = 17.9375.
    close(c.params, 17.9375);
    // mults at max(8, 32) = 32 bits: 784.
    close(c.mults, 784.0);
    close(c.sparsity.unwrap(), 5.0 / 54.0);
}

#[test]
fn int8_weights_and_activations_with_adder_trees() {
    let r = run(dq_conv(true), &ScoreOptions::default());
    let c = layer(&r, "conv");
    assert_eq!((c.weight_bits, c.act_bits), (Some(8), 8));
    // mults at 8/32: 784 / 4 = 196. Q/DQ nodes are conversions: not counted.
    close(c.mults, 196.0);
    assert!(r.layers.iter().all(|l| !l.op_type.contains("Quantize")));

    // tree: base = 8 + 8 - 1 (the input is signed) = 15 bits.
    // 17 values: 8 adds x 15 + 4 x 16 + 2 x 17 + 1 x 18 + 1 x 19 = 120+64+34+18+19 = 255 bits.
    // 16 values: 8 x 15 + 4 x 16 + 2 x 17 + 1 x 18 = 236 bits.
    // (255 + 236 + 236) * 16 positions / 32 = 363.5; bias adds 48 at 32 bits -> 411.5.
    let tree = ScoreOptions {
        accumulation: AccMode::Tree,
        ..Default::default()
    };
    close(layer(&run(dq_conv(true), &tree), "conv").adds, 411.5);
    // fixed-int: widest tree (17 values) ends at 20 bits; (16+15+15) * 20 * 16 / 32 = 460; + 48 = 508.
    let fixed = ScoreOptions {
        accumulation: AccMode::FixedInt,
        ..Default::default()
    };
    close(layer(&run(dq_conv(true), &fixed), "conv").adds, 508.0);
    // fp16 accumulation: (46 * 16) * 0.5 = 368, + 48 bias = 416.
    let fp16 = ScoreOptions {
        accumulation: AccMode::Fp16,
        ..Default::default()
    };
    close(layer(&run(dq_conv(true), &fp16), "conv").adds, 416.0);
    // tree on float layers falls back to 32-bit adds: 784.
    close(layer(&run(dq_conv(false), &tree), "conv").adds, 784.0);
}

#[test]
fn adder_tree_matches_ref() {
    use onnx_micronet::score::count::adder_tree;
    // REF/RIAIR adder_tree(base=16, length=5): 2 x 16 + 1 x 17 + 1 x 18 = 67, width 19.
    assert_eq!(adder_tree(16, 5), (67, 19));
    assert_eq!(adder_tree(8, 1), (0, 8));
    assert_eq!(adder_tree(8, 2), (8, 9));
}

fn claim(t: &mut TensorProto, kv: &[(&str, &str)]) {
    t.metadata_props = kv
        .iter()
        .map(|(k, v)| StringStringEntryProto {
            key: Some(k.to_string()),
            value: Some(v.to_string()),
        })
        .collect();
}

#[test]
fn claimed_linear_weights_are_checked_against_their_values() {
    // w = ((7i mod 11) - 5) / 10 lies on the grid k * 0.1 with k in [-5, 5]: a 4-bit linear code.
    let mut m = tiny_conv();
    claim(
        &mut m.graph.as_mut().unwrap().initializer[0],
        &[
            ("onnx_micronet.scheme", "linear"),
            ("onnx_micronet.bits", "4"),
            ("onnx_micronet.step", "0.1"),
        ],
    );
    let r = run(m.clone(), &ScoreOptions::default());
    assert!(r.quantized);
    let c = layer(&r, "conv");
    assert_eq!(c.weight_bits, Some(4));
    // 49 * 4 + 54 = 250 bits + float bias 96 + the claim's one 32-bit step = 378
    // -> 11.8125.
    close(c.params, 11.8125);

    // The same claim at 2 bits is contradicted by 11 distinct values.
    m.graph.as_mut().unwrap().initializer[0].metadata_props[1].value = Some("2".into());
    let model = Model {
        proto: m.clone(),
        path: None,
        external_files: vec![],
    };
    let err = score::score(&model, &ScoreOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tensor 'w': claims linear but holds 11 distinct values"),
        "{err}"
    );

    // A step the values are not on.
    m.graph.as_mut().unwrap().initializer[0].metadata_props[1].value = Some("8".into());
    m.graph.as_mut().unwrap().initializer[0].metadata_props[2].value = Some("0.3".into());
    let model = Model {
        proto: m,
        path: None,
        external_files: vec![],
    };
    let err = score::score(&model, &ScoreOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not on the grid k * 0.3"), "{err}");
}

#[test]
fn ternary_weights_both_modes() {
    // w in {-0.5, 0, 0.5}: sign of ((7i mod 11) - 5), zeros at the same 5 places.
    let w: Vec<f32> = (0..54)
        .map(|i: i32| match i * 7 % 11 - 5 {
            0 => 0.0,
            k => 0.5 * k.signum() as f32,
        })
        .collect();
    let mut m = tiny_conv();
    let g = m.graph.as_mut().unwrap();
    g.initializer[0] = tensor_f32("w", &[3, 2, 3, 3], &w);
    claim(
        &mut g.initializer[0],
        &[("onnx_micronet.scheme", "ternary")],
    );
    let r = run(m.clone(), &ScoreOptions::default());
    let c = layer(&r, "conv");
    // sparse binary + scale: 54 mask + 49 sign bits + 32-bit scale = 135 bits; bias 96 -> 231 / 32 = 7.21875.
    close(c.params, 7.21875);
    // +-1 multiplies 784 at 1/32 = 24.5, plus one scale multiply per output (48) at 32 bits = 48 -> 72.5.
    close(c.mults, 72.5);
    let two = ScoreOptions {
        ternary: TernaryMode::TwoMasksTwoCentroids,
        ..Default::default()
    };
    let c = layer(&run(m, &two), "conv").clone();
    // two masks 2 * 54 + two 32-bit centroids = 172 bits + 96 bias = 268 / 32 = 8.375; 2 multiplies per output = 96.
    close(c.params, 8.375);
    close(c.mults, 96.0);
}

/// x[1,3,4,4] -> Conv(w[3,3,1,1], no bias) -> BatchNormalization -> y.
fn conv_bn(with_bias: bool) -> ModelProto {
    let w: Vec<f32> = (1..=9).map(|v| v as f32).collect();
    let mut conv = node("Conv", "conv", &["x", "w"], &["c"]);
    if with_bias {
        conv.input.push("b".into());
    }
    let mut inits = vec![
        tensor_f32("w", &[3, 3, 1, 1], &w),
        tensor_f32("b", &[3], &[1.0, 2.0, 3.0]),
        tensor_f32("s", &[3], &[1.0, 2.0, 3.0]),
        tensor_f32("o", &[3], &[0.1, 0.2, 0.3]),
        tensor_f32("mu", &[3], &[0.0, 0.5, 1.0]),
        tensor_f32("var", &[3], &[1.0, 1.0, 2.0]),
    ];
    if !with_bias {
        inits.remove(1);
    }
    model(
        GraphProto {
            name: Some("conv_bn".into()),
            node: vec![
                conv,
                node(
                    "BatchNormalization",
                    "bn",
                    &["c", "s", "o", "mu", "var"],
                    &["y"],
                ),
            ],
            initializer: inits,
            input: vec![value_info("x", &[1, 3, 4, 4])],
            output: vec![value_info("y", &[1, 3, 4, 4])],
            ..Default::default()
        },
        13,
    )
}

#[test]
fn batchnorm_modes() {
    // E = 48 elements, C = 3 channels; freebie: params at 16 bits, mults 16, adds 32.
    let r = run(conv_bn(false), &ScoreOptions::default());
    let bn = layer(&r, "bn");
    // fold-bias, conv without bias: C params (3 * 16 / 32 = 1.5), one add per element (48).
    close(bn.params, 1.5);
    close(bn.adds, 48.0);
    close(bn.mults, 0.0);
    // fold-bias, conv with bias: the bias counts once, at the conv.
    let r = run(conv_bn(true), &ScoreOptions::default());
    close(layer(&r, "bn").params + layer(&r, "bn").adds, 0.0);
    // unfolded: C params, 1 mult (at 16) + 1 add per element: 1.5 params, 24 mults, 48 adds.
    let opts = ScoreOptions {
        bn: BnMode::Unfolded,
        ..Default::default()
    };
    let r = run(conv_bn(false), &opts);
    let bn = layer(&r, "bn");
    close(bn.params, 1.5);
    close(bn.mults, 24.0);
    close(bn.adds, 48.0);
    // scale-bias-fp16: (2C + 1) 16-bit params = 7 * 0.5 = 3.5; mult and add at 16 bits: 24 + 24.
    let opts = ScoreOptions {
        bn: BnMode::ScaleBiasFp16,
        ..Default::default()
    };
    let bn = layer(&run(conv_bn(false), &opts), "bn").clone();
    close(bn.params, 3.5);
    close(bn.mults + bn.adds, 48.0);
    // fold-mul-only counts the shift even with a conv bias: 1.5 params, 48 adds.
    let opts = ScoreOptions {
        bn: BnMode::FoldMulOnly,
        ..Default::default()
    };
    let bn = layer(&run(conv_bn(true), &opts), "bn").clone();
    close(bn.params, 1.5);
    close(bn.adds, 48.0);
}

/// x[1,3,4,4] -> op chain -> y, for activation-only graphs.
fn chain(
    nodes: Vec<onnx_micronet::onnx::NodeProto>,
    out: &str,
    out_dims: &[i64],
    inits: Vec<TensorProto>,
) -> ModelProto {
    model(
        GraphProto {
            name: Some("chain".into()),
            node: nodes,
            initializer: inits,
            input: vec![value_info("x", &[1, 3, 4, 4])],
            output: vec![value_info(out, out_dims)],
            ..Default::default()
        },
        13,
    )
}

#[test]
fn swish_global_pool_and_residual() {
    // s = Sigmoid(x); m = x * s (swish); p = GlobalAveragePool(m); a = m + x.
    let m = chain(
        vec![
            node("Sigmoid", "sig", &["x"], &["s"]),
            node("Mul", "mul", &["x", "s"], &["m"]),
            node("Add", "add", &["m", "x"], &["a"]),
            node("GlobalAveragePool", "gap", &["a"], &["y"]),
        ],
        "y",
        &[1, 3, 1, 1],
        vec![],
    );
    let r = run(m, &no_freebie());
    // swish over 48 elements: sigmoid (2, 1) + mul (1, 0) = REF's swish (3, 1): 144 mults, 48 adds.
    close(
        layer(&r, "sig").raw_mults + layer(&r, "mul").raw_mults,
        144.0,
    );
    close(layer(&r, "sig").raw_adds + layer(&r, "mul").raw_adds, 48.0);
    // residual add: 48 adds.
    close(layer(&r, "add").raw_adds, 48.0);
    // global average: C = 3 mults, (HW - 1) C = 15 * 3 = 45 adds.
    close(layer(&r, "gap").raw_mults, 3.0);
    close(layer(&r, "gap").raw_adds, 45.0);
    close(r.totals.ops, 144.0 + 48.0 + 48.0 + 3.0 + 45.0);
}

#[test]
fn pooling_and_fully_connected() {
    // MaxPool 2x2 stride 2 -> [1,3,2,2] -> Flatten -> [1,12] -> Gemm(w[5,12], transB) -> [1,5].
    let mut mp = node("MaxPool", "mp", &["x"], &["p"]);
    mp.attribute.push(attr_ints("kernel_shape", &[2, 2]));
    mp.attribute.push(attr_ints("strides", &[2, 2]));
    let mut gemm = node("Gemm", "fc", &["f", "w", "b"], &["y"]);
    gemm.attribute.push(attr_int("transB", 1));
    // w: 60 values, the first 12 (unit 0) all zero -> unit 0 has 0 nonzeros, the others 12.
    let w: Vec<f32> = (0..60).map(|i| if i < 12 { 0.0 } else { 1.0 }).collect();
    let m = chain(
        vec![mp, node("Flatten", "flat", &["p"], &["f"]), gemm],
        "y",
        &[1, 5],
        vec![
            tensor_f32("w", &[5, 12], &w),
            tensor_f32("b", &[5], &[0.0; 5]),
        ],
    );
    let r = run(m, &no_freebie());
    // max pool: (4 - 1) comparisons x 12 outputs = 36, counted as multiplies.
    close(layer(&r, "mp").raw_mults, 36.0);
    // Flatten is free.
    assert!(r.layers.iter().all(|l| l.name != "flat"));
    let fc = layer(&r, "fc");
    // mults: 4 units x 12 = 48; adds: 4 x 11 (+ 0 for the dead unit) + 5 bias = 49.
    close(fc.raw_mults, 48.0);
    close(fc.raw_adds, 49.0);
    // storage: 48 x 32 + 60 mask bits + bias 5 x 32 = 1536 + 60 + 160 = 1756 bits -> 54.875.
    close(fc.params, 54.875);
}

#[test]
fn unknown_ops_are_listed_and_strict_refuses() {
    let m = chain(
        vec![node("Cos", "cos", &["x"], &["y"])],
        "y",
        &[1, 3, 4, 4],
        vec![],
    );
    let r = run(m.clone(), &ScoreOptions::default());
    assert_eq!(r.uncounted.len(), 1);
    assert_eq!(
        (
            r.uncounted[0].op_type.as_str(),
            r.uncounted[0].output_elements
        ),
        ("Cos", 48)
    );
    let model = Model {
        proto: m,
        path: None,
        external_files: vec![],
    };
    let strict = ScoreOptions {
        strict: true,
        ..Default::default()
    };
    let err = score::score(&model, &strict).unwrap_err().to_string();
    assert!(err.contains("'cos' (Cos)"), "{err}");
}

#[test]
fn cli_json_has_the_documented_fields() {
    let f = fixture("mnist_ccexam.onnx");
    let o = cli(&["score", f.to_str().unwrap(), "--json", "-"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for k in [
        "track",
        "baseline",
        "totals",
        "score",
        "score_params",
        "score_ops",
        "options",
        "layers",
        "uncounted",
    ] {
        assert!(j.get(k).is_some(), "missing {k}");
    }
    for k in ["params", "mults", "adds", "ops", "raw_mults", "raw_adds"] {
        assert!(j["totals"].get(k).is_some(), "missing totals.{k}");
    }
    let l = &j["layers"][0];
    for k in [
        "name",
        "op_type",
        "output_shape",
        "params",
        "mults",
        "adds",
        "raw_mults",
        "raw_adds",
        "sparsity",
        "weight_bits",
        "act_bits",
    ] {
        assert!(l.get(k).is_some(), "missing layers[].{k}");
    }
    // The first conv of ccexam's MNIST net: w 32x1x3x3, pad 1, 28x28 -> 28x28:
    // raw mults 9 * 32 * 784 = 225,792.
    assert_eq!(
        j["layers"][0]["weight_shape"],
        serde_json::json!([32, 1, 3, 3])
    );
    assert_eq!(j["layers"][0]["raw_mults"], 225792.0);
}

#[test]
fn same_network_scores_the_same_exported_both_ways() {
    // TorchScript and dynamo exports of ccexam's MNIST net.
    let a = onnx_micronet::load(&fixture("mnist_ccexam.onnx")).unwrap();
    let b = onnx_micronet::load(&fixture("mnist_ccexam_dynamo/model.onnx")).unwrap();
    let ra = score::score(&a, &ScoreOptions::default()).unwrap();
    let rb = score::score(&b, &ScoreOptions::default()).unwrap();
    assert_eq!(ra.totals, rb.totals);
    assert_eq!(ra.score, rb.score);
}

#[test]
fn bad_score_options_exit_2() {
    let f = fixture("mnist_ccexam.onnx");
    let f = f.to_str().unwrap();
    // clap's own messages: exit 2, naming the option and the bad value.
    for (args, needle) in [
        (vec!["--track", "mars"], "'mars' for '--track"),
        (
            vec!["--sparse-storage", "threshold:2"],
            "threshold:T with T in [0, 1]",
        ),
        (vec!["--act-cost", "Relu=1"], "expected OP=MULTS,ADDS"),
        (vec!["--elementwise-add-bits", "8"], "32 or 16"),
        (vec!["--input-shape", "1,1,x,28"], "comma-separated dims"),
    ] {
        let o = cli(&[&["score", f][..], &args[..]].concat());
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // A symbolic non-batch dim without --input-shape names the input.
    let d = tempfile::tempdir_in(root().join("target")).unwrap();
    let mut m = tiny_conv();
    m.graph.as_mut().unwrap().input[0] = value_info("x", &[1, 2, 4, 4]);
    if let Some(onnx_micronet::onnx::proto::type_proto::Value::TensorType(t)) =
        m.graph.as_mut().unwrap().input[0]
            .r#type
            .as_mut()
            .unwrap()
            .value
            .as_mut()
    {
        t.shape.as_mut().unwrap().dim[2].value = Some(
            onnx_micronet::onnx::proto::tensor_shape_proto::dimension::Value::DimParam("H".into()),
        );
    }
    let p = d.path().join("sym.onnx");
    write_model(&p, &m);
    let err = cli_fails(&["score", p.to_str().unwrap()]);
    assert!(
        err.contains("input 'x' has a symbolic dimension at axis 2"),
        "{err}"
    );
    let o = cli(&["score", p.to_str().unwrap(), "--input-shape", "1,2,4,4"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn fake_quant_chain_counts_its_bits() {
    // x -> Mul(1/0.05) -> Round -> Clip(-8, 7) -> Mul(0.05) -> conv: 16 levels = 4-bit activations.
    let mut m = dq_conv(false);
    let g = m.graph.as_mut().unwrap();
    g.initializer.push(tensor_f32("inv_s", &[], &[20.0]));
    g.initializer.push(tensor_f32("lo", &[], &[-8.0]));
    g.initializer.push(tensor_f32("hi", &[], &[7.0]));
    g.initializer.push(tensor_f32("s", &[], &[0.05]));
    let chain = vec![
        node("Mul", "fq_scale", &["x", "inv_s"], &["x1"]),
        node("Round", "fq_round", &["x1"], &["x2"]),
        node("Clip", "fq_clip", &["x2", "lo", "hi"], &["x3"]),
        node("Mul", "fq_back", &["x3", "s"], &["x4"]),
    ];
    let conv = g.node.iter_mut().find(|n| n.name() == "conv").unwrap();
    conv.input[0] = "x4".into();
    let mut nodes = chain;
    nodes.append(&mut g.node);
    g.node = nodes;
    let r = run(m, &ScoreOptions::default());
    let c = layer(&r, "conv");
    assert_eq!((c.weight_bits, c.act_bits), (Some(8), 4));
    // mults at max(8, 4) = 8 bits: 784 / 4 = 196. The chain's four nodes are conversions: free.
    close(c.mults, 196.0);
    assert!(
        r.layers.iter().all(|l| !l.name.starts_with("fq_")),
        "{:?}",
        r.layers
    );
}

#[test]
fn ref_output_size_reproduces_the_even_kernel_quirk() {
    // Conv k=2, stride 2, pads [0,0,1,1] on 4x4: ONNX gives 2x2 = 4 positions;
    // REF's 'same' formula gives ceil((4 - 2 + 1 + 2*1) / 2) = 3 per axis -> 9.
    let w: Vec<f32> = vec![1.0; 2 * 2 * 2 * 2];
    let mut conv = node("Conv", "conv", &["x", "w"], &["y"]);
    conv.attribute.push(attr_ints("strides", &[2, 2]));
    conv.attribute.push(attr_ints("pads", &[0, 0, 1, 1]));
    let m = model(
        GraphProto {
            name: Some("even".into()),
            node: vec![conv],
            initializer: vec![tensor_f32("w", &[2, 2, 2, 2], &w)],
            input: vec![value_info("x", &[1, 2, 4, 4])],
            output: vec![value_info("y", &[1, 2, 2, 2])],
            ..Default::default()
        },
        13,
    );
    // graph: 8 weights per channel x 4 positions x 2 channels = 64 mults.
    close(
        layer(&run(m.clone(), &no_freebie()), "conv").raw_mults,
        64.0,
    );
    let opts = ScoreOptions {
        output_size: score::OutputSize::Ref,
        ..no_freebie()
    };
    // ref: 8 x 9 x 2 = 144.
    close(layer(&run(m, &opts), "conv").raw_mults, 144.0);
}

#[test]
fn track_is_inferred_from_the_input_size_unless_given() {
    let d = tempfile::tempdir().unwrap();
    let track_of = |args: &[&str]| {
        let o = cli(args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        (
            j["track"].as_str().unwrap().to_string(),
            j["options"]["track_inferred"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        )
    };
    // MNIST, 28 px: the 32 x 32 track.
    let f = fixture("mnist_ccexam.onnx");
    let (t, why) = track_of(&["score", f.to_str().unwrap(), "--json", "-"]);
    assert_eq!(t, "cifar100");
    assert_eq!(why, "input 28 px high");
    // The same 3x3 conv at 224 x 224: ImageNet (baseline 6.9M params).
    let mut m = tiny_conv();
    let input = &mut m.graph.as_mut().unwrap().input[0];
    *input = value_info("x", &[1, 2, 224, 224]);
    let out = &mut m.graph.as_mut().unwrap().output[0];
    *out = value_info("y", &[1, 3, 224, 224]);
    let p = d.path().join("big.onnx");
    write_model(&p, &m);
    let (t, why) = track_of(&["score", p.to_str().unwrap(), "--json", "-"]);
    assert_eq!(t, "imagenet");
    assert_eq!(why, "input 224 px high");
    // Given, it wins and nothing is inferred.
    let (t, why) = track_of(&[
        "score",
        p.to_str().unwrap(),
        "--track",
        "cifar100",
        "--json",
        "-",
    ]);
    assert_eq!(t, "cifar100");
    assert_eq!(why, "");
    // The text report says it too.
    let o = cli(&["score", p.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("inferred from the model: input 224 px high; --track to choose"),
        "{text}"
    );
}
