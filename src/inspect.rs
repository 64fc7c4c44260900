//! `inspect`: what a model file holds, as a struct that renders as text or JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::error::Result;
use crate::graph::{declared_elem_type, shape_string, Graph};
use crate::onnx::tensor::{dtype_name, elem_bits, shape_of};
use crate::onnx::{Model, TensorData};
use crate::score::render::{fmt_shape, name_width};

#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub file: Option<String>,
    pub file_bytes: Option<u64>,
    pub external_data_files: Vec<String>,
    pub ir_version: i64,
    pub opsets: Vec<Opset>,
    pub producer: String,
    pub producer_version: String,
    pub graph_name: String,
    pub inputs: Vec<Value>,
    pub outputs: Vec<Value>,
    pub nodes: usize,
    /// op type (with its domain when not the default) -> count, most frequent first in text.
    pub op_histogram: BTreeMap<String, usize>,
    pub batch_normalization_nodes: usize,
    pub initializers: usize,
    pub parameters: usize,
    pub parameter_bytes: u64,
    pub by_element_type: BTreeMap<String, TypeTotals>,
    pub weights: Vec<Weight>,
    pub metadata_props: BTreeMap<String, String>,
    pub functions: usize,
    pub sparse_initializers: usize,
    /// The weighted layers as the score reads them (logical weights: scheme, bits
    /// and sparsity of packed or quantized storage, not its decoder tensors), when
    /// some weight is packed or quantized; empty for plain float weights.
    pub layers: Vec<LayerView>,
    /// Why `layers` is empty when the score could not read the model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layers_note: Option<String>,
}

/// One weighted layer's logical weight.
#[derive(Debug, Clone, Serialize)]
pub struct LayerView {
    pub name: String,
    pub op_type: String,
    pub weight_shape: Option<Vec<usize>>,
    pub scheme: Option<String>,
    pub bits: Option<u32>,
    pub sparsity: Option<f64>,
    pub act_bits: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Opset {
    pub domain: String,
    pub version: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Value {
    pub name: String,
    pub elem_type: String,
    pub shape: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TypeTotals {
    pub tensors: usize,
    pub elements: usize,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Weight {
    pub name: String,
    pub elem_type: String,
    pub shape: Vec<usize>,
    pub elements: usize,
    pub zeros: usize,
    pub sparsity: f64,
}

/// Collects the inspection of a loaded model.
pub fn inspect(model: &Model) -> Result<Inspection> {
    // The layers' logical weights, read the way the score reads them (default
    // counting options), for models with packed or quantized weights (for plain
    // float weights the weights table says it all, and a large model is not read
    // twice); a model the score cannot read still inspects.
    let compressed = {
        let g = crate::graph::Graph::of(model)?;
        crate::graph::weighted_layers(&g)
            .iter()
            .any(|l| l.not_float_initializer(&g).is_some())
    };
    let scored = if compressed {
        crate::score::options::Counting::default()
            .resolve(model)
            .and_then(|o| crate::score::score(model, &o))
            .map(Some)
    } else {
        Ok(None)
    };
    let (layers, layers_note) = match scored {
        Ok(None) => (Vec::new(), None),
        Ok(Some(r)) => (
            r.layers
                .iter()
                .filter(|l| l.weight_shape.is_some())
                .map(|l| LayerView {
                    name: l.name.clone(),
                    op_type: l.op_type.clone(),
                    weight_shape: l.weight_shape.clone(),
                    scheme: l.weight_scheme.clone(),
                    bits: l.weight_bits,
                    sparsity: l.sparsity,
                    act_bits: l.act_bits,
                })
                .collect(),
            None,
        ),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    let proto = &model.proto;
    let graph = proto.graph.as_ref().expect("loaded models have a graph");
    let view = Graph::new(graph)?;

    let mut op_histogram = BTreeMap::new();
    for n in &graph.node {
        let key = match n.domain() {
            "" | "ai.onnx" => n.op_type().to_string(),
            d => format!("{d}::{}", n.op_type()),
        };
        *op_histogram.entry(key).or_insert(0) += 1;
    }

    let mut by_element_type: BTreeMap<String, TypeTotals> = BTreeMap::new();
    let mut weights = Vec::new();
    let (mut parameters, mut parameter_bytes) = (0usize, 0u64);
    for t in &graph.initializer {
        let shape = shape_of(t)?;
        let elements = shape.iter().product::<usize>();
        let bytes = match (t.raw_data.as_ref(), elem_bits(t.data_type())) {
            (Some(r), _) => r.len() as u64,
            (None, Some(bits)) => (elements as u64 * bits).div_ceil(8),
            (None, None) => t.string_data.iter().map(|s| s.len() as u64).sum(),
        };
        let e = by_element_type
            .entry(dtype_name(t.data_type()))
            .or_default();
        e.tensors += 1;
        e.elements += elements;
        e.bytes += bytes;
        parameters += elements;
        parameter_bytes += bytes;
        let zeros = TensorData::from_proto(t).map(|d| d.zeros()).unwrap_or(0);
        weights.push(Weight {
            name: t.name().to_string(),
            elem_type: dtype_name(t.data_type()),
            shape,
            elements,
            zeros,
            sparsity: if elements == 0 {
                0.0
            } else {
                zeros as f64 / elements as f64
            },
        });
    }

    let value = |v: &crate::onnx::ValueInfoProto| Value {
        name: v.name().to_string(),
        elem_type: declared_elem_type(v)
            .map(dtype_name)
            .unwrap_or_else(|| "?".into()),
        shape: shape_string(v),
    };
    let file_bytes = model
        .path
        .as_ref()
        .and_then(|p| std::fs::metadata(p).ok())
        .map(|m| m.len());
    Ok(Inspection {
        file: model.path.as_ref().map(|p| p.display().to_string()),
        file_bytes,
        external_data_files: model
            .external_files
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        ir_version: proto.ir_version(),
        opsets: proto
            .opset_import
            .iter()
            .map(|o| Opset {
                domain: if o.domain().is_empty() {
                    "ai.onnx".into()
                } else {
                    o.domain().to_string()
                },
                version: o.version(),
            })
            .collect(),
        producer: proto.producer_name().to_string(),
        producer_version: proto.producer_version().to_string(),
        graph_name: graph.name().to_string(),
        inputs: view.inputs().map(value).collect(),
        outputs: graph.output.iter().map(value).collect(),
        nodes: graph.node.len(),
        batch_normalization_nodes: op_histogram.get("BatchNormalization").copied().unwrap_or(0),
        op_histogram,
        initializers: graph.initializer.len(),
        parameters,
        parameter_bytes,
        by_element_type,
        weights,
        metadata_props: proto
            .metadata_props
            .iter()
            .map(|p| (p.key().to_string(), p.value().to_string()))
            .collect(),
        functions: proto.functions.len(),
        sparse_initializers: graph.sparse_initializer.len(),
        layers,
        layers_note,
    })
}

/// Thousands separators for counts in text reports.
pub fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl Inspection {
    /// The terminal rendering. Weights below `min_elements` are summarised, not listed.
    pub fn to_text(&self, min_elements: usize) -> String {
        let mut s = String::new();
        let w = &mut s;
        if let Some(f) = &self.file {
            let _ = write!(w, "{f}");
            if let Some(b) = self.file_bytes {
                let _ = write!(w, "  ({} bytes)", group_digits(b));
            }
            let _ = writeln!(w);
        }
        for f in &self.external_data_files {
            let _ = writeln!(w, "  external data: {f}");
        }
        let opsets: Vec<String> = self
            .opsets
            .iter()
            .map(|o| format!("{} {}", o.domain, o.version))
            .collect();
        let _ = writeln!(
            w,
            "IR version {}, opsets: {}",
            self.ir_version,
            opsets.join(", ")
        );
        let _ = writeln!(w, "producer: {} {}", self.producer, self.producer_version);
        let _ = writeln!(w, "\ninputs:");
        for v in &self.inputs {
            let _ = writeln!(w, "  {:<24} {:<8} {}", v.name, v.elem_type, v.shape);
        }
        let _ = writeln!(w, "outputs:");
        for v in &self.outputs {
            let _ = writeln!(w, "  {:<24} {:<8} {}", v.name, v.elem_type, v.shape);
        }
        let _ = writeln!(
            w,
            "\n{} nodes, {} BatchNormalization",
            self.nodes, self.batch_normalization_nodes
        );
        let mut ops: Vec<(&String, &usize)> = self.op_histogram.iter().collect();
        ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (op, n) in ops {
            let _ = writeln!(w, "  {n:>6}  {op}");
        }
        let _ = writeln!(
            w,
            "\nparameters: {} in {} initializers, {} bytes",
            group_digits(self.parameters as u64),
            self.initializers,
            group_digits(self.parameter_bytes)
        );
        for (ty, t) in &self.by_element_type {
            let _ = writeln!(
                w,
                "  {ty:<10} {:>12} elements  {:>14} bytes  in {} tensors",
                group_digits(t.elements as u64),
                group_digits(t.bytes),
                t.tensors
            );
        }
        let listed: Vec<&Weight> = self
            .weights
            .iter()
            .filter(|x| x.elements >= min_elements)
            .collect();
        if !listed.is_empty() {
            let _ = writeln!(
                w,
                "\nweights of {min_elements}+ elements (sparsity = exact zeros):"
            );
            let name_w = name_width(listed.iter().map(|x| x.name.as_str()), 48);
            let _ = writeln!(
                w,
                "  {:<name_w$} {:<8} {:<18} {:>10} {:>9}",
                "name", "type", "shape", "elements", "sparsity"
            );
            for x in &listed {
                let _ = writeln!(
                    w,
                    "  {:<name_w$} {:<8} {:<18} {:>10} {:>8.2}%",
                    x.name,
                    x.elem_type,
                    fmt_shape(&x.shape),
                    group_digits(x.elements as u64),
                    100.0 * x.sparsity
                );
            }
            let rest = self.weights.len() - listed.len();
            if rest > 0 {
                let _ = writeln!(w, "  (+{rest} smaller initializers)");
            }
        }
        // Packed or quantized storage: the layers as they compute, not the
        // decoder tensors above.
        let compressed = self
            .layers
            .iter()
            .any(|l| l.scheme.is_some() || l.bits.is_some_and(|b| b < 32));
        if compressed {
            let _ = writeln!(
                w,
                "\nlayers (logical weights of packed or quantized storage):"
            );
            let name_w = name_width(self.layers.iter().map(|l| l.name.as_str()), 48);
            let _ = writeln!(
                w,
                "  {:<name_w$} {:<8} {:<16} {:>4} {:>9} {:>8}  storage",
                "layer", "op", "weight", "bits", "sparsity", "act bits"
            );
            for l in &self.layers {
                let shape = l.weight_shape.as_deref().map(fmt_shape).unwrap_or_default();
                let _ = writeln!(
                    w,
                    "  {:<name_w$} {:<8} {:<16} {:>4} {:>8.2}% {:>8}  {}",
                    l.name,
                    l.op_type,
                    shape,
                    l.bits.map(|b| b.to_string()).unwrap_or_else(|| "-".into()),
                    100.0 * l.sparsity.unwrap_or(0.0),
                    l.act_bits,
                    l.scheme.as_deref().unwrap_or("float"),
                );
            }
        }
        if let Some(n) = &self.layers_note {
            let _ = writeln!(w, "\nlayers: not read ({n})");
        }
        if !self.metadata_props.is_empty() {
            let _ = writeln!(w, "\nmetadata:");
            for (k, v) in &self.metadata_props {
                // Multi-line values (a recipe) indented under their key.
                let v = v.trim_end().replace('\n', "\n      ");
                let _ = writeln!(w, "  {k} = {v}");
            }
        }
        if self.functions > 0 || self.sparse_initializers > 0 {
            let _ = writeln!(
                w,
                "\n{} functions, {} sparse initializers",
                self.functions, self.sparse_initializers
            );
        }
        s
    }
}
