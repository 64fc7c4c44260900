//! The packed weight format: how a weight W (shape S, n elements) is written as
//! standard ONNX ops, and how it is recognized when read back. Both directions
//! live here; the packing pass calls [`build`], `repr::weight` calls [`read`].
//!
//! Storage: a bitmask M (n bits, one per element, 1 = nonzero) packed into
//! uint8, present when the tensor has zeros, plus the m stored values (m = nnz
//! with a mask, n without) in one of four stores:
//!   float    m float32 values                                    (32 bits each)
//!   half     m float16 values, Cast to float32                   (16 bits each)
//!   affine   m k-bit codes u, W = (u - zp) * scale               (k bits each, k = 1..16)
//!            per tensor, or per channel along one axis (zp, scale broadcast)
//!   codebook m k-bit codes u, W = book[u], book <= 2^k floats    (k bits each)
//!            ternary = mask + 1-bit codes into [w_n, w_p]         (mask + sign bit per nonzero)
//!   codes    as affine, but the codes are cast to integers and dequantized by
//!            DequantizeLinear (the QDQ convention onnxruntime's quantizer writes
//!            and keeps: its WeightBiasQuantization re-quantizes float weights
//!            between Q/DQ activations, never DequantizeLinear outputs)
//! An all-zero tensor is `ConstantOfShape(S)`.
//!
//! Bit streams are LSB first: bit p of the stream is bit (p mod 8) of byte p / 8;
//! code j occupies stream bits j*k .. j*k+k-1, its bit i worth 2^i.
//!
//! Decoding, every step an ONNX op that tract 0.23.9 and onnxruntime run, opset >= 11:
//!   bits(P, L)  = Slice(Reshape(Mod(BitShift(Reshape(P, [-1,1]), [[0..7]], RIGHT), 2), [-1]), 0, L)
//!   codes(P, k) = Cast(P, float)                                        k = 8
//!               = Cast(bits(P, m), float)                               k = 1
//!               = ReduceSum(Reshape(Cast(bits(P, m k), float), [-1,k]) * [1,2,..,2^(k-1)], axis -1)
//!   mask        = Reshape(Cast(bits(M, n), bool), S)
//!   idx         = CumSum(Cast(bits(M, n), int32), 0) - 1      position of each element's value
//!   float       W = Where(mask, Reshape(Gather(V, idx), S), 0)
//!   half        W = Where(mask, Reshape(Gather(Cast(V16, float), idx), S), 0)
//!   codebook    W = Where(mask, Reshape(Gather(Gather(book, Cast(codes, int32)), idx), S), 0)
//!   affine      W = Where(mask, (Reshape(Gather(codes, idx), S) - zp) * scale, 0)
//!   codes       q = Cast(Where(mask, Reshape(Gather(codes, idx), S), zp) - shift, T)
//!               W = DequantizeLinear(q, scale, zp_T[, axis])
//!     T = int8 (signed grids, k <= 8: shift 2^(k-1), zp_T 0), uint8 (unsigned,
//!     k <= 8: shift 0, zp_T = zp), int32 (k = 9..16: shift = zp, no zp_T);
//!     dense 8-bit codes are the int8/uint8 initializer q itself, no decoder.
//!     Per channel needs opset 13 (DequantizeLinear's axis).
//! and without a mask the Gather(., idx) and Where steps are left out. Codes are
//! integers below 2^16, exact in float32, so (u - zp) is exact and W is the one
//! rounding of ((u - zp) as f32) * scale the quantizer made. Gather by idx = -1
//! (elements before the first nonzero) wraps to the last value; Where discards it.
//! The decoded value keeps the name of the initializer it replaces, so consumers
//! are untouched. Every node depends on initializers only: runtimes fold it at load.

use std::collections::{HashMap, HashSet};

use ndarray::{arr0, ArrayD, IxDyn};

use super::eval::{self, Val};
use super::Weight;
use crate::error::Result;
use crate::graph::{Graph, Namer};
use crate::onnx::attr::{self, NodeAttrs};
use crate::onnx::proto::{AttributeProto, NodeProto, TensorProto};
use crate::onnx::{DataType, TensorData};

/// Prefix of the constants every decoder of a model shares (shapes, shifts, ...).
pub const SHARED_PREFIX: &str = "pk_";

/// Widest code packed.
pub const MAX_CODE_BITS: u32 = 16;

/// How the stored values are kept.
#[derive(Debug, Clone, PartialEq)]
pub enum Store {
    Float(Vec<f32>),
    /// float16 values (held as the f32 numbers they are).
    Half(Vec<f32>),
    Affine {
        k: u32,
        codes: Vec<u32>,
        /// One value (per tensor) or one per channel along `axis`.
        scale: Vec<f32>,
        zp: Vec<f32>,
        axis: Option<usize>,
    },
    Codebook {
        k: u32,
        codes: Vec<u32>,
        book: Vec<f32>,
    },
    /// As `Affine`, dequantized by DequantizeLinear (see the module doc).
    Codes {
        k: u32,
        codes: Vec<u32>,
        scale: Vec<f32>,
        zp: Vec<f32>,
        axis: Option<usize>,
    },
}

/// A weight as it will be stored.
#[derive(Debug, Clone)]
pub struct Packed {
    pub shape: Vec<usize>,
    /// One flag per element (true: a value is stored); `None`: every element is stored.
    pub mask: Option<Vec<bool>>,
    /// `None`: all zeros.
    pub store: Option<Store>,
}

impl Packed {
    /// Bits of the payload: mask bits + stored values x their width (+ scales, codebooks).
    pub fn payload_bits(&self) -> u64 {
        let mask = self.mask.as_ref().map_or(0, |m| m.len() as u64);
        mask + match &self.store {
            None => 0,
            Some(Store::Float(v)) => 32 * v.len() as u64,
            Some(Store::Half(v)) => 16 * v.len() as u64,
            Some(Store::Affine {
                k,
                codes,
                scale,
                zp,
                ..
            })
            | Some(Store::Codes {
                k,
                codes,
                scale,
                zp,
                ..
            }) => *k as u64 * codes.len() as u64 + 32 * (scale.len() + zp.len()) as u64,
            Some(Store::Codebook { k, codes, book }) => {
                *k as u64 * codes.len() as u64 + 32 * book.len() as u64
            }
        }
    }

    /// A one-line description for reports.
    pub fn describe(&self) -> String {
        let n: usize = self.shape.iter().product();
        let mask = match &self.mask {
            Some(m) => format!("{n}-bit mask + {} ", m.iter().filter(|b| **b).count()),
            None => format!("{n} "),
        };
        match &self.store {
            None => "all zeros: ConstantOfShape".into(),
            Some(Store::Float(_)) => format!("{mask}float32 values"),
            Some(Store::Half(_)) => format!("{mask}float16 values"),
            Some(Store::Affine { k, scale, axis, .. }) => format!(
                "{mask}{k}-bit codes x {}",
                match axis {
                    Some(a) => format!("{} scales along axis {a}", scale.len()),
                    None => "one scale".into(),
                }
            ),
            Some(Store::Codebook { k, book, .. }) => {
                format!("{mask}{k}-bit codes into a {}-entry codebook", book.len())
            }
            Some(Store::Codes { k, scale, axis, .. }) => format!(
                "{mask}{k}-bit codes -> DequantizeLinear ({})",
                match axis {
                    Some(a) => format!("{} scales along axis {a}", scale.len()),
                    None => "one scale".into(),
                }
            ),
        }
    }
}

/// Packs k-bit codes LSB first (only the low k bits of each code are written).
pub fn pack_codes(codes: &[u32], k: u32) -> Vec<u8> {
    let mut out = vec![0u8; (codes.len() * k as usize).div_ceil(8)];
    if k == 8 {
        for (o, &c) in out.iter_mut().zip(codes) {
            *o = c as u8;
        }
        return out;
    }
    // A 64-bit accumulator flushed a byte at a time (k <= 32).
    let mask = if k >= 32 { u32::MAX } else { (1u32 << k) - 1 };
    let (mut acc, mut have, mut at) = (0u64, 0u32, 0usize);
    for &c in codes {
        acc |= ((c & mask) as u64) << have;
        have += k;
        while have >= 8 {
            out[at] = acc as u8;
            acc >>= 8;
            have -= 8;
            at += 1;
        }
    }
    if have > 0 {
        out[at] = acc as u8;
    }
    out
}

/// Packs a mask, one bit per element, LSB first.
pub fn pack_mask(mask: &[bool]) -> Vec<u8> {
    mask.chunks(8)
        .map(|c| {
            c.iter()
                .enumerate()
                .fold(0u8, |b, (i, &on)| b | (u8::from(on) << i))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Writing.

/// Constants every decoder shares, created once per model.
pub struct Shared {
    names: HashMap<String, String>,
    taken: Namer,
    /// The shared initializers created so far.
    pub inits: Vec<TensorProto>,
}

impl Shared {
    /// `taken`: every value and initializer name in the graph.
    pub fn new(taken: HashSet<String>) -> Self {
        let mut namer = Namer::default();
        for t in taken {
            namer.take(t);
        }
        Shared::with_names(namer)
    }

    /// Names come from `taken` (values, initializers and node names of the graph).
    pub fn with_names(taken: Namer) -> Self {
        Shared {
            names: HashMap::new(),
            taken,
            inits: Vec::new(),
        }
    }

    fn get(&mut self, key: &str, make: impl FnOnce() -> TensorData) -> String {
        if let Some(n) = self.names.get(key) {
            return n.clone();
        }
        let name = self.taken.fresh(&format!("{SHARED_PREFIX}{key}"));
        self.inits.push(make().to_proto(&name));
        self.names.insert(key.to_string(), name.clone());
        name
    }

    /// Forgets the shared constants created after the first `keep`.
    pub fn truncate(&mut self, keep: usize) {
        let gone: Vec<String> = self
            .inits
            .drain(keep.min(self.inits.len())..)
            .map(|t| t.name().to_string())
            .collect();
        self.names.retain(|_, v| !gone.contains(v));
        for g in gone {
            self.taken.release(&g);
        }
    }

    /// A short prefix no existing name starts with, for one tensor's decoder values
    /// (short: every value name is written twice in the file).
    pub fn prefix(&mut self) -> String {
        let mut k = self.names.len() + self.taken.len();
        loop {
            let p = format!("pk{k:x}");
            if !self.taken.any_starts_with(&format!("{p}.")) {
                self.taken.take(format!("{p}."));
                return p;
            }
            k += 1;
        }
    }
}

fn i64s(v: &[i64]) -> TensorData {
    TensorData::I64(ArrayD::from_shape_vec(IxDyn(&[v.len()]), v.to_vec()).expect("1-D"))
}

/// The nodes and per-tensor initializers that decode one weight.
pub struct Decoder {
    pub nodes: Vec<NodeProto>,
    pub inits: Vec<TensorProto>,
}

struct Builder<'a> {
    out: Decoder,
    prefix: String,
    count: usize,
    shared: &'a mut Shared,
    opset: i64,
}

impl Builder<'_> {
    fn init(&mut self, tag: &str, d: TensorData) -> String {
        let name = format!("{}.{tag}", self.prefix);
        self.out.inits.push(d.to_proto(&name));
        name
    }

    fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        self.count += 1;
        let out = format!("{}.{}", self.prefix, self.count);
        self.node_to(op, inputs, attrs, &out);
        out
    }

    fn node_to(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>, out: &str) {
        // Unnamed nodes: the output names them, and names cost bytes.
        self.out.nodes.push(NodeProto {
            op_type: Some(op.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.to_string()],
            attribute: attrs,
            ..Default::default()
        });
    }

    fn cast(&mut self, x: &str, to: DataType) -> String {
        self.node("Cast", &[x], vec![attr::int("to", to as i64)])
    }

    /// uint8 bits [len] of the stream in initializer `leaf` ([bytes] uint8).
    fn bits(&mut self, leaf: &str, len: usize, bytes: usize) -> String {
        let col = self.shared.get("shape_col", || i64s(&[-1, 1]));
        let shifts = self.shared.get("shifts", || {
            TensorData::U8(ArrayD::from_shape_vec(IxDyn(&[1, 8]), (0..8).collect()).expect("1x8"))
        });
        let two = self.shared.get("two", || {
            TensorData::U8(ArrayD::from_shape_vec(IxDyn(&[1]), vec![2]).expect("1"))
        });
        let flat = self.shared.get("shape_flat", || i64s(&[-1]));
        let r = self.node("Reshape", &[leaf, &col], vec![]);
        let dir = attr::string("direction", "RIGHT");
        let s = self.node("BitShift", &[&r, &shifts], vec![dir]);
        let b = self.node("Mod", &[&s, &two], vec![]);
        let f = self.node("Reshape", &[&b, &flat], vec![]);
        if len == bytes * 8 {
            return f;
        }
        let zero = self.shared.get("starts", || i64s(&[0]));
        let end = self
            .shared
            .get(&format!("len{len}"), || i64s(&[len as i64]));
        self.node("Slice", &[&f, &zero, &end], vec![])
    }

    /// float codes [m] from k-bit codes packed in `leaf`.
    fn codes(&mut self, leaf: &str, m: usize, k: u32, bytes: usize) -> String {
        if k == 8 {
            return self.cast(leaf, DataType::Float);
        }
        let t = self.bits(leaf, m * k as usize, bytes);
        let c = self.cast(&t, DataType::Float);
        if k == 1 {
            return c;
        }
        let shape = self
            .shared
            .get(&format!("shape_k{k}"), || i64s(&[-1, k as i64]));
        let pow = self.shared.get(&format!("pow{k}"), || {
            TensorData::F32(
                ArrayD::from_shape_vec(
                    IxDyn(&[k as usize]),
                    (0..k).map(|i| (1u32 << i) as f32).collect(),
                )
                .expect("1-D"),
            )
        });
        let r = self.node("Reshape", &[&c, &shape], vec![]);
        let w = self.node("Mul", &[&r, &pow], vec![]);
        let keep = attr::int("keepdims", 0);
        if self.opset >= 13 {
            let axes = self.shared.get("axes_last", || i64s(&[-1]));
            self.node("ReduceSum", &[&w, &axes], vec![keep])
        } else {
            let axes = attr::ints("axes", vec![-1]);
            self.node("ReduceSum", &[&w], vec![axes, keep])
        }
    }
}

/// Builds the decoder of `p`; its last node writes `output`. `opset` is the
/// model's default-domain opset (>= 11).
pub fn build(p: &Packed, output: &str, prefix: &str, opset: i64, shared: &mut Shared) -> Decoder {
    let mut b = Builder {
        out: Decoder {
            nodes: Vec::new(),
            inits: Vec::new(),
        },
        prefix: prefix.to_string(),
        count: 0,
        shared,
        opset,
    };
    let shape: Vec<i64> = p.shape.iter().map(|&d| d as i64).collect();
    let key: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_name = b
        .shared
        .get(&format!("shape_{}", key.join("x")), || i64s(&shape));
    let Some(store) = &p.store else {
        let value = attr::tensor(
            "value",
            TensorData::F32(ArrayD::zeros(IxDyn(&[1]))).to_proto(""),
        );
        b.node_to("ConstantOfShape", &[&shape_name], vec![value], output);
        return b.out;
    };
    let n: usize = p.shape.iter().product();
    // Mask: condition and value index.
    let masked = p.mask.as_ref().map(|m| {
        let bytes = pack_mask(m);
        let nb = bytes.len();
        let leaf = b.init(
            "mask",
            TensorData::U8(ArrayD::from_shape_vec(IxDyn(&[nb]), bytes).expect("1-D")),
        );
        let t = b.bits(&leaf, n, nb);
        let c = b.cast(&t, DataType::Bool);
        let cond = b.node("Reshape", &[&c, &shape_name], vec![]);
        let ti = b.cast(&t, DataType::Int32);
        let axis0 = b
            .shared
            .get("axis0", || TensorData::I32(arr0(0).into_dyn()));
        let one = b
            .shared
            .get("one_i32", || TensorData::I32(arr0(1).into_dyn()));
        let cs = b.node("CumSum", &[&ti, &axis0], vec![]);
        let idx = b.node("Sub", &[&cs, &one], vec![]);
        (cond, idx)
    });
    let zero = b
        .shared
        .get("zero_f32", || TensorData::F32(arr0(0.0).into_dyn()));
    let code_leaf = |b: &mut Builder, codes: &[u32], k: u32| {
        let bytes = pack_codes(codes, k);
        let nb = bytes.len();
        let leaf = b.init(
            "codes",
            TensorData::U8(ArrayD::from_shape_vec(IxDyn(&[nb]), bytes).expect("1-D")),
        );
        b.codes(&leaf, codes.len(), k, nb)
    };
    let finish = |b: &mut Builder, values: &str| match &masked {
        Some((cond, idx)) => {
            let g = b.node("Gather", &[values, idx], vec![]);
            let x = b.node("Reshape", &[&g, &shape_name], vec![]);
            b.node_to("Where", &[cond, &x, &zero], vec![], output);
        }
        None => b.node_to("Reshape", &[values, &shape_name], vec![], output),
    };
    match store {
        Store::Float(v) => {
            let vals = b.init(
                "values",
                TensorData::F32(ArrayD::from_shape_vec(IxDyn(&[v.len()]), v.clone()).expect("1-D")),
            );
            finish(&mut b, &vals);
        }
        Store::Half(v) => {
            let h: Vec<half::f16> = v.iter().map(|x| half::f16::from_f32(*x)).collect();
            let vals = b.init(
                "values",
                TensorData::F16(ArrayD::from_shape_vec(IxDyn(&[h.len()]), h).expect("1-D")),
            );
            let f = b.cast(&vals, DataType::Float);
            finish(&mut b, &f);
        }
        Store::Codebook { k, codes, book } => {
            let cf = code_leaf(&mut b, codes, *k);
            let ci = b.cast(&cf, DataType::Int32);
            let bk = b.init(
                "book",
                TensorData::F32(
                    ArrayD::from_shape_vec(IxDyn(&[book.len()]), book.clone()).expect("1-D"),
                ),
            );
            let v = b.node("Gather", &[&bk, &ci], vec![]);
            finish(&mut b, &v);
        }
        Store::Affine {
            k,
            codes,
            scale,
            zp,
            axis,
        } => {
            let cf = code_leaf(&mut b, codes, *k);
            let bshape: Vec<usize> = match axis {
                Some(a) => (0..p.shape.len())
                    .map(|i| if i == *a { scale.len() } else { 1 })
                    .collect(),
                None => vec![],
            };
            let arr = |v: &[f32]| {
                TensorData::F32(ArrayD::from_shape_vec(IxDyn(&bshape), v.to_vec()).expect("shape"))
            };
            let zp_name = b.init("zero_point", arr(zp));
            let sc_name = b.init("scale", arr(scale));
            let g = match &masked {
                Some((_, idx)) => b.node("Gather", &[&cf, idx], vec![]),
                None => cf,
            };
            let x = b.node("Reshape", &[&g, &shape_name], vec![]);
            let d = b.node("Sub", &[&x, &zp_name], vec![]);
            match &masked {
                Some((cond, _)) => {
                    let y = b.node("Mul", &[&d, &sc_name], vec![]);
                    b.node_to("Where", &[cond, &y, &zero], vec![], output);
                }
                None => b.node_to("Mul", &[&d, &sc_name], vec![], output),
            }
        }
        Store::Codes {
            k,
            codes,
            scale,
            zp,
            axis,
        } => {
            let k = *k;
            let half = (1u32 << (k - 1)) as f32;
            let signed = k <= 8 && zp.iter().all(|z| *z == half);
            let c = scale.len();
            // Scale and zero point of DequantizeLinear: scalars, or 1-D along `axis`.
            let dims: Vec<usize> = if axis.is_some() { vec![c] } else { vec![] };
            let sc_name = b.init(
                "scale",
                TensorData::F32(ArrayD::from_shape_vec(IxDyn(&dims), scale.clone()).expect("1-D")),
            );
            // A signed grid's zero point is 0, DequantizeLinear's default: not written.
            let (to, zp_t) = if k > 8 {
                (DataType::Int32, None)
            } else if signed {
                (DataType::Int8, None)
            } else {
                let z: Vec<u8> = zp.iter().map(|z| *z as u8).collect();
                (
                    DataType::Uint8,
                    Some(TensorData::U8(
                        ArrayD::from_shape_vec(IxDyn(&dims), z).expect("1-D"),
                    )),
                )
            };
            let q = if k == 8 && masked.is_none() {
                // Dense 8-bit codes: the integer tensor itself.
                let data = if signed {
                    let v = codes.iter().map(|u| (*u as i32 - 128) as i8).collect();
                    TensorData::I8(ArrayD::from_shape_vec(IxDyn(&p.shape), v).expect("shape"))
                } else {
                    let v = codes.iter().map(|u| *u as u8).collect();
                    TensorData::U8(ArrayD::from_shape_vec(IxDyn(&p.shape), v).expect("shape"))
                };
                b.init("q", data)
            } else {
                let cf = code_leaf(&mut b, codes, k);
                // zp in float, broadcast along the channel axis of W.
                let bshape: Vec<usize> = match axis {
                    Some(a) => (0..p.shape.len())
                        .map(|i| if i == *a { c } else { 1 })
                        .collect(),
                    None => vec![],
                };
                // Read by a masked store's fill and by the shift of int32 codes only.
                let zp_f = if masked.is_some() || k > 8 {
                    b.init(
                        "zero_point",
                        TensorData::F32(
                            ArrayD::from_shape_vec(IxDyn(&bshape), zp.clone()).expect("shape"),
                        ),
                    )
                } else {
                    String::new()
                };
                let x = match &masked {
                    Some((cond, idx)) => {
                        let g = b.node("Gather", &[&cf, idx], vec![]);
                        let r = b.node("Reshape", &[&g, &shape_name], vec![]);
                        b.node("Where", &[cond, &r, &zp_f], vec![])
                    }
                    None => b.node("Reshape", &[&cf, &shape_name], vec![]),
                };
                let x = if k > 8 {
                    b.node("Sub", &[&x, &zp_f], vec![])
                } else if signed {
                    let h = b.shared.get(&format!("half{k}"), || {
                        TensorData::F32(arr0(half).into_dyn())
                    });
                    b.node("Sub", &[&x, &h], vec![])
                } else {
                    x
                };
                b.cast(&x, to)
            };
            let mut inputs = vec![q.as_str(), sc_name.as_str()];
            let zp_name = zp_t.map(|z| b.init("zp", z));
            if let Some(z) = &zp_name {
                inputs.push(z);
            }
            let attrs = axis
                .map(|a| vec![attr::int("axis", a as i64)])
                .unwrap_or_default();
            b.node_to("DequantizeLinear", &inputs, attrs, output);
        }
    }
    b.out
}

// ---------------------------------------------------------------------------
// Reading.

/// What the structure of a decoder says about storage.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Zeros,
    Float,
    Half,
    Affine(u32),
    Codebook { k: u32, ternary: bool },
}

fn prod<'g>(g: &Graph<'g>, v: &str, op: &str) -> Option<&'g NodeProto> {
    let (i, slot) = g.producer(v)?;
    let n = g.node(i);
    (slot == 0 && n.op_type() == op).then_some(n)
}

fn strip(g: &Graph, v: &str) -> String {
    let mut v = v.to_string();
    while let Some((i, _)) = g.producer(&v) {
        let n = g.node(i);
        if matches!(
            n.op_type(),
            "Reshape" | "Identity" | "Unsqueeze" | "Squeeze"
        ) {
            v = n.input[0].clone();
        } else {
            break;
        }
    }
    v
}

fn const_ints(g: &Graph, v: &str) -> Option<Vec<i64>> {
    let d = g.constant(v).ok()??;
    Some(d.to_i64()?.iter().copied().collect())
}

fn const_f32(g: &Graph, v: &str) -> Option<Vec<f32>> {
    let t = g.constant_proto(v)?;
    if t.data_type() != DataType::Float as i32 {
        return None;
    }
    Some(g.constant_f32(v).ok()??.iter().copied().collect())
}

fn is_u8_leaf(g: &Graph, v: &str) -> bool {
    g.constant_proto(v)
        .is_some_and(|t| t.data_type() == DataType::Uint8 as i32)
}

/// The uint8 initializer whose bit stream `v` is (0/1 uint8 values), if it is one.
fn bit_stream(g: &Graph, v: &str) -> Option<String> {
    let mut v = v.to_string();
    if let Some(s) = prod(g, &v, "Slice") {
        let starts = const_ints(g, s.input.get(1)?)?;
        if starts != [0] || s.input.len() > 3 {
            return None;
        }
        v = s.input[0].clone();
    }
    let v = strip(g, &v);
    let (i, _) = g.producer(&v)?;
    let m = g.node(i);
    let one_bit = match m.op_type() {
        "Mod" => const_ints(g, &m.input[1])? == [2],
        "BitwiseAnd" => const_ints(g, &m.input[1])? == [1],
        _ => false,
    };
    if !one_bit {
        return None;
    }
    let s = prod(g, &m.input[0], "BitShift")?;
    let right = s
        .attribute
        .iter()
        .any(|a| a.name() == "direction" && a.s() == b"RIGHT");
    if !right || const_ints(g, &s.input[1])? != (0..8).collect::<Vec<i64>>() {
        return None;
    }
    let leaf = strip(g, &s.input[0]);
    is_u8_leaf(g, &leaf).then_some(leaf)
}

fn cast_to(n: &NodeProto) -> Option<i64> {
    n.get_int("to").ok().flatten()
}

/// `Cast(V, to = FLOAT)` of a float16 initializer V.
fn half_values(g: &Graph, v: &str) -> bool {
    let Some(c) = prod(g, v, "Cast") else {
        return false;
    };
    cast_to(c) == Some(DataType::Float as i64)
        && g.constant_proto(&c.input[0])
            .is_some_and(|t| t.data_type() == DataType::Float16 as i32)
}

/// Width of the float codes `v`, and the initializer holding them.
fn code_width(g: &Graph, v: &str) -> Option<(u32, String)> {
    if let Some(c) = prod(g, v, "Cast") {
        if cast_to(c)? != DataType::Float as i64 {
            return None;
        }
        let x = &c.input[0];
        if is_u8_leaf(g, x) {
            return Some((8, x.clone()));
        }
        return bit_stream(g, x).map(|l| (1, l));
    }
    let r = prod(g, v, "ReduceSum")?;
    let m = prod(g, &r.input[0], "Mul")?;
    let pow = const_f32(g, &m.input[1])?;
    let k = pow.len() as u32;
    if !(2..=MAX_CODE_BITS).contains(&k)
        || pow
            .iter()
            .enumerate()
            .any(|(i, &p)| p != (1u32 << i) as f32)
    {
        return None;
    }
    let shape = const_ints(g, &prod(g, &m.input[0], "Reshape")?.input[1])?;
    if shape.last() != Some(&(k as i64)) {
        return None;
    }
    let c = prod(g, &strip(g, &m.input[0]), "Cast")?;
    if cast_to(c)? != DataType::Float as i64 {
        return None;
    }
    bit_stream(g, &c.input[0]).map(|l| (k, l))
}

/// `book[Cast(codes)]`: the width of the codes and the codebook.
fn codebook(g: &Graph, v: &str) -> Option<(u32, Vec<f32>)> {
    let gn = prod(g, v, "Gather")?;
    let book = const_f32(g, &gn.input[0])?;
    let c = prod(g, &gn.input[1], "Cast")?;
    if !matches!(cast_to(c)?, x if x == DataType::Int32 as i64 || x == DataType::Int64 as i64) {
        return None;
    }
    let (k, _) = code_width(g, &c.input[0])?;
    (book.len() as u64 <= 1u64 << k).then_some((k, book))
}

/// Bits of an affine decoder's scale (32 each) and zero point (k each).
fn affine_params(g: &Graph, value: &str, k: u32) -> f64 {
    let mul = match prod(g, value, "Where") {
        Some(w) => prod(g, &strip(g, &w.input[1]), "Mul"),
        None => prod(g, value, "Mul"),
    };
    let Some(m) = mul else { return 0.0 };
    let scales = const_f32(g, &m.input[1]).map_or(0, |v| v.len());
    // A signed grid's zero point is the offset 2^(k-1) of its stored codes, not a
    // parameter.
    let half = (1u64 << (k - 1)) as f32;
    let zps = prod(g, &m.input[0], "Sub")
        .and_then(|s| const_f32(g, &s.input[1]))
        .filter(|v| v.iter().any(|z| *z != half))
        .map_or(0, |v| v.len());
    scales as f64 * 32.0 + zps as f64 * k as f64
}

/// `(x - zp) * scale` with constant zp and scale: x.
fn affine(g: &Graph, v: &str) -> Option<String> {
    let m = prod(g, v, "Mul")?;
    const_f32(g, &m.input[1])?;
    let s = prod(g, &m.input[0], "Sub")?;
    const_f32(g, &s.input[1])?;
    Some(strip(g, &s.input[0]))
}

/// The bit stream a mask index `CumSum(Cast(bits)) - 1` counts.
fn mask_index(g: &Graph, v: &str) -> Option<String> {
    let s = prod(g, v, "Sub")?;
    if const_ints(g, &s.input[1])? != [1] {
        return None;
    }
    let cs = prod(g, &s.input[0], "CumSum")?;
    if const_ints(g, &cs.input[1])? != [0] || cs.attribute.iter().any(|a| a.i() != 0) {
        return None;
    }
    let c = prod(g, &cs.input[0], "Cast")?;
    bit_stream(g, &c.input[0])
}

fn classify(g: &Graph, value: &str) -> Option<Kind> {
    let (i, _) = g.producer(value)?;
    let n = g.node(i);
    match n.op_type() {
        "ConstantOfShape" => {
            const_ints(g, &n.input[0])?;
            Some(Kind::Zeros)
        }
        "Where" => {
            let zero = const_f32(g, &n.input[2])?;
            if zero.iter().any(|z| *z != 0.0) {
                return None;
            }
            let cond = prod(g, &strip(g, &n.input[0]), "Cast")?;
            if cast_to(cond)? != DataType::Bool as i64 {
                return None;
            }
            let mask_leaf = bit_stream(g, &cond.input[0])?;
            let x = strip(g, &n.input[1]);
            // Values gathered behind the mask: Gather(store, idx) with idx counting the same mask.
            let gathered = |v: &str| -> Option<String> {
                let gn = prod(g, v, "Gather")?;
                (mask_index(g, &gn.input[1])? == mask_leaf).then(|| gn.input[0].clone())
            };
            if let Some(inner) = affine(g, &x) {
                let codes = gathered(&inner)?;
                return code_width(g, &codes).map(|(k, _)| Kind::Affine(k));
            }
            let store = gathered(&x)?;
            if let Some(t) = g.constant_proto(&store) {
                return (t.data_type() == DataType::Float as i32).then_some(Kind::Float);
            }
            if half_values(g, &store) {
                return Some(Kind::Half);
            }
            let (k, book) = codebook(g, &store)?;
            let ternary = k == 1
                && book.len() == 2
                && book.iter().filter(|v| **v < 0.0).count() == 1
                && book.iter().filter(|v| **v > 0.0).count() == 1;
            Some(Kind::Codebook { k, ternary })
        }
        "Mul" => {
            let codes = affine(g, value)?;
            code_width(g, &codes).map(|(k, _)| Kind::Affine(k))
        }
        "Reshape" => {
            if half_values(g, &n.input[0]) {
                return Some(Kind::Half);
            }
            let (k, _) = codebook(g, &n.input[0])?;
            Some(Kind::Codebook { k, ternary: false })
        }
        _ => None,
    }
}

/// Integer codes decoded from packed storage (the `codes` store: the input of a
/// DequantizeLinear): their width k and their values. `None` when `value` is not
/// such a decoder.
pub fn read_codes(g: &Graph, value: &str) -> Result<Option<(u32, ArrayD<f32>)>> {
    let Some(c) = prod(g, value, "Cast") else {
        return Ok(None);
    };
    let int = [DataType::Int8, DataType::Uint8, DataType::Int32]
        .iter()
        .any(|t| cast_to(c) == Some(*t as i64));
    if !int {
        return Ok(None);
    }
    let mut x = c.input[0].clone();
    if let Some(sub) = prod(g, &x, "Sub") {
        if const_f32(g, &sub.input[1]).is_none() {
            return Ok(None);
        }
        x = sub.input[0].clone();
    }
    let codes = if let Some(w) = prod(g, &x, "Where") {
        if const_f32(g, &w.input[2]).is_none() {
            return Ok(None);
        }
        let Some(cond) = prod(g, &strip(g, &w.input[0]), "Cast") else {
            return Ok(None);
        };
        let Some(mask_leaf) = bit_stream(g, &cond.input[0]) else {
            return Ok(None);
        };
        let Some(gn) = prod(g, &strip(g, &w.input[1]), "Gather") else {
            return Ok(None);
        };
        if mask_index(g, &gn.input[1]).as_deref() != Some(mask_leaf.as_str()) {
            return Ok(None);
        }
        gn.input[0].clone()
    } else {
        strip(g, &x)
    };
    let Some((k, _)) = code_width(g, &codes) else {
        return Ok(None);
    };
    // Our own decoder, read natively (see `recognized`).
    let dql = g.consumers(value).iter().map(|&i| g.node(i)).find(|n| {
        n.op_type() == "DequantizeLinear" && n.input.first().map(String::as_str) == Some(value)
    });
    if let Some(n) = dql {
        let native = n
            .output
            .first()
            .and_then(|o| recognized(g, o))
            .and_then(|p| decode_codes(&p));
        if let Some((k2, q)) = native.filter(|(k2, _)| *k2 == k) {
            return Ok(Some((k2, q)));
        }
    }
    match eval::eval(g, value)? {
        Some(Val::I(a, _)) => Ok(Some((k, a.mapv(|v| v as f32)))),
        _ => Ok(None),
    }
}

/// A packed weight, recognized by the structure of its decoder and evaluated
/// by the ops it consists of. `None` when `value` is not a packed weight.
pub fn read(g: &Graph, value: &str) -> Result<Option<Weight>> {
    let Some(kind) = classify(g, value) else {
        return Ok(None);
    };
    let values = match recognized(g, value).and_then(|p| decode(&p)) {
        Some(v) => v,
        None => match eval::eval(g, value)? {
            Some(Val::F(values)) => values,
            _ => return Ok(None),
        },
    };
    // The affine decoder's scale and zero point (the zero point at the code width).
    let param_bits = match kind {
        Kind::Affine(k) => affine_params(g, value, k),
        _ => 0.0,
    };
    let (bits, scheme, ternary) = match kind {
        Kind::Zeros => (32, "all zeros (packed: ConstantOfShape)".to_string(), false),
        Kind::Float => (32, "float32 (packed: mask + values)".into(), false),
        Kind::Half => (16, "float16 (packed)".into(), false),
        Kind::Affine(k) => (k, format!("{k}-bit codes x scale (packed)"), false),
        Kind::Codebook { ternary: true, .. } => (
            2,
            "ternary (packed: mask + sign bit + 2 centroids)".into(),
            true,
        ),
        Kind::Codebook { k, .. } => (k, format!("{k}-bit codebook (packed)"), false),
    };
    Ok(Some(Weight {
        values,
        bits,
        scheme,
        quantized: bits < 16,
        ternary,
        claim: None,
        param_bits,
    }))
}

// ---------------------------------------------------------------------------
// Reading without the evaluator.
//
// A decoder this module wrote is read natively. [`parse`] recovers a candidate
// [`Packed`] from the graph's constants (loosely: it only has to be right when the
// graph is one of ours); [`build`] writes that Packed's decoder again; and the
// graph's subgraph must equal it node for node: the same ops, attributes and input
// structure, and every constant equal by value (names aside). The graph then
// computes what `build(p)` computes, and that is [`decode`] / [`decode_codes`]
// of `p` (tested against the evaluator on every store, masked and dense, per
// tensor and per channel, at both opsets). Whatever does not match is read by the
// evaluator as before.

/// The values the decoder of `p` writes, shape `p.shape`: elements without a
/// stored value are 0, the others decoded by the formulas of the module doc in
/// float32 arithmetic, in the decoder's order of operations (so bitwise equal).
/// `None` for the `codes` store (its output is DequantizeLinear's: see
/// [`decode_codes`]) or a codebook index past the book.
pub fn decode(p: &Packed) -> Option<ArrayD<f32>> {
    let Some(store) = &p.store else {
        return Some(ArrayD::zeros(IxDyn(&p.shape)));
    };
    let out = match store {
        Store::Codes { .. } => return None,
        Store::Affine {
            codes, scale, zp, ..
        } => {
            if scale.len() != zp.len() {
                return None;
            }
            by_channel(&p.shape, store_axis(store), &p.mask, codes, 0.0, |c, u| {
                (u as f32 - zp[c]) * scale[c]
            })?
        }
        Store::Float(v) => by_channel(&p.shape, None, &p.mask, v, 0.0, |_, x| x)?,
        Store::Half(v) => by_channel(&p.shape, None, &p.mask, v, 0.0, |_, x| {
            half::f16::from_f32(x).to_f32()
        })?,
        Store::Codebook { codes, book, .. } => {
            if codes.iter().any(|&c| c as usize >= book.len()) {
                return None;
            }
            by_channel(&p.shape, None, &p.mask, codes, 0.0, |_, c| book[c as usize])?
        }
    };
    ArrayD::from_shape_vec(IxDyn(&p.shape), out).ok()
}

/// The integer codes q a `codes` store's decoder hands DequantizeLinear (as f32,
/// shape `p.shape`) and the code width: q = Cast(x - shift, T) with x the stored
/// code (or, where the mask is 0, the channel's zero point) and shift 2^(k-1)
/// (int8), 0 (uint8) or the zero point (int32); Cast truncates toward zero and
/// wraps to T as the evaluator does. `None` for the other stores.
pub fn decode_codes(p: &Packed) -> Option<(u32, ArrayD<f32>)> {
    let Some(Store::Codes {
        k,
        codes,
        scale,
        zp,
        axis,
    }) = &p.store
    else {
        return None;
    };
    let k = *k;
    // The evaluator's Cast refuses non-finite values: leave those to it.
    if zp.len() != scale.len() || zp.iter().any(|z| !z.is_finite()) {
        return None;
    }
    let half = (1u32 << (k - 1)) as f32;
    let signed = k <= 8 && zp.iter().all(|z| *z == half);
    let (to, shift): (DataType, Vec<f32>) = if k > 8 {
        (DataType::Int32, zp.clone())
    } else if signed {
        (DataType::Int8, vec![half; zp.len()])
    } else {
        (DataType::Uint8, vec![0.0; zp.len()])
    };
    let cast = |x: f32| eval::wrap(x.trunc() as i64, to) as f32;
    // Where the mask is 0 the decoder's x is the zero point: q = Cast(zp - shift).
    let fill: Vec<f32> = zp.iter().zip(&shift).map(|(z, s)| cast(z - s)).collect();
    let out = if shift.iter().all(|s| s.fract() == 0.0 && s.abs() < 65536.0) {
        // Integer shifts: u - shift is exact in f32 and in T's range (u < 2^k,
        // shift 2^(k-1) for int8, 0 for uint8, an integer zero point for int32),
        // so Cast changes nothing.
        by_channel_fill(&p.shape, *axis, &p.mask, codes, &fill, |c, u| {
            u as f32 - shift[c]
        })?
    } else {
        by_channel_fill(&p.shape, *axis, &p.mask, codes, &fill, |c, u| {
            cast(u as f32 - shift[c])
        })?
    };
    Some((k, ArrayD::from_shape_vec(IxDyn(&p.shape), out).ok()?))
}

/// The n = prod(shape) decoded elements, in order: element i of channel c (along
/// `axis`; channel 0 without one) is `f(c, stored[j])` where the mask is set (j
/// counting the set bits before it) or every element without a mask, `fill`
/// elsewhere. `None` when the stored values do not cover the mask.
fn by_channel<T: Copy>(
    shape: &[usize],
    axis: Option<usize>,
    mask: &Option<Vec<bool>>,
    stored: &[T],
    fill: f32,
    f: impl Fn(usize, T) -> f32,
) -> Option<Vec<f32>> {
    let channels = axis.and_then(|a| shape.get(a)).copied().unwrap_or(1);
    by_channel_fill(shape, axis, mask, stored, &vec![fill; channels.max(1)], f)
}

fn by_channel_fill<T: Copy>(
    shape: &[usize],
    axis: Option<usize>,
    mask: &Option<Vec<bool>>,
    stored: &[T],
    fill: &[f32],
    f: impl Fn(usize, T) -> f32,
) -> Option<Vec<f32>> {
    let n = numel(shape)?;
    let (outer, channels, inner) = match axis {
        Some(a) if a < shape.len() => (
            shape[..a].iter().product::<usize>(),
            shape[a],
            shape[a + 1..].iter().product::<usize>(),
        ),
        _ => (1, 1, n),
    };
    if fill.len() < channels {
        return None;
    }
    match mask {
        None => {
            if stored.len() < n {
                return None;
            }
            let mut out = Vec::with_capacity(n);
            for o in 0..outer {
                for c in 0..channels {
                    let at = (o * channels + c) * inner;
                    out.extend(stored[at..at + inner].iter().map(|&x| f(c, x)));
                }
            }
            Some(out)
        }
        Some(mask) => {
            if mask.len() != n || mask.iter().filter(|b| **b).count() > stored.len() {
                return None;
            }
            let mut out = Vec::with_capacity(n);
            let Some(&last) = stored.last() else {
                // Nothing stored: every element is the fill.
                for _ in 0..outer {
                    for &fill in fill.iter().take(channels) {
                        out.extend(std::iter::repeat_n(fill, inner));
                    }
                }
                return Some(out);
            };
            // Branch-free (a pruned mask is random): every element decodes the
            // next stored value, the mask picks it or the fill.
            let mut j = 0;
            for o in 0..outer {
                for (c, &fill) in fill.iter().enumerate().take(channels) {
                    let at = (o * channels + c) * inner;
                    out.extend(mask[at..at + inner].iter().map(|&on| {
                        let v = f(c, *stored.get(j).unwrap_or(&last));
                        j += usize::from(on);
                        if on {
                            v
                        } else {
                            fill
                        }
                    }));
                }
            }
            Some(out)
        }
    }
}

fn store_axis(s: &Store) -> Option<usize> {
    match s {
        Store::Affine { axis, .. } | Store::Codes { axis, .. } => *axis,
        _ => None,
    }
}

fn u8_leaf(g: &Graph, v: &str) -> Option<Vec<u8>> {
    match TensorData::from_proto(g.constant_proto(v)?).ok()? {
        TensorData::U8(a) => Some(a.into_raw_vec_and_offset().0),
        _ => None,
    }
}

/// Elements of a shape; `None` when the product overflows.
fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

/// The first `len` bits of an LSB-first stream.
fn unpack_bits(bytes: &[u8], len: usize) -> Option<Vec<bool>> {
    (len <= bytes.len() * 8).then(|| {
        bytes
            .iter()
            .flat_map(|&b| (0..8).map(move |i| (b >> i) & 1 == 1))
            .take(len)
            .collect()
    })
}

/// The first `m` k-bit codes of an LSB-first stream (the inverse of [`pack_codes`]).
fn unpack_codes(bytes: &[u8], m: usize, k: u32) -> Option<Vec<u32>> {
    if k == 0 || k > 32 || m.checked_mul(k as usize)? > bytes.len().saturating_mul(8) {
        return None;
    }
    if k == 8 {
        return Some(bytes[..m].iter().map(|&b| b as u32).collect());
    }
    let mask = if k >= 32 {
        u64::from(u32::MAX)
    } else {
        (1u64 << k) - 1
    };
    let (mut acc, mut have, mut at) = (0u64, 0u32, 0usize);
    let mut out = Vec::with_capacity(m);
    for _ in 0..m {
        while have < k {
            acc |= u64::from(bytes[at]) << have;
            at += 1;
            have += 8;
        }
        out.push((acc & mask) as u32);
        acc >>= k;
        have -= k;
    }
    Some(out)
}

/// Codes `cf` (float, as `Builder::codes` writes them): width, the first `m`
/// codes of their stream, and the opset the ReduceSum form implies.
fn parse_codes(g: &Graph, cf: &str, m: usize) -> Option<(u32, Vec<u32>, i64)> {
    let (k, leaf) = code_width(g, cf)?;
    let opset = match prod(g, cf, "ReduceSum") {
        Some(r) if r.input.len() < 2 => 11,
        _ => 13,
    };
    Some((k, unpack_codes(&u8_leaf(g, &leaf)?, m, k)?, opset))
}

fn const_usizes(g: &Graph, v: &str) -> Option<Vec<usize>> {
    const_ints(g, v)?
        .iter()
        .map(|&d| usize::try_from(d).ok())
        .collect()
}

/// A per-tensor (rank 0) or per-channel constant: its values and the axis along
/// which it is not 1 (`rank1`: a 1-D constant along `axis_attr`).
fn channel_const(g: &Graph, v: &str) -> Option<(Vec<f32>, Option<usize>)> {
    let d = g.constant(v).ok()??;
    let dims = d.shape().to_vec();
    let vals: Vec<f32> = d.to_f32().iter().copied().collect();
    if dims.is_empty() {
        return Some((vals, None));
    }
    let axis = dims.iter().position(|&x| x == vals.len()).unwrap_or(0);
    Some((vals, Some(axis)))
}

/// The Packed whose decoder may write `value`, read from the graph's constants,
/// and the opset of its ReduceSum form. Not a proof: [`recognized`] checks it.
fn parse(g: &Graph, value: &str) -> Option<(Packed, i64)> {
    let (i, slot) = g.producer(value)?;
    if slot != 0 {
        return None;
    }
    let node = g.node(i);
    // Mask behind `cond` (Reshape(Cast(bits, bool), S)): shape and flags.
    let mask_of = |cond: &str| -> Option<(Vec<usize>, Vec<bool>)> {
        let r = prod(g, cond, "Reshape")?;
        let shape = const_usizes(g, r.input.get(1)?)?;
        let c = prod(g, &r.input[0], "Cast")?;
        let leaf = bit_stream(g, &c.input[0])?;
        let n = numel(&shape)?;
        Some((shape, unpack_bits(&u8_leaf(g, &leaf)?, n)?))
    };
    // Stored values `v` (Float, Half or Codebook) of m elements.
    let values_of = |v: &str, m: usize| -> Option<(Store, i64)> {
        if let Some(t) = g.constant_proto(v) {
            if t.data_type() != DataType::Float as i32 {
                return None;
            }
            let vals: Vec<f32> = g.constant_f32(v).ok()??.iter().copied().collect();
            return (vals.len() == m).then_some((Store::Float(vals), 13));
        }
        if half_values(g, v) {
            let c = prod(g, v, "Cast")?;
            let vals: Vec<f32> = g.constant_f32(&c.input[0]).ok()??.iter().copied().collect();
            return (vals.len() == m).then_some((Store::Half(vals), 13));
        }
        let gn = prod(g, v, "Gather")?;
        let book = const_f32(g, &gn.input[0])?;
        let c = prod(g, &gn.input[1], "Cast")?;
        let (k, codes, opset) = parse_codes(g, &c.input[0], m)?;
        Some((Store::Codebook { k, codes, book }, opset))
    };
    let affine_of =
        |mul: &NodeProto, m: usize, gathered: bool| -> Option<(Vec<usize>, Store, i64)> {
            let (scale, axis) = channel_const(g, mul.input.get(1)?)?;
            let sub = prod(g, &mul.input[0], "Sub")?;
            let (zp, _) = channel_const(g, sub.input.get(1)?)?;
            let r = prod(g, &sub.input[0], "Reshape")?;
            let shape = const_usizes(g, r.input.get(1)?)?;
            let cf = if gathered {
                prod(g, &r.input[0], "Gather")?.input[0].clone()
            } else {
                r.input[0].clone()
            };
            let m = if gathered { m } else { numel(&shape)? };
            let (k, codes, opset) = parse_codes(g, &cf, m)?;
            Some((
                shape,
                Store::Affine {
                    k,
                    codes,
                    scale,
                    zp,
                    axis,
                },
                opset,
            ))
        };
    let (packed, opset) = match node.op_type() {
        "ConstantOfShape" => (
            Packed {
                shape: const_usizes(g, node.input.first()?)?,
                mask: None,
                store: None,
            },
            13,
        ),
        "Where" => {
            let (shape, mask) = mask_of(&node.input[0])?;
            let m = mask.iter().filter(|b| **b).count();
            let x = node.input.get(1)?;
            let (store, opset) = if let Some(mul) = prod(g, x, "Mul") {
                let (s, store, opset) = affine_of(mul, m, true)?;
                (s == shape).then_some((store, opset))?
            } else {
                let r = prod(g, x, "Reshape")?;
                values_of(&prod(g, &r.input[0], "Gather")?.input[0], m)?
            };
            (
                Packed {
                    shape,
                    mask: Some(mask),
                    store: Some(store),
                },
                opset,
            )
        }
        "Reshape" => {
            let shape = const_usizes(g, node.input.get(1)?)?;
            let (store, opset) = values_of(&node.input[0], numel(&shape)?)?;
            (
                Packed {
                    shape,
                    mask: None,
                    store: Some(store),
                },
                opset,
            )
        }
        "Mul" => {
            let (shape, store, opset) = affine_of(node, 0, false)?;
            (
                Packed {
                    shape,
                    mask: None,
                    store: Some(store),
                },
                opset,
            )
        }
        "DequantizeLinear" => {
            let (scale, _) = channel_const(g, node.input.get(1)?)?;
            let axis = match node.get_int("axis").ok()? {
                Some(a) => Some(usize::try_from(a).ok()?),
                None => None,
            };
            let c = prod(g, &node.input[0], "Cast")?;
            let to = cast_to(c)?;
            let mut x = c.input[0].clone();
            let mut shift = None;
            if let Some(s) = prod(g, &x, "Sub") {
                shift = Some(const_f32(g, s.input.get(1)?)?);
                x = s.input[0].clone();
            }
            let (r, mask) = match prod(g, &x, "Where") {
                Some(w) => (
                    prod(g, w.input.get(1)?, "Reshape")?,
                    Some(mask_of(&w.input[0])?),
                ),
                None => (prod(g, &x, "Reshape")?, None),
            };
            let shape = const_usizes(g, r.input.get(1)?)?;
            let n = numel(&shape)?;
            let (cf, m) = match &mask {
                Some((s, mk)) => {
                    if *s != shape {
                        return None;
                    }
                    (
                        prod(g, &r.input[0], "Gather")?.input[0].clone(),
                        mk.iter().filter(|b| **b).count(),
                    )
                }
                None => (r.input[0].clone(), n),
            };
            let (k, codes, opset) = parse_codes(g, &cf, m)?;
            let zp = if to == DataType::Int32 as i64 {
                let z = shift?;
                if z.len() != scale.len() {
                    return None;
                }
                z
            } else if to == DataType::Int8 as i64 {
                vec![(1u32 << (k - 1)) as f32; scale.len()]
            } else {
                let z: Vec<f32> = g
                    .constant_f32(node.input.get(2)?)
                    .ok()??
                    .iter()
                    .copied()
                    .collect();
                if z.len() != scale.len() {
                    return None;
                }
                z
            };
            (
                Packed {
                    shape,
                    mask: mask.map(|(_, m)| m),
                    store: Some(Store::Codes {
                        k,
                        codes,
                        scale,
                        zp,
                        axis,
                    }),
                },
                opset,
            )
        }
        _ => return None,
    };
    Some((packed, opset))
}

/// Whether [`build`] writes a decoder for `p` (it assumes what the packing pass
/// guarantees; a Packed parsed from someone else's graph may not hold it).
fn buildable(p: &Packed) -> bool {
    let Some(n) = numel(&p.shape) else {
        return false;
    };
    let m = match &p.mask {
        Some(mask) if mask.len() != n => return false,
        Some(mask) => mask.iter().filter(|b| **b).count(),
        None => n,
    };
    // A mask with nothing behind it is ConstantOfShape's job (and Gather(empty,
    // -1) fails).
    if p.mask.is_some() && p.store.is_some() && m == 0 {
        return false;
    }
    let grid = |k: u32, codes: &[u32], scale: &[f32], zp: &[f32], axis: Option<usize>| {
        (1..=MAX_CODE_BITS).contains(&k)
            && codes.len() == m
            && !scale.is_empty()
            && scale.len() == zp.len()
            && match axis {
                None => scale.len() == 1,
                // One scale per channel (decode indexes them by channel).
                Some(a) => p.shape.get(a) == Some(&scale.len()),
            }
    };
    match &p.store {
        None => true,
        Some(Store::Float(v)) | Some(Store::Half(v)) => v.len() == m,
        Some(Store::Codebook { k, codes, book }) => {
            (1..=MAX_CODE_BITS).contains(k) && codes.len() == m && book.len() as u64 <= 1 << k
        }
        Some(Store::Affine {
            k,
            codes,
            scale,
            zp,
            axis,
        })
        | Some(Store::Codes {
            k,
            codes,
            scale,
            zp,
            axis,
        }) => grid(*k, codes, scale, zp, *axis),
    }
}

/// Whether the graph's `gv` is computed exactly as the decoder's `dv`.
struct Match<'d, 'g> {
    g: &'d Graph<'g>,
    nodes: HashMap<&'d str, &'d NodeProto>,
    inits: HashMap<&'d str, &'d TensorProto>,
    seen: HashSet<(&'d str, &'d str)>,
}

impl<'d> Match<'d, '_> {
    fn same(&mut self, gv: &'d str, dv: &'d str) -> bool {
        if gv.is_empty() || dv.is_empty() {
            return gv.is_empty() && dv.is_empty();
        }
        if self.seen.contains(&(gv, dv)) {
            return true;
        }
        let ok = if let Some(t) = self.inits.get(dv) {
            match self.g.constant_proto(gv) {
                Some(gt)
                    if gt.raw_data.is_some()
                        && gt.data_location() == t.data_location()
                        && t.raw_data.is_some() =>
                {
                    // Both little-endian bytes of the same type and shape.
                    gt.data_type() == t.data_type()
                        && gt.dims == t.dims
                        && gt.raw_data == t.raw_data
                }
                Some(gt) => {
                    // Typed fields: compared by their canonical little-endian bytes
                    // (bit for bit: -0 is not 0, as the evaluator sees them).
                    gt.data_type() == t.data_type()
                        && gt.dims == t.dims
                        && match (TensorData::from_proto(gt), TensorData::from_proto(t)) {
                            (Ok(a), Ok(b)) => a.to_proto("").raw_data == b.to_proto("").raw_data,
                            _ => false,
                        }
                }
                None => false,
            }
        } else if let Some(dn) = self.nodes.get(dv).copied() {
            match self.g.producer(gv) {
                Some((i, 0)) => {
                    let gn = self.g.node(i);
                    gn.op_type() == dn.op_type()
                        && gn.domain().is_empty()
                        && gn.attribute == dn.attribute
                        && gn.input.len() == dn.input.len()
                        && gn.input.iter().zip(&dn.input).all(|(a, b)| self.same(a, b))
                }
                _ => false,
            }
        } else {
            false
        };
        if ok {
            self.seen.insert((gv, dv));
        }
        ok
    }
}

/// The Packed the decoder writing `value` stores, when that decoder is exactly
/// the one [`build`] writes for it.
pub fn recognized(g: &Graph, value: &str) -> Option<Packed> {
    let (p, opset) = parse(g, value)?;
    if !buildable(&p) {
        return None;
    }
    let mut shared = Shared::new(HashSet::new());
    let out = "\u{0}decoded";
    let dec = build(&p, out, "\u{0}", opset, &mut shared);
    let mut m = Match {
        g,
        nodes: dec
            .nodes
            .iter()
            .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
            .collect(),
        inits: dec
            .inits
            .iter()
            .chain(&shared.inits)
            .map(|t| (t.name(), t))
            .collect(),
        seen: HashSet::new(),
    };
    m.same(value, out).then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout by its definition: stream bit p is bit (p mod 8) of byte p / 8,
    /// code j's bit i is stream bit j*k + i.
    fn by_definition(codes: &[u32], k: u32) -> Vec<u8> {
        let mut out = vec![0u8; (codes.len() * k as usize).div_ceil(8)];
        for (j, &c) in codes.iter().enumerate() {
            for i in 0..k as usize {
                if (c >> i) & 1 == 1 {
                    let p = j * k as usize + i;
                    out[p / 8] |= 1 << (p % 8);
                }
            }
        }
        out
    }

    #[test]
    fn pack_codes_is_the_lsb_first_stream_at_every_width() {
        // By hand, k = 3: codes 5 (101), 3 (011), 6 (110) -> stream bits
        // 1,0,1, 1,1,0, 0,1,1 (p0..p8) -> byte 0 = p7..p0 = 0b1001_1101 = 0x9d,
        // byte 1 = p8 = 0x01.
        assert_eq!(pack_codes(&[5, 3, 6], 3), vec![0x9d, 0x01]);
        // A fixed pseudo-random stream of codes, every width the format writes, and
        // lengths that end mid-byte.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for k in 1..=MAX_CODE_BITS {
            for n in [0usize, 1, 7, 8, 9, 1001] {
                let codes: Vec<u32> = (0..n)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        (x as u32) & ((1u32 << k) - 1)
                    })
                    .collect();
                assert_eq!(
                    pack_codes(&codes, k),
                    by_definition(&codes, k),
                    "k {k}, n {n}"
                );
            }
        }
    }

    /// Decoders of every store, masked and dense, per tensor and per channel, at
    /// both opsets' ReduceSum forms: `eval::shape` (no element computed) gives the
    /// shape `eval` computes, and the decoded values are the packed ones.
    #[test]
    fn shape_without_decoding_equals_the_decoded_shape() {
        use crate::graph::Graph;
        use crate::onnx::proto::GraphProto;
        use crate::repr::eval;
        let shape = vec![4usize, 3, 2, 2];
        let n: usize = shape.iter().product();
        // Every third element zero.
        let mask: Vec<bool> = (0..n).map(|i| i % 3 != 0).collect();
        let m = mask.iter().filter(|b| **b).count();
        let codes = |len: usize, k: u32| -> Vec<u32> {
            (0..len as u32).map(|i| (i * 7 + 3) % (1 << k)).collect()
        };
        let mut cases: Vec<(Option<Vec<bool>>, Option<Store>)> = vec![(None, None)];
        for masked in [false, true] {
            let len = if masked { m } else { n };
            let mk = masked.then(|| mask.clone());
            // Float values are stored behind a mask only (`choose`: dense float32
            // without zeros has nothing to pack).
            if masked {
                cases.push((
                    mk.clone(),
                    Some(Store::Float((0..len).map(|i| i as f32 + 0.5).collect())),
                ));
            }
            cases.push((
                mk.clone(),
                Some(Store::Half((0..len).map(|i| i as f32).collect())),
            ));
            for k in [1u32, 3, 8, 12] {
                cases.push((
                    mk.clone(),
                    Some(Store::Codebook {
                        k: k.min(4),
                        codes: codes(len, k.min(4)),
                        book: (0..1u32 << k.min(4)).map(|i| i as f32 - 2.0).collect(),
                    }),
                ));
                for axis in [None, Some(0)] {
                    let c = if axis.is_some() { shape[0] } else { 1 };
                    let scale: Vec<f32> = (0..c).map(|i| 0.25 * (i + 1) as f32).collect();
                    let zp = vec![(1u32 << (k - 1)) as f32; c];
                    cases.push((
                        mk.clone(),
                        Some(Store::Affine {
                            k,
                            codes: codes(len, k),
                            scale: scale.clone(),
                            zp: zp.clone(),
                            axis,
                        }),
                    ));
                    cases.push((
                        mk.clone(),
                        Some(Store::Codes {
                            k,
                            codes: codes(len, k),
                            scale,
                            zp,
                            axis,
                        }),
                    ));
                }
            }
        }
        let (mut checked, mut native_checked) = (0, 0);
        for opset in [11i64, 13] {
            for (mask, store) in &cases {
                let p = Packed {
                    shape: shape.clone(),
                    mask: mask.clone(),
                    store: store.clone(),
                };
                let mut shared = Shared::new(Default::default());
                let dec = build(&p, "w", "pk", opset, &mut shared);
                let g = GraphProto {
                    node: dec.nodes.clone(),
                    initializer: dec.inits.iter().chain(&shared.inits).cloned().collect(),
                    ..Default::default()
                };
                let view = Graph::new(&g).unwrap();
                // Read natively: recognized as the Packed it is, and decoded bitwise
                // as the evaluator decodes it.
                let dense_q = matches!(store, Some(Store::Codes { k: 8, .. })) && mask.is_none();
                if !dense_q {
                    let r = recognized(&view, "w").unwrap_or_else(|| panic!("{p:?}"));
                    assert_eq!(r.shape, p.shape);
                    assert_eq!(r.mask, p.mask);
                    assert_eq!(
                        build(&r, "w", "pk", opset, &mut Shared::new(Default::default())).inits,
                        dec.inits
                    );
                    let bits = |a: &ArrayD<f32>| a.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    if let Some(Store::Codes { .. }) = store {
                        let q = &dec.nodes.last().unwrap().input[0];
                        let Some(Val::I(e, _)) = eval::eval(&view, q).unwrap() else {
                            panic!("{p:?}")
                        };
                        let (k, native) = decode_codes(&r).unwrap();
                        assert_eq!(native, e.mapv(|v| v as f32), "{p:?}");
                        assert_eq!(read_codes(&view, q).unwrap().unwrap(), (k, native.clone()));
                        native_checked += 1;
                    } else {
                        let Some(Val::F(e)) = eval::eval(&view, "w").unwrap() else {
                            panic!("{p:?}")
                        };
                        let native = decode(&r).unwrap();
                        assert_eq!(bits(&native), bits(&e), "{p:?}");
                        native_checked += 1;
                    }
                }
                let decoded = crate::repr::weight(&view, "w").unwrap().unwrap();
                assert_eq!(decoded.values.shape(), shape.as_slice(), "{p:?}");
                assert_eq!(eval::shape(&view, "w").as_deref(), Some(shape.as_slice()));
                // The value every decoder step computes, and its shape found alone.
                for node in &dec.nodes {
                    for o in &node.output {
                        let Some(v) = eval::eval(&view, o).unwrap() else {
                            continue;
                        };
                        assert_eq!(
                            eval::shape(&view, o).as_deref(),
                            Some(v.shape()),
                            "{} ({}) of {p:?}",
                            o,
                            node.op_type()
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 500, "{checked} values checked");
        // Every case at both opsets but the two dense 8-bit `codes` stores (per
        // tensor and per channel), whose q is an int8/uint8 initializer, no decoder.
        assert_eq!(native_checked, 2 * (cases.len() - 2));
    }

    /// A decoder that differs from ours in anything `parse` does not look at is
    /// not read natively (the evaluator reads it), and a changed constant that
    /// `parse` does read is read with its new value.
    #[test]
    fn a_changed_decoder_is_not_read_natively() {
        use crate::graph::Graph;
        use crate::onnx::proto::GraphProto;
        let shape = vec![2usize, 3];
        let p = Packed {
            shape: shape.clone(),
            mask: Some(vec![true, false, true, true, false, true]),
            store: Some(Store::Affine {
                k: 3,
                codes: vec![1, 2, 5, 7],
                scale: vec![0.5],
                zp: vec![4.0],
                axis: None,
            }),
        };
        let mut shared = Shared::new(Default::default());
        let dec = build(&p, "w", "pk", 13, &mut shared);
        let proto = |edit: &dyn Fn(&mut TensorProto)| {
            let mut inits: Vec<TensorProto> =
                dec.inits.iter().chain(&shared.inits).cloned().collect();
            inits.iter_mut().for_each(edit);
            GraphProto {
                node: dec.nodes.clone(),
                initializer: inits,
                ..Default::default()
            }
        };
        let g = proto(&|_| {});
        let view = Graph::new(&g).unwrap();
        // (code - 4) * 0.5 at the stored positions: (1-4)/2 = -1.5, (2-4)/2 = -1,
        // (5-4)/2 = 0.5, (7-4)/2 = 1.5.
        let want = [-1.5f32, 0.0, -1.0, 0.5, 0.0, 1.5];
        let r = recognized(&view, "w").unwrap();
        assert_eq!(
            decode(&r).unwrap().iter().copied().collect::<Vec<_>>(),
            want
        );
        // The bit stream's column shape [-1, 1] made [1, -1]: `parse` skips
        // Reshapes, the comparison with our decoder does not.
        let g = proto(&|t| {
            if t.name() == "pk_shape_col" {
                *t = i64s(&[1, -1]).to_proto("pk_shape_col");
            }
        });
        let view = Graph::new(&g).unwrap();
        assert!(recognized(&view, "w").is_none());
        // The scale 0.5 -> 2: read natively with the new scale, as the evaluator does.
        let g = proto(&|t| {
            if t.name() == "pk.scale" {
                *t = TensorData::F32(arr0(2.0f32).into_dyn()).to_proto("pk.scale");
            }
        });
        let view = Graph::new(&g).unwrap();
        let r = recognized(&view, "w").unwrap();
        let Some(Val::F(e)) = eval::eval(&view, "w").unwrap() else {
            panic!()
        };
        assert_eq!(decode(&r).unwrap(), e);
        assert_eq!(
            e.iter().copied().collect::<Vec<_>>(),
            [-6.0, 0.0, -4.0, 2.0, 0.0, 6.0]
        );
        // The Where's fill 0 written as typed float_data -0.0: equal as numbers,
        // not as bits (the evaluator would give -0): not ours.
        let g = proto(&|t| {
            if t.name() == "pk_zero_f32" {
                *t = TensorProto {
                    name: Some("pk_zero_f32".into()),
                    data_type: Some(DataType::Float as i32),
                    float_data: vec![-0.0],
                    ..Default::default()
                };
            }
        });
        assert!(recognized(&Graph::new(&g).unwrap(), "w").is_none());
        // Hostile shapes: a product past usize (2^62 x 8) or huge (2^60 elements
        // from 12 bytes of codes) is refused before any allocation, by the native
        // reader and by the evaluator alike.
        let dense = Packed {
            mask: None,
            store: Some(Store::Affine {
                k: 16,
                codes: vec![1, 2, 5, 7, 0, 3],
                scale: vec![0.5],
                zp: vec![4.0],
                axis: None,
            }),
            ..p.clone()
        };
        let mut sh = Shared::new(Default::default());
        let dd = build(&dense, "w", "pk", 13, &mut sh);
        for dims in [vec![1i64 << 62, 8], vec![1i64 << 60]] {
            let inits = dd
                .inits
                .iter()
                .chain(&sh.inits)
                .map(|t| {
                    if t.name() == "pk_shape_2x3" {
                        i64s(&dims).to_proto("pk_shape_2x3")
                    } else {
                        t.clone()
                    }
                })
                .collect();
            let g = GraphProto {
                node: dd.nodes.clone(),
                initializer: inits,
                ..Default::default()
            };
            let view = Graph::new(&g).unwrap();
            assert!(recognized(&view, "w").is_none(), "{dims:?}");
            assert!(
                !matches!(crate::repr::weight(&view, "w"), Ok(Some(_))),
                "{dims:?}"
            );
        }
    }
}
