//! Packed storage (passes/pack): every representation decodes bit for bit to the
//! float-stored weights in tract and in onnxruntime, the score counts a packed
//! model exactly as the float-stored one, edge cases, and the CLI end to end.

use crate::common::*;
use onnx_micronet::graph::Graph;
use onnx_micronet::onnx::proto::{GraphProto, ModelProto, StringStringEntryProto, TensorProto};
use onnx_micronet::onnx::Model;
use onnx_micronet::passes::pack::Pack;
use onnx_micronet::passes::{Context, Pass};
use onnx_micronet::repr::packed::{self as format, pack_codes, pack_mask, Packed, Shared, Store};
use onnx_micronet::score::{self, ScoreOptions};
use prost::Message;

fn as_model(m: ModelProto) -> Model {
    Model {
        proto: m,
        path: None,
        external_files: Vec::new(),
    }
}

/// Deterministic pseudo-random numbers in [0, 1).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    fn int(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() * (hi - lo + 1) as f64) as i64
    }
}

fn with_claims(mut t: TensorProto, kv: &[(&str, String)]) -> TensorProto {
    for (k, v) in kv {
        t.metadata_props.push(StringStringEntryProto {
            key: Some(k.to_string()),
            value: Some(v.clone()),
        });
    }
    t
}

/// Runs a model in tract the way `engine::plan` does (typed, constants folded,
/// optimized) and returns every output.
fn tract_outputs(m: &ModelProto, x: &[f32], shape: &[usize]) -> Vec<Vec<f32>> {
    use tract_onnx::prelude::*;
    let bytes = m.encode_to_vec();
    let mut model = tract_onnx::onnx()
        .with_ignore_value_info(true)
        .model_for_read(&mut &bytes[..])
        .expect("tract loads");
    model
        .set_input_fact(0, f32::fact(shape).into())
        .expect("input fact");
    let mut typed = model.into_typed().expect("typed");
    typed.compute_const_facts().expect("const facts");
    let plan = typed
        .into_optimized()
        .expect("optimized")
        .into_runnable()
        .expect("runnable");
    let input = tract_ndarray::ArrayD::from_shape_vec(shape.to_vec(), x.to_vec()).unwrap();
    let out = plan
        .run(tvec!(Tensor::from(input).into_tvalue()))
        .expect("tract runs");
    out.iter()
        .map(|t| {
            t.to_plain_array_view::<f32>()
                .expect("f32 output")
                .iter()
                .copied()
                .collect()
        })
        .collect()
}

/// Bitwise equality with -0.0 taken as +0.0.
fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| (x + 0.0).to_bits() == (y + 0.0).to_bits())
}

/// In onnxruntime: runs both models on the same random input in two sessions,
/// optimizations off (the graph as written) and the default one. The decoders give
/// the float weights exactly, so in the session where both models reach each Conv
/// the same way the outputs are bit-identical: the default one for float decoders
/// (folded to constant weights at load), optimizations off for DequantizeLinear-fed
/// weights (kept unfolded by default, so the Conv runs another kernel). In both
/// sessions every output is within 1e-5 of the largest |output|. Also checks the
/// second model with the full checker.
const ORT_SAME: &str = r#"
import sys, numpy as np, onnx, onnxruntime as ort
a, b = sys.argv[1], sys.argv[2]
onnx.checker.check_model(onnx.load(b), full_check=True)
def run(p, level):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    s = ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
    feeds = {}
    for i in s.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        feeds[i.name] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return [o.name for o in s.get_outputs()], s.run(None, feeds)
exact = []
for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    na, ra = run(a, level)
    nb, rb = run(b, level)
    assert na == nb, (na, nb)
    same = True
    for n, x, y in zip(na, ra, rb):
        if x.shape != y.shape:
            print("DIFF", n, x.shape, y.shape)
            sys.exit(1)
        tol = 1e-5 * max(float(np.abs(x).max()), 1e-30)
        if float(np.abs(x - y).max()) > tol:
            print("DIFF", level, n, float(np.abs(x - y).max()), tol)
            sys.exit(1)
        xb = (x.astype(np.float32) + np.float32(0)).view(np.uint32)
        yb = (y.astype(np.float32) + np.float32(0)).view(np.uint32)
        same &= bool(np.array_equal(xb, yb))
    exact.append(same)
if not any(exact):
    print("DIFF: bit-identical in neither session", exact)
    sys.exit(1)
print("same", len(na))
"#;

fn ort_same(a: &ModelProto, b: &ModelProto, tag: &str) {
    let Some(py) = venv_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb) = (
        dir.path().join(format!("{tag}_a.onnx")),
        dir.path().join(format!("{tag}_b.onnx")),
    );
    write_model(&pa, a);
    write_model(&pb, b);
    let out = run_python(&py, ORT_SAME, &[pa.to_str().unwrap(), pb.to_str().unwrap()]);
    assert!(out.starts_with("same"), "{out}");
}

// ---------------------------------------------------------------------------
// The format itself, on hand-made tensors, one decoder per representation.

/// (name, shape, expected values, packed form): every representation and edge case.
fn format_cases() -> Vec<(String, Vec<usize>, Vec<f32>, Packed)> {
    let mut r = Lcg(7);
    let mut cases = Vec::new();
    let mut add =
        |name: &str, shape: Vec<usize>, values: Vec<f32>, mask: bool, store: Option<Store>| {
            let m = mask.then(|| values.iter().map(|v| *v != 0.0).collect());
            cases.push((
                name.to_string(),
                shape.clone(),
                values,
                Packed {
                    shape,
                    mask: m,
                    store,
                },
            ));
        };
    // Float values behind a mask, 135 elements (not a multiple of 8).
    let v: Vec<f32> = (0..135)
        .map(|i| {
            if i % 3 == 0 {
                0.0
            } else {
                (i as f32 - 60.0) * 0.0173
            }
        })
        .collect();
    let nz: Vec<f32> = v.iter().copied().filter(|x| *x != 0.0).collect();
    add(
        "float_masked",
        vec![5, 3, 3, 3],
        v,
        true,
        Some(Store::Float(nz)),
    );
    // k-bit affine codes, k = 1..=16, masked and dense, per tensor, sizes 1..
    for k in [1u32, 2, 3, 4, 5, 7, 8, 9, 12, 16] {
        for masked in [false, true] {
            let n = 1 + (k as usize * 37) % 61 + if masked { 40 } else { 0 };
            let s = 0.0123f32 * k as f32;
            let zp = (1i64 << (k - 1)) as f32;
            let codes: Vec<u32> = (0..n)
                .map(|_| r.int(0, (1i64 << k) - 1) as u32)
                .map(|c| if masked && c as f32 == zp { c ^ 1 } else { c })
                .collect();
            let mut values: Vec<f32> = codes.iter().map(|&c| (c as f32 - zp) * s).collect();
            let mut stored = codes.clone();
            if masked {
                for i in (0..n).step_by(3) {
                    values[i] = 0.0;
                }
                stored = codes
                    .iter()
                    .zip(&values)
                    .filter(|(_, v)| **v != 0.0)
                    .map(|(c, _)| *c)
                    .collect();
            }
            add(
                &format!("affine{k}_{}", if masked { "masked" } else { "dense" }),
                vec![n],
                values.clone(),
                masked,
                Some(Store::Affine {
                    k,
                    codes: stored.clone(),
                    scale: vec![s],
                    zp: vec![zp],
                    axis: None,
                }),
            );
            // The same codes dequantized by DequantizeLinear (int8 below 9 bits, int32 above).
            add(
                &format!("codes{k}_{}", if masked { "masked" } else { "dense" }),
                vec![n],
                values,
                masked,
                Some(Store::Codes {
                    k,
                    codes: stored,
                    scale: vec![s],
                    zp: vec![zp],
                    axis: None,
                }),
            );
        }
    }
    // Per-channel affine (axis 1 of 3x4x5), minmax-style zero points, masked.
    let (scale, zp) = (
        vec![0.5f32, 0.013, 0.75, 0.031],
        vec![3.0f32, 0.0, 5.0, 7.0],
    );
    let mut values = Vec::new();
    let mut stored = Vec::new();
    for i in 0..60 {
        let c = (i / 5) % 4;
        let code = r.int(0, 7) as u32;
        let v = (code as f32 - zp[c]) * scale[c];
        values.push(v);
        if v != 0.0 {
            stored.push(code);
        }
    }
    add(
        "affine3_per_channel",
        vec![3, 4, 5],
        values.clone(),
        true,
        Some(Store::Affine {
            k: 3,
            codes: stored.clone(),
            scale: scale.clone(),
            zp: zp.clone(),
            axis: Some(1),
        }),
    );
    // The same as uint8 codes with per-channel zero points into DequantizeLinear(axis 1).
    add(
        "codes3_per_channel",
        vec![3, 4, 5],
        values,
        true,
        Some(Store::Codes {
            k: 3,
            codes: stored,
            scale,
            zp,
            axis: Some(1),
        }),
    );
    // Codebook (log-style powers of two), masked, and dense (tanh-style) with a zero in the book.
    let book = vec![-0.5f32, -0.125, 0.0625, 0.25, 1.0];
    let codes: Vec<u32> = (0..77).map(|_| r.int(0, 4) as u32).collect();
    let mut values: Vec<f32> = codes.iter().map(|&c| book[c as usize]).collect();
    for i in (0..77).step_by(2) {
        values[i] = 0.0;
    }
    let stored: Vec<u32> = codes
        .iter()
        .zip(&values)
        .filter(|(_, v)| **v != 0.0)
        .map(|(c, _)| *c)
        .collect();
    add(
        "codebook4_masked",
        vec![7, 11],
        values,
        true,
        Some(Store::Codebook {
            k: 4,
            codes: stored,
            book: book.clone(),
        }),
    );
    let book = vec![-0.7f32, -0.21, 0.0, 0.33, 0.9];
    let codes: Vec<u32> = (0..50).map(|_| r.int(0, 4) as u32).collect();
    let values = codes.iter().map(|&c| book[c as usize]).collect();
    add(
        "codebook3_dense",
        vec![50],
        values,
        false,
        Some(Store::Codebook { k: 3, codes, book }),
    );
    // Ternary: mask + sign bit per nonzero + two centroids.
    let values: Vec<f32> = (0..30).map(|i| [0.0, -0.3, 0.7][(i * 7 % 5) % 3]).collect();
    let codes = values
        .iter()
        .filter(|v| **v != 0.0)
        .map(|v| u32::from(*v > 0.0))
        .collect();
    add(
        "ternary",
        vec![2, 3, 5],
        values,
        true,
        Some(Store::Codebook {
            k: 1,
            codes,
            book: vec![-0.3, 0.7],
        }),
    );
    // One element, all zero, one nonzero behind a mask (Gather index -1 before it).
    add(
        "one_element",
        vec![1, 1, 1, 1],
        vec![0.375],
        false,
        Some(Store::Affine {
            k: 4,
            codes: vec![11],
            scale: vec![0.125],
            zp: vec![8.0],
            axis: None,
        }),
    );
    add("all_zero", vec![3, 4], vec![0.0; 12], false, None);
    // float16 values (fp16 scheme): masked and dense; 0.1 is not a half, its
    // nearest half is 1638 x 2^-14; 65504 is the largest half, 2^-24 the smallest
    // (subnormal); -1/3 rounds to -5460 x 2^-14.
    let halves = [
        1638.0f32 / 16384.0,
        -2.5,
        65504.0,
        2f32.powi(-24),
        -5460.0 / 16384.0,
    ];
    let values: Vec<f32> = (0..24)
        .map(|i| if i % 3 == 0 { 0.0 } else { halves[i % 5] })
        .collect();
    let stored = values.iter().copied().filter(|v| *v != 0.0).collect();
    add(
        "half_masked",
        vec![4, 6],
        values,
        true,
        Some(Store::Half(stored)),
    );
    let values: Vec<f32> = (0..10).map(|i| halves[i % 5]).collect();
    add(
        "half_dense",
        vec![10],
        values.clone(),
        false,
        Some(Store::Half(values)),
    );
    let mut v = vec![0.0f32; 19];
    v[17] = -1.5;
    add(
        "last_only",
        vec![19],
        v,
        true,
        Some(Store::Float(vec![-1.5])),
    );
    cases
}

/// x -> Identity -> y, plus one output per case: Identity of the weight.
fn format_model(cases: &[(String, Vec<usize>, Vec<f32>, Packed)], packed: bool) -> ModelProto {
    let mut nodes = vec![node("Identity", "id", &["x"], &["y"])];
    let mut outputs = vec![value_info("y", &[1])];
    let mut inits = Vec::new();
    let mut shared = Shared::new(Default::default());
    for (name, shape, values, p) in cases {
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        if packed {
            let dec = format::build(p, name, &format!("p_{name}"), 13, &mut shared);
            nodes.extend(dec.nodes);
            inits.extend(dec.inits);
        } else {
            inits.push(tensor_f32(name, &dims, values));
        }
        let out = format!("out_{name}");
        nodes.push(node("Identity", &format!("id_{name}"), &[name], &[&out]));
        outputs.push(value_info(&out, &dims));
    }
    inits.extend(shared.inits);
    model(
        GraphProto {
            name: Some("format".into()),
            node: nodes,
            initializer: inits,
            input: vec![value_info("x", &[1])],
            output: outputs,
            ..Default::default()
        },
        13,
    )
}

#[test]
fn every_representation_decodes_bit_exactly_in_tract_onnxruntime_and_the_reader() {
    let cases = format_cases();
    let float = format_model(&cases, false);
    let packed = format_model(&cases, true);

    // The reader (what the score uses) gives back every value and the stored width.
    let g = Graph::new(packed.graph.as_ref().unwrap()).unwrap();
    for (name, _, values, p) in &cases {
        let w = onnx_micronet::repr::weight(&g, name)
            .unwrap()
            .unwrap_or_else(|| panic!("{name}: not recognized"));
        let got: Vec<f32> = w.values.iter().copied().collect();
        assert!(same_bits(&got, values), "{name}: {got:?} vs {values:?}");
        let want_bits = match &p.store {
            None | Some(Store::Float(_)) => 32,
            Some(Store::Half(_)) => 16,
            Some(Store::Codebook { k: 1, .. }) if name == "ternary" => 2,
            Some(Store::Affine { k, .. })
            | Some(Store::Codebook { k, .. })
            | Some(Store::Codes { k, .. }) => *k,
        };
        assert_eq!(w.bits, want_bits, "{name}: {}", w.scheme);
        assert_eq!(w.ternary, name == "ternary", "{name}");
    }

    // Payloads hold exactly the mask and the codes: e.g. a 4-bit masked affine
    // tensor of n elements and m values stores ceil(n/8) + ceil(4m/8) bytes.
    assert_eq!(
        pack_mask(&[true, false, true, true, false, false, false, false, true]),
        vec![0b0000_1101, 0b1]
    );
    // codes 5 = 0b101, 3 = 0b011, 6 = 0b110 at 3 bits, each LSB first: stream bits
    // 1,0,1, 1,1,0, 0,1,1 -> byte 0 holds stream bits 0..7 = 1,0,1,1,1,0,0,1
    // = 1 + 4 + 8 + 16 + 128 = 157 = 0b1001_1101, byte 1 holds bit 8 = 1.
    assert_eq!(pack_codes(&[5, 3, 6], 3), vec![0b1001_1101, 0b1]);

    // tract: every decoded output equals the float initializer, bit for bit.
    let a = tract_outputs(&float, &[1.0], &[1]);
    let b = tract_outputs(&packed, &[1.0], &[1]);
    assert_eq!(a.len(), cases.len() + 1);
    for (i, (name, _, values, _)) in cases.iter().enumerate() {
        assert!(same_bits(&a[i + 1], values), "{name}: tract float");
        assert!(
            same_bits(&b[i + 1], values),
            "{name}: tract packed {:?}",
            &b[i + 1]
        );
    }
    // onnxruntime: the same, plus the full checker on the packed model.
    ort_same(&float, &packed, "format");
}

// ---------------------------------------------------------------------------
// The pass on a model whose weights carry the quantizer's claims.

/// x[1,4,6,6] -> one Conv per weight (7x4x5x5 = 700 elements, not a multiple of 8) -> outputs.
fn claimed_model() -> (ModelProto, Vec<String>) {
    let mut r = Lcg(42);
    let shape = [7i64, 4, 5, 5];
    let n = 700;
    let chan = |i: usize| i / 100;
    let mut ws: Vec<TensorProto> = Vec::new();
    // float32 pruned 50% (unclaimed).
    let v: Vec<f32> = (0..n)
        .map(|i| {
            if i % 2 == 0 {
                0.0
            } else {
                (r.next() as f32 - 0.5) * 0.4
            }
        })
        .collect();
    ws.push(tensor_f32("w_f32", &shape, &v));
    // linear 4-bit per tensor, step 2^-4, 70% zeros: value = (code as f32) * step.
    let v: Vec<f32> = (0..n)
        .map(|i| {
            if i % 10 < 7 {
                0.0
            } else {
                let c = r.int(-8, 6);
                (if c >= 0 { c + 1 } else { c }) as f32 * 0.0625
            }
        })
        .collect();
    ws.push(with_claims(
        tensor_f32("w_lin4", &shape, &v),
        &[
            ("onnx_micronet.scheme", "linear".into()),
            ("onnx_micronet.bits", "4".into()),
            ("onnx_micronet.step", "0.0625".into()),
        ],
    ));
    // linear 8-bit per channel (axis 0), 30% zeros.
    let steps: Vec<f32> = (0..7).map(|c| 0.0021 * (c + 1) as f32).collect();
    let v: Vec<f32> = (0..n)
        .map(|i| {
            if i % 10 < 3 {
                0.0
            } else {
                r.int(-128, 127) as f32 * steps[chan(i)]
            }
        })
        .collect();
    let list = |x: &[f32]| {
        x.iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    ws.push(with_claims(
        tensor_f32("w_lin8pc", &shape, &v),
        &[
            ("onnx_micronet.scheme", "linear".into()),
            ("onnx_micronet.bits", "8".into()),
            ("onnx_micronet.step", list(&steps)),
            ("onnx_micronet.axis", "0".into()),
        ],
    ));
    // minmax 3-bit per channel with zero points, dense.
    let zps: Vec<f32> = (0..7).map(|c| (c % 8) as f32).collect();
    let v: Vec<f32> = (0..n)
        .map(|i| (r.int(0, 7) as f32 - zps[chan(i)]) * steps[chan(i)])
        .collect();
    ws.push(with_claims(
        tensor_f32("w_mm3pc", &shape, &v),
        &[
            ("onnx_micronet.scheme", "minmax".into()),
            ("onnx_micronet.bits", "3".into()),
            ("onnx_micronet.step", list(&steps)),
            (
                "onnx_micronet.zero_point",
                zps.iter()
                    .map(|z| format!("{z}"))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            ("onnx_micronet.axis", "0".into()),
        ],
    ));
    // linear 1-bit: codes {-1, 0} -> values {-0.25, 0}; dense 1-bit codes (a mask never pays at k = 1).
    let v: Vec<f32> = (0..n)
        .map(|_| if r.next() < 0.5 { -0.25 } else { 0.0 })
        .collect();
    ws.push(with_claims(
        tensor_f32("w_lin1", &shape, &v),
        &[
            ("onnx_micronet.scheme", "linear".into()),
            ("onnx_micronet.bits", "1".into()),
            ("onnx_micronet.step", "0.25".into()),
        ],
    ));
    // linear 16-bit, no zeros.
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let c = r.int(-32768, 32767);
            (if c == 0 { 1 } else { c }) as f32 * 3.0517578e-5
        })
        .collect();
    ws.push(with_claims(
        tensor_f32("w_lin16", &shape, &v),
        &[
            ("onnx_micronet.scheme", "linear".into()),
            ("onnx_micronet.bits", "16".into()),
            ("onnx_micronet.step", "3.0517578e-5".into()),
        ],
    ));
    // log 4-bit: signed powers of two 2^-6..2^0, 60% zeros (14 levels + 0 <= 16).
    let v: Vec<f32> = (0..n)
        .map(|i| {
            if i % 5 < 3 {
                0.0
            } else {
                let s = if r.next() < 0.5 { -1.0 } else { 1.0 };
                s * 2f32.powi(r.int(-6, 0) as i32)
            }
        })
        .collect();
    ws.push(with_claims(
        tensor_f32("w_log4", &shape, &v),
        &[
            ("onnx_micronet.scheme", "log".into()),
            ("onnx_micronet.bits", "4".into()),
        ],
    ));
    // tanh 3-bit: 8 levels, dense.
    let levels = [-0.9f32, -0.5, -0.2, -0.05, 0.07, 0.3, 0.6, 0.95];
    let v: Vec<f32> = (0..n).map(|_| levels[r.int(0, 7) as usize]).collect();
    ws.push(with_claims(
        tensor_f32("w_tanh3", &shape, &v),
        &[
            ("onnx_micronet.scheme", "tanh".into()),
            ("onnx_micronet.bits", "3".into()),
        ],
    ));
    // ternary (ec2t, asymmetric centroids).
    let v: Vec<f32> = (0..n)
        .map(|_| [-0.31f32, 0.0, 0.0, 0.52][r.int(0, 3) as usize])
        .collect();
    ws.push(with_claims(
        tensor_f32("w_ternary", &shape, &v),
        &[
            ("onnx_micronet.scheme", "ternary".into()),
            ("onnx_micronet.bits", "2".into()),
            ("onnx_micronet.rule", "ec2t".into()),
        ],
    ));
    // all zeros (unclaimed).
    ws.push(tensor_f32("w_zero", &shape, &[0.0; 700]));
    // dense float without zeros: left alone.
    let v: Vec<f32> = (0..n).map(|_| r.next() as f32 - 0.5).collect();
    ws.push(tensor_f32("w_dense", &shape, &v));
    // a one-element pruned bias: never smaller packed, left alone.
    let names: Vec<String> = ws.iter().map(|t| t.name().to_string()).collect();
    let mut nodes = Vec::new();
    let mut outputs = Vec::new();
    for (i, w) in names.iter().enumerate() {
        let out = format!("y{i}");
        let mut ins = vec!["x", w.as_str()];
        if i == 0 {
            ins.push("b0");
        }
        nodes.push(node("Conv", &format!("conv{i}"), &ins, &[&out]));
        outputs.push(value_info(&out, &[1, 7, 2, 2]));
    }
    let mut inits = ws;
    inits.push(tensor_f32(
        "b0",
        &[7],
        &[0.0, 0.5, 0.0, 0.0, 0.0, 0.0, -0.5],
    ));
    let m = model(
        GraphProto {
            name: Some("claimed".into()),
            node: nodes,
            initializer: inits,
            input: vec![value_info("x", &[1, 4, 6, 6])],
            output: outputs,
            ..Default::default()
        },
        13,
    );
    (m, names)
}

#[test]
fn pass_packs_claimed_weights_scores_the_same_and_runs_identically() {
    let (float, names) = claimed_model();
    let mut packed = as_model(float.clone());
    let report = Pack.run(&mut packed, &Context::default()).unwrap();
    let changed: Vec<&str> = report.changed.iter().map(|c| c.target.as_str()).collect();
    let skipped: Vec<(&str, &str)> = report
        .skipped
        .iter()
        .map(|c| (c.target.as_str(), c.what.as_str()))
        .collect();
    for n in &names[..10] {
        assert!(changed.contains(&n.as_str()), "{n} not packed: {skipped:?}");
    }
    assert!(
        skipped
            .iter()
            .any(|(t, w)| *t == "w_dense" && w.contains("nothing to pack")),
        "{skipped:?}"
    );
    // b0: 7 floats with 5 zeros: 7 mask bits + 2 x 32 bits is smaller as payload, but
    // the decoder's nodes make it bigger than the 28-byte float tensor.
    assert!(
        skipped
            .iter()
            .any(|(t, w)| *t == "b0" && w.contains("not fewer")),
        "{skipped:?}"
    );
    let what = |n: &str| {
        report
            .changed
            .iter()
            .find(|c| c.target == n)
            .unwrap()
            .what
            .clone()
    };
    // 700 elements, 210 nonzeros: 700 mask bits + 210 x 4 bits = 88 + 105 bytes.
    // (tensor, how its description must start (^) or what it must contain)
    for (name, want) in [
        // Affine grids end in DequantizeLinear (the QDQ form onnxruntime keeps).
        (
            "w_lin4",
            "700-bit mask + 210 4-bit codes -> DequantizeLinear (one scale)",
        ),
        ("w_lin1", "^700 1-bit codes -> DequantizeLinear"),
        (
            "w_lin8pc",
            "8-bit codes -> DequantizeLinear (7 scales along axis 0)",
        ),
        ("w_mm3pc", "^700 3-bit codes -> DequantizeLinear (7 scales"),
        ("w_lin16", "^700 16-bit codes -> DequantizeLinear"),
        ("w_log4", "4-bit codes into a 14-entry codebook"),
        ("w_tanh3", "^700 3-bit codes into a 8-entry codebook"),
        ("w_ternary", "1-bit codes into a 2-entry codebook"),
        ("w_zero", "^all zeros"),
    ] {
        let got = what(name);
        let ok = match want.strip_prefix('^') {
            Some(prefix) => got.starts_with(prefix),
            None => got.contains(want),
        };
        assert!(ok, "{name}: {got}");
    }
    let packed = packed.proto;
    assert!(
        packed.encoded_len() * 2 < float.encoded_len(),
        "{} vs {}",
        packed.encoded_len(),
        float.encoded_len()
    );

    // The score: the same figures, layer by layer.
    let opts = ScoreOptions::default();
    let a = score::score(&as_model(float.clone()), &opts).unwrap();
    let b = score::score(&as_model(packed.clone()), &opts).unwrap();
    assert_eq!(a.totals, b.totals);
    assert_eq!(a.quantized, b.quantized);
    assert!(b.uncounted.is_empty(), "{:?}", b.uncounted);
    assert_eq!(a.layers.len(), b.layers.len());
    for (x, y) in a.layers.iter().zip(&b.layers) {
        assert_eq!(
            (
                &x.name,
                x.params,
                x.mults,
                x.adds,
                x.weight_bits,
                x.sparsity
            ),
            (
                &y.name,
                y.params,
                y.mults,
                y.adds,
                y.weight_bits,
                y.sparsity
            )
        );
    }
    // conv1 (w_lin4): 210 nonzeros x 4 bits + 700 mask bits + its one 32-bit step
    // (the scale a runtime needs; linear grids have no zero point) = 1572 bits =
    // 49.125 params.
    assert_eq!(a.layers[1].params, 1572.0 / 32.0);
    // Bytes on disk for conv1: the score's 1572 bits = 196.5 bytes; stored: mask
    // ceil(700/8) = 88 bytes + codes ceil(210 x 4 / 8) = 105 bytes + scale and zero
    // point (4 bytes each), plus a protobuf header (name, dims, type) per tensor.
    let d = &b.disk.layers[1];
    assert_eq!(d.score_bytes, 196.5);
    assert!(
        (88 + 105 + 8..88 + 105 + 8 + 4 * 24).contains(&d.stored_bytes),
        "{d:?}"
    );
    assert!(
        d.decoder_bytes > 0 && a.disk.layers[1].decoder_bytes == 0,
        "{d:?}"
    );
    // Float storage: 700 x 4 bytes + header and the claim metadata.
    assert!(
        (2800..2950).contains(&a.disk.layers[1].stored_bytes),
        "{:?}",
        a.disk.layers[1]
    );
    assert_eq!(b.disk.file_bytes as usize, packed.encoded_len());
    // conv8 (ternary): 700 mask + 350ish sign bits + one 32-bit scale, as float-stored.
    assert_eq!(a.layers[8].note, b.layers[8].note);

    // tract and onnxruntime: every conv output identical to the float-stored model's.
    let x: Vec<f32> = (0..144)
        .map(|i| ((i * 37 % 29) as f32 - 14.0) / 7.0)
        .collect();
    let ya = tract_outputs(&float, &x, &[1, 4, 6, 6]);
    let yb = tract_outputs(&packed, &x, &[1, 4, 6, 6]);
    for (i, (p, q)) in ya.iter().zip(&yb).enumerate() {
        assert!(same_bits(p, q), "conv{i}: {p:?} vs {q:?}");
    }
    ort_same(&float, &packed, "claimed");
}

#[test]
fn packing_is_idempotent_and_float_storage_is_untouched() {
    let (float, _) = claimed_model();
    let mut once = as_model(float);
    Pack.run(&mut once, &Context::default()).unwrap();
    let mut twice = once.clone();
    let r = Pack.run(&mut twice, &Context::default()).unwrap();
    assert!(r.changed.is_empty(), "{:?}", r.changed);
    assert_eq!(once.proto, twice.proto);
}

// ---------------------------------------------------------------------------
// The CLI, end to end on a real fixture.

#[test]
fn optimize_storage_packed_and_float_score_the_same_and_agree() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("mobilenetv2_cifar_bn.onnx");
    let mut outs = Vec::new();
    for storage in ["packed", "float"] {
        let out = dir.path().join(format!("{storage}.onnx"));
        let rep = dir.path().join(format!("{storage}.json"));
        let mut args = vec![
            "optimize",
            src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--prune",
            "magnitude:0.7",
            "--report",
            rep.to_str().unwrap(),
        ];
        if storage == "float" {
            args.extend(["--storage", "float"]);
        }
        let o = cli(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        assert_eq!(text.contains("\npack ("), storage == "packed", "{text}");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&rep).unwrap()).unwrap();
        outs.push((out, json));
    }
    let (p, f) = (&outs[0], &outs[1]);
    assert_eq!(p.1["after"]["totals"], f.1["after"]["totals"]);
    assert_eq!(p.1["after"]["score"], f.1["after"]["score"]);
    let (sp, sf) = (
        std::fs::metadata(&p.0).unwrap().len(),
        std::fs::metadata(&f.0).unwrap().len(),
    );
    // Unquantized, 70% sparse: about 1 mask bit + 0.3 x 32 bits per weight instead of 32.
    assert!(sp * 2 < sf, "packed {sp} bytes, float {sf}");
    // Both run, and give the same logits, in tract (validate) and onnxruntime.
    let v = cli(&[
        "validate",
        f.0.to_str().unwrap(),
        p.0.to_str().unwrap(),
        "--data",
        fixture("data/foolbox/cifar100").to_str().unwrap(),
        "--limit",
        "8",
        "--json",
        "-",
    ]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    let vj: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
    let text = vj.to_string();
    assert_eq!(vj["agreement"]["max_abs_logit_diff"], 0.0, "{text}");
    let fp = onnx_micronet::load(&f.0).unwrap();
    let pp = onnx_micronet::load(&p.0).unwrap();
    ort_same(&fp.proto, &pp.proto, "cli");
}

#[test]
fn storage_option_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("r.toml");
    std::fs::write(&recipe, "storage = \"sparse\"\n").unwrap();
    let out = dir.path().join("o.onnx");
    let o = cli(&[
        "optimize",
        fixture("mnist_ccexam.onnx").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--recipe",
        recipe.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let last = err.trim_end().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: storage 'sparse': expected 'packed'"),
        "{err}"
    );
    assert!(!out.exists());
    let o = cli(&["optimize", "x.onnx", "-o", "y.onnx", "--storage", "sparse"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn packed_models_carry_no_unread_initializers() {
    // Regression: quantized and packed without a mask, the shared zero constant made
    // for masked decoders was left in the file unread (onnxruntime warns about it).
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q8.onnx");
    let src = fixture("cifar10_keras_bn.onnx");
    let o = cli(&[
        "optimize",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--quantize",
        "linear:8",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = onnx_micronet::load(&out).unwrap();
    let read: std::collections::HashSet<&str> = m
        .graph()
        .node
        .iter()
        .flat_map(|n| n.input.iter().map(String::as_str))
        .collect();
    let unread: Vec<&str> = m
        .graph()
        .initializer
        .iter()
        .map(|t| t.name())
        .filter(|n| !read.contains(n))
        .collect();
    assert!(unread.is_empty(), "unread initializers: {unread:?}");
    // The 9 weights are stored as dense 8-bit codes: int8 initializers read by
    // DequantizeLinear, no decoder node at all.
    let count = |op: &str| m.graph().node.iter().filter(|n| n.op_type() == op).count();
    assert_eq!((count("DequantizeLinear"), count("Cast")), (9, 0));
}

/// `inspect` of a packed, quantized file shows each layer's logical weight (shape,
/// bits, sparsity, activation bits, storage), as the score reads it, besides the
/// stored tensors; JSON too.
#[test]
fn inspect_shows_logical_layers_of_a_packed_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("p.onnx");
    let o = cli(&[
        "optimize",
        fixture("mnist_ccexam.onnx").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--prune",
        "magnitude:0.7",
        "--quantize",
        "linear:4",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(cli(&["inspect", out.to_str().unwrap()]).stdout).unwrap();
    let table = text
        .split("layers (logical weights of packed or quantized storage):")
        .nth(1)
        .unwrap_or_else(|| panic!("{text}"));
    // The classifier's first Gemm: 128 x 3136 weights, 4-bit, 70% pruned (magnitude
    // prunes each eligible layer to exactly round(0.7 n) zeros) plus the small
    // survivors the 4-bit grid rounds to zero (measured: 74.21% in all),
    // activations float (32).
    let line = table
        .lines()
        .find(|l| l.contains("/classifier/classifier.0/Gemm"))
        .unwrap_or_else(|| panic!("{table}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&cols[1..4], &["Gemm", "128x3136", "4"], "{line}");
    let sparsity: f64 = cols[4].trim_end_matches('%').parse().unwrap();
    assert!((70.0..75.0).contains(&sparsity), "{line}");
    assert_eq!(cols[5], "32", "{line}");
    assert!(line.contains("4-bit codes"), "{line}");
    let j: serde_json::Value =
        serde_json::from_slice(&cli(&["inspect", out.to_str().unwrap(), "--json"]).stdout).unwrap();
    let layers = j["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 4);
    assert!(layers.iter().all(|l| l["bits"] == 4), "{layers:?}");
}

/// GPTQ's output on a 2:4 mask (SparseGPT) and on ternary grids, packed: every
/// weighted layer reads back as packed storage at its claimed width, the stored
/// payload is the score's storage within 10%, the file scores as the report
/// says, and its logits equal those of the same pipeline stored as float32.
#[test]
fn gptq_on_2_4_and_ternary_grids_packs_to_the_scored_storage() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("mobilenetv2_cifar_bn.onnx");
    let data = fixture("data/foolbox/cifar100");
    let cases: [(&str, &[&str], &str); 2] = [
        (
            "nm24",
            &[
                "--prune",
                "sparsegpt:2:4",
                "--quantize",
                "minmax:8",
                "--per-channel",
            ],
            "8-bit codes",
        ),
        ("ternary", &["--quantize", "ternary"], "ternary (packed"),
    ];
    for (tag, flags, scheme) in cases {
        let mut outs = Vec::new();
        for storage in ["packed", "float"] {
            let out = dir.path().join(format!("{tag}_{storage}.onnx"));
            let rep = dir.path().join(format!("{tag}_{storage}.json"));
            let mut args = vec![
                "optimize",
                src.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "--calib",
                data.to_str().unwrap(),
                "--storage",
                storage,
                "--report",
                rep.to_str().unwrap(),
            ];
            args.extend_from_slice(flags);
            let o = cli(&args);
            assert!(
                o.status.success(),
                "{tag}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let json: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&rep).unwrap()).unwrap();
            outs.push((out, json));
        }
        let (p, f) = (&outs[0], &outs[1]);
        // GPTQ ran (the default with --calib) on most layers.
        let q = report_pass(&p.1, "quantize");
        let gptq = q["errors"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["method"].as_str().unwrap().contains("GPTQ"))
            .count();
        assert!(gptq >= 40, "{tag}: GPTQ on {gptq} layers");
        let layers = p.1["after"]["layers"].as_array().unwrap();
        let weighted: Vec<&serde_json::Value> = layers
            .iter()
            .filter(|l| l["weight_bits"].is_number())
            .collect();
        assert_eq!(weighted.len(), 53, "{tag}");
        let mut sparse = 0;
        for l in &weighted {
            let s = l["weight_scheme"].as_str().unwrap();
            // Dense 8-bit codes are the uint8 tensor itself (the layers the 2:4
            // pruning leaves alone), every other weight is packed.
            let dense8 = tag == "nm24" && s == "uint8 via DequantizeLinear";
            assert!(
                dense8 || (s.contains(scheme) && s.contains("packed")),
                "{tag}: {l}"
            );
            sparse += usize::from(l["sparsity"].as_f64().unwrap() >= 0.44);
        }
        if tag == "nm24" {
            // 2 of every 4 (0.44 for depthwise 3x3 kernels: groups of 4 across 9
            // inputs keep 5); the prune pass leaves the first conv and three
            // layers under 1000 weights alone: 53 - 4.
            assert_eq!(sparse, 49, "{tag}: layers at 2:4");
        }
        // The stored payload is the scored storage within 10% (decoders apart).
        let d = &p.1["after"]["disk"];
        let (score_b, stored) = (
            d["score_bytes"].as_f64().unwrap(),
            d["stored_bytes"].as_f64().unwrap(),
        );
        assert!(
            (stored / score_b - 1.0).abs() < 0.10,
            "{tag}: stored {stored} bytes, scored {score_b}"
        );
        // The same scores either way, and `score` of the file agrees.
        assert_eq!(p.1["after"]["totals"], f.1["after"]["totals"], "{tag}");
        let s = cli(&["score", p.0.to_str().unwrap(), "--json", "-"]);
        assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
        let sj: serde_json::Value = serde_json::from_slice(&s.stdout).unwrap();
        assert_eq!(sj["score"], p.1["after"]["score"], "{tag}");
        // Bit-identical logits in tract.
        let v = cli(&[
            "validate",
            f.0.to_str().unwrap(),
            p.0.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--limit",
            "8",
            "--json",
            "-",
        ]);
        assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
        let vj: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
        assert_eq!(vj["agreement"]["max_abs_logit_diff"], 0.0, "{tag}: {vj}");
    }
}
