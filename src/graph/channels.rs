//! Channel groups: everything that must shrink together when output channels of
//! a layer are removed (structured pruning; `passes/prune_channels.rs`).
//!
//! A group starts at a *root*, a Conv (group 1) or Gemm/MatMul whose output
//! channels (axis 1 of its output, NCHW or [N, C]) are to be removed, and follows
//! those channels through the graph:
//!
//! - channel-wise ops pass them on unchanged: activations (Relu, Clip, Sigmoid,
//!   HardSwish, ...), pooling (MaxPool, AveragePool, GlobalAveragePool, ...),
//!   BatchNormalization and InstanceNormalization (their per-channel parameters
//!   are sliced), a depthwise Conv (group = C, weight [C, 1, k...]: its filters
//!   and bias are sliced and its `group` becomes the kept count), elementwise
//!   Add/Sub/Mul/Div/Max/Min/Sum/Mean with a constant (sliced when it is
//!   per-channel) or with a value that broadcasts along the channels;
//! - Flatten(axis 1) turns channel c of [N, C, H, W] into the columns
//!   [c HW, (c + 1) HW) of [N, C HW] (the "block" of the value);
//! - *sinks* read the channels as their input channels: a Conv (group 1; weight
//!   axis 1, one im2col block of kh kw columns per channel), a Gemm or MatMul on
//!   a 2-D input (the K axis of the weight, `block` columns per channel);
//! - an elementwise op joining two values that both carry C channels (a residual
//!   Add, the Mul of squeeze-and-excitation, x sigmoid(x)) makes one *coupled*
//!   group of everything on both sides: the roots of all of them lose the same
//!   channels.
//!
//! Anything else on the way (Concat, Reshape, a grouped Conv that is not
//! depthwise, a graph input or output, a weight shared with a node outside the
//! group, a shape tract could not infer) leaves the whole group unpruned, with the
//! reason. (ONNX operator specs for the axes; the grouping is the one of
//! dependency-graph structured pruning, e.g. Fang et al., 2023, "DepGraph".)

use std::collections::{BTreeSet, HashMap};

use super::Graph;
use crate::onnx::attr::NodeAttrs;
use crate::onnx::tensor::shape_of;
use crate::onnx::DataType;

/// A tensor to slice: channel c owns the indices [c block, (c + 1) block) of `axis`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Slice {
    pub tensor: String,
    pub axis: usize,
    pub block: usize,
}

/// A layer that reads the channels as its inputs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Sink {
    pub node: usize,
    /// Columns of the layer's input rows (im2col patches of a Conv, the K-vector
    /// of a Gemm/MatMul) per channel: kh kw, or the Flatten block.
    pub cols: usize,
}

/// One group of channels that are removed together.
#[derive(Debug, Clone, Default)]
pub struct ChannelGroup {
    /// Channel count C.
    pub channels: usize,
    /// Layers whose output channels these are, in topological order.
    pub roots: Vec<usize>,
    /// Channel-wise nodes on the way (including depthwise convs).
    pub through: Vec<usize>,
    pub sinks: Vec<Sink>,
    /// Every tensor to slice (roots' weights and biases, per-channel parameters,
    /// sinks' weights), each once.
    pub slices: Vec<Slice>,
    /// Depthwise convs whose `group` attribute becomes the kept count.
    pub depthwise: Vec<usize>,
    /// Values that carry the channels, with their block (for declared shapes).
    pub values: Vec<(String, usize)>,
}

impl ChannelGroup {
    /// Joined through an elementwise op with another root's channels (residual Add, ...).
    pub fn coupled(&self) -> bool {
        self.roots.len() > 1
    }
}

/// A group found from a root, or why it cannot be pruned.
#[derive(Debug, Clone)]
pub struct Found {
    /// The roots reached (at least the one it started from), in topological order.
    pub roots: Vec<usize>,
    pub group: Result<ChannelGroup, String>,
}

/// Ops that map each channel to itself, reading one data input (input 0) and
/// writing output 0; other inputs are constants (Clip bounds, PRelu slope).
const CHANNELWISE: &[&str] = &[
    "Relu",
    "Clip",
    "LeakyRelu",
    "PRelu",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Elu",
    "Selu",
    "Celu",
    "Softplus",
    "Softsign",
    "Mish",
    "Gelu",
    "Erf",
    "Identity",
    "Dropout",
    "Neg",
    "Abs",
    "Sqrt",
    "Exp",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "MaxPool",
    "AveragePool",
    "LpPool",
    "BatchNormalization",
    "InstanceNormalization",
];

/// Elementwise ops with broadcasting over several inputs.
const ELEMENTWISE: &[&str] = &["Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean"];

/// Every channel group of the graph, one per set of roots (a Conv with group 1,
/// a Gemm, a 2-D MatMul with a constant weight), in topological order of their
/// first root. `shapes` are the values' concrete shapes (`engine::value_shapes`).
pub fn channel_groups(g: &Graph, shapes: &HashMap<String, Vec<usize>>) -> Vec<Found> {
    let mut claimed: BTreeSet<usize> = BTreeSet::new();
    let mut out = Vec::new();
    for &n in g.topo_order() {
        if claimed.contains(&n) || !is_root_candidate(g, n) {
            continue;
        }
        let found = Explorer::new(g, shapes).run(n);
        claimed.extend(found.roots.iter().copied());
        out.push(found);
    }
    out
}

fn is_root_candidate(g: &Graph, n: usize) -> bool {
    let node = g.node(n);
    let standard = node.domain().is_empty() || node.domain() == "ai.onnx";
    standard
        && match node.op_type() {
            "Conv" => node.int_or("group", 1).unwrap_or(0) == 1,
            "Gemm" | "MatMul" => true,
            _ => false,
        }
        && node
            .input
            .get(1)
            .is_some_and(|w| g.initializer(w).is_some())
}

struct Explorer<'a, 'g> {
    g: &'a Graph<'g>,
    shapes: &'a HashMap<String, Vec<usize>>,
    channels: usize,
    /// value -> block
    values: HashMap<String, usize>,
    queue: Vec<String>,
    roles: BTreeSet<(usize, Role)>,
    roots: BTreeSet<usize>,
    through: BTreeSet<usize>,
    sinks: BTreeSet<Sink>,
    slices: Vec<Slice>,
    depthwise: BTreeSet<usize>,
    error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    Root,
    Sink,
    Through,
}

impl<'a, 'g> Explorer<'a, 'g> {
    fn new(g: &'a Graph<'g>, shapes: &'a HashMap<String, Vec<usize>>) -> Self {
        Explorer {
            g,
            shapes,
            channels: 0,
            values: HashMap::new(),
            queue: Vec::new(),
            roles: BTreeSet::new(),
            roots: BTreeSet::new(),
            through: BTreeSet::new(),
            sinks: BTreeSet::new(),
            slices: Vec::new(),
            depthwise: BTreeSet::new(),
            error: None,
        }
    }

    fn fail(&mut self, why: String) {
        self.error.get_or_insert(why);
    }

    fn name(&self, n: usize) -> String {
        format!("{} '{}'", self.g.node(n).op_type(), self.g.node_name(n))
    }

    fn shape(&self, v: &str) -> Option<&'a Vec<usize>> {
        self.shapes.get(v)
    }

    /// Adds a value with its block (a value reached twice must agree).
    fn add_value(&mut self, v: &str, block: usize) {
        match self.values.get(v) {
            Some(&b) if b == block => {}
            Some(&b) => self.fail(format!(
                "value '{v}' carries the channels in blocks of {b} and of {block}"
            )),
            None => {
                self.values.insert(v.to_string(), block);
                self.queue.push(v.to_string());
            }
        }
    }

    fn slice(&mut self, n: usize, slot: usize, axis: usize, block: usize) {
        let node = self.g.node(n);
        let Some(t) = node.input.get(slot).filter(|t| !t.is_empty()) else {
            return;
        };
        if let Some(why) = self.g.not_fixed(t) {
            return self.fail(why);
        }
        let Some(init) = self.g.initializer(t) else {
            return self.fail(format!(
                "input {slot} '{t}' of {} is not an initializer",
                self.name(n)
            ));
        };
        if init.data_type() != DataType::Float as i32 {
            return self.fail(format!("'{t}' of {} is not float32", self.name(n)));
        }
        match shape_of(init) {
            Ok(s) if s.get(axis) == Some(&(self.channels * block)) => {}
            Ok(s) => {
                return self.fail(format!(
                    "'{t}' of {} has shape {s:?}: axis {axis} is not {} channels x {block}",
                    self.name(n),
                    self.channels
                ))
            }
            Err(e) => return self.fail(e.to_string()),
        }
        let slice = Slice {
            tensor: t.clone(),
            axis,
            block,
        };
        // A layer that both writes and reads the channels (a conv inside a residual
        // group) has its weight cut along both axes, each once.
        if self.slices.iter().any(|s| s.tensor == *t && s.axis == axis) {
            return self.fail(format!("'{t}' is read twice in the group"));
        }
        self.slices.push(slice);
    }

    fn run(mut self, root: usize) -> Found {
        let out = self.g.node(root).output[0].clone();
        match self.shape(&out) {
            Some(s) if s.len() >= 2 => self.channels = s[1],
            _ => {
                return Found {
                    roots: vec![root],
                    group: Err(format!(
                        "the shape of '{out}' is unknown (tract could not infer it)"
                    )),
                }
            }
        }
        self.visit(root, Role::Root);
        while let Some(v) = self.queue.pop() {
            if self.error.is_some() {
                break;
            }
            self.expand(&v);
        }
        let mut roots: Vec<usize> = self.roots.iter().copied().collect();
        let pos: HashMap<usize, usize> = self
            .g
            .topo_order()
            .iter()
            .enumerate()
            .map(|(i, &n)| (n, i))
            .collect();
        roots.sort_by_key(|n| pos[n]);
        if let Some(e) = self.error {
            return Found {
                roots,
                group: Err(e),
            };
        }
        // Every sliced tensor is read by nodes of the group only.
        let members: BTreeSet<usize> = self.roles.iter().map(|(n, _)| *n).collect();
        for s in &self.slices {
            let outside = self
                .g
                .consumers(&s.tensor)
                .iter()
                .find(|c| !members.contains(c));
            if let Some(&c) = outside {
                return Found {
                    roots,
                    group: Err(format!(
                        "'{}' is also read by {}, outside the group",
                        s.tensor,
                        self.name(c)
                    )),
                };
            }
        }
        let mut values: Vec<(String, usize)> = self.values.into_iter().collect();
        values.sort();
        let mut slices = self.slices;
        slices.sort();
        Found {
            roots: roots.clone(),
            group: Ok(ChannelGroup {
                channels: self.channels,
                roots,
                through: self.through.into_iter().collect(),
                sinks: self.sinks.into_iter().collect(),
                slices,
                depthwise: self.depthwise.into_iter().collect(),
                values,
            }),
        }
    }

    fn expand(&mut self, v: &str) {
        let block = self.values[v];
        match self.shape(v) {
            Some(s) if s.len() >= 2 && s[1] == self.channels * block => {}
            Some(s) => {
                return self.fail(format!(
                    "'{v}' has shape {s:?}, not {} channels x {block} on axis 1",
                    self.channels
                ))
            }
            None => return self.fail(format!("the shape of '{v}' is unknown")),
        }
        if self.g.is_output(v) {
            return self.fail(format!("the channels reach the graph output '{v}'"));
        }
        match self.g.producer(v) {
            None => return self.fail(format!("'{v}' is a graph input or constant")),
            Some((p, 0)) => self.arrive(p, v, true),
            Some((p, slot)) => {
                return self.fail(format!("'{v}' is output {slot} of {}", self.name(p)))
            }
        }
        let mut consumers: Vec<usize> = self.g.consumers(v).to_vec();
        consumers.dedup();
        for c in consumers {
            if self.g.reads_in_subgraph(c, v) {
                return self.fail(format!("{} reads '{v}' inside a subgraph", self.name(c)));
            }
            self.arrive(c, v, false);
        }
    }

    /// Node `n` writes (`from_output`) or reads the channel value `v`.
    fn arrive(&mut self, n: usize, v: &str, from_output: bool) {
        let node = self.g.node(n);
        let op = node.op_type();
        let standard = node.domain().is_empty() || node.domain() == "ai.onnx";
        if !standard {
            return self.fail(format!("{} (domain '{}')", self.name(n), node.domain()));
        }
        let slot = if from_output {
            None
        } else {
            node.input.iter().position(|i| i == v)
        };
        if ELEMENTWISE.contains(&op) {
            return self.visit(n, Role::Through);
        }
        if op == "Conv" {
            let group = match node.int_or("group", 1) {
                Ok(g) => g.max(1) as usize,
                Err(e) => return self.fail(e.to_string()),
            };
            let wshape = node
                .input
                .get(1)
                .and_then(|w| self.g.initializer(w))
                .and_then(|t| shape_of(t).ok());
            if group > 1 {
                let dw = group == self.channels
                    && wshape
                        .as_ref()
                        .is_some_and(|s| s.len() >= 3 && s[0] == self.channels && s[1] == 1);
                if !dw {
                    return self.fail(format!(
                        "{} is a grouped conv (group {group}) that is not depthwise over these {} channels",
                        self.name(n),
                        self.channels
                    ));
                }
                return self.visit(n, Role::Through);
            }
        }
        match (op, from_output, slot) {
            ("Conv" | "Gemm" | "MatMul", true, _) => self.visit(n, Role::Root),
            ("Conv" | "Gemm" | "MatMul", false, Some(0)) => self.visit(n, Role::Sink),
            _ if CHANNELWISE.contains(&op) || op == "Flatten" => {
                if slot.is_some_and(|s| s != 0) {
                    return self.fail(format!(
                        "{} reads '{v}' as its input {}",
                        self.name(n),
                        slot.unwrap_or(0)
                    ));
                }
                self.visit(n, Role::Through)
            }
            ("Concat", ..) => {
                self.fail(format!("{} joins these channels with others", self.name(n)))
            }
            (_, false, Some(s)) => self.fail(format!(
                "{} reads the channels (input {s}, '{v}')",
                self.name(n)
            )),
            _ => self.fail(format!("{} writes or reads '{v}'", self.name(n))),
        }
    }

    fn visit(&mut self, n: usize, role: Role) {
        if !self.roles.insert((n, role)) {
            return;
        }
        let g = self.g;
        let node = g.node(n);
        let op = node.op_type();
        match role {
            Role::Root => self.root(n),
            Role::Sink => self.sink(n),
            Role::Through if op == "Conv" => {
                // Depthwise: channel c in, channel c out.
                self.through.insert(n);
                self.depthwise.insert(n);
                self.slice(n, 1, 0, 1);
                self.slice(n, 2, 0, 1);
                let (i, o) = (node.input[0].clone(), node.output[0].clone());
                self.add_value(&i, 1);
                self.add_value(&o, 1);
            }
            Role::Through if ELEMENTWISE.contains(&op) => self.elementwise(n),
            Role::Through if op == "Flatten" => {
                self.through.insert(n);
                match node.int_or("axis", 1) {
                    Ok(1) => {}
                    Ok(a) => return self.fail(format!("{} flattens at axis {a}", self.name(n))),
                    Err(e) => return self.fail(e.to_string()),
                }
                let i = node.input[0].clone();
                let Some(s) = self.shape(&i) else {
                    return self.fail(format!("the shape of '{i}' is unknown"));
                };
                let inner: usize = s[2..].iter().product();
                self.add_value(&i, 1);
                let o = node.output[0].clone();
                self.add_value(&o, inner);
            }
            Role::Through => {
                self.through.insert(n);
                if node
                    .output
                    .iter()
                    .skip(1)
                    .any(|o| !o.is_empty() && g.use_count(o) > 0)
                {
                    return self.fail(format!("{} has a second output in use", self.name(n)));
                }
                let i = node.input[0].clone();
                let block = self.values.get(&i).copied().unwrap_or(1);
                let o = node.output[0].clone();
                self.add_value(&i, block);
                self.add_value(&o, block);
                match op {
                    "BatchNormalization" => (1..=4).for_each(|s| self.slice(n, s, 0, 1)),
                    "InstanceNormalization" => (1..=2).for_each(|s| self.slice(n, s, 0, 1)),
                    "PRelu" => self.constant_operand(n, 1, &o),
                    _ => {
                        // Clip bounds, Dropout ratio: scalars.
                        for (s, t) in node.input.iter().enumerate().skip(1) {
                            if t.is_empty() {
                                continue;
                            }
                            let numel = self.shape(t).map(|s| s.iter().product::<usize>());
                            let numel = numel.or_else(|| {
                                g.initializer(t)
                                    .and_then(|t| shape_of(t).ok())
                                    .map(|s| s.iter().product())
                            });
                            if numel != Some(1) {
                                return self.fail(format!(
                                    "input {s} '{t}' of {} is not a scalar",
                                    self.name(n)
                                ));
                            }
                        }
                    }
                }
            }
        }
    }

    /// A constant operand of an elementwise node: sliced when it varies along the
    /// output's channel axis.
    fn constant_operand(&mut self, n: usize, slot: usize, out: &str) {
        let node = self.g.node(n);
        let t = &node.input[slot];
        let Some(init) = self.g.initializer(t) else {
            return self.fail(format!(
                "input {slot} '{t}' of {} is computed (not an initializer) and does not carry these channels",
                self.name(n)
            ));
        };
        let Ok(s) = shape_of(init) else {
            return self.fail(format!("'{t}' has no readable shape"));
        };
        let rank = self.shape(out).map_or(0, Vec::len);
        // Broadcasting aligns trailing axes: axis 1 of the output is axis 1 - (rank - r).
        let axis = (1 + s.len()).checked_sub(rank);
        match axis.map(|a| s[a]) {
            None | Some(1) => {}
            Some(_) => {
                let block = self.values.get(out).copied().unwrap_or(1);
                self.slice(n, slot, axis.expect("some"), block);
            }
        }
    }

    fn elementwise(&mut self, n: usize) {
        self.through.insert(n);
        let node = self.g.node(n);
        let o = node.output[0].clone();
        let Some(out_shape) = self.shape(&o) else {
            return self.fail(format!("the shape of '{o}' is unknown"));
        };
        // The block of the channels: that of any input already in the group.
        let block = node
            .input
            .iter()
            .find_map(|i| self.values.get(i).copied())
            .or_else(|| self.values.get(&o).copied())
            .unwrap_or(1);
        if out_shape.len() < 2 || out_shape[1] != self.channels * block {
            return self.fail(format!(
                "{} writes '{o}' of shape {out_shape:?}",
                self.name(n)
            ));
        }
        self.add_value(&o, block);
        for slot in 0..node.input.len() {
            let i = node.input[slot].clone();
            if i.is_empty() || self.values.contains_key(&i) {
                continue;
            }
            if self.g.constant_proto(&i).is_some() {
                self.constant_operand(n, slot, &o);
                continue;
            }
            match self.shape(&i) {
                Some(s) if s.len() == out_shape.len() && s[1] == out_shape[1] => {
                    self.add_value(&i, block)
                }
                // Broadcast along the channels (a per-sample scale): not channels.
                Some(s)
                    if s.len() + 1 < out_shape.len() || s.len() == out_shape.len() && s[1] == 1 => {
                }
                Some(s) => {
                    return self.fail(format!(
                        "{} combines the channels with '{i}' of shape {s:?}",
                        self.name(n)
                    ))
                }
                None => return self.fail(format!("the shape of '{i}' is unknown")),
            }
        }
    }

    /// The shape of node `n`'s weight (input 1), which must be an initializer
    /// (else the group fails, saying so).
    fn weight_shape(&mut self, n: usize) -> Option<Vec<usize>> {
        let w = self
            .g
            .initializer(&self.g.node(n).input[1])
            .and_then(|t| shape_of(t).ok());
        if w.is_none() {
            self.fail(format!(
                "the weight of {} is not an initializer",
                self.name(n)
            ));
        }
        w
    }

    fn root(&mut self, n: usize) {
        self.roots.insert(n);
        let node = self.g.node(n);
        let op = node.op_type();
        let o = node.output[0].clone();
        self.add_value(&o, 1);
        let Some(w) = self.weight_shape(n) else {
            return;
        };
        match op {
            "Conv" => {
                self.slice(n, 1, 0, 1);
                self.slice(n, 2, 0, 1);
            }
            "Gemm" => {
                let trans_b = node.int_or("transB", 0).unwrap_or(0) != 0;
                self.slice(n, 1, if trans_b { 0 } else { 1 }, 1);
                if let Some(b) = node.input.get(2).filter(|b| !b.is_empty()) {
                    let rank = self
                        .g
                        .initializer(b)
                        .and_then(|t| shape_of(t).ok())
                        .map(|s| (s.len(), s.last().copied()));
                    match rank {
                        Some((_, Some(1))) | Some((0, _)) => {}
                        Some((r, _)) => self.slice(n, 2, r - 1, 1),
                        None => self.fail(format!(
                            "the bias of {} is not an initializer",
                            self.name(n)
                        )),
                    }
                }
            }
            _ => {
                if w.len() != 2 {
                    return self.fail(format!("{} has a weight of rank {}", self.name(n), w.len()));
                }
                self.slice(n, 1, 1, 1);
            }
        }
    }

    fn sink(&mut self, n: usize) {
        let node = self.g.node(n);
        let i = node.input[0].clone();
        let block = self.values.get(&i).copied().unwrap_or(1);
        let Some(w) = self.weight_shape(n) else {
            return;
        };
        match node.op_type() {
            "Conv" => {
                if block != 1 {
                    return self.fail(format!("{} reads flattened channels", self.name(n)));
                }
                self.sinks.insert(Sink {
                    node: n,
                    cols: w[2..].iter().product(),
                });
                self.slice(n, 1, 1, 1);
            }
            "Gemm" => {
                if node.int_or("transA", 0).unwrap_or(1) != 0 {
                    return self.fail(format!("{} has transA = 1", self.name(n)));
                }
                if self.shape(&i).map(Vec::len) != Some(2) {
                    return self.fail(format!(
                        "{} reads an input of rank other than 2",
                        self.name(n)
                    ));
                }
                let trans_b = node.int_or("transB", 0).unwrap_or(0) != 0;
                self.sinks.insert(Sink {
                    node: n,
                    cols: block,
                });
                self.slice(n, 1, if trans_b { 1 } else { 0 }, block);
            }
            _ => {
                if w.len() != 2 || self.shape(&i).map(Vec::len) != Some(2) {
                    return self.fail(format!("{} is a MatMul of rank other than 2", self.name(n)));
                }
                self.sinks.insert(Sink {
                    node: n,
                    cols: block,
                });
                self.slice(n, 1, 0, block);
            }
        }
    }
}
