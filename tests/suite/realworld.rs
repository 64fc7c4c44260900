//! Real-world export patterns (fixtures/realworld/, made by
//! fixtures/scripts/make_realworld.py, the smallest model of each pattern) and the
//! kinds of fault they stand for: every case runs through the CLI as a user would,
//! and the written model is compared with the original in tract and onnxruntime on
//! the fixture's stored input, or the refusal and its reason are checked.

use std::path::{Path, PathBuf};

use crate::common::*;
use ndarray::{ArrayD, IxDyn};
use onnx_micronet::onnx::Model;

fn rw(name: &str) -> PathBuf {
    fixture(&format!("realworld/{name}.onnx"))
}

/// The fixture's stored test input (fixtures/realworld/inputs.npz, key = stem).
fn input(py: &Path, stem: &str) -> ArrayD<f32> {
    let out = run_python(
        py,
        "import sys, numpy as np\n\
a = np.load(sys.argv[1])[sys.argv[2]].astype(np.float32)\n\
print(','.join(str(d) for d in a.shape)); print(','.join(repr(float(v)) for v in a.ravel()))",
        &[fixture("realworld/inputs.npz").to_str().unwrap(), stem],
    );
    let mut lines = out.lines();
    let shape: Vec<usize> = lines
        .next()
        .unwrap()
        .split(',')
        .map(|d| d.parse().unwrap())
        .collect();
    let v: Vec<f32> = lines
        .next()
        .unwrap()
        .split(',')
        .map(|x| x.parse().unwrap())
        .collect();
    ArrayD::from_shape_vec(IxDyn(&shape), v).unwrap()
}

/// Runs `optimize` with `flags` on a realworld fixture; returns (written model,
/// report JSON) on success.
fn optimize(name: &str, flags: &[&str]) -> (Model, serde_json::Value, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let report = dir.path().join("r.json");
    let mut args = vec![
        "optimize",
        rw(name).to_str().unwrap().to_string().leak(),
        "-o",
        out.to_str().unwrap().to_string().leak(),
        "--report",
        report.to_str().unwrap().to_string().leak(),
    ];
    args.extend_from_slice(flags);
    let o = cli(&args);
    assert!(
        o.status.success(),
        "{name} {flags:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let m = onnx_micronet::load(&out).unwrap();
    let r = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    (m, r, dir)
}

/// Every (target, reason) the passes left alone.
fn skipped(r: &serde_json::Value) -> Vec<(String, String)> {
    r["passes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["skipped"].as_array().unwrap().clone())
        .map(|i| {
            (
                i["target"].as_str().unwrap().to_string(),
                i["what"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn changed(r: &serde_json::Value) -> Vec<(String, String)> {
    r["passes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["changed"].as_array().unwrap().clone())
        .map(|i| {
            (
                i["target"].as_str().unwrap().to_string(),
                i["what"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn reason_for(items: &[(String, String)], target: &str) -> String {
    items
        .iter()
        .find(|(t, _)| t == target)
        .map(|(_, w)| w.clone())
        .unwrap_or_else(|| panic!("no item for '{target}' in {items:?}"))
}

/// max |a - b| / max |a| over every output.
fn rel_diff(a: &[ArrayD<f32>], b: &[ArrayD<f32>]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0f64;
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.shape(), y.shape());
        let scale = x.iter().fold(0f64, |m, v| m.max(v.abs() as f64)).max(1e-30);
        let d = x
            .iter()
            .zip(y)
            .fold(0f64, |m, (p, q)| m.max((p - q).abs() as f64));
        worst = worst.max(d / scale);
    }
    worst
}

/// The written model computes what the original does, in tract and in onnxruntime
/// (optimizations off and the default session), within `tol` relative.
fn same_outputs(name: &str, written: &Model, tol: f64) {
    let Some(py) = venv_python() else { return };
    let x = input(&py, name);
    let original = onnx_micronet::load(&rw(name)).unwrap();
    let a = onnx_micronet::engine::run_tensor(&original, x.clone()).unwrap();
    let b = onnx_micronet::engine::run_tensor(written, x).unwrap();
    let d = rel_diff(&a, &b);
    assert!(
        d <= tol,
        "{name}: tract: written vs original off by {d:.2e}"
    );
    // onnxruntime, both sessions, written vs original.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.onnx");
    onnx_micronet::onnx::save(written, &p, &Default::default()).unwrap();
    let code = r#"import sys, numpy as np, onnxruntime as ort
x = np.load(sys.argv[3])[sys.argv[4]].astype(np.float32)
worst = 0.0
for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    outs = []
    for m in sys.argv[1:3]:
        o = ort.SessionOptions(); o.graph_optimization_level = level; o.log_severity_level = 3
        s = ort.InferenceSession(m, o, providers=['CPUExecutionProvider'])
        outs.append(s.run(None, {s.get_inputs()[0].name: x}))
    for a, b in zip(*outs):
        worst = max(worst, float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30)))
print(worst)"#;
    let out = run_python(
        &py,
        code,
        &[
            rw(name).to_str().unwrap(),
            p.to_str().unwrap(),
            fixture("realworld/inputs.npz").to_str().unwrap(),
            name,
        ],
    );
    let d: f64 = out.trim().parse().unwrap();
    assert!(
        d <= tol,
        "{name}: onnxruntime: written vs original off by {d:.2e}"
    );
}

fn count(m: &Model, op: &str) -> usize {
    m.graph().node.iter().filter(|n| n.op_type() == op).count()
}

// ---------------------------------------------------------------------------
// 1. a channel axis assumed, not checked

#[test]
fn kind1_bn_over_a_matmul_sequence_axis_is_left_with_its_reason() {
    // x [1, L=4, K=3] x B [3, C=4], BN over axis 1 (L): folding into B's columns is
    // 173% off (the fixture script measures it); it must stay.
    let (m, r, _d) = optimize("k1_matmul3d_bn", &[]);
    assert_eq!(count(&m, "BatchNormalization"), 1);
    let why = reason_for(&skipped(&r), "bn_0");
    assert!(
        why.contains("normalizes axis 1 of the rank-3 output [1, 4, 4] of MatMul 'matmul_0'"),
        "{why}"
    );
    same_outputs("k1_matmul3d_bn", &m, 1e-6);
    // The rank-2 case folds (B' = B diag(f), then an Add of the shift).
    let (m, _, _d) = optimize("k1_matmul2d_bn", &[]);
    assert_eq!(count(&m, "BatchNormalization"), 0);
    same_outputs("k1_matmul2d_bn", &m, 1e-5);
}

/// The score's count of the one BatchNormalization of a fixture.
fn bn_count(name: &str) -> onnx_micronet::score::Layer {
    let m = onnx_micronet::load(&rw(name)).unwrap();
    let r = onnx_micronet::score::score(&m, &Default::default()).unwrap();
    r.layers
        .into_iter()
        .find(|l| l.op_type == "BatchNormalization")
        .unwrap()
}

#[test]
fn the_score_merges_a_bn_only_where_the_fold_would() {
    // The same assumption in `score`: a BN counts as merged into its layer only when
    // the fold pass would merge it. Unquantized, so the 16-bit freebie: 0.5 units
    // per parameter and per multiply, adds at 32 bits.
    // k1_matmul3d_bn: BN over L = 4 of a [1, 4, 4] MatMul output (16 elements) stays
    // a scale + shift: params 2 x 4 x 0.5 = 4, mults 16 x 0.5 = 8, adds 16.
    let l = bn_count("k1_matmul3d_bn");
    assert_eq!((l.params, l.mults, l.adds), (4.0, 8.0, 16.0), "{}", l.note);
    assert!(
        l.note
            .contains("normalizes axis 1 of a rank-3 MatMul output, not its feature axis"),
        "{}",
        l.note
    );
    // k1_matmul2d_bn: merged into the MatMul (no bias) as a bias of C = 4 features
    // on its [2, 4] output (8 elements): params 4 x 0.5 = 2, no multiplies, adds 8.
    let l = bn_count("k1_matmul2d_bn");
    assert_eq!((l.params, l.mults, l.adds), (2.0, 0.0, 8.0), "{}", l.note);
    // k5_overridable_bn: statistics a caller may replace: scale + shift over
    // [1, 3, 4, 4] = 48 elements: params 2 x 3 x 0.5 = 3, mults 24, adds 48.
    let l = bn_count("k5_overridable_bn");
    assert_eq!((l.params, l.mults, l.adds), (3.0, 24.0, 48.0), "{}", l.note);
    assert!(
        l.note
            .contains("is an initializer also listed as a graph input"),
        "{}",
        l.note
    );
}

// 2. broadcasting read wrong

#[test]
fn kind2_constants_that_broadcast_over_the_width_are_not_per_channel() {
    // Conv -> Mul([4]) -> Add([4]) on [1, 4, 4, 4]: the [4] constants vary along the
    // width (right-aligned: [1, 1, 1, 4]), not the channels.
    let (m, r, _d) = optimize("k2_conv_mul_add_c", &[]);
    assert_eq!((count(&m, "Mul"), count(&m, "Add")), (1, 1));
    let why = reason_for(&skipped(&r), "mul_0");
    assert!(
        why.contains("a constant of shape [4] broadcasts along the right-aligned axes of the rank-4 output, not along its channels"),
        "{why}"
    );
    same_outputs("k2_conv_mul_add_c", &m, 1e-6);
    // [4, 1, 1] is per channel: folded.
    let (m, _, _d) = optimize("k2_conv_mul_add_c11", &[]);
    assert_eq!((count(&m, "Mul"), count(&m, "Add")), (0, 0));
    same_outputs("k2_conv_mul_add_c11", &m, 1e-5);
}

// 3. IR-version invariants

#[test]
fn kind3_ir3_models_keep_every_initializer_listed_as_an_input() {
    let Some(py) = venv_python() else { return };
    let check = r#"import sys, onnx
m = onnx.load(sys.argv[1])
onnx.checker.check_model(m, full_check=True)
inits = {t.name for t in m.graph.initializer}
inputs = {i.name for i in m.graph.input}
print(m.ir_version, len(inits), len(inits - inputs), len(inputs - inits))"#;
    for flags in [
        &[][..],
        &["--quantize", "linear:8"][..],
        &[
            "--prune",
            "magnitude:0.5",
            "--quantize",
            "minmax:4",
            "--per-channel",
        ][..],
    ] {
        let (m, _, d) = optimize("k3_ir3_conv_bn", flags);
        let p = d.path().join("out.onnx");
        let out = run_python(&py, check, &[p.to_str().unwrap()]);
        // IR 3; every initializer listed; exactly one real input (x) besides them.
        let f: Vec<usize> = out.split_whitespace().map(|v| v.parse().unwrap()).collect();
        assert_eq!((f[0], f[2], f[3]), (3, 0, 1), "{flags:?}: {out}");
        if flags.is_empty() {
            assert_eq!(count(&m, "BatchNormalization"), 0);
            same_outputs("k3_ir3_conv_bn", &m, 1e-5);
        }
    }
}

// 4. uses that hide in subgraphs

#[test]
fn kind4_a_value_read_inside_a_subgraph_is_a_use() {
    let (m, r, _d) = optimize("k4_subgraph_use", &[]);
    assert_eq!(count(&m, "BatchNormalization"), 1);
    let why = reason_for(&skipped(&r), "bn_0");
    assert!(
        why.contains("(2 uses): 'bn_0' (BatchNormalization), 'if_0' (If, inside its subgraph)"),
        "{why}"
    );
    same_outputs("k4_subgraph_use", &m, 1e-6);
}

// 5. overridable initializers treated as constants

#[test]
fn kind5_initializers_listed_as_inputs_are_not_constants() {
    let (m, r, _d) = optimize("k5_overridable_bn", &[]);
    assert_eq!(count(&m, "BatchNormalization"), 1);
    let why = reason_for(&skipped(&r), "bn_0");
    assert!(
        why.contains("'bn_mean' is an initializer also listed as a graph input"),
        "{why}"
    );
    // Every graph input the original had is still there.
    let original = onnx_micronet::load(&rw("k5_overridable_bn")).unwrap();
    assert_eq!(m.graph().input.len(), original.graph().input.len());
    same_outputs("k5_overridable_bn", &m, 1e-6);
    // The quantizer and the packer leave an overridable weight alone, the same way.
    let (m, r, _d) = optimize("k5_overridable_weight", &["--quantize", "linear:8"]);
    let s = skipped(&r);
    assert!(
        s.iter()
            .any(|(_, w)| w.contains("is an initializer also listed as a graph input")),
        "{s:?}"
    );
    let w = m
        .graph()
        .initializer
        .iter()
        .find(|t| t.name() == "W")
        .unwrap();
    assert!(w.metadata_props.is_empty(), "the weight was not rewritten");
    same_outputs("k5_overridable_weight", &m, 0.0);
}

#[test]
fn kind5_kind7_an_overridable_mul_add_constant_is_left_with_its_reason() {
    // x [1,2,4,4] -> Conv(w, b) -> Mul(m [3,1,1]) -> Add(a [3,1,1]) -> y, with 'm'
    // also a graph input (IR 8: a default a caller may replace): the Mul/Add form
    // stays, and the report says why (before: skipped without a word).
    let mut m = tiny_conv();
    let g = m.graph.as_mut().unwrap();
    g.node.truncate(1);
    g.node.push(node("Mul", "mul_0", &["c", "m"], &["cm"]));
    g.node.push(node("Add", "add_0", &["cm", "a"], &["y"]));
    g.initializer
        .push(tensor_f32("m", &[3, 1, 1], &[2.0, 0.5, -1.0]));
    g.initializer
        .push(tensor_f32("a", &[3, 1, 1], &[0.1, 0.2, 0.3]));
    g.input.push(value_info("m", &[3, 1, 1]));
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("m.onnx");
    write_model(&src, &m);
    let r = optimize_report(dir.path(), "o", &src, &[]);
    let why = reason_for(&skipped(&r), "mul_0");
    assert!(
        why.contains("Mul 'mul_0' + Add 'add_0' after Conv 'conv' left: 'm' is an initializer also listed as a graph input"),
        "{why}"
    );
    let w = onnx_micronet::load(&dir.path().join("o.onnx")).unwrap();
    assert_eq!((count(&w, "Mul"), count(&w, "Add")), (1, 1));
}

// 6. decisions taken before the graph is normalized

#[test]
fn kind6_a_bn_behind_identity_and_dropout_folds_in_one_run() {
    let (m, _, _d) = optimize("k6_passthrough_bn", &[]);
    assert_eq!(
        (
            count(&m, "BatchNormalization"),
            count(&m, "Identity"),
            count(&m, "Dropout")
        ),
        (0, 0, 0)
    );
    same_outputs("k6_passthrough_bn", &m, 1e-5);
}

// 7. reasons that name the wrong cause

#[test]
fn kind7_each_fold_reason_names_its_real_cause() {
    let (_, r, _d) = optimize("k7_bn_after_relu", &[]);
    assert_eq!(
        reason_for(&skipped(&r), "bn_0"),
        "follows Relu 'relu_0', not a Conv, ConvTranspose, Gemm or MatMul"
    );
    // The reason of each refusal, on the model made for it (the table of kinds 1, 2,
    // 4, 5 and 8 above and below checks the others).
    let (_, r, _d) = optimize("k8_dropout_opset6_training", &[]);
    assert!(reason_for(&skipped(&r), "dropout_0").starts_with(
        "opset 6 Dropout with is_test = 0 (that version's default) drops activations"
    ));
}

// 8. old operator versions with other meanings

#[test]
fn kind8_operator_versions_decide_what_a_node_means() {
    // opset 6, is_test = 1: inference mode, folded (onnxruntime has no BN-6 kernel:
    // compared in tract only).
    let (m, _, _d) = optimize("k8_bn_opset6_test", &[]);
    assert_eq!(count(&m, "BatchNormalization"), 0);
    let original = onnx_micronet::load(&rw("k8_bn_opset6_test")).unwrap();
    let x = ArrayD::from_elem(IxDyn(&[1, 2, 4, 4]), 0.25f32);
    let a = onnx_micronet::engine::run_tensor(&original, x.clone()).unwrap();
    let b = onnx_micronet::engine::run_tensor(&m, x).unwrap();
    assert!(rel_diff(&a, &b) < 1e-5);
    // Training mode, both spellings: refused before any work, saying what to do.
    for name in ["k8_bn_opset6_training", "k8_bn_training_mode"] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("o.onnx");
        let err = cli_fails(&[
            "optimize",
            rw(name).to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]);
        assert!(
            err.contains("node 'bn_0' (BatchNormalization) runs in training mode")
                && err.contains("export the model in eval mode"),
            "{name}: {err}"
        );
        assert!(!out.exists());
        let err = cli_fails(&["score", rw(name).to_str().unwrap()]);
        assert!(err.contains("runs in training mode"), "{err}");
    }
}

// 9. shared constants rewritten in place

#[test]
fn kind9_a_shared_bias_is_quantized_as_a_private_copy() {
    // B is the Conv's bias and the constant of a later Add (y2 = GAP(c) + B).
    let (m, r, _d) = optimize(
        "k9_shared_bias",
        &[
            "--quantize",
            "linear:8",
            "--bias-bits",
            "8",
            "--storage",
            "float",
        ],
    );
    let c = changed(&r);
    assert!(
        c.iter()
            .any(|(_, w)| w.contains("also read by") && w.contains("a private copy")),
        "{c:?}"
    );
    // The Add still reads B, bit for bit the original's and without a claim; the
    // Conv reads its private quantized copy.
    let original = onnx_micronet::load(&rw("k9_shared_bias")).unwrap();
    let b_of = |m: &Model| {
        let t = m
            .graph()
            .initializer
            .iter()
            .find(|t| t.name() == "B")
            .unwrap()
            .clone();
        (
            onnx_micronet::onnx::TensorData::from_proto(&t).unwrap(),
            t.metadata_props.len(),
        )
    };
    assert_eq!(b_of(&m), b_of(&original));
    let add = m
        .graph()
        .node
        .iter()
        .find(|n| n.op_type() == "Add")
        .unwrap();
    assert!(add.input.contains(&"B".to_string()));
    let conv = m
        .graph()
        .node
        .iter()
        .find(|n| n.op_type() == "Conv")
        .unwrap();
    assert_eq!(conv.input[2], "B_q");
    same_outputs("k9_shared_bias", &m, 0.05);
    // The fold with a shared bias writes a new bias and leaves B for the Add.
    let (m, _, _d) = optimize("k9_shared_bias_bn", &[]);
    assert_eq!(count(&m, "BatchNormalization"), 0);
    same_outputs("k9_shared_bias_bn", &m, 1e-5);
}

// 10. grid arithmetic at the edges of float32

#[test]
fn kind10_tiny_channels_and_wide_codes_give_valid_grids() {
    // A channel of magnitude ~1e-39 (subnormal) under per-channel minmax: its scale
    // is clamped to the smallest normal f32, its values quantize to zeros.
    let (m, _, _d) = optimize(
        "k10_tiny_channel",
        &[
            "--quantize",
            "minmax:8",
            "--per-channel",
            "--storage",
            "float",
        ],
    );
    same_outputs("k10_tiny_channel", &m, 0.02);
    // Every width the quantizer accepts writes a claim its own check accepts, on the
    // real MNIST weights (linear 17-24 and minmax 15-16 failed before).
    let mnist = onnx_micronet::load(&fixture("mnist_ccexam.onnx")).unwrap();
    let t = mnist
        .graph()
        .initializer
        .iter()
        .find(|t| t.name() == "features.3.weight")
        .unwrap();
    let w = onnx_micronet::onnx::TensorData::from_proto(t)
        .unwrap()
        .to_f32();
    use onnx_micronet::passes::quantize::{quantize_tensor, QuantConfig, Scheme};
    for scheme in [Scheme::Linear, Scheme::MinMax, Scheme::Log, Scheme::Tanh] {
        for bits in scheme.bit_range() {
            for per_channel in [false, true] {
                if per_channel && !scheme.imp().per_channel() {
                    continue;
                }
                let cfg = QuantConfig {
                    per_channel,
                    ..Default::default()
                };
                let q = quantize_tensor(&w, scheme, bits, &cfg, Some(0), 288);
                let mut t = onnx_micronet::onnx::TensorData::F32(q.values.clone()).to_proto("w");
                onnx_micronet::repr::claim::write(&mut t, &q.meta);
                onnx_micronet::repr::claim::verify(&t, &q.values).unwrap_or_else(|e| {
                    panic!("{scheme} {bits} bits (per channel {per_channel}): {e}")
                });
            }
        }
    }
    // And from the CLI: linear:20 on MNIST exits 0.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.onnx");
    let o = cli(&[
        "optimize",
        fixture("mnist_ccexam.onnx").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--quantize",
        "linear:20",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

// 11. a model that means something else in another runtime

#[test]
fn kind11_quantized_weights_are_written_in_the_form_runtimes_keep() {
    // k11: a float weight on a per-channel 4-bit grid between Q/DQ activations, as
    // the tool wrote it before: onnxruntime's default session re-quantizes it (the
    // fixture script measures the difference). Quantized and packed now, the weight
    // is codes -> DequantizeLinear and the bias int32 -> DequantizeLinear: both
    // sessions of onnxruntime and tract give the same outputs, bit for bit.
    let Some(py) = venv_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.onnx");
    let o = cli(&[
        "optimize",
        fixture("mobilenetv2_cifar_bn.onnx").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--quantize",
        "linear:8",
        "--per-channel",
        "--act-bits",
        "8",
        "--calib",
        fixture("data/foolbox/cifar100").to_str().unwrap(),
        "--calib-samples",
        "8",
        "--preprocess",
        "cifar",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = onnx_micronet::load(&out).unwrap();
    // Every Conv/Gemm weight and bias comes from a DequantizeLinear.
    let g = onnx_micronet::graph::Graph::new(m.graph()).unwrap();
    for &i in g.topo_order() {
        let n = g.node(i);
        if matches!(n.op_type(), "Conv" | "Gemm") {
            for v in n.input.iter().skip(1) {
                let p = g.producer(v).map(|(p, _)| g.node(p).op_type());
                assert_eq!(
                    p,
                    Some("DequantizeLinear"),
                    "{}: input '{v}'",
                    g.node_name(i)
                );
            }
        }
    }
    let code = r#"import sys, numpy as np, onnxruntime as ort
x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
ys = []
for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    o = ort.SessionOptions(); o.graph_optimization_level = level; o.log_severity_level = 3
    s = ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider'])
    ys.append(np.concatenate([s.run(None, {s.get_inputs()[0].name: x[i:i+1]})[0] for i in range(4)]))
print(float(np.abs(ys[0] - ys[1]).max()))"#;
    let d: f64 = run_python(&py, code, &[out.to_str().unwrap()])
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        d, 0.0,
        "onnxruntime's default session differs from the graph as written"
    );
    // fp16 weights cannot be DequantizeLinear outputs: their layers' inputs get the
    // fake-quant chain (which onnxruntime runs as written), said in the report.
    let (m, r, _d) = optimize_fixture(
        "mobilenetv2_cifar_bn.onnx",
        &[
            "--quantize",
            "fp16",
            "--act-bits",
            "8",
            "--calib",
            fixture("data/foolbox/cifar100").to_str().unwrap(),
            "--calib-samples",
            "4",
            "--preprocess",
            "cifar",
        ],
    );
    assert_eq!(count(&m, "QuantizeLinear"), 0);
    assert!(count(&m, "Round") > 0);
    let c = changed(&r);
    assert!(
        c.iter()
            .any(|(_, w)| w.contains("not Q/DQ: onnxruntime would re-quantize")),
        "{c:?}"
    );
}

fn optimize_fixture(name: &str, flags: &[&str]) -> (Model, serde_json::Value, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let report = dir.path().join("r.json");
    let mut args = vec![
        "optimize",
        fixture(name).to_str().unwrap().to_string().leak(),
        "-o",
        out.to_str().unwrap().to_string().leak(),
        "--report",
        report.to_str().unwrap().to_string().leak(),
    ];
    args.extend_from_slice(flags);
    let o = cli(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = onnx_micronet::load(&out).unwrap();
    let r = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    (m, r, dir)
}

// 12. input heuristics that silently produce wrong data

#[test]
fn kind12_bad_labels_normalized_data_and_unanswerable_gates_are_said() {
    let dir = tempfile::tempdir().unwrap();
    // A phone photo's name reads as <set>_<idx>_<label>: label 153012 of 1000 classes.
    let photos = dir.path().join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    let src = std::fs::read_dir(fixture("data/foolbox/imagenet"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::copy(&src, photos.join("IMG_20240101_153012.jpg")).unwrap();
    let err = cli_fails(&[
        "validate",
        fixture("efficientnet_style_bn.onnx").to_str().unwrap(),
        "--data",
        photos.to_str().unwrap(),
    ]);
    assert!(
        err.contains("image 'IMG_20240101_153012.jpg' has label 153012")
            && err.contains("classes (0..")
            && err.contains("labels from the file names"),
        "{err}"
    );
    // A gate that unlabelled data cannot answer fails before any work, nothing written.
    let unlabelled = dir.path().join("unlabelled");
    std::fs::create_dir_all(&unlabelled).unwrap();
    std::fs::copy(&src, unlabelled.join("photo.jpg")).unwrap();
    let out = dir.path().join("o.onnx");
    let err = cli_fails(&[
        "optimize",
        fixture("efficientnet_style_bn.onnx").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--data",
        unlabelled.to_str().unwrap(),
        "--min-accuracy",
        "0.5",
    ]);
    assert!(
        err.contains("--min-accuracy and --max-drop need labelled --data")
            && err.contains("use --min-agreement"),
        "{err}"
    );
    assert!(!out.exists());
    // --min-agreement works on the same data (the fold changes nothing: 100%).
    let o = cli(&[
        "optimize",
        fixture("efficientnet_style_bn.onnx").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--data",
        unlabelled.to_str().unwrap(),
        "--min-agreement",
        "0.99",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Float data that look normalized already, given without --preprocess raw: warned.
    let npy = dir.path().join("x.npy");
    let x = ndarray::Array4::<f32>::from_shape_fn((2, 1, 28, 28), |(n, _, h, w)| {
        ((n + h * 3 + w) % 7) as f32 / 3.0 - 1.0
    });
    write_npy(&npy, &x);
    let o = cli(&[
        "validate",
        fixture("mnist_ccexam.onnx").to_str().unwrap(),
        "--data",
        npy.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning:")
            && stderr.contains("look already scaled or normalized")
            && stderr.contains("--preprocess raw"),
        "{stderr}"
    );
}

// 13. integer shape arithmetic read by elementwise ops

/// EfficientNet-Lite's TorchScript export computes each Pad's `pads` from int64
/// Constants (Mul, then Sub). Shape inference used to hand every constant-computed
/// value read only by Sub/Mul/... to tract as a float input of its shape (a
/// decoded weight's treatment), so `score`, `optimize` and `validate` all refused
/// the model ("No super type for F32 and I64"). Now the score counts the Conv,
/// and optimize quantizes it and writes a model that computes what the original
/// does in tract and onnxruntime.
#[test]
fn kind13_integer_pads_computed_in_graph_stay_integers() {
    let name = "k13_pads_from_constants";
    let m = onnx_micronet::load(&rw(name)).unwrap();
    let r = onnx_micronet::score::score(&m, &Default::default()).unwrap();
    let conv = r.layers.iter().find(|l| l.name == "conv_0").unwrap();
    // 108 MACs at each of 36 positions; 108 + 4 parameters at the 16-bit freebie:
    // 56 32-bit units.
    assert_eq!((conv.raw_mults, conv.params), (3888.0, 56.0));
    let (m, _, _d) = optimize(name, &["--quantize", "linear:8", "--storage", "float"]);
    assert_eq!(count(&m, "Pad"), 1);
    same_outputs(name, &m, 0.02);
}
