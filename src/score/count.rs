//! What each ONNX node costs, per input example (batch 1), following REF
//! (`micronet_challenge/counting.py`) and the options of `micronet-rules.md` §5.
//!
//! Weighted layers (Conv, ConvTranspose, Gemm, MatMul with a constant weight), per
//! output channel c with n_c nonzero weights and P output positions:
//!   mults = sum_c n_c * P,   adds = sum_c (n_c - 1) * P   (+ P per channel with a bias)
//!   storage = nnz * bits + numel (one-bit mask) when sparse, numel * bits when dense
//! Multiplies weigh max(weight bits, input activation bits) / 32; accumulation adds
//! weigh 32/32 by default (`--accumulation`); element-wise adds weigh
//! `elementwise_add_bits` / 32. An unquantized model gets the freebie: params and
//! multiplies at 16 bits, adds still at 32.
//!
//! BatchNormalization after a weighted layer folds into it as one bias (C params,
//! one add per element; nothing more when the layer already has a bias). A BN that
//! follows no weighted layer cannot fold and costs its scale and shift: 2C params,
//! one multiply and one add per element.
//!
//! Activations cost a per-element (mults, adds) from the table below (REF: relu
//! (1,0), sigmoid (2,1); swish = Sigmoid + Mul = (3,1) falls out of counting both
//! nodes). Global average pooling: C mults + (HW - 1) C adds. Average pooling k x k:
//! (k^2 - 1) adds + 1 mult per output; max pooling (k^2 - 1) comparisons, counted
//! as multiplies like REF's relu. Element-wise Add/Sub: one add per output; Mul/Div:
//! one multiply. Data movement (Reshape, Concat, Transpose, ...), shape arithmetic
//! and format conversions (Q/DQ, fake-quant chains) are free.

use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap, HashSet};

use super::{
    AccMode, BnMode, Layer, OutputSize, ScoreOptions, SparsePolicy, TernaryMode, Uncounted,
};
use crate::engine::float_equivalent;
use crate::error::{Error, Result};
use crate::graph::layers::{bias_input, layer_kind, weight_axis};
use crate::graph::{weighted_layers, Graph};
use crate::onnx::attr::NodeAttrs;
use crate::onnx::NodeProto;
use crate::repr::act::{activation_param_inputs, ActBits};
use crate::repr::{self, Weight};

/// Per-element (mults, adds) of activation ops. REF knows relu, sigmoid and swish;
/// the others follow the submissions named in micronet-rules.md §3.2, or the
/// decomposition given here where no submission counted them.
pub fn default_activation_table() -> BTreeMap<String, (f64, f64)> {
    [
        ("Relu", (1.0, 0.0)),        // REF
        ("Sigmoid", (2.0, 1.0)),     // REF
        ("Clip", (2.0, 0.0)),        // relu6: EXPA, organizer announcement via KAIST
        ("HardSwish", (4.0, 1.0)),   // KAIST hswish_ops (Verified)
        ("HardSigmoid", (3.0, 1.0)), // alpha*x (1 mult) + beta (1 add) + clamp (2, as relu6)
        ("Tanh", (2.0, 1.0)),        // as sigmoid: tanh(x) = 2 sigmoid(2x) - 1, one transcendental
        ("LeakyRelu", (2.0, 0.0)),   // compare + multiply
        ("PRelu", (2.0, 0.0)),       // compare + multiply
        ("Elu", (3.0, 1.0)),         // compare, exp, multiply, subtract
        ("Selu", (4.0, 1.0)),        // Elu + the outer scale
        ("Softplus", (2.0, 1.0)),    // exp, log (transcendentals as one op each), +1
        ("Softmax", (2.0, 1.0)),     // exp and divide per element, one add into the sum
        ("LogSoftmax", (2.0, 1.0)),
        ("Exp", (1.0, 0.0)),
        ("Log", (1.0, 0.0)),
        ("Sqrt", (1.0, 0.0)),
        ("Reciprocal", (1.0, 0.0)),
        ("Erf", (1.0, 0.0)),
        ("Abs", (1.0, 0.0)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Ops that move or select data, compute shapes, or convert formats: free.
const FREE: &[&str] = &[
    "Reshape",
    "Flatten",
    "Concat",
    "Transpose",
    "Identity",
    "Dropout",
    "Shape",
    "Size",
    "Gather",
    "Unsqueeze",
    "Squeeze",
    "Constant",
    "ConstantOfShape",
    "Cast",
    "Slice",
    "Split",
    "Pad",
    "Expand",
    "Tile",
    "Range",
    "QuantizeLinear",
    "DequantizeLinear",
    "SpaceToDepth",
    "DepthToSpace",
];

/// REF/RIAIR adder tree over `length` values of `base` bits: (bits summed over all
/// adds, width of the level after the last). The number of adds is length - 1.
pub fn adder_tree(base: u32, length: u64) -> (u64, u32) {
    let (mut count, mut width, mut len) = (0u64, base, length);
    while len > 1 {
        count += (len / 2) * width as u64;
        len = len.div_ceil(2);
        width += 1;
    }
    (count, width)
}

/// Storage bits of a weight with `nnz` nonzeros out of `numel`, and whether it is masked.
pub fn storage_bits(numel: u64, nnz: u64, bits: u32, policy: SparsePolicy) -> (f64, bool) {
    let dense = numel as f64 * bits as f64;
    let masked = nnz as f64 * bits as f64 + numel as f64;
    if nnz == numel {
        return (dense, false);
    }
    let sparsity = 1.0 - nnz as f64 / numel as f64;
    match policy {
        SparsePolicy::MaskIfAnyZero => (masked, true),
        SparsePolicy::Min => {
            if masked < dense {
                (masked, true)
            } else {
                (dense, false)
            }
        }
        SparsePolicy::Threshold(t) => {
            if sparsity >= t {
                (masked, true)
            } else {
                (dense, false)
            }
        }
    }
}

struct Ctx<'a, 'g> {
    g: &'a Graph<'g>,
    shapes: &'a HashMap<String, Vec<usize>>,
    opts: &'a ScoreOptions,
    act: ActBits<'g>,
    /// Shared by the nodes of a layer (`Arc`: weights are read, never copied).
    weights: HashMap<usize, std::sync::Arc<Weight>>,
    freebie: bool,
}

impl Ctx<'_, '_> {
    fn float_bits(&self) -> u32 {
        if self.freebie {
            16
        } else {
            32
        }
    }

    /// Bits a stored weight counts (float weights drop to 16 under the freebie).
    fn weight_bits(&self, w: &Weight) -> u32 {
        if self.freebie {
            w.bits.min(16)
        } else {
            w.bits
        }
    }

    fn act_bits(&mut self, value: &str) -> u32 {
        let fb = self.float_bits();
        self.act
            .of(value)
            .unwrap_or(fb)
            .min(if self.freebie { 16 } else { 64 })
    }

    fn shape(&self, value: &str, node: &str) -> Result<Vec<usize>> {
        self.shapes.get(value).cloned().ok_or_else(|| {
            Error::Usage(format!(
                "tract could not infer a concrete shape for '{value}' (used by node '{node}')"
            ))
        })
    }

    /// Whether a value is never negative (after Relu, ReLU6, Sigmoid, ...), for the adder tree's sign bit.
    fn unsigned(&self, value: &str) -> bool {
        let Some((p, _)) = self.g.producer(value) else {
            return false;
        };
        let n = self.g.node(p);
        match n.op_type() {
            "Relu" | "Sigmoid" | "HardSigmoid" => true,
            "Clip" => n
                .input
                .get(1)
                .and_then(|v| self.g.constant_f32(v).ok().flatten())
                .and_then(|a| a.iter().next().copied())
                .is_some_and(|lo| lo >= 0.0),
            "QuantizeLinear" | "DequantizeLinear" | "MaxPool" | "Reshape" | "Flatten"
            | "Identity" | "Pad" => self.unsigned(&n.input[0]),
            _ => false,
        }
    }
}

/// What [`count_graph`] found.
pub(crate) struct Counted {
    pub layers: Vec<Layer>,
    pub uncounted: Vec<Uncounted>,
    /// Whether any part is quantized below 16 bits.
    pub quantized: bool,
    pub freebie_applied: bool,
}

/// Counts every node.
pub(crate) fn count_graph(
    g: &Graph,
    shapes: &HashMap<String, Vec<usize>>,
    opts: &ScoreOptions,
) -> Result<Counted> {
    // Weights of weighted layers, and whether anything is quantized.
    // Decoding a packed weight is the expensive part: one layer per core (rayon),
    // read in layer order.
    let layers = weighted_layers(g);
    let read: Vec<Result<Option<repr::Weight>>> = layers
        .par_iter()
        .map(|layer| {
            let first = layer.nodes[0];
            if crate::graph::layers::is_weighted(g.node(first)) {
                repr::weight(g, &layer.weight)
            } else {
                repr::layer_weight(g, first)
            }
        })
        .collect();
    let mut weights = HashMap::new();
    for (layer, w) in layers.iter().zip(read) {
        if let Some(w) = w? {
            // Every node of the layer sees the weight.
            let w = std::sync::Arc::new(w);
            for &i in &layer.nodes {
                weights.insert(i, w.clone());
            }
        }
    }
    let mut act = ActBits::new(g);
    let quantized_acts = g
        .topo_order()
        .iter()
        .flat_map(|&i| g.node(i).output.clone())
        .any(|v| act.of(&v).is_some_and(|b| b < 16));
    let quantized = quantized_acts || weights.values().any(|w| w.quantized);
    let freebie = opts.freebie && !quantized;

    // Values computed from constants and shapes only: their nodes are free.
    let mut static_values: HashSet<&str> = HashSet::new();
    for &i in g.topo_order() {
        let n = g.node(i);
        let all_static = n
            .input
            .iter()
            .filter(|v| !v.is_empty())
            .all(|v| static_values.contains(v.as_str()) || g.constant_proto(v).is_some());
        if n.op_type() == "Shape" || n.op_type() == "Constant" || all_static {
            static_values.extend(n.output.iter().map(String::as_str));
        }
    }

    let mut ctx = Ctx {
        g,
        shapes,
        opts,
        act,
        weights,
        freebie,
    };
    let mut layers = Vec::new();
    let mut uncounted = Vec::new();
    for &i in g.topo_order() {
        let n = g.node(i);
        let op = float_equivalent(n.op_type()).unwrap_or(n.op_type());
        if ctx.act.conversion_nodes.contains(&i)
            || FREE.contains(&op)
            || n.output.iter().all(|o| static_values.contains(o.as_str()))
        {
            continue;
        }
        match count_node(&mut ctx, i)? {
            Some(l) => layers.push(l),
            None => {
                let elements = n
                    .output
                    .first()
                    .and_then(|o| shapes.get(o))
                    .map(|s| s.iter().product())
                    .unwrap_or(0);
                let quantized_op = {
                    let o = n.op_type();
                    o.starts_with('Q')
                        || o.contains("Integer")
                        || o.contains("NBits")
                        || o.contains("Quantize")
                };
                let reads_weight = quantized_op
                    || n.input
                        .iter()
                        .any(|v| g.constant_proto(v).is_some_and(|t| t.dims.len() >= 2));
                uncounted.push(Uncounted {
                    name: g.node_name(i).to_string(),
                    op_type: n.op_type().to_string(),
                    output_elements: elements,
                    reads_weight,
                });
            }
        }
    }
    if opts.quant_params {
        if let Some(l) = activation_params(g, &ctx.act) {
            layers.push(l);
        }
    }
    Ok(Counted {
        layers,
        uncounted,
        quantized,
        freebie_applied: freebie,
    })
}

fn numel(s: &[usize]) -> f64 {
    // In f64: a malformed graph's shapes may overflow usize.
    s.iter().map(|&d| d as f64).product()
}

/// The activation quantizers' scales and zero points (Q/DQ pairs, the inputs and
/// outputs of quantized ops, fake-quant chains), each constant once, as one row.
fn activation_params(g: &Graph, act: &ActBits) -> Option<Layer> {
    let mut seen: HashSet<String> = HashSet::new();
    let mut bits = 0.0;
    let mut count = 0usize;
    let mut add = |v: &str| {
        if v.is_empty() || !seen.insert(v.to_string()) {
            return;
        }
        // An all-zero zero point is the default: nothing to store.
        if let Ok(Some(d)) = g.constant(v) {
            if d.zeros() < d.len() || d.data_type() == crate::onnx::DataType::Float {
                bits += d.len() as f64 * d.elem_bits() as f64;
                count += 1;
            }
        }
    };
    for &i in g.topo_order() {
        let n = g.node(i);
        for k in activation_param_inputs(g, n) {
            if let Some(v) = n.input.get(k) {
                add(v);
            }
        }
        // A fake-quant chain's scale (the constant of its first Div/Mul).
        if act.conversion_nodes.contains(&i)
            && matches!(n.op_type(), "Div" | "Mul")
            && n.input
                .first()
                .is_some_and(|x| g.constant_proto(x).is_none())
        {
            if let Some(v) = n.input.get(1) {
                if g.producer(&n.output[0]).is_none_or(|_| {
                    g.consumers(&n.output[0])
                        .iter()
                        .any(|&c| g.node(c).op_type() == "Round")
                }) {
                    add(v);
                }
            }
        }
    }
    (count > 0).then(|| Layer {
        name: "(activation scales and zero points)".into(),
        op_type: "QuantParams".into(),
        output_shape: vec![],
        weight_shape: None,
        sparsity: None,
        weight_bits: None,
        weight_scheme: None,
        act_bits: 0,
        params: bits / 32.0,
        mults: 0.0,
        adds: 0.0,
        raw_mults: 0.0,
        raw_adds: 0.0,
        note: format!("{count} constants"),
    })
}

fn count_node(ctx: &mut Ctx, idx: usize) -> Result<Option<Layer>> {
    let g = ctx.g;
    let n = g.node(idx);
    let name = g.node_name(idx).to_string();
    let op = float_equivalent(n.op_type()).unwrap_or(n.op_type());
    // onnxruntime's quantized binary ops read their operands at inputs 0 and 3.
    let qlinear = n.op_type().starts_with("QLinear");
    let out_shape = ctx.shape(&n.output[0], &name)?;
    let e = numel(&out_shape);
    let add_w = ctx.opts.elementwise_add_bits as f64 / 32.0;
    let mut layer = Layer {
        name: name.clone(),
        op_type: op.to_string(),
        output_shape: out_shape.clone(),
        weight_shape: None,
        sparsity: None,
        weight_bits: None,
        weight_scheme: None,
        act_bits: 0,
        params: 0.0,
        mults: 0.0,
        adds: 0.0,
        raw_mults: 0.0,
        raw_adds: 0.0,
        note: String::new(),
    };
    let data_in = n.input.first().cloned().unwrap_or_default();
    layer.act_bits = if data_in.is_empty() {
        ctx.float_bits()
    } else {
        ctx.act_bits(&data_in)
    };
    let mul_w = layer.act_bits as f64 / 32.0;

    if let Some(w) = ctx.weights.get(&idx).cloned() {
        count_weighted(ctx, idx, &w, &mut layer)?;
        return Ok(Some(layer));
    }
    if let Some(&(m, a)) = ctx.opts.activations.get(op) {
        layer.raw_mults = m * e;
        layer.raw_adds = a * e;
        layer.mults = layer.raw_mults * mul_w;
        layer.adds = layer.raw_adds * add_w;
        if op == "PRelu" {
            add_constant_params(ctx, n, &mut layer)?;
        }
        return Ok(Some(layer));
    }
    match op {
        "DynamicQuantizeLinear" => {
            // The min/max search over the input, two comparisons an element (counted
            // as multiplies, like REF's relu); the quantization itself is a conversion.
            let x = ctx.shape(&data_in, &name)?;
            layer.raw_mults = 2.0 * numel(&x);
            layer.mults = layer.raw_mults * mul_w;
            layer.note = "range search: 2 comparisons per element".into();
        }
        "MatMul" | "Gemm" => {
            // Two activations: every output is a dot product of length K.
            let a = ctx.shape(&n.input[0], &name)?;
            let trans_a = op == "Gemm" && n.int_or("transA", 0)? == 1;
            let k = if trans_a {
                a[a.len().saturating_sub(2)]
            } else {
                *a.last().unwrap_or(&1)
            } as f64;
            let b_bits = ctx.act_bits(&n.input[if qlinear { 3 } else { 1 }].clone());
            layer.raw_mults = e * k;
            layer.raw_adds = e * (k - 1.0).max(0.0);
            layer.mults = layer.raw_mults * layer.act_bits.max(b_bits) as f64 / 32.0;
            layer.adds = layer.raw_adds;
        }
        "BatchNormalization" => count_batchnorm(ctx, idx, e, &mut layer)?,
        "Add" | "Sub" | "Sum" if qlinear => {
            // (A, scale, zp, B, scale, zp, ...): one add per output at the operands' width.
            let bits = [0, 3]
                .iter()
                .filter_map(|&k| n.input.get(k).cloned())
                .map(|v| ctx.act_bits(&v))
                .max()
                .unwrap_or(32);
            layer.raw_adds = e;
            layer.adds = e * bits.max(ctx.opts.elementwise_add_bits.min(bits)) as f64 / 32.0;
            layer.note = "quantized add (the rescaling is a conversion)".into();
        }
        "Mul" if qlinear => {
            let bits = [0, 3]
                .iter()
                .filter_map(|&k| n.input.get(k).cloned())
                .map(|v| ctx.act_bits(&v))
                .max()
                .unwrap_or(32);
            layer.raw_mults = e;
            layer.mults = e * bits as f64 / 32.0;
        }
        "Add" | "Sub" | "Sum" => {
            let operands = n.input.iter().filter(|v| !v.is_empty()).count().max(2) as f64;
            layer.raw_adds = e * (operands - 1.0);
            layer.adds = layer.raw_adds * add_w;
            add_constant_params(ctx, n, &mut layer)?;
        }
        "Mul" | "Div" | "Max" | "Min" => {
            let operands = n.input.iter().filter(|v| !v.is_empty()).count().max(2) as f64;
            let bits = n
                .input
                .clone()
                .iter()
                .filter(|v| g.constant_proto(v).is_none())
                .map(|v| ctx.act_bits(v))
                .max()
                .unwrap_or(layer.act_bits);
            layer.raw_mults = e * (operands - 1.0);
            layer.mults = layer.raw_mults * bits as f64 / 32.0;
            add_constant_params(ctx, n, &mut layer)?;
        }
        "GlobalAveragePool" | "GlobalMaxPool" => {
            let x = ctx.shape(&data_in, &name)?;
            let hw = numel(&x[2.min(x.len())..]);
            let c = e; // output is [N, C, 1, 1]
            if op == "GlobalAveragePool" {
                layer.raw_mults = c;
                layer.raw_adds = (hw - 1.0) * c;
            } else {
                layer.raw_mults = (hw - 1.0) * c;
            }
            layer.mults = layer.raw_mults * mul_w;
            layer.adds = layer.raw_adds * add_w;
        }
        "ReduceMean" | "ReduceSum" => {
            let x = ctx.shape(&data_in, &name)?;
            let r = numel(&x) / e.max(1.0);
            layer.raw_adds = (r - 1.0) * e;
            if op == "ReduceMean" {
                layer.raw_mults = e;
            }
            layer.mults = layer.raw_mults * mul_w;
            layer.adds = layer.raw_adds * add_w;
        }
        "AveragePool" | "MaxPool" => {
            let k: i64 = n
                .get_ints("kernel_shape")?
                .unwrap_or_default()
                .iter()
                .product();
            let k = k.max(1) as f64;
            if op == "AveragePool" {
                layer.raw_adds = (k - 1.0) * e;
                layer.raw_mults = e;
            } else if ctx.opts.count_max_pool {
                layer.raw_mults = (k - 1.0) * e;
                layer.note = "comparisons counted as multiplies".into();
            } else {
                layer.note = "max pooling not counted (--max-pool free)".into();
            }
            layer.mults = layer.raw_mults * mul_w;
            layer.adds = layer.raw_adds * add_w;
        }
        "Neg" => layer.note = "sign flip: free".into(),
        _ => return Ok(None),
    }
    Ok(Some(layer))
}

/// Constant operands of element-wise ops are parameters.
fn add_constant_params(ctx: &mut Ctx, n: &NodeProto, layer: &mut Layer) -> Result<()> {
    for v in n.input.iter().skip(1) {
        if let Some(w) = repr::weight(ctx.g, v)? {
            let bits = ctx.weight_bits(&w);
            layer.params += w.values.len() as f64 * bits as f64 / 32.0;
        }
    }
    Ok(())
}

fn count_weighted(ctx: &mut Ctx, idx: usize, w: &Weight, layer: &mut Layer) -> Result<()> {
    let g = ctx.g;
    let n = g.node(idx);
    let name = layer.name.clone();
    let op = layer_kind(n).map_or(n.op_type(), |(op, _)| op);
    let wshape = w.values.shape().to_vec();
    let e = numel(&layer.output_shape);

    // Output channels: (per-channel nonzero counts, output positions per channel).
    let (per_channel, positions): (Vec<u64>, f64) = match op {
        "Conv" => {
            let cout = wshape[0];
            let nz = channel_nonzeros(&w.values, 0);
            let mut p = e / cout as f64;
            if ctx.opts.output_size == OutputSize::Ref {
                p = ref_positions(ctx, n, &wshape, &name)?;
            }
            (nz, p)
        }
        "Gemm" | "MatMul" if wshape.len() == 2 => {
            let (axis, _) = weight_axis(n, &wshape)?;
            let axis = axis.expect("a 2-D weight has an output axis");
            (channel_nonzeros(&w.values, axis), e / wshape[axis] as f64)
        }
        "ConvTranspose" => {
            // Every input position meets every weight of its input channel.
            let x = ctx.shape(&n.input[0], &name)?;
            let cin = wshape[0] as f64;
            let nnz = w.values.iter().filter(|v| **v != 0.0).count() as f64;
            let mults = nnz * numel(&x) / cin;
            layer.raw_mults = mults;
            layer.raw_adds = (mults - e).max(0.0);
            (vec![], 0.0)
        }
        _ => {
            layer.note = format!(
                "weight of rank {} counted as a batched product",
                wshape.len()
            );
            let k = wshape[wshape.len() - 2] as f64;
            let nz = w.values.iter().filter(|v| **v != 0.0).count() as f64 / w.values.len() as f64;
            layer.raw_mults = e * k * nz;
            layer.raw_adds = e * (k * nz - 1.0).max(0.0);
            (vec![], 0.0)
        }
    };
    let numel_w = w.values.len() as u64;
    let nnz: u64 = if per_channel.is_empty() {
        w.values.iter().filter(|v| **v != 0.0).count() as u64
    } else {
        per_channel.iter().sum()
    };
    let wb = ctx.weight_bits(w);
    let ab = layer.act_bits;
    layer.weight_shape = Some(wshape.clone());
    layer.sparsity = Some(if numel_w == 0 {
        0.0
    } else {
        1.0 - nnz as f64 / numel_w as f64
    });
    layer.weight_bits = Some(wb);
    layer.weight_scheme = Some(w.scheme.clone());
    if !per_channel.is_empty() {
        layer.raw_mults = per_channel.iter().map(|&c| c as f64).sum::<f64>() * positions;
        layer.raw_adds = per_channel
            .iter()
            .map(|&c| c.saturating_sub(1) as f64)
            .sum::<f64>()
            * positions;
    }
    let channels = per_channel.len().max(1) as f64;

    // Storage and multiplies.
    if w.ternary {
        match ctx.opts.ternary {
            TernaryMode::SparseBinaryPlusScale => {
                // mask + one sign bit per nonzero + one 32-bit scale; +-1 multiplies at 1/32, one scale multiply per output.
                layer.params = (numel_w as f64 + nnz as f64 + 32.0) / 32.0;
                let scale_mults = channels * positions;
                layer.mults = layer.raw_mults / 32.0 + scale_mults * ab as f64 / 32.0;
                layer.raw_mults += scale_mults;
                layer.note = "ternary as sparse binary + scale".into();
            }
            TernaryMode::TwoMasksTwoCentroids => {
                // two masks + two 32-bit centroids; two multiplies per output.
                layer.params = (2.0 * numel_w as f64 + 64.0) / 32.0;
                layer.raw_mults = 2.0 * channels * positions;
                layer.mults = layer.raw_mults * ab.max(32) as f64 / 32.0;
                layer.note = "ternary as two masks + two centroids".into();
            }
        }
    } else {
        let (bits, masked) = storage_bits(numel_w, nnz, wb, ctx.opts.sparse_storage);
        layer.params = bits / 32.0;
        layer.mults = layer.raw_mults * wb.max(ab) as f64 / 32.0;
        if masked {
            layer.note = "sparse: values + one-bit mask".into();
        }
    }

    // Accumulation adds.
    let integer = w.quantized && ab < 32 && !ctx.freebie;
    layer.adds = match ctx.opts.accumulation {
        AccMode::Fp32 => layer.raw_adds,
        AccMode::Fp16 => layer.raw_adds * 0.5,
        AccMode::Tree | AccMode::FixedInt if integer && !per_channel.is_empty() => {
            let signed = !ctx.unsigned(&n.input[0].clone());
            let base = wb + ab - u32::from(signed);
            if ctx.opts.accumulation == AccMode::Tree {
                per_channel
                    .iter()
                    .map(|&c| adder_tree(base, c).0 as f64)
                    .sum::<f64>()
                    * positions
                    / 32.0
            } else {
                let widest = per_channel.iter().copied().max().unwrap_or(0);
                let max_bit = adder_tree(base, widest).1 as f64;
                per_channel
                    .iter()
                    .map(|&c| c.saturating_sub(1) as f64 * max_bit)
                    .sum::<f64>()
                    * positions
                    / 32.0
            }
        }
        _ => layer.raw_adds,
    };

    // The scales and zero points the weight's grid needs.
    if ctx.opts.quant_params {
        layer.params += w.param_bits / 32.0;
    }
    // Bias: its values are parameters, one add per output element.
    if let Some(b) = bias_input(n) {
        if let Some(bw) = repr::weight(g, b)? {
            layer.params += bw.values.len() as f64 * ctx.weight_bits(&bw) as f64 / 32.0;
            if ctx.opts.quant_params {
                layer.params += bw.param_bits / 32.0;
            }
        }
        layer.raw_adds += e;
        layer.adds += e * ctx.opts.elementwise_add_bits as f64 / 32.0;
    }
    Ok(())
}

/// Nonzeros of each slice along `axis` (the output channels).
fn channel_nonzeros(w: &ndarray::ArrayD<f32>, axis: usize) -> Vec<u64> {
    w.axis_iter(ndarray::Axis(axis))
        .map(|s| s.iter().filter(|v| **v != 0.0).count() as u64)
        .collect()
}

/// Output positions per channel by REF's formula (square-input convention per axis).
fn ref_positions(ctx: &Ctx, n: &NodeProto, wshape: &[usize], name: &str) -> Result<f64> {
    let x = ctx.shape(&n.input[0], name)?;
    let strides = n.get_ints("strides")?.unwrap_or_default();
    let pads = n.get_ints("pads")?.unwrap_or_default();
    let same = pads.iter().any(|&p| p > 0)
        || n.get_string("auto_pad")?
            .is_some_and(|a| a != "NOTSET" && a != "VALID");
    let mut p = x[0] as f64;
    for (i, &size) in x.iter().enumerate().skip(2) {
        let k = wshape[i] as f64;
        let s = *strides.get(i - 2).unwrap_or(&1) as f64;
        let pad = if same { (wshape[i] / 2) as f64 } else { 0.0 };
        p *= ((size as f64 - k + 1.0 + 2.0 * pad) / s).ceil();
    }
    Ok(p)
}

fn count_batchnorm(ctx: &mut Ctx, idx: usize, e: f64, layer: &mut Layer) -> Result<()> {
    let g = ctx.g;
    let n = g.node(idx);
    let c = ctx
        .shape(&n.input[1], &layer.name)?
        .iter()
        .product::<usize>() as f64;
    let add_w = ctx.opts.elementwise_add_bits as f64 / 32.0;
    let pb = ctx.float_bits() as f64 / 32.0;
    let mul_w = layer.act_bits as f64 / 32.0;
    let producer = g.producer(&n.input[0]).map(|(p, _)| p);
    // Mergeable only as the fold pass merges it: into the one reader of a weighted
    // layer's output, on that layer's channel axis (a MatMul's BN normalizes axis 1,
    // its feature axis only when the output has rank 2), with fixed statistics (an
    // initializer also listed as a graph input may be replaced at run time).
    let unmergeable = match producer {
        None => Some("follows no weighted layer".to_string()),
        Some(p) if !ctx.weights.contains_key(&p) => Some("follows no weighted layer".into()),
        Some(_) if g.use_count(&n.input[0]) != 1 => Some("its input has other readers".to_string()),
        Some(p) if g.node(p).op_type() == "MatMul" => {
            let rank = ctx.shape(&n.input[0], &layer.name)?.len();
            (rank != 2).then(|| {
                format!("normalizes axis 1 of a rank-{rank} MatMul output, not its feature axis")
            })
        }
        _ => None,
    }
    .or_else(|| n.input.iter().skip(1).find_map(|s| g.not_fixed(s)));
    if let Some(why) = unmergeable {
        layer.params = 2.0 * c * pb;
        layer.raw_mults = e;
        layer.raw_adds = e;
        layer.mults = e * mul_w;
        layer.adds = e * add_w;
        layer.note = format!("{why}: scale + shift");
        return Ok(());
    }
    let p = producer.expect("checked above");
    let producer_name = g.node_name(p).to_string();
    let pn = g.node(p);
    let has_bias = bias_input(pn).is_some();
    match ctx.opts.bn {
        BnMode::FoldBias if has_bias => {
            layer.note = format!("folded into '{producer_name}' (its bias counts once)")
        }
        BnMode::FoldBias | BnMode::FoldMulOnly => {
            layer.params = c * pb;
            layer.raw_adds = e;
            layer.adds = e * add_w;
            layer.note = format!("folded into '{producer_name}' as a bias");
        }
        BnMode::Unfolded => {
            layer.params = c * pb;
            layer.raw_mults = e;
            layer.raw_adds = e;
            layer.mults = e * mul_w;
            layer.adds = e * add_w;
        }
        BnMode::Ignore => layer.note = "not counted (--bn ignore)".into(),
        BnMode::ScaleBiasFp16 => {
            layer.params = (2.0 * c + 1.0) * 16.0 / 32.0;
            layer.raw_mults = e;
            layer.raw_adds = e;
            layer.mults = e * 0.5;
            layer.adds = e * 0.5;
        }
    }
    Ok(())
}
