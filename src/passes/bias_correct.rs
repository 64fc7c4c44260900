//! Bias correction, empirical: every weighted layer's bias absorbs the shift of
//! its mean output that compressing it introduced (Nagel et al., 2019,
//! "Data-Free Quantization Through Weight Equalization and Bias Correction",
//! section 4.2, in its empirical form with calibration data):
//!
//!   b'_c = b_c + (W_c - W'_c) . E[x']
//!
//! with W the layer's weight in the reference model (the input after BN folding,
//! before any lossy pass), W' its compressed weight (pruned, quantized), x' the
//! layer's input in the compressed model (after its input quantizer, if any), the
//! mean over the calibration images and every output position (the mean im2col
//! row of a conv, padding included). So the shift the layer's weights add, on the
//! inputs it really sees, is removed; shifts from the layers before it are removed
//! at those layers. One capture of the compressed model's mean inputs.
//!
//! Measured, not assumed: also correcting the input quantizer's shift,
//! W . (E[x] - E[x']), made MobileNetV2 worse (8-bit weights and activations, 300
//! held-out photos: 86.7% top-1 agreement against 90.7% with the weights' shift
//! alone): a clipped activation's error sits on its rare large values, and a
//! mean moved onto every position adds error everywhere else.
//!
//! A layer is corrected when its bias is a float32 initializer of one value per
//! output channel, or absent (a zero bias is added); a bias other nodes read
//! gets a private copy; a bias with a quantization claim, or an overridable one,
//! is left with the reason.

use std::collections::HashMap;

use super::{calib, Context, Pass, PassReport};
use crate::error::Result;
use crate::graph::layers::{bias_input, is_weighted};
use crate::graph::{set_initializer, Graph, Namer};
use crate::onnx::{DataType, Model, TensorData};

/// The pass.
pub struct BiasCorrect;

impl Pass for BiasCorrect {
    fn name(&self) -> &'static str {
        "bias-correct"
    }

    fn run(&self, model: &mut Model, cx: &Context) -> Result<PassReport> {
        let mut report = PassReport::new(self.name());
        let (Some(reference), Some(_)) = (cx.reference, cx.calib.filter(|d| !d.is_empty())) else {
            report.skipped(
                "model",
                "no bias correction: it measures mean inputs on calibration images (--calib)",
            );
            return Ok(report);
        };
        struct Target {
            node: usize,
            name: String,
            bias: Option<String>,
            shared: bool,
            rows: calib::Rows,
            w_ref: Vec<f32>,
            w_new: Vec<f32>,
        }
        let mut targets = Vec::new();
        let mut wanted: Vec<(usize, Vec<calib::Geom>)> = Vec::new();
        {
            let g = Graph::of(model)?;
            let rg = Graph::new(reference.graph())?;
            for &i in g.topo_order() {
                let n = g.node(i);
                if !is_weighted(n) || !matches!(n.op_type(), "Conv" | "Gemm") {
                    continue;
                }
                let name = g.node_name(i).to_string();
                let skip = |report: &mut PassReport, why: String| {
                    report.skipped(&name, format!("no bias correction: {why}"))
                };
                // The same layer in the reference: the node writing the same output.
                let Some((ri, _)) = rg.producer(&n.output[0]) else {
                    skip(
                        &mut report,
                        "its output is not in the reference model".into(),
                    );
                    continue;
                };
                let (Some(w_ref), Some(w_new)) = (
                    crate::repr::weight(&rg, &rg.node(ri).input[1])?,
                    crate::repr::weight(&g, &n.input[1])?,
                ) else {
                    skip(&mut report, "its weight is not a constant".into());
                    continue;
                };
                if w_ref.values.shape() != w_new.values.shape() {
                    skip(&mut report, "its weight changed shape".into());
                    continue;
                }
                // (W - W') E[x'] is zero: no capture for it.
                if w_ref.values == w_new.values {
                    skip(&mut report, "its weights are the reference's".into());
                    continue;
                }
                let bias = bias_input(n).map(str::to_string);
                let mut shared = false;
                if let Some(b) = &bias {
                    let Some(t) = g.initializer(b) else {
                        skip(&mut report, format!("its bias '{b}' is not an initializer"));
                        continue;
                    };
                    if t.data_type() != DataType::Float as i32 {
                        skip(&mut report, format!("its bias '{b}' is not float32"));
                        continue;
                    }
                    if t.metadata_props
                        .iter()
                        .any(|p| p.key().starts_with("onnx_micronet."))
                    {
                        skip(&mut report, format!("its bias '{b}' is quantized"));
                        continue;
                    }
                    if let Some(why) = g.not_fixed(b) {
                        skip(&mut report, format!("the bias {why}"));
                        continue;
                    }
                    shared = g.consumers(b).iter().any(|&c| c != i) || g.is_output(b);
                }
                let shape = w_new.values.shape().to_vec();
                let (rows, geoms) = match calib::layout(&g, &[i], &shape) {
                    Ok(l) => l,
                    Err(e) => {
                        skip(&mut report, e);
                        continue;
                    }
                };
                wanted.push((targets.len(), geoms));
                targets.push(Target {
                    node: i,
                    name,
                    bias,
                    shared,
                    rows,
                    w_ref: w_ref.values.iter().copied().collect(),
                    w_new: w_new.values.iter().copied().collect(),
                });
            }
        }
        if targets.is_empty() {
            return Ok(report);
        }
        let data = cx.calib.expect("checked");
        let input_shape = cx.input_shape_for(data);
        let start = std::time::Instant::now();
        let (captured, too_big) = calib::gram::collect(
            model,
            &input_shape,
            data.images.view(),
            cx.threads.max(1),
            &wanted,
            calib::gram::Capture::MeansOnly,
        )?;
        let means: HashMap<usize, Vec<Vec<f64>>> =
            captured.into_iter().map(|c| (c.layer, c.means)).collect();
        for (k, why) in too_big {
            report.skipped(&targets[k].name, format!("no bias correction: {why}"));
        }
        let g = model.graph_mut();
        let mut names = Namer::of(g);
        let mut largest = 0f64;
        for (k, t) in targets.iter().enumerate() {
            let Some(m_hat) = means.get(&k) else {
                continue;
            };
            let groups = m_hat.len();
            let layer = calib::obs::Layer {
                rows: &t.rows,
                groups,
                factors: &[],
            };
            let want = layer.mean_output(&t.w_ref, m_hat);
            let got = layer.mean_output(&t.w_new, m_hat);
            let shift: Vec<f64> = want.iter().zip(&got).map(|(a, b)| a - b).collect();
            let current: Vec<f32> = match &t.bias {
                Some(b) => {
                    let tensor = g
                        .initializer
                        .iter()
                        .find(|x| x.name() == b.as_str())
                        .expect("checked");
                    TensorData::from_proto(tensor)?
                        .into_f32()
                        .iter()
                        .copied()
                        .collect()
                }
                None => vec![0.0; shift.len()],
            };
            if current.len() != shift.len() {
                report.skipped(
                    &t.name,
                    format!(
                        "no bias correction: {} bias values for {} output channels",
                        current.len(),
                        shift.len()
                    ),
                );
                continue;
            }
            let new: Vec<f32> = current
                .iter()
                .zip(&shift)
                .map(|(b, d)| (*b as f64 + d) as f32)
                .collect();
            let biggest = shift.iter().fold(0f64, |m, d| m.max(d.abs()));
            largest = largest.max(biggest);
            let target = match (&t.bias, t.shared) {
                (Some(b), false) => b.clone(),
                (Some(b), true) => names.fresh(&format!("{b}_corrected")),
                (None, _) => names.fresh(&format!(
                    "{}_bias",
                    t.name.replace(['/', ':'], "_").trim_start_matches('_')
                )),
            };
            let arr = ndarray::ArrayD::from_shape_vec(vec![new.len()], new).expect("1-D");
            set_initializer(g, &target, &TensorData::F32(arr));
            let node = &mut g.node[t.node];
            if node.input.len() > 2 {
                node.input[2] = target.clone();
            } else {
                node.input.push(target.clone());
            }
            report.changed(
                &t.name,
                format!(
                    "bias absorbs the mean output shift (largest {biggest:.3e}) into '{target}'"
                ),
            );
        }
        report.changed(
            "calibration",
            format!(
                "{} images: mean inputs of {} layers in {:.2}s; largest shift {largest:.3e}",
                data.len(),
                targets.len(),
                start.elapsed().as_secs_f64()
            ),
        );
        Ok(report)
    }
}
