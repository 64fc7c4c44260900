//! Bytes on disk, per counted layer, beside what the score counts.
//!
//! For each layer with constant inputs (weights, biases, constant operands), the
//! constant subgraph behind those inputs is walked back to its initializers:
//!   stored  = protobuf bytes of the initializers only this layer reads
//!             (the payload: mask, codes, values, scales, codebooks, + tensor headers)
//!   decoder = protobuf bytes of the decoding nodes on the way
//! Initializers several layers share (the packer's `pk_*` constants, shape
//! tensors) are counted once, as shared decoder bytes. The rest of the file is
//! the graph itself: the layers' nodes, value names, inputs and outputs.
//! The score's storage is params x 4 bytes (params in 32-bit units).

use std::collections::{HashMap, HashSet};

use prost::Message;
use serde::Serialize;

use super::Layer;
use crate::graph::Graph;
use crate::onnx::Model;
use crate::repr::packed::SHARED_PREFIX;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LayerDisk {
    pub layer: String,
    /// The score's parameter storage, params x 4.
    pub score_bytes: f64,
    /// Initializer bytes only this layer reads.
    pub stored_bytes: u64,
    /// Bytes of the decoding nodes behind its constant inputs.
    pub decoder_bytes: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct DiskReport {
    pub layers: Vec<LayerDisk>,
    pub score_bytes: f64,
    pub stored_bytes: u64,
    pub decoder_bytes: u64,
    /// Initializers read by several layers' decoders (shared constants).
    pub shared_bytes: u64,
    /// Everything else: the graph's own nodes, names, inputs, outputs, metadata.
    pub other_bytes: u64,
    /// The whole model, encoded.
    pub file_bytes: u64,
}

/// Measures `model` for the counted `layers` of its score.
pub fn measure(model: &Model, layers: &[Layer]) -> crate::error::Result<DiskReport> {
    let g = Graph::new(model.graph())?;
    let by_name: HashMap<&str, usize> = (0..g.nodes().len()).map(|i| (g.node_name(i), i)).collect();
    // Per layer: the initializers and decoding nodes behind its non-data inputs.
    let mut behind: Vec<(HashSet<String>, HashSet<usize>)> = Vec::new();
    let mut readers: HashMap<String, usize> = HashMap::new();
    for l in layers {
        let mut inits = HashSet::new();
        let mut nodes = HashSet::new();
        if let Some(&i) = by_name.get(l.name.as_str()) {
            for v in g.node(i).input.iter().skip(1).filter(|v| !v.is_empty()) {
                walk(&g, v, &mut inits, &mut nodes);
            }
        }
        for t in &inits {
            *readers.entry(t.clone()).or_default() += 1;
        }
        behind.push((inits, nodes));
    }
    let init_bytes: HashMap<&str, u64> = model
        .graph()
        .initializer
        .iter()
        .map(|t| (t.name(), t.encoded_len() as u64))
        .collect();
    let mut r = DiskReport {
        file_bytes: model.proto.encoded_len() as u64,
        ..Default::default()
    };
    let mut shared: HashSet<&str> = HashSet::new();
    for (l, (inits, nodes)) in layers.iter().zip(&behind) {
        let mut stored = 0;
        for t in inits {
            if readers[t] > 1 || t.starts_with(SHARED_PREFIX) {
                shared.insert(t.as_str());
            } else {
                stored += init_bytes.get(t.as_str()).copied().unwrap_or(0);
            }
        }
        let decoder: u64 = nodes.iter().map(|&i| g.node(i).encoded_len() as u64).sum();
        r.layers.push(LayerDisk {
            layer: l.name.clone(),
            score_bytes: l.params * 4.0,
            stored_bytes: stored,
            decoder_bytes: decoder,
        });
        r.score_bytes += l.params * 4.0;
        r.stored_bytes += stored;
        r.decoder_bytes += decoder;
    }
    r.shared_bytes = shared
        .iter()
        .map(|t| init_bytes.get(t).copied().unwrap_or(0))
        .sum();
    r.other_bytes = r
        .file_bytes
        .saturating_sub(r.stored_bytes + r.decoder_bytes + r.shared_bytes);
    Ok(r)
}

/// Collects the initializers and constant-computing nodes behind `v`.
fn walk(g: &Graph, v: &str, inits: &mut HashSet<String>, nodes: &mut HashSet<usize>) {
    if g.initializer(v).is_some() {
        inits.insert(v.to_string());
        return;
    }
    let Some((i, _)) = g.producer(v) else { return };
    if nodes.contains(&i) {
        return;
    }
    let n = g.node(i);
    // Only subgraphs of constants: a node reading a graph input is not a decoder.
    if !constant_only(g, v, &mut HashMap::new()) {
        return;
    }
    nodes.insert(i);
    for x in n.input.iter().filter(|x| !x.is_empty()) {
        walk(g, x, inits, nodes);
    }
}

fn constant_only(g: &Graph, v: &str, memo: &mut HashMap<String, bool>) -> bool {
    if let Some(&b) = memo.get(v) {
        return b;
    }
    let b = if g.initializer(v).is_some() {
        true
    } else if let Some((i, _)) = g.producer(v) {
        let n = g.node(i);
        n.op_type() != "Shape"
            && n.input
                .iter()
                .filter(|x| !x.is_empty())
                .all(|x| constant_only(g, x, memo))
    } else {
        false
    };
    memo.insert(v.to_string(), b);
    b
}

impl DiskReport {
    /// The table: per layer with a packed or stored weight, then totals.
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let w = self
            .layers
            .iter()
            .map(|l| l.layer.chars().count())
            .max()
            .unwrap_or(5)
            .clamp(5, 36);
        let _ = writeln!(
            s,
            "\nbytes on disk (score: params x 4 bytes):\n{:<w$} {:>12} {:>12} {:>10}",
            "layer", "score", "stored", "decoder"
        );
        for l in self
            .layers
            .iter()
            .filter(|l| l.stored_bytes + l.decoder_bytes > 0)
        {
            let chars: Vec<char> = l.layer.chars().collect();
            let name = if chars.len() > w {
                format!(
                    "…{}",
                    chars[chars.len() - (w - 1)..].iter().collect::<String>()
                )
            } else {
                l.layer.clone()
            };
            let _ = writeln!(
                s,
                "{name:<w$} {:>12.0} {:>12} {:>10}",
                l.score_bytes, l.stored_bytes, l.decoder_bytes
            );
        }
        let _ = writeln!(
            s,
            "{:<w$} {:>12.0} {:>12} {:>10}",
            "total", self.score_bytes, self.stored_bytes, self.decoder_bytes
        );
        let _ = writeln!(
            s,
            "file {} bytes = stored {} + decoders {} + shared decoder constants {} + graph {} ({:.3}x the score's storage)",
            self.file_bytes,
            self.stored_bytes,
            self.decoder_bytes,
            self.shared_bytes,
            self.other_bytes,
            if self.score_bytes > 0.0 {
                self.file_bytes as f64 / self.score_bytes
            } else {
                f64::NAN
            }
        );
        s
    }
}
