//! The HTML report (`--html`): written by `optimize`, `score` and `validate` on
//! the MobileNetV2 demo fixture, self-contained, and rendered in a real headless
//! Chromium (Debian's, which `make test` installs) with every plot present and
//! drawn, and no console or page error. Screenshots go to target/html-report/.

use std::path::PathBuf;
use std::process::Command;

use crate::common::{cli, fixture, root, venv_python};

/// Debian's Chromium: `ONNX_MICRONET_CHROMIUM`, else /usr/bin/chromium. Under
/// `make test` (ONNX_MICRONET_REQUIRE_VENV=1) a missing browser fails the test.
fn chromium() -> Option<PathBuf> {
    let p = std::env::var_os("ONNX_MICRONET_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if p.exists() {
        return Some(p);
    }
    if std::env::var_os("ONNX_MICRONET_REQUIRE_VENV").is_some() {
        panic!(
            "no Chromium at {}: `make test` installs Debian's (make browser)",
            p.display()
        );
    }
    eprintln!(
        "note: no Chromium at {}; skipping the render check",
        p.display()
    );
    None
}

fn run_ok(args: &[&str]) -> String {
    let out = cli(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Occurrences of `data-plot="name"` in a page.
fn plots(html: &str, name: &str) -> usize {
    html.matches(&format!("data-plot=\"{name}\"")).count()
}

/// A document that needs nothing outside itself: no scripts, no external
/// stylesheet, image or font.
fn assert_self_contained(html: &str) {
    for bad in [
        "<script",
        "<link",
        "<img",
        "src=\"http",
        "href=\"http",
        "@import",
        "url(",
    ] {
        assert!(
            !html.contains(bad),
            "the report must be self-contained, found {bad}"
        );
    }
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert_eq!(html.matches("<svg").count(), html.matches("</svg>").count());
}

#[test]
fn html_reports_render_in_chromium_with_every_plot() {
    let dir = tempfile::tempdir().unwrap();
    let out = |n: &str| dir.path().join(n).display().to_string();
    let demo = fixture("mobilenetv2_cifar_bn.onnx").display().to_string();
    let data = fixture("data/foolbox/cifar100").display().to_string();
    // The demo's MobileNetV2 pruned 50%, 4-bit per-channel weights (GPTQ, which
    // measures per-layer errors), 8-bit activations calibrated on the 20 images.
    run_ok(&[
        "optimize",
        &demo,
        "-o",
        &out("small.onnx"),
        "--prune",
        "magnitude:0.5",
        "--quantize",
        "minmax:4",
        "--per-channel",
        "--act-bits",
        "8",
        "--calib",
        &data,
        "--data",
        &data,
        "--html",
        &out("optimize.html"),
    ]);
    run_ok(&["score", &out("small.onnx"), "--html", &out("score.html")]);
    run_ok(&[
        "validate",
        &demo,
        &out("small.onnx"),
        "--data",
        &data,
        "--html",
        &out("validate.html"),
    ]);
    // A search's page (two plans on the small EfficientNet-style fixture): its
    // Pareto plot and table besides the rest.
    let eff = fixture("efficientnet_style_bn.onnx").display().to_string();
    let cifar10 = fixture("data/foolbox/cifar10").display().to_string();
    run_ok(&[
        "optimize",
        &eff,
        "-o",
        &out("eff.onnx"),
        "--calib",
        &cifar10,
        "--data",
        &cifar10,
        "--quantize",
        "minmax:4",
        "--per-channel",
        "--avg-weight-bits",
        "6",
        "--search",
        "--search-steps",
        "1",
        "--min-agreement",
        "0.9",
        "--html",
        &out("search.html"),
    ]);
    let read = |n: &str| std::fs::read_to_string(dir.path().join(n)).unwrap();
    let (opt, score, val) = (
        read("optimize.html"),
        read("score.html"),
        read("validate.html"),
    );
    let search = read("search.html");
    // 37 weighted layers: 37 histograms, and the search's plot.
    assert_eq!(plots(&search, "pareto"), 1);
    assert_eq!(plots(&search, "weight-histogram"), 37);
    for page in [&opt, &score, &val, &search] {
        assert_self_contained(page);
    }
    // MobileNetV2 (CIFAR strides) has 52 Conv layers and one Gemm: 53 weighted
    // layers, each with its histogram; 53 activation quantizers (one per weighted
    // layer's input); one error plot (GPTQ's; magnitude pruning measures none).
    let expected_opt = [
        ("accuracy", 1),
        ("score-split", 1),
        ("bits-sparsity", 1),
        ("weight-histogram", 53),
        ("activation-ranges", 1),
        ("layer-errors", 1),
    ];
    for (name, n) in expected_opt {
        assert_eq!(plots(&opt, name), n, "optimize page: plot {name}");
    }
    assert_eq!(opt.matches("data-plot=").count(), 58);
    for (name, n) in [
        ("score-split", 1),
        ("bits-sparsity", 1),
        ("weight-histogram", 53),
    ] {
        assert_eq!(plots(&score, name), n, "score page: plot {name}");
    }
    assert_eq!(plots(&val, "accuracy"), 1);
    // The figures the page states are the report's: the JSON and the HTML agree.
    let json = run_ok(&["score", &out("small.onnx"), "--json", "-"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let s = v["score"].as_f64().unwrap();
    assert!(
        score.contains(&format!("{s:.4}")),
        "score {s:.4} on the score page"
    );
    assert!(
        opt.contains(&format!("{s:.4}")),
        "score {s:.4} on the optimize page"
    );

    // Rendered in a real browser.
    let (Some(py), Some(chrome)) = (venv_python(), chromium()) else {
        return;
    };
    let shots = root().join("target/html-report");
    let script = root().join("tests/html/render_check.py");
    let res = Command::new(&py)
        .arg(&script)
        .arg(&chrome)
        .arg(&shots)
        .args([
            out("optimize.html"),
            out("score.html"),
            out("validate.html"),
            out("search.html"),
        ])
        .output()
        .expect("python runs");
    assert!(
        res.status.success(),
        "render check failed: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&res.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    let html = [&opt, &score, &val, &search];
    for (r, page) in lines.iter().zip(html) {
        let file = r["file"].as_str().unwrap();
        assert_eq!(
            r["errors"].as_array().unwrap().len(),
            0,
            "{file}: {}",
            r["errors"]
        );
        assert_eq!(
            r["requests"].as_array().unwrap().len(),
            0,
            "{file}: {}",
            r["requests"]
        );
        let rendered = r["plots"].as_array().unwrap();
        // Every plot of the document is in the rendered page, laid out at its
        // size, with its marks drawn (a histogram has at least its axes, ticks and
        // a few bars: dozens of elements).
        assert_eq!(rendered.len(), page.matches("data-plot=").count(), "{file}");
        for p in rendered {
            let name = p["name"].as_str().unwrap();
            assert!(
                p["width"].as_f64().unwrap() >= 300.0,
                "{file}: {name} width {}",
                p["width"]
            );
            assert!(
                p["height"].as_f64().unwrap() >= 150.0,
                "{file}: {name} height {}",
                p["height"]
            );
            assert!(
                p["drawn"].as_u64().unwrap() >= 30,
                "{file}: {name} drew {}",
                p["drawn"]
            );
        }
        assert!(shots
            .join(format!(
                "{}.png",
                std::path::Path::new(file)
                    .file_stem()
                    .unwrap()
                    .to_string_lossy()
            ))
            .exists());
    }
}

#[test]
fn html_output_path_is_checked_before_work() {
    // A missing directory fails at once (exit 2), naming the option, before any
    // calibration, and writes nothing.
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.onnx");
    let bad = dir.path().join("missing/r.html");
    let err = crate::common::cli_fails(&[
        "optimize",
        &fixture("mnist_ccexam.onnx").display().to_string(),
        "-o",
        &model.display().to_string(),
        "--html",
        &bad.display().to_string(),
    ]);
    assert!(err.contains("--html"), "{err}");
    assert!(!model.exists());
    let err = crate::common::cli_fails(&[
        "score",
        &fixture("mnist_ccexam.onnx").display().to_string(),
        "--html",
        &bad.display().to_string(),
    ]);
    assert!(err.contains("--html"), "{err}");
}
