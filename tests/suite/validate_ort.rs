//! `validate` against onnxruntime: the same preprocessed tensors (written by our
//! readers) run in onnxruntime give the same top-1 classes and nearly the same
//! logits as in tract, and the CLI's accuracy equals onnxruntime's on real data.

use crate::common::*;
use onnx_micronet::{data, engine, validate};

const ORT: &str = r#"
import sys, json, numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.intra_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
x = np.load(sys.argv[2])
name = s.get_inputs()[0].name
out = np.concatenate([s.run(None, {name: x[i:i+1]})[0].reshape(1, -1) for i in range(len(x))])
print(json.dumps(out.astype(float).tolist()))
"#;

pub(crate) fn check(
    model_rel: &str,
    data_rel: &str,
    preset: &str,
    limit: usize,
) -> Option<(f64, f64)> {
    let py = venv_python()?;
    let model_path = fixture(model_rel);
    if !model_path.exists() {
        eprintln!("note: {model_rel} absent (make fixtures-extra makes it); skipped");
        return None;
    }
    let model = onnx_micronet::load(&model_path).unwrap();
    let geometry = validate::input_geometry(&model, &[]).unwrap();
    let d = validate::load_data(&fixture(data_rel), preset, None, Some(limit), &geometry).unwrap();
    let plan = engine::plan(&model, &geometry.shape).unwrap();
    let tract = engine::run_images(&plan, d.images.view(), 2, &|_| {}).unwrap();

    let dir = tempfile::tempdir_in(root().join("target")).unwrap();
    let npy = dir.path().join("x.npy");
    write_npy(&npy, &d.images);
    let json = run_python(
        &py,
        ORT,
        &[model_path.to_str().unwrap(), npy.to_str().unwrap()],
    );
    let rows: Vec<Vec<f32>> = serde_json::from_str(&json).unwrap();
    let ort = ndarray::Array2::from_shape_vec((rows.len(), rows[0].len()), rows.concat()).unwrap();
    let a = validate::agreement(&tract, &ort).unwrap();
    assert_eq!(
        a.top1_agreement, 1.0,
        "{model_rel}: tract and onnxruntime disagree on some top-1"
    );
    assert!(
        a.max_abs_logit_diff < 1e-3,
        "{model_rel}: max |logit diff| {}",
        a.max_abs_logit_diff
    );
    let (t1, _) = validate::accuracy(&tract, &d.labels);
    let (o1, _) = validate::accuracy(&ort, &d.labels);
    assert_eq!(t1, o1);
    eprintln!(
        "{model_rel}: {} images, top-1 tract {:.4} = onnxruntime {:.4}, max |logit diff| {:.2e}",
        d.images.shape()[0],
        t1.unwrap(),
        o1.unwrap(),
        a.max_abs_logit_diff
    );
    Some((t1.unwrap(), a.max_abs_logit_diff))
}

#[test]
fn mnist_net_on_mnist_digits() {
    // ccexam's MNIST net: 998 of the 1,000 committed digits (fixtures/README.md, measured with onnxruntime).
    if let Some((top1, _)) = check(
        "mnist_ccexam.onnx",
        "data/mnist-digits-1000/images-idx3-ubyte.gz",
        "mnist",
        1000,
    ) {
        assert_eq!(top1, 0.998);
    }
}

#[test]
fn cifar10_keras_net_on_foolbox_cifar10() {
    // 20 of 20 (fixtures/README.md).
    if let Some((top1, _)) = check("cifar10_keras_bn.onnx", "data/foolbox/cifar10", "raw", 20) {
        assert_eq!(top1, 1.0);
    }
}

#[test]
fn real_mobilenet_v2_on_foolbox_imagenet() {
    // The real torchvision weights (make fixtures-extra), standard ImageNet preprocessing.
    check(
        "extra/mobilenet_v2_bn.onnx",
        "data/foolbox/imagenet",
        "imagenet",
        20,
    );
}

#[test]
fn cli_validate_reports_the_same_accuracy() {
    let m = fixture("mnist_ccexam.onnx");
    let d = fixture("data/mnist-digits-1000/images-idx3-ubyte.gz");
    let o = cli(&[
        "validate",
        m.to_str().unwrap(),
        m.to_str().unwrap(),
        "--data",
        d.to_str().unwrap(),
        "--json",
        "-",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // 998 / 1000, and a model against itself: full agreement, zero logit difference.
    assert_eq!(j["runs"][0]["top1"], 0.998);
    assert_eq!(j["agreement"]["top1_agreement"], 1.0);
    assert_eq!(j["agreement"]["max_abs_logit_diff"], 0.0);
    let _ = data::Format::Idx;
}
