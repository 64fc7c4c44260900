//! Structured channel pruning (passes/prune_channels.rs, graph/channels.rs):
//! hand-checkable cases (a channel whose filter is zero changes nothing when cut;
//! the least-squares refit recovers the exact output when the removed channel is a
//! linear combination of kept ones), coupled residual groups pruned together and
//! run, the groups left alone with their reason, and a real model whose written
//! file passes onnx's full check and runs the same in onnxruntime and tract.

use crate::common::*;
use ndarray::{Array4, ArrayD};
use onnx_micronet::data::{self, Dataset, Layout, Preprocess};
use onnx_micronet::engine;
use onnx_micronet::onnx::proto::{GraphProto, ModelProto};
use onnx_micronet::onnx::{Model, TensorData};
use onnx_micronet::passes::prune_channels::{ChannelSection, PruneChannels};
use onnx_micronet::passes::{Context, Pass, PassReport};

fn wrap(proto: ModelProto) -> Model {
    Model {
        proto,
        path: None,
        external_files: vec![],
    }
}

fn init(m: &Model, name: &str) -> ArrayD<f32> {
    let g = m.proto.graph.as_ref().unwrap();
    let t = g.initializer.iter().find(|t| t.name() == name).unwrap();
    TensorData::from_proto(t).unwrap().to_f32()
}

fn set(m: &mut Model, name: &str, a: ArrayD<f32>) {
    onnx_micronet::graph::set_initializer(m.graph_mut(), name, &TensorData::F32(a));
}

fn run(m: &Model, x: &ArrayD<f32>) -> ArrayD<f32> {
    engine::run_tensor(m, x.clone()).unwrap().remove(0)
}

fn max_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f64 / (1u64 << 31) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

fn images(n: usize, shape: [usize; 3], seed: u64) -> Dataset {
    let [c, h, w] = shape;
    let v = values(n * c * h * w, seed);
    Dataset {
        images: Array4::from_shape_vec((n, c, h, w), v).unwrap(),
        labels: vec![None; n],
        names: (0..n).map(|i| format!("random {i}")).collect(),
        description: "random".into(),
        warnings: vec![],
    }
}

fn prune(m: &mut Model, section: ChannelSection, calib: Option<&Dataset>) -> PassReport {
    let shape = calib.map(|d| {
        let mut s = d.images.shape().to_vec();
        s[0] = 1;
        s
    });
    let cx = Context {
        reference: None,
        calib,
        input_shape: shape.unwrap_or_default(),
        threads: 2,
        ..Default::default()
    };
    let r = PruneChannels(section.config().unwrap())
        .run(m, &cx)
        .unwrap();
    onnx_micronet::graph::check(m.graph()).unwrap();
    r
}

/// One pass's entry of an `optimize --report` JSON file.
fn pass_report(report: &std::path::Path, name: &str) -> serde_json::Value {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap();
    report_pass(&json, name).clone()
}

fn section(ratio: f64, criterion: &str, reconstruct: bool) -> ChannelSection {
    ChannelSection {
        ratio,
        criterion: Some(criterion.into()),
        reconstruct: Some(reconstruct),
        multiple: Some(1),
        ..Default::default()
    }
}

#[test]
fn kept_channel_counts_round_to_the_multiple() {
    use onnx_micronet::passes::prune_channels::removed_count;
    // 96 x 0.3 = 28.8 -> 29 removed, 67 kept; 67 / 8 = 8.4 -> 8 x 8 = 64 kept: 32 go.
    assert_eq!(removed_count(96, 0.3, 8), 32);
    // 960 x 0.3 = 288 removed, 672 = 84 x 8 kept: unchanged.
    assert_eq!(removed_count(960, 0.3, 8), 288);
    // 144 x 0.3 = 43.2 -> 43, 101 kept; 101 / 8 = 12.6 -> 13 x 8 = 104: 40 go.
    assert_eq!(removed_count(144, 0.3, 8), 40);
    // 4 x 0.25 = 1, 3 kept -> rounds to one multiple (8), more than there are: none go.
    assert_eq!(removed_count(4, 0.25, 8), 0);
    // Without rounding, 1 of 4; and never all of them.
    assert_eq!(removed_count(4, 0.25, 1), 1);
    assert_eq!(removed_count(4, 0.99, 1), 3);
}

/// x[1,2,5,5] -> Conv a (4 out, 1x1) -> Relu -> depthwise Conv (3x3, pads 1,
/// group 4) -> Relu -> Conv b (3 out, 1x1) -> y. Channel 2 of `a` has an all-zero
/// filter and bias 0, and the depthwise bias of channel 2 is 0.
fn expand_dw_project() -> ModelProto {
    let mut wa = values(8, 1);
    wa[4] = 0.0; // a's filter 2 is [w(2,0), w(2,1)] = elements 4 and 5
    wa[5] = 0.0;
    let ba = vec![0.1, -0.2, 0.0, 0.3];
    let wd = values(36, 2);
    let bd = vec![0.05, 0.1, 0.0, -0.1];
    let wb = values(12, 3);
    let mut dw = node("Conv", "dw", &["r1", "wd", "bd"], &["d"]);
    dw.attribute.push(attr_int("group", 4));
    dw.attribute.push(attr_ints("pads", &[1, 1, 1, 1]));
    model(
        GraphProto {
            name: Some("edp".into()),
            node: vec![
                node("Conv", "a", &["x", "wa", "ba"], &["e"]),
                node("Relu", "relu1", &["e"], &["r1"]),
                dw,
                node("Relu", "relu2", &["d"], &["r2"]),
                node("Conv", "b", &["r2", "wb", "bb"], &["y"]),
            ],
            initializer: vec![
                tensor_f32("wa", &[4, 2, 1, 1], &wa),
                tensor_f32("ba", &[4], &ba),
                tensor_f32("wd", &[4, 1, 3, 3], &wd),
                tensor_f32("bd", &[4], &bd),
                tensor_f32("wb", &[3, 4, 1, 1], &wb),
                tensor_f32("bb", &[3], &[0.0, 0.1, -0.1]),
            ],
            input: vec![value_info("x", &[1, 2, 5, 5])],
            output: vec![value_info("y", &[1, 3, 5, 5])],
            value_info: vec![value_info("d", &[1, 4, 5, 5])],
            ..Default::default()
        },
        13,
    )
}

#[test]
fn a_channel_with_an_all_zero_filter_is_cut_without_changing_any_output() {
    let base = wrap(expand_dw_project());
    let mut m = base.clone();
    // 25% of 4 channels: k = round(0.25 x 4) = 1. L1 norms of a's filters: channel 2
    // has |0| + |0| = 0, the lowest, so it goes. Its path: Relu(0 + 0) = 0, the
    // depthwise filter times zeros plus bias 0 = 0, Relu(0) = 0, times b's column 2:
    // it adds nothing to y, so y is unchanged.
    let r = prune(&mut m, section(0.25, "l1", false), None);
    assert_eq!(r.changed.len(), 1, "{r:#?}");
    assert!(r.changed[0].what.starts_with("4 -> 3 channels"), "{r:#?}");
    assert_eq!(init(&m, "wa").shape(), &[3, 2, 1, 1]);
    assert_eq!(init(&m, "ba").as_slice().unwrap(), &[0.1, -0.2, 0.3]);
    assert_eq!(init(&m, "wd").shape(), &[3, 1, 3, 3]);
    assert_eq!(init(&m, "bd").as_slice().unwrap(), &[0.05, 0.1, -0.1]);
    assert_eq!(init(&m, "wb").shape(), &[3, 3, 1, 1]);
    let dw = &m.graph().node[2];
    let group = dw.attribute.iter().find(|a| a.name() == "group").unwrap();
    assert_eq!(group.i(), 3);
    // The declared shape of 'd' follows.
    let d = m
        .graph()
        .value_info
        .iter()
        .find(|v| v.name() == "d")
        .unwrap();
    assert_eq!(onnx_micronet::graph::shape_string(d), "[1, 3, 5, 5]");
    let x: ArrayD<f32> = ArrayD::from_shape_vec(vec![1, 2, 5, 5], values(50, 9)).unwrap();
    let (y0, y1) = (run(&base, &x), run(&m, &x));
    assert!(max_diff(&y0, &y1) < 1e-6, "{}", max_diff(&y0, &y1));
}

/// x[1,3,6,6] -> Conv a (4 out, 1x1, no activation) -> Conv b (2 out, 3x3, pads 1)
/// -> y, with a's channel 3 = channel 0 + 2 x channel 1 (filter and bias).
fn linear_pair() -> ModelProto {
    let mut wa = values(12, 4);
    for i in 0..3 {
        wa[9 + i] = wa[i] + 2.0 * wa[3 + i];
    }
    let ba = [0.2f32, -0.1, 0.4, 0.2 + 2.0 * -0.1];
    let wb = values(72, 5);
    let mut b = node("Conv", "b", &["e", "wb", "bb"], &["y"]);
    b.attribute.push(attr_ints("pads", &[1, 1, 1, 1]));
    model(
        GraphProto {
            name: Some("pair".into()),
            node: vec![node("Conv", "a", &["x", "wa", "ba"], &["e"]), b],
            initializer: vec![
                tensor_f32("wa", &[4, 3, 1, 1], &wa),
                tensor_f32("ba", &[4], &ba),
                tensor_f32("wb", &[2, 4, 3, 3], &wb),
                tensor_f32("bb", &[2], &[0.05, -0.05]),
            ],
            input: vec![value_info("x", &[1, 3, 6, 6])],
            output: vec![value_info("y", &[1, 2, 6, 6])],
            ..Default::default()
        },
        13,
    )
}

#[test]
fn the_refit_recovers_the_exact_output_when_the_removed_channel_is_a_combination_of_kept_ones() {
    let base = wrap(linear_pair());
    let calib = images(16, [3, 6, 6], 11);
    let x: ArrayD<f32> = ArrayD::from_shape_vec(vec![1, 3, 6, 6], values(108, 12)).unwrap();
    let y0 = run(&base, &x);
    let scale = y0.iter().map(|v| v.abs()).fold(0.0, f32::max);

    // Reconstruction chooses a channel of {0, 1, 3} (each is a combination of the
    // other two: e3 = e0 + 2 e1, everywhere including b's zero padding), whose
    // removal costs nothing once b's kernels of the others absorb its kernel:
    // w0' = w0 + w3, w1' = w1 + 2 w3 when channel 3 goes.
    // The same in sequential calibration (the pruned model's inputs beside the
    // original's: one group, so both are the original's here).
    for mode in ["parallel", "sequential"] {
        let mut m = base.clone();
        let mut s = section(0.25, "reconstruction", true);
        s.damp = Some(1e-9); // an almost plain least-squares fit (raised until the factor exists): exact here
        s.calib_mode = Some(mode.into());
        let r = prune(&mut m, s, Some(&calib));
        let e = r.errors.first().unwrap_or_else(|| panic!("{r:#?}"));
        assert!(e.after < 1e-8, "{mode}: refit error {}", e.after);
        assert!(e.nearest > 1e-2, "{mode}: cut error {}", e.nearest);
        assert_eq!(init(&m, "wa").shape(), &[3, 3, 1, 1]);
        assert_eq!(init(&m, "wb").shape(), &[2, 3, 3, 3]);
        let y1 = run(&m, &x);
        assert!(
            max_diff(&y0, &y1) < 1e-4 * scale,
            "{mode}: {} of {scale}",
            max_diff(&y0, &y1)
        );
    }

    // The plain cut of the lowest-L1 channel, without the refit, changes the output.
    let mut cut = base.clone();
    prune(&mut cut, section(0.25, "l1", false), None);
    let y2 = run(&cut, &x);
    assert!(max_diff(&y0, &y2) > 1e-2 * scale);
}

/// A residual pair: x[1,3,5,5] -> Conv c1 (4) -> a; Conv c2(a) (4) -> b;
/// Add(a, b) -> s -> Relu -> Conv c3 (2) -> y. c1 and c2 write the same channels
/// (through the Add): one coupled group whose sinks are c2 and c3.
fn residual() -> ModelProto {
    model(
        GraphProto {
            name: Some("res".into()),
            node: vec![
                node("Conv", "c1", &["x", "w1", "b1"], &["a"]),
                node("Conv", "c2", &["a", "w2", "b2"], &["b"]),
                node("Add", "add", &["a", "b"], &["s"]),
                node("Relu", "relu", &["s"], &["r"]),
                node("Conv", "c3", &["r", "w3", "b3"], &["y"]),
            ],
            initializer: vec![
                tensor_f32("w1", &[4, 3, 1, 1], &values(12, 21)),
                tensor_f32("b1", &[4], &values(4, 22)),
                tensor_f32("w2", &[4, 4, 1, 1], &values(16, 23)),
                tensor_f32("b2", &[4], &values(4, 24)),
                tensor_f32("w3", &[2, 4, 1, 1], &values(8, 25)),
                tensor_f32("b3", &[2], &values(2, 26)),
            ],
            input: vec![value_info("x", &[1, 3, 5, 5])],
            output: vec![value_info("y", &[1, 2, 5, 5])],
            ..Default::default()
        },
        13,
    )
}

#[test]
fn a_residual_group_is_left_alone_by_default_and_pruned_together_when_asked() {
    let base = wrap(residual());
    let mut m = base.clone();
    let r = prune(&mut m, section(0.25, "l1", false), None);
    assert!(r.changed.is_empty());
    // c1 and c2's group, and c3 (its channels are the graph output).
    assert_eq!(r.skipped.len(), 2, "{r:#?}");
    assert_eq!(r.skipped[0].target, "c1 (+1 coupled)");
    assert!(
        r.skipped[0].what.contains("coupled with 1 other layer"),
        "{r:#?}"
    );

    let mut s = section(0.25, "l1", false);
    s.coupled = Some(true);
    let r = prune(&mut m, s, None);
    assert!(
        r.changed[0].what.contains("coupled group of 2 layers"),
        "{r:#?}"
    );
    // Every member lost the same channel: c1's and c2's rows, c2's and c3's columns.
    assert_eq!(init(&m, "w1").shape(), &[3, 3, 1, 1]);
    assert_eq!(init(&m, "w2").shape(), &[3, 3, 1, 1]);
    assert_eq!(init(&m, "b2").shape(), &[3]);
    assert_eq!(init(&m, "w3").shape(), &[2, 3, 1, 1]);
    // Which one: the lowest sum of |w1[c]| / mean + |w2[c]| / mean (per-root
    // normalized L1). Cutting channel c is the same as zeroing c1's and c2's
    // output c (rows and biases): a_c = b_c = 0, so s_c = r_c = 0, and c2's
    // and c3's column c multiply zeros.
    let l1 = |w: &ArrayD<f32>| -> Vec<f64> {
        w.outer_iter()
            .map(|r| r.iter().map(|v| v.abs() as f64).sum())
            .collect()
    };
    let (n1, n2) = (l1(&init(&base, "w1")), l1(&init(&base, "w2")));
    let (m1, m2) = (n1.iter().sum::<f64>() / 4.0, n2.iter().sum::<f64>() / 4.0);
    let score: Vec<f64> = (0..4).map(|c| n1[c] / m1 + n2[c] / m2).collect();
    let c = (0..4)
        .min_by(|&a, &b| score[a].total_cmp(&score[b]))
        .unwrap();
    let mut zeroed = base.clone();
    for (w, b) in [("w1", "b1"), ("w2", "b2")] {
        let mut wv = init(&zeroed, w);
        wv.index_axis_mut(ndarray::Axis(0), c).fill(0.0);
        let mut bv = init(&zeroed, b);
        bv[c] = 0.0;
        set(&mut zeroed, w, wv);
        set(&mut zeroed, b, bv);
    }
    let x: ArrayD<f32> = ArrayD::from_shape_vec(vec![1, 3, 5, 5], values(75, 27)).unwrap();
    assert!(max_diff(&run(&zeroed, &x), &run(&m, &x)) < 1e-5);
}

#[test]
fn groups_that_cannot_be_pruned_are_left_with_the_reason() {
    // Concat joins the channels of c1 with x's: left, naming the Concat.
    let mut p = residual();
    let g = p.graph.as_mut().unwrap();
    g.node[2] = node("Concat", "cat", &["a", "b"], &["s"]);
    g.node[2].attribute.push(attr_int("axis", 1));
    g.initializer[4] = tensor_f32("w3", &[2, 8, 1, 1], &values(16, 25));
    let mut m = wrap(p);
    let r = prune(&mut m, section(0.5, "l1", false), None);
    assert!(r.changed.is_empty(), "{r:#?}");
    assert!(
        r.skipped.iter().any(|i| i.what.contains("Concat 'cat'")),
        "{r:#?}"
    );
    // The channels of the last conv are the graph output.
    assert!(
        r.skipped
            .iter()
            .any(|i| i.target == "c3" && i.what.contains("graph output 'y'")),
        "{r:#?}"
    );
}

#[test]
fn reconstruction_without_calibration_images_is_refused_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("m.onnx");
    write_model(&input, &expand_dw_project());
    let out = dir.path().join("o.onnx");
    let err = cli_fails(&[
        "optimize",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--prune",
        "channels:0.25:reconstruction",
    ]);
    assert!(err.contains("--calib"), "{err}");
    assert!(!out.exists());
    let err = cli_fails(&[
        "optimize",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--prune",
        "channels:1.5",
    ]);
    assert!(err.contains("1.5"), "{err}");
}

/// The real MobileNetV2 (CIFAR) fixture: 30% of every uncoupled group's channels
/// by reconstruction, calibrated on 64 real images. The file is smaller, passes
/// onnx's full check, runs the same in onnxruntime and tract, and every sink's
/// refit error is below its plain cut's.
#[test]
fn mobilenetv2_cifar_channels_written_model_is_valid_smaller_and_refit_helps() {
    let path = fixture("mobilenetv2_cifar_bn.onnx");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ch.onnx");
    let calib_dir = fixture("data/foolbox/cifar100");
    let report = dir.path().join("r.json");
    let o = cli(&[
        "optimize",
        path.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--prune",
        "channels:0.3",
        "--storage",
        "float",
        "--calib",
        calib_dir.to_str().unwrap(),
        "--preprocess",
        "cifar",
        "--report",
        report.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let before = std::fs::metadata(&path).unwrap().len();
    let after = std::fs::metadata(&out).unwrap().len();
    assert!((after as f64) < 0.85 * before as f64, "{after} of {before}");
    let pass = pass_report(&report, "prune-channels");
    let errors = pass["errors"].as_array().unwrap();
    assert!(errors.len() >= 5, "{pass:#}");
    for e in errors {
        let (cut, refit) = (e["nearest"].as_f64().unwrap(), e["after"].as_f64().unwrap());
        assert!(refit < cut, "{e}");
    }
    // onnx's full check and onnxruntime against tract on the same inputs.
    let Some(py) = venv_python() else { return };
    let pre = Preprocess::preset("cifar", 32, 32, 3, Layout::Nchw).unwrap();
    let eval = data::load(&fixture("data/foolbox/cifar10"), &pre, None, None).unwrap();
    let m = onnx_micronet::load(&out).unwrap();
    let x = eval.images.slice(ndarray::s![0..4, .., .., ..]).to_owned();
    let xs = dir.path().join("x.npy");
    write_npy(&xs, &x);
    let mut tract_out = Vec::new();
    for i in 0..4 {
        let xi = x
            .slice(ndarray::s![i..i + 1, .., .., ..])
            .to_owned()
            .into_dyn();
        tract_out.extend(run(&m, &xi).iter().copied());
    }
    let ort = run_python(
        &py,
        r#"
import sys, numpy as np, onnx, onnxruntime as ort
onnx.checker.check_model(onnx.load(sys.argv[1]), full_check=True)
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
x = np.load(sys.argv[2])
ys = [s.run(None, {s.get_inputs()[0].name: x[i:i+1]})[0].ravel() for i in range(len(x))]
print(" ".join(repr(float(v)) for v in np.concatenate(ys)))
"#,
        &[out.to_str().unwrap(), xs.to_str().unwrap()],
    );
    let ort: Vec<f32> = ort.split_whitespace().map(|v| v.parse().unwrap()).collect();
    assert_eq!(ort.len(), tract_out.len());
    let scale = ort.iter().map(|v| v.abs()).fold(0.0, f32::max);
    for (a, b) in ort.iter().zip(&tract_out) {
        assert!((a - b).abs() <= 1e-4 * scale, "ort {a} tract {b}");
    }
}

/// The bench's generated ResNet-50 (tests/bench/gen_resnet50.py: bottlenecks with
/// projection shortcuts, unfused BN): every residual stage is one coupled group
/// (its shortcut conv and the last conv of each block), pruned together with
/// `coupled = true`. The written model passes onnx's full check and gives the
/// same logits in onnxruntime and tract; each stage's members keep equal counts.
#[test]
fn generated_resnet50_coupled_stages_are_pruned_together_and_run() {
    let Some(py) = venv_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let gen = root().join("tests/bench/gen_resnet50.py");
    let o = std::process::Command::new(&py)
        .arg(&gen)
        .arg("--out-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let input = dir.path().join("resnet50_bn.onnx");
    let out = dir.path().join("r50_ch.onnx");
    let report = dir.path().join("r.json");
    let o = cli(&[
        "optimize",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--prune",
        "channels:0.3:l1",
        "--set",
        "channels.coupled=true",
        "--set",
        "channels.reconstruct=false",
        "--storage",
        "float",
        "--report",
        report.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pass = pass_report(&report, "prune-channels");
    let coupled: Vec<&str> = changed_whats(&pass)
        .into_iter()
        .filter(|w| w.contains("coupled group"))
        .collect();
    // Stages of 3, 4, 6 and 3 blocks: 1 shortcut + one last conv per block.
    // 256 x 0.7 = 179.2 -> 176 (22 x 8); 512 -> 358.4 -> 360; 1024 -> 716.8 -> 720;
    // 2048 -> 1433.6 -> 1432.
    assert_eq!(
        coupled,
        [
            "256 -> 176 channels (l1), coupled group of 4 layers",
            "512 -> 360 channels (l1), coupled group of 5 layers",
            "1024 -> 720 channels (l1), coupled group of 7 layers",
            "2048 -> 1432 channels (l1), coupled group of 4 layers",
        ]
    );
    let before = std::fs::metadata(&input).unwrap().len();
    let after = std::fs::metadata(&out).unwrap().len();
    assert!((after as f64) < 0.6 * before as f64, "{after} of {before}");
    let m = onnx_micronet::load(&out).unwrap();
    let x: ArrayD<f32> =
        ArrayD::from_shape_vec(vec![1, 3, 224, 224], values(3 * 224 * 224, 31)).unwrap();
    let y = run(&m, &x);
    let xs = dir.path().join("x.npy");
    write_npy(
        &xs,
        &x.clone().into_dimensionality::<ndarray::Ix4>().unwrap(),
    );
    let ort = run_python(
        &py,
        r#"
import sys, numpy as np, onnx, onnxruntime as ort
onnx.checker.check_model(onnx.load(sys.argv[1]), full_check=True)
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
y = s.run(None, {s.get_inputs()[0].name: np.load(sys.argv[2])})[0].ravel()
print(" ".join(repr(float(v)) for v in y))
"#,
        &[out.to_str().unwrap(), xs.to_str().unwrap()],
    );
    let ort: Vec<f32> = ort.split_whitespace().map(|v| v.parse().unwrap()).collect();
    assert_eq!(ort.len(), y.len());
    let scale = ort.iter().map(|v| v.abs()).fold(0.0, f32::max);
    for (a, b) in ort.iter().zip(y.iter()) {
        assert!(
            (a - b).abs() <= 1e-3 * scale,
            "ort {a} tract {b} (scale {scale})"
        );
    }
}

/// Channel pruning before quantization: bias correction's reference is the
/// channel-pruned model (its layers have the new shapes), so the whole pipeline
/// runs and bias correction corrects every quantized layer it can.
#[test]
fn channel_pruning_then_8_bit_quantization_with_bias_correction_runs() {
    let path = fixture("mobilenetv2_cifar_bn.onnx");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("chq.onnx");
    let report = dir.path().join("r.json");
    let calib = fixture("data/foolbox/cifar100");
    let o = cli(&[
        "optimize",
        path.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--prune",
        "channels:0.25",
        "--quantize",
        "minmax:8",
        "--per-channel",
        "--act-bits",
        "8",
        "--calib",
        calib.to_str().unwrap(),
        "--preprocess",
        "cifar",
        "--report",
        report.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pass = |name: &str| pass_report(&report, name);
    let channels = pass("prune-channels");
    assert!(channels["changed"].as_array().unwrap().len() >= 5);
    let bc = pass("bias-correct");
    let corrected = bc["changed"].as_array().unwrap().len();
    assert!(corrected >= 20, "{bc:#}");
    // Nothing was left for a shape mismatch with the reference.
    for s in bc["skipped"].as_array().unwrap() {
        assert!(!s["what"].as_str().unwrap().contains("shape"), "{s}");
    }
}

/// `allocate = "error"` moves the removal between groups by their estimated errors
/// and removes as many parameters as the uniform ratio does (up to the rounding
/// of each count to the multiple): the two files are within 2% in size, and the
/// groups' kept shares spread further apart.
#[test]
fn error_allocation_keeps_the_parameter_budget_and_varies_the_groups() {
    let path = fixture("mobilenetv2_cifar_bn.onnx");
    let dir = tempfile::tempdir().unwrap();
    let calib = fixture("data/foolbox/cifar100");
    let run = |allocate: &str| {
        let out = dir.path().join(format!("{allocate}.onnx"));
        let report = dir.path().join(format!("{allocate}.json"));
        let o = cli(&[
            "optimize",
            path.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--prune",
            "channels:0.3",
            "--set",
            &format!("channels.allocate=\"{allocate}\""),
            "--storage",
            "float",
            "--calib",
            calib.to_str().unwrap(),
            "--preprocess",
            "cifar",
            "--report",
            report.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let pass = pass_report(&report, "prune-channels");
        // "C -> K channels (...)": the kept shares.
        let shares: Vec<f64> = pass["changed"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|i| {
                let w = i["what"].as_str()?;
                let (c, rest) = w.split_once(" -> ")?;
                let k = rest.split_whitespace().next()?;
                Some(k.parse::<f64>().ok()? / c.parse::<f64>().ok()?)
            })
            .collect();
        (std::fs::metadata(&out).unwrap().len() as f64, shares)
    };
    let (uniform, u) = run("uniform");
    let (error, e) = run("error");
    assert!((error / uniform - 1.0).abs() < 0.02, "{error} vs {uniform}");
    let spread = |v: &[f64]| {
        v.iter().cloned().fold(f64::MIN, f64::max) - v.iter().cloned().fold(f64::MAX, f64::min)
    };
    // Uniform shares differ only by the rounding to multiples of 8 (16 channels
    // keep 8: 0.5); the error allocation spreads them further.
    assert!(
        spread(&e) > spread(&u) + 0.1,
        "error shares {e:?}, uniform {u:?}"
    );
}

/// The per-layer solvers report their progress to the callback the CLI installs
/// (its progress bar): channel selection counts its groups from 0 to all.
#[test]
fn channel_selection_reports_progress() {
    use std::sync::Mutex;
    static SEEN: Mutex<Vec<(String, usize, usize)>> = Mutex::new(Vec::new());
    onnx_micronet::passes::set_solve_progress(|what, done, total| {
        SEEN.lock().unwrap().push((what.to_string(), done, total));
    });
    let mut m = wrap(linear_pair());
    let calib = images(16, [3, 6, 6], 11);
    prune(&mut m, section(0.25, "reconstruction", true), Some(&calib));
    let seen = SEEN.lock().unwrap().clone();
    let ours: Vec<(usize, usize)> = seen
        .iter()
        .filter(|(w, ..)| w == "channel selection")
        .map(|(_, d, t)| (*d, *t))
        .collect();
    // One group (conv a -> conv b; b's own channels are the graph output).
    assert!(ours.windows(2).any(|w| w == [(0, 1), (1, 1)]), "{seen:?}");
}
