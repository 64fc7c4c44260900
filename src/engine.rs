//! The one place onnx-micronet calls tract: the shape of every value (for counting
//! operations) and, later, runnable plans for accuracy runs.
//!
//! tract has its own (older) ONNX schema, so the model crosses over as bytes: our
//! proto is encoded (external data already inline) and decoded into
//! `tract_onnx::pb`. Shapes come from tract's analysis of the `InferenceModel`
//! with the graph's `value_info` ignored (exporters write symbolic dims there that
//! would clash with a concrete input), keyed by ONNX value name.

use std::collections::HashMap;
use std::sync::Arc;

use prost::Message;
use tract_onnx::prelude::*;

use crate::error::{Error, Result};
use crate::graph::{declared_elem_type, declared_shape, Graph};
use crate::onnx::{DataType, Model};

/// A graph input with the concrete shape it is analysed and run with.
#[derive(Debug, Clone, PartialEq)]
pub struct InputShape {
    pub name: String,
    pub shape: Vec<usize>,
    /// ONNX element type (`DataType` as i32).
    pub elem_type: i32,
}

/// The concrete input shapes to analyse the model with: the declared ones, with a
/// symbolic leading (batch) dim set to 1; `overrides` (by input position) win.
/// Any other symbolic dim without an override is an error naming the input.
pub fn input_shapes(model: &Model, overrides: &[Vec<usize>]) -> Result<Vec<InputShape>> {
    let graph = Graph::new(model.graph())?;
    let mut out = Vec::new();
    for (i, input) in graph.inputs().enumerate() {
        let elem = declared_elem_type(input).unwrap_or(DataType::Float as i32);
        if let Some(shape) = overrides.get(i) {
            out.push(InputShape {
                name: input.name().to_string(),
                shape: shape.clone(),
                elem_type: elem,
            });
            continue;
        }
        let dims = declared_shape(input).ok_or_else(|| {
            Error::Usage(format!(
                "input '{}' declares no shape; give one with --input-shape (e.g. 1,3,32,32)",
                input.name()
            ))
        })?;
        let mut shape = Vec::with_capacity(dims.len());
        for (axis, d) in dims.iter().enumerate() {
            match (axis, d) {
                (_, Some(v)) if *v >= 0 => shape.push(*v as usize),
                (0, _) => shape.push(1),
                _ => {
                    return Err(Error::Usage(format!(
                        "input '{}' has a symbolic dimension at axis {axis} ({}); give the shape with --input-shape (e.g. 1,3,32,32)",
                        input.name(),
                        crate::graph::shape_string(input)
                    )))
                }
            }
        }
        // Images, not terabytes: past 2^40 elements the counts would overflow.
        if crate::onnx::tensor::numel_of(&shape).is_none_or(|n| n > 1 << 40) {
            return Err(Error::Usage(format!(
                "input '{}' has shape {shape:?}: more than 2^40 elements; give a real one with --input-shape",
                input.name()
            )));
        }
        out.push(InputShape {
            name: input.name().to_string(),
            shape,
            elem_type: elem,
        });
    }
    Ok(out)
}

fn datum_type(elem: i32) -> DatumType {
    match DataType::try_from(elem).unwrap_or(DataType::Float) {
        DataType::Uint8 => DatumType::U8,
        DataType::Int8 => DatumType::I8,
        DataType::Int32 => DatumType::I32,
        DataType::Int64 => DatumType::I64,
        DataType::Float16 => DatumType::F16,
        DataType::Double => DatumType::F64,
        _ => DatumType::F32,
    }
}

/// Refuses, in words a user can act on, what tract would refuse in its own: a
/// BatchNormalization in training mode (`training_mode` = 1 from opset 14, or
/// running statistics as outputs; `is_test` = 0 in opsets 1 and 6) normalizes with
/// the batch's statistics and has no inference meaning.
fn check_inference_graph(model: &Model) -> Result<()> {
    use crate::onnx::attr::NodeAttrs;
    let opset = model.opset();
    for n in &model.graph().node {
        if n.op_type() != "BatchNormalization" {
            continue;
        }
        let outputs = n.output.iter().filter(|o| !o.is_empty()).count();
        let training = n.int_or("training_mode", 0)? != 0
            || outputs > 1
            || (opset < 7 && n.int_or("is_test", 0)? == 0);
        if training {
            return Err(Error::Usage(format!(
                "node '{}' (BatchNormalization) runs in training mode ({}): it normalizes with the batch's statistics; export the model in eval mode (model.eval() before torch.onnx.export)",
                n.name(),
                if opset < 7 {
                    format!("opset {opset}, is_test = 0")
                } else {
                    format!("training_mode = 1, {outputs} outputs")
                }
            )));
        }
    }
    Ok(())
}

/// Hands the model to tract (as bytes, see the module doc).
fn tract_proto(model: &Model) -> Result<tract_onnx::pb::ModelProto> {
    check_inference_graph(model)?;
    let bytes = model.proto.encode_to_vec();
    tract_onnx::pb::ModelProto::decode(&bytes[..])
        .map_err(|e| Error::Usage(format!("tract cannot decode the model: {e}")))
}

fn tract_err(model: &Model, what: &str, e: impl std::fmt::Display) -> Error {
    let file = model
        .path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "model".into());
    Error::Usage(format!("{file}: {what}: {e}"))
}

thread_local! {
    static IN_TRACT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread is inside a call into tract whose panics [`guarded`] turns
/// into errors (the CLI's panic hook stays quiet for those).
pub fn in_guarded_call() -> bool {
    IN_TRACT.with(|c| c.get())
}

/// Runs `f` (a call into tract), turning a panic into an error naming the model:
/// tract's analysis indexes missing inputs and divides by zero strides on malformed
/// graphs instead of returning errors.
fn guarded<T>(model: &Model, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let outer = IN_TRACT.with(|c| c.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    IN_TRACT.with(|c| c.set(outer));
    r.unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(tract_err(
            model,
            what,
            format!("tract panicked ({msg}); the graph is malformed"),
        ))
    })
}

/// The concrete shape of every value tract can determine, by ONNX value name,
/// for the given input shapes (from [`input_shapes`]).
pub fn value_shapes(model: &Model, inputs: &[InputShape]) -> Result<HashMap<String, Vec<usize>>> {
    guarded(model, "shape inference failed", || {
        value_shapes_unguarded(model, inputs)
    })
}

/// Ops whose output shapes depend on a float operand's shape only, never on its values.
const SHAPE_ONLY_READERS: &[&str] = &[
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "BatchNormalization",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "PRelu",
];

/// Quantized ops rewritten to their float equivalents for shape inference: (op,
/// float op, the inputs kept, in order). Their output shapes are the float op's;
/// tract does not know most of them (QLinearAdd, QGemm, ... are onnxruntime's
/// contrib ops) nor the element types they use (int4).
const SHAPE_PROXIES: &[(&str, &str, &[usize])] = &[
    ("QLinearConv", "Conv", &[0, 3, 8]),
    ("ConvInteger", "Conv", &[0, 1]),
    ("QLinearMatMul", "MatMul", &[0, 3]),
    ("MatMulInteger", "MatMul", &[0, 1]),
    ("QGemm", "Gemm", &[0, 3, 6]),
    ("QLinearAdd", "Add", &[0, 3]),
    ("QLinearMul", "Mul", &[0, 3]),
    ("QLinearGlobalAveragePool", "GlobalAveragePool", &[0]),
    ("QLinearAveragePool", "AveragePool", &[0]),
    ("QLinearSigmoid", "Sigmoid", &[0]),
    ("QLinearLeakyRelu", "LeakyRelu", &[0]),
    ("QLinearSoftmax", "Softmax", &[0]),
    ("QuantizeLinear", "Identity", &[0]),
];

/// The float equivalent of a quantized op, for shapes and counting (`None`: not one).
pub fn float_equivalent(op: &str) -> Option<&'static str> {
    SHAPE_PROXIES
        .iter()
        .find(|(q, _, _)| *q == op)
        .map(|(_, f, _)| *f)
        .or(match op {
            "QLinearConcat" => Some("Concat"),
            "DequantizeLinear" => Some("Cast"),
            _ => None,
        })
}

/// Element types tract loads (tract-onnx `tensor.rs`): others (int4, bfloat16,
/// float8, ...) must not reach it.
fn tract_loads(t: i32) -> bool {
    use DataType as D;
    matches!(
        DataType::try_from(t),
        Ok(D::Bool
            | D::Uint8
            | D::Uint16
            | D::Uint32
            | D::Uint64
            | D::Int8
            | D::Int16
            | D::Int32
            | D::Int64
            | D::Float16
            | D::Float
            | D::Double
            | D::String)
    )
}

/// The model for shape inference only, a float proxy of it:
/// - quantized ops become their float equivalents ([`SHAPE_PROXIES`]; QLinearConcat
///   a Concat of its data inputs, DynamicQuantizeLinear an Identity plus scalar
///   constants, DequantizeLinear a Cast to float), keeping value names;
/// - initializers that only such ops or [`SHAPE_ONLY_READERS`] read (large float
///   weights, integer weights and biases of quantized ops) and every initializer of
///   a type tract does not load (int4, bfloat16, float8) become float graph inputs
///   of the same shape: the weights are neither copied into tract's protobuf nor
///   decoded by it (the shapes do not depend on them).
///
/// Returns the proto and the moved tensors' shapes, in the order they were appended
/// to the inputs.
fn shape_proto(model: &Model) -> Result<(tract_onnx::pb::ModelProto, Vec<Vec<usize>>)> {
    use crate::onnx::attr;
    use crate::onnx::proto::{type_proto, NodeProto, TensorShapeProto, TypeProto, ValueInfoProto};
    const MIN_ELEMENTS: i64 = 1024;
    // Tensor payloads are reference-counted `Bytes`: this clone does not copy weights.
    let mut proto = model.proto.clone();
    let graph = proto.graph.as_mut().expect("loaded models have a graph");
    let mut rewritten: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut nodes = Vec::with_capacity(graph.node.len());
    for n in std::mem::take(&mut graph.node) {
        let op = n.op_type().to_string();
        let keep = |n: &NodeProto, op: &str, inputs: Vec<String>, attrs: Vec<_>| NodeProto {
            op_type: Some(op.into()),
            domain: None,
            input: inputs,
            output: n.output.clone(),
            name: n.name.clone(),
            attribute: attrs,
            ..Default::default()
        };
        let pick = |idx: &[usize]| -> Vec<String> {
            let mut v: Vec<String> = idx
                .iter()
                .map(|&i| n.input.get(i).cloned().unwrap_or_default())
                .collect();
            while v.last().is_some_and(|s| s.is_empty()) {
                v.pop();
            }
            v
        };
        let attrs: Vec<_> = n
            .attribute
            .iter()
            .filter(|a| a.name() != "channels_last")
            .cloned()
            .collect();
        if let Some((_, f, idx)) = SHAPE_PROXIES.iter().find(|(q, _, _)| *q == op) {
            let attrs = if *f == "Identity" { vec![] } else { attrs };
            let m = keep(&n, f, pick(idx), attrs);
            rewritten.extend(m.input.iter().cloned());
            nodes.push(m);
        } else if op == "QLinearConcat" {
            let inputs = n.input.iter().skip(2).step_by(3).cloned().collect();
            nodes.push(keep(&n, "Concat", inputs, attrs));
        } else if op == "DequantizeLinear" {
            let m = keep(
                &n,
                "Cast",
                pick(&[0]),
                vec![attr::int("to", DataType::Float as i64)],
            );
            rewritten.extend(m.input.iter().cloned());
            nodes.push(m);
        } else if op == "DynamicQuantizeLinear" {
            let x = n.input.first().cloned().unwrap_or_default();
            let outs = &n.output;
            if let Some(y) = outs.first() {
                nodes.push(NodeProto {
                    op_type: Some("Identity".into()),
                    input: vec![x],
                    output: vec![y.clone()],
                    ..Default::default()
                });
            }
            for o in outs.iter().skip(1).filter(|o| !o.is_empty()) {
                let zero = crate::onnx::TensorData::F32(ndarray::arr0(1.0f32).into_dyn());
                nodes.push(NodeProto {
                    op_type: Some("Constant".into()),
                    output: vec![o.clone()],
                    attribute: vec![attr::tensor("value", zero.to_proto(""))],
                    ..Default::default()
                });
            }
        } else {
            nodes.push(n);
        }
    }
    graph.node = nodes;
    let mut only_shape: HashMap<String, bool> = HashMap::new();
    for n in &graph.node {
        let ok = SHAPE_ONLY_READERS.contains(&n.op_type());
        for v in &n.input {
            let e = only_shape.entry(v.clone()).or_insert(true);
            *e &= ok;
        }
    }
    let outputs: std::collections::HashSet<String> =
        graph.output.iter().map(|o| o.name().to_string()).collect();
    let movable = |t: &crate::onnx::TensorProto| {
        if t.dims.iter().any(|d| *d < 0) || outputs.contains(t.name()) {
            return false;
        }
        let read_for_shape = only_shape.get(t.name()).copied().unwrap_or(false);
        !tract_loads(t.data_type())
            || (read_for_shape && rewritten.contains(t.name()))
            || (t.data_type() == DataType::Float as i32
                && t.dims.iter().product::<i64>() >= MIN_ELEMENTS
                && read_for_shape)
    };
    let names: std::collections::HashSet<String> = graph
        .initializer
        .iter()
        .filter(|t| movable(t))
        .map(|t| t.name().to_string())
        .collect();
    // Weights decoded by subgraphs of constants (packed storage) and read for their
    // shape only: tract's analysis would decode every one of them; their shape,
    // found without decoding (`repr::eval::shape`), is all it needs. Each becomes
    // an input of that shape and its decoder is dropped below.
    let decoded: Vec<(String, Vec<usize>)> = match crate::graph::Graph::of(model) {
        Ok(g) => {
            let mut v: Vec<(String, Vec<usize>)> = only_shape
                .iter()
                .filter(|(v, ok)| {
                    **ok && !v.is_empty()
                        && !outputs.contains(v.as_str())
                        && g.constant_proto(v).is_none()
                        && g.producer(v)
                            .is_some_and(|(i, _)| g.node(i).op_type() != "Constant")
                        // It becomes a float input: integer shape arithmetic read
                        // by a Sub (a static padding computed in-graph) must keep
                        // its values and type.
                        && crate::repr::eval::elem_type(&g, v) == Some(DataType::Float as i32)
                })
                .filter_map(|(v, _)| crate::repr::eval::shape(&g, v).map(|s| (v.clone(), s)))
                .collect();
            v.sort();
            v
        }
        Err(_) => Vec::new(),
    };
    if names.is_empty() && rewritten.is_empty() && decoded.is_empty() {
        return Ok((tract_proto(model)?, Vec::new()));
    }
    if !decoded.is_empty() {
        // The decoders: every node the decoded values are computed from.
        let producer: HashMap<&str, usize> = graph
            .node
            .iter()
            .enumerate()
            .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
            .collect();
        let mut decoder: std::collections::HashSet<usize> = std::collections::HashSet::new();
        let mut stack: Vec<&str> = decoded.iter().map(|(v, _)| v.as_str()).collect();
        while let Some(v) = stack.pop() {
            if let Some(&i) = producer.get(v) {
                if decoder.insert(i) {
                    stack.extend(graph.node[i].input.iter().map(String::as_str));
                }
            }
        }
        let gone: std::collections::HashSet<&str> =
            decoded.iter().map(|(v, _)| v.as_str()).collect();
        let mut removed: std::collections::HashSet<usize> = (0..graph.node.len())
            .filter(|&j| {
                graph.node[j]
                    .output
                    .iter()
                    .any(|o| gone.contains(o.as_str()))
            })
            .collect();
        // A decoder node nothing else reads any more goes too, until none is left.
        loop {
            let read: std::collections::HashSet<&str> = graph
                .node
                .iter()
                .enumerate()
                .filter(|(j, _)| !removed.contains(j))
                .flat_map(|(_, n)| n.input.iter().map(String::as_str))
                .chain(outputs.iter().map(String::as_str))
                .collect();
            let dead: Vec<usize> = decoder
                .iter()
                .copied()
                .filter(|&j| {
                    !removed.contains(&j)
                        && graph.node[j]
                            .output
                            .iter()
                            .all(|o| o.is_empty() || !read.contains(o.as_str()))
                })
                .collect();
            if dead.is_empty() {
                break;
            }
            removed.extend(dead);
        }
        crate::graph::remove_nodes(graph, &removed);
    }
    let mut moved: Vec<Vec<i64>> = graph
        .initializer
        .iter()
        .filter(|t| names.contains(t.name()))
        .map(|t| t.dims.clone())
        .collect();
    let mut moved_names: Vec<String> = graph
        .initializer
        .iter()
        .filter(|t| names.contains(t.name()))
        .map(|t| t.name().to_string())
        .collect();
    for (v, s) in &decoded {
        moved_names.push(v.clone());
        moved.push(s.iter().map(|&d| d as i64).collect());
    }
    graph.initializer.retain(|t| !names.contains(t.name()));
    graph.input.retain(|i| !names.contains(i.name()));
    // Initializers nothing reads any more (the scales and zero points of rewritten
    // ops) may be of types tract does not load: drop them.
    let read: std::collections::HashSet<String> = graph
        .node
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .chain(graph.output.iter().map(|o| o.name().to_string()))
        .collect();
    graph.initializer.retain(|t| read.contains(t.name()));
    let mut shapes = Vec::new();
    for (name, dims) in moved_names.iter().zip(&moved) {
        graph.input.push(ValueInfoProto {
            name: Some(name.clone()),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: Some(DataType::Float as i32),
                    shape: Some(TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|d| crate::onnx::proto::tensor_shape_proto::Dimension {
                                value: Some(
                                    crate::onnx::proto::tensor_shape_proto::dimension::Value::DimValue(*d),
                                ),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        });
        shapes.push(dims.iter().map(|d| *d as usize).collect());
    }
    check_inference_graph(model)?;
    let bytes = proto.encode_to_vec();
    let parsed = tract_onnx::pb::ModelProto::decode(&bytes[..])
        .map_err(|e| Error::Usage(format!("tract cannot decode the model: {e}")))?;
    Ok((parsed, shapes))
}

fn value_shapes_unguarded(
    model: &Model,
    inputs: &[InputShape],
) -> Result<HashMap<String, Vec<usize>>> {
    check_inference_graph(model)?;
    let (proto, moved) = shape_proto(model)?;
    let onnx = tract_onnx::onnx().with_ignore_value_info(true);
    let parsed = onnx
        .parse(&proto, None)
        .map_err(|e| tract_err(model, "tract cannot load the model", format!("{e:#}")))?;
    let mut m = parsed.model;
    for (i, input) in inputs.iter().enumerate() {
        m.set_input_fact(
            i,
            InferenceFact::dt_shape(datum_type(input.elem_type), &input.shape),
        )
        .map_err(|e| tract_err(model, "setting the input shape", e))?;
    }
    for (j, shape) in moved.iter().enumerate() {
        m.set_input_fact(
            inputs.len() + j,
            InferenceFact::dt_shape(f32::datum_type(), shape),
        )
        .map_err(|e| tract_err(model, "setting a weight's shape", e))?;
    }
    m.analyse(false)
        .map_err(|e| tract_err(model, "shape inference failed", format!("{e:#}")))?;
    let mut out = HashMap::new();
    for (name, outlet) in parsed.outlets_by_name {
        let Ok(fact) = m.outlet_fact(outlet) else {
            continue;
        };
        if let Ok(Some(dims)) = fact.shape.as_concrete_finite() {
            out.insert(name, dims.to_vec());
        }
    }
    Ok(out)
}

/// A model made ready to run in tract: fixed batch of 1, weight-decoding subgraphs
/// folded to constants (`compute_const_facts`), optimized. The plan is shared by
/// all worker threads; each spawns its own state.
pub struct Plan {
    plan: Arc<TypedRunnableModel>,
    /// The input shape it was built for (batch 1).
    pub input_shape: Vec<usize>,
    /// Elements of the first output per image (the class count of a classifier),
    /// when tract knows it before running.
    pub output_len: Option<usize>,
}

/// Builds a plan for the model's first input with `input_shape` (batch 1).
pub fn plan(model: &Model, input_shape: &[usize]) -> Result<Plan> {
    guarded(model, "tract cannot load the model", || {
        plan_unguarded(model, input_shape)
    })
}

fn plan_unguarded(model: &Model, input_shape: &[usize]) -> Result<Plan> {
    let proto = tract_proto(model)?;
    let onnx = tract_onnx::onnx().with_ignore_value_info(true);
    let parsed = onnx
        .parse(&proto, None)
        .map_err(|e| tract_err(model, "tract cannot load the model", format!("{e:#}")))?;
    let mut m = parsed.model;
    m.set_input_fact(0, f32::fact(input_shape).into())
        .map_err(|e| tract_err(model, "setting the input shape", e))?;
    let plan = runnable(model, m)?;
    let output_len = plan
        .model()
        .output_fact(0)
        .ok()
        .and_then(|f| f.shape.as_concrete().map(|d| d.iter().product::<usize>()));
    Ok(Plan {
        plan,
        input_shape: input_shape.to_vec(),
        output_len,
    })
}

/// Types the inference model, folds its constant subgraphs (weight decoders) and
/// optimizes it into a runnable plan.
fn runnable(model: &Model, m: InferenceModel) -> Result<Arc<TypedRunnableModel>> {
    let mut typed = m
        .into_typed()
        .map_err(|e| tract_err(model, "tract cannot type the model", format!("{e:#}")))?;
    typed
        .compute_const_facts()
        .map_err(|e| tract_err(model, "folding constants", format!("{e:#}")))?;
    typed
        .into_optimized()
        .and_then(|m| m.into_runnable())
        .map_err(|e| tract_err(model, "tract cannot optimize the model", format!("{e:#}")))
}

/// Runs the model once on one input tensor of any rank (its first input; the
/// shape fixes the input) and returns every output as f32. For tests and
/// one-off checks; accuracy runs use [`plan`] and [`run_images`].
pub fn run_tensor(model: &Model, x: ndarray::ArrayD<f32>) -> Result<Vec<ndarray::ArrayD<f32>>> {
    guarded(model, "tract cannot run the model", || {
        let proto = tract_proto(model)?;
        let onnx = tract_onnx::onnx().with_ignore_value_info(true);
        let parsed = onnx
            .parse(&proto, None)
            .map_err(|e| tract_err(model, "tract cannot load the model", format!("{e:#}")))?;
        let mut m = parsed.model;
        m.set_input_fact(0, f32::fact(x.shape()).into())
            .map_err(|e| tract_err(model, "setting the input shape", e))?;
        let plan = runnable(model, m)?;
        let t: Tensor = x.into();
        let y = plan
            .run(tvec!(t.into_tvalue()))
            .map_err(|e| Error::Usage(format!("tract failed: {e:#}")))?;
        y.iter()
            .map(|v| {
                v.cast_to::<f32>()
                    .map_err(|e| Error::Usage(format!("output is not numeric: {e}")))?
                    .to_plain_array_view::<f32>()
                    .map(|a| a.to_owned())
                    .map_err(|e| Error::Usage(format!("output: {e}")))
            })
            .collect()
    })
}

/// (image index, its flattened first output) pairs computed by one worker.
type Rows = Vec<(usize, Vec<f32>)>;

/// The first output of every image, flattened: N x outputs. Images are run one
/// at a time on `threads` OS threads (each with its own tract state), the fastest
/// setup measured for CNNs of this size. `progress` is called with the number of
/// images done so far (from any thread).
pub fn run_images(
    plan: &Plan,
    images: ndarray::ArrayView4<f32>,
    threads: usize,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<ndarray::Array2<f32>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let n = images.shape()[0];
    let per_image: Vec<usize> = images.shape()[1..].to_vec();
    if per_image[..] != plan.input_shape[1..] {
        return Err(Error::Usage(format!(
            "images of shape {:?} do not fit the model input {:?}",
            per_image, plan.input_shape
        )));
    }
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let threads = threads.clamp(1, n.max(1));
    let results: Vec<Result<Rows>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<Rows> {
                    let mut state = plan
                        .plan
                        .spawn()
                        .map_err(|e| Error::Usage(format!("tract: {e}")))?;
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return Ok(out);
                        }
                        let x = images.slice(ndarray::s![i..i + 1, .., .., ..]).to_owned();
                        let t: Tensor = x.into_dyn().into();
                        let y = state.run(tvec!(t.into_tvalue())).map_err(|e| {
                            Error::Usage(format!("tract failed on image {i}: {e:#}"))
                        })?;
                        let logits = y[0]
                            .to_plain_array_view::<f32>()
                            .map_err(|e| Error::Usage(format!("model output is not float32: {e}")))?
                            .iter()
                            .copied()
                            .collect();
                        out.push((i, logits));
                        progress(done.fetch_add(1, Ordering::Relaxed) + 1);
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker thread panicked"))
            .collect()
    });
    let mut rows: Vec<Option<Vec<f32>>> = vec![None; n];
    for r in results {
        for (i, v) in r? {
            rows[i] = Some(v);
        }
    }
    let width = rows.first().and_then(|r| r.as_ref()).map_or(0, Vec::len);
    let mut out = ndarray::Array2::<f32>::zeros((n, width));
    for (i, r) in rows.into_iter().enumerate() {
        let r = r.expect("every image ran");
        if r.len() != width {
            return Err(Error::Usage(format!(
                "image {i} gave {} outputs, image 0 gave {width}",
                r.len()
            )));
        }
        out.row_mut(i).assign(&ndarray::ArrayView1::from(&r));
    }
    Ok(out)
}

/// Progress of the calibration runs ([`capture`]): called with (images merged so
/// far, images in the run), first with 0. The library prints nothing itself; the
/// CLI installs a progress bar here (once per process).
static CAPTURE_PROGRESS: std::sync::OnceLock<Box<dyn Fn(usize, usize) + Send + Sync>> =
    std::sync::OnceLock::new();

/// Installs the [`capture`] progress callback (the first call wins).
pub fn set_capture_progress(f: impl Fn(usize, usize) + Send + Sync + 'static) {
    let _ = CAPTURE_PROGRESS.set(Box::new(f));
}

/// Runs the model on every image and hands the values named in `values` (graph
/// input or any intermediate value, in that order) to `fold`, never holding more
/// than one image's activations per worker.
///
/// The images are cut into consecutive chunks of `chunk` images. Each chunk is
/// folded in image order into a fresh state from `init`, on one of `threads`
/// worker threads; `merge` then receives the chunk states on the calling thread
/// in chunk order. So the result does not depend on the thread count or timing:
/// floating-point sums come out bit-identical run to run. At most `2 * threads`
/// finished chunk states wait for their turn.
#[allow(clippy::too_many_arguments)]
pub fn capture<S: Send>(
    model: &Model,
    input_shape: &[usize],
    values: &[String],
    images: ndarray::ArrayView4<f32>,
    threads: usize,
    chunk: usize,
    init: impl Fn() -> S + Sync,
    fold: impl Fn(&mut S, usize, &[ndarray::ArrayViewD<f32>]) + Sync,
    mut merge: impl FnMut(S),
) -> Result<()> {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{mpsc, Condvar, Mutex};

    let n = images.shape()[0];
    if images.shape()[1..] != input_shape[1..] {
        return Err(Error::Usage(format!(
            "images of shape {:?} do not fit the model input {:?}",
            &images.shape()[1..],
            input_shape
        )));
    }
    let graph = Graph::new(model.graph())?;
    let input_name = graph
        .inputs()
        .next()
        .map(|i| i.name().to_string())
        .ok_or_else(|| Error::Usage("the model has no input".into()))?;

    // Which output of the plan carries each value (None: the image itself).
    let proto = tract_proto(model)?;
    let onnx = tract_onnx::onnx().with_ignore_value_info(true);
    let parsed = onnx
        .parse(&proto, None)
        .map_err(|e| tract_err(model, "tract cannot load the model", format!("{e:#}")))?;
    let mut outlets = Vec::new();
    let mut slots = Vec::new();
    for v in values {
        if *v == input_name {
            slots.push(None);
            continue;
        }
        let outlet = *parsed
            .outlets_by_name
            .get(v)
            .ok_or_else(|| Error::Usage(format!("value '{v}' is not in the model tract loaded")))?;
        let slot = match outlets.iter().position(|o| *o == outlet) {
            Some(s) => s,
            None => {
                outlets.push(outlet);
                outlets.len() - 1
            }
        };
        slots.push(Some(slot));
    }
    let plan = if outlets.is_empty() {
        None
    } else {
        let mut m = parsed.model;
        m.set_input_fact(0, f32::fact(input_shape).into())
            .map_err(|e| tract_err(model, "setting the input shape", e))?;
        m.select_output_outlets(&outlets)
            .map_err(|e| tract_err(model, "selecting the captured values", e))?;
        Some(runnable(model, m)?)
    };

    let chunk = chunk.max(1);
    let chunks = n.div_ceil(chunk);
    let threads = threads.clamp(1, chunks.max(1));
    let next = AtomicUsize::new(0);
    let abort = AtomicBool::new(false);
    let merged = (Mutex::new(0usize), Condvar::new());
    let (tx, rx) = mpsc::channel::<(usize, Result<S>)>();
    let mut failure: Option<Error> = None;
    // A panic (in `fold` on a worker, in `merge` here) must not leave workers waiting
    // for a chunk that never comes: it stops them all; the scope then re-raises it.
    struct OnPanic<F: Fn()>(F);
    impl<F: Fn()> Drop for OnPanic<F> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                (self.0)();
            }
        }
    }
    // Raising the flag under the lock, so no waiting worker misses the wake-up.
    let stop = || {
        let _held = merged.0.lock().expect("no poisoned lock");
        abort.store(true, Ordering::Relaxed);
        merged.1.notify_all();
    };
    std::thread::scope(|s| {
        for _ in 0..threads {
            let tx = tx.clone();
            let (plan, slots, next, abort, merged, init, fold, stop) =
                (&plan, &slots, &next, &abort, &merged, &init, &fold, &stop);
            s.spawn(move || {
                let _on_panic = OnPanic(stop);
                let mut state = match plan.as_ref().map(|p| p.spawn()).transpose() {
                    Ok(st) => st,
                    Err(e) => {
                        stop();
                        let _ = tx.send((usize::MAX, Err(Error::Usage(format!("tract: {e}")))));
                        return;
                    }
                };
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= chunks || abort.load(Ordering::Relaxed) {
                        return;
                    }
                    {
                        let mut done = merged.0.lock().expect("no poisoned lock");
                        while k >= *done + 2 * threads && !abort.load(Ordering::Relaxed) {
                            done = merged.1.wait(done).expect("no poisoned lock");
                        }
                    }
                    let mut acc = init();
                    let mut result = Ok(());
                    for i in k * chunk..((k + 1) * chunk).min(n) {
                        let x = images.slice(ndarray::s![i..i + 1, .., .., ..]);
                        let outputs = match state.as_mut() {
                            Some(st) => {
                                let t: Tensor = x.to_owned().into_dyn().into();
                                match st.run(tvec!(t.into_tvalue())) {
                                    Ok(y) => y,
                                    Err(e) => {
                                        result = Err(Error::Usage(format!(
                                            "tract failed on image {i}: {e:#}"
                                        )));
                                        break;
                                    }
                                }
                            }
                            None => tvec!(),
                        };
                        let mut views = Vec::with_capacity(slots.len());
                        for slot in slots.iter() {
                            match slot {
                                None => views.push(x.into_dyn()),
                                Some(j) => match outputs[*j].to_plain_array_view::<f32>() {
                                    Ok(v) => views.push(v),
                                    Err(e) => {
                                        result = Err(Error::Usage(format!(
                                            "captured value is not float32: {e}"
                                        )));
                                        break;
                                    }
                                },
                            }
                        }
                        if result.is_err() {
                            break;
                        }
                        fold(&mut acc, i, &views);
                    }
                    let failed = result.is_err();
                    if tx.send((k, result.map(|_| acc))).is_err() || failed {
                        stop();
                        return;
                    }
                }
            });
        }
        drop(tx);
        let _on_panic = OnPanic(&stop);
        let mut pending: BTreeMap<usize, S> = BTreeMap::new();
        let mut want = 0usize;
        let progress = CAPTURE_PROGRESS.get();
        if let Some(p) = progress {
            p(0, n);
        }
        for (k, r) in rx {
            match r {
                Err(e) => {
                    failure.get_or_insert(e);
                    stop();
                }
                Ok(acc) if failure.is_none() => {
                    pending.insert(k, acc);
                    while let Some(acc) = pending.remove(&want) {
                        merge(acc);
                        want += 1;
                        if let Some(p) = progress {
                            p((want * chunk).min(n), n);
                        }
                    }
                    *merged.0.lock().expect("no poisoned lock") = want;
                    merged.1.notify_all();
                }
                Ok(_) => {}
            }
        }
    });
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
