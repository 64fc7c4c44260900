//! A small constant evaluator: computes a value of the graph that depends on
//! initializers only, with ONNX semantics, for the ops weight-decoding subgraphs
//! use (Identity, Reshape, Unsqueeze, Squeeze, Slice, Cast, BitShift, Mod,
//! BitwiseAnd, Add, Sub, Mul, ReduceSum, CumSum, Gather, Where, ConstantOfShape).
//!
//! The score reads a packed weight's values from here, so the values it counts are
//! the values a runtime computes, not what a format is supposed to decode to.
//! Integers are held as i64 tagged with their ONNX type and wrapped to it after
//! every op; floats are f32, float16 held as the f32 numbers it represents (other
//! float types are not evaluated). An op, type or
//! attribute outside that set makes the value "not evaluable" (`None`), never a guess.

use std::collections::HashMap;

use ndarray::{ArrayD, Axis, IxDyn, Slice};

use crate::error::Result;
use crate::graph::Graph;
use crate::onnx::attr::NodeAttrs;
use crate::onnx::{DataType, NodeProto, TensorData};

/// An evaluated value.
#[derive(Debug, Clone)]
pub enum Val {
    F(ArrayD<f32>),
    /// Integer values with their ONNX element type.
    I(ArrayD<i64>, DataType),
    B(ArrayD<bool>),
}

impl Val {
    pub fn shape(&self) -> &[usize] {
        match self {
            Val::F(a) => a.shape(),
            Val::I(a, _) => a.shape(),
            Val::B(a) => a.shape(),
        }
    }

    fn from_data(d: TensorData) -> Option<Val> {
        Some(match d {
            TensorData::F32(a) => Val::F(a),
            TensorData::Bool(a) => Val::B(a),
            // float16 widens to float32 exactly.
            TensorData::F16(a) => Val::F(a.mapv(|x| x.to_f32())),
            TensorData::F64(_) | TensorData::BF16(_) => return None,
            other => {
                let t = other.data_type();
                Val::I(other.to_i64()?, t)
            }
        })
    }

    fn ints(&self) -> Option<Vec<i64>> {
        match self {
            Val::I(a, _) => Some(a.iter().copied().collect()),
            _ => None,
        }
    }
}

/// Wraps an integer to the range of an ONNX integer type.
pub(crate) fn wrap(x: i64, t: DataType) -> i64 {
    match t {
        DataType::Uint8 => x as u8 as i64,
        DataType::Int8 => x as i8 as i64,
        DataType::Uint16 => x as u16 as i64,
        DataType::Int16 => x as i16 as i64,
        DataType::Uint32 => x as u32 as i64,
        DataType::Int32 => x as i32 as i64,
        _ => x,
    }
}

/// An INT attribute; absent or of another type: `None` (the value is then not evaluable).
fn attr_i(n: &NodeProto, name: &str) -> Option<i64> {
    n.get_int(name).ok().flatten()
}

fn attr_ints(n: &NodeProto, name: &str) -> Option<Vec<i64>> {
    n.get_ints(name).ok().flatten()
}

fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let x = if i + a.len() >= r {
            a[i + a.len() - r]
        } else {
            1
        };
        let y = if i + b.len() >= r {
            b[i + b.len() - r]
        } else {
            1
        };
        out[i] = match (x, y) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(out)
}

fn zip2<A: Clone, B: Clone, C>(
    a: &ArrayD<A>,
    b: &ArrayD<B>,
    f: impl Fn(A, B) -> C,
) -> Option<ArrayD<C>> {
    let s = broadcast_shape(a.shape(), b.shape())?;
    // Fast paths (decoders are mostly element-wise on one long axis, or against a
    // scalar): plain slices instead of the general broadcasting Zip over IxDyn.
    if let (Some(xa), Some(xb)) = (a.as_slice(), b.as_slice()) {
        let v: Option<Vec<C>> = if a.shape() == b.shape() {
            Some(
                xa.iter()
                    .zip(xb)
                    .map(|(x, y)| f(x.clone(), y.clone()))
                    .collect(),
            )
        } else if xb.len() == 1 && a.shape() == s.as_slice() {
            Some(xa.iter().map(|x| f(x.clone(), xb[0].clone())).collect())
        } else if xa.len() == 1 && b.shape() == s.as_slice() {
            Some(xb.iter().map(|y| f(xa[0].clone(), y.clone())).collect())
        } else {
            None
        };
        if let Some(v) = v {
            return ArrayD::from_shape_vec(IxDyn(&s), v).ok();
        }
    }
    let (a, b) = (a.broadcast(IxDyn(&s))?, b.broadcast(IxDyn(&s))?);
    if s.len() == 2 {
        // The bit expansion's [bytes, 1] x [1, 8]: static dimensions iterate far
        // faster than IxDyn.
        let (a2, b2) = (
            a.view().into_dimensionality::<ndarray::Ix2>().ok()?,
            b.view().into_dimensionality::<ndarray::Ix2>().ok()?,
        );
        let out = ndarray::Zip::from(&a2)
            .and(&b2)
            .map_collect(|x, y| f(x.clone(), y.clone()));
        return Some(out.into_dyn());
    }
    Some(
        ndarray::Zip::from(&a)
            .and(&b)
            .map_collect(|x, y| f(x.clone(), y.clone())),
    )
}

/// Where(c, a, b) with broadcasting; `c` already broadcast to `s`. Fast path for
/// contiguous operands of the full shape or single values (the mask decoder's form).
fn select<T: Copy>(
    c: &ndarray::ArrayViewD<bool>,
    a: &ArrayD<T>,
    b: &ArrayD<T>,
    s: &[usize],
) -> Option<ArrayD<T>> {
    let full_or_one = |x: &ArrayD<T>| x.len() == 1 || x.shape() == s;
    if let (Some(xc), Some(xa), Some(xb)) = (c.as_slice(), a.as_slice(), b.as_slice()) {
        if full_or_one(a) && full_or_one(b) {
            let pick = |x: &[T], i: usize| if x.len() == 1 { x[0] } else { x[i] };
            let v: Vec<T> = xc
                .iter()
                .enumerate()
                .map(|(i, &k)| if k { pick(xa, i) } else { pick(xb, i) })
                .collect();
            return ArrayD::from_shape_vec(IxDyn(s), v).ok();
        }
    }
    let (a, b) = (a.broadcast(IxDyn(s))?, b.broadcast(IxDyn(s))?);
    Some(
        ndarray::Zip::from(c)
            .and(&a)
            .and(&b)
            .map_collect(|&c, &x, &y| if c { x } else { y }),
    )
}

/// Reshape's output dimensions (ONNX Reshape: 0 copies the input's dimension
/// unless `allow_zero`, one -1 takes what is left); `None` when they do not hold
/// the input's elements.
fn reshape_dims(input: &[usize], shape: &[i64], allow_zero: bool) -> Option<Vec<usize>> {
    let len: usize = input.iter().product();
    let mut dims: Vec<i64> = shape
        .iter()
        .enumerate()
        .map(|(i, &d)| {
            if d == 0 && !allow_zero {
                input.get(i).map(|&s| s as i64).unwrap_or(-2)
            } else {
                d
            }
        })
        .collect();
    if dims.iter().any(|&d| d < -1) || dims.iter().filter(|&&d| d == -1).count() > 1 {
        return None;
    }
    // Checked: a hostile shape constant may multiply past i64.
    let known: i64 = dims
        .iter()
        .filter(|&&d| d >= 0)
        .try_fold(1i64, |a, &d| a.checked_mul(d))?;
    if let Some(p) = dims.iter().position(|&d| d == -1) {
        if known == 0 || len as i64 % known != 0 {
            return None;
        }
        dims[p] = len as i64 / known;
    }
    let dims: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
    let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    (n == len).then_some(dims)
}

/// Unsqueeze's (axes of the output) or Squeeze's (axes of the input, all ones when
/// empty) output dimensions; `None` for an axis out of range or a squeezed
/// dimension other than 1.
fn squeeze_dims(input: &[usize], axes: &[i64], unsqueeze: bool) -> Option<Vec<usize>> {
    let mut dims = input.to_vec();
    if unsqueeze {
        let r = dims.len() + axes.len();
        let mut ax: Vec<usize> = axes
            .iter()
            .map(|&a| norm_axis(a, r))
            .collect::<Option<_>>()?;
        ax.sort();
        for a in ax {
            dims.insert(a, 1);
        }
    } else if axes.is_empty() {
        dims.retain(|&d| d != 1);
    } else {
        let r = dims.len();
        let mut ax: Vec<usize> = axes
            .iter()
            .map(|&a| norm_axis(a, r))
            .collect::<Option<_>>()?;
        ax.sort();
        for a in ax.into_iter().rev() {
            if dims[a] != 1 {
                return None;
            }
            dims.remove(a);
        }
    }
    Some(dims)
}

/// Slice's ranges (step 1 only; `axes` default 0.., `steps` default 1): (axis,
/// start, end) per entry, negative bounds counted from the end and clamped to the
/// extent the entries before it left, end never below start. `None` for other
/// steps, an axis out of range or lists of different lengths.
fn slice_ranges(
    shape: &[usize],
    starts: &[i64],
    ends: &[i64],
    axes: Option<Vec<i64>>,
    steps: Option<Vec<i64>>,
) -> Option<Vec<(usize, usize, usize)>> {
    let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
    if ends.len() != starts.len() || axes.len() != starts.len() {
        return None;
    }
    let mut dims = shape.to_vec();
    let mut out = Vec::with_capacity(starts.len());
    for i in 0..starts.len() {
        if steps.get(i) != Some(&1) {
            return None;
        }
        let a = norm_axis(axes[i], dims.len())?;
        let d = dims[a] as i64;
        let clamp = |v: i64| (if v < 0 { v + d } else { v }).clamp(0, d);
        let (s, e) = (clamp(starts[i]), clamp(ends[i]));
        let e = e.max(s);
        dims[a] = (e - s) as usize;
        out.push((a, s as usize, e as usize));
    }
    Some(out)
}

fn norm_axis(axis: i64, rank: usize) -> Option<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    (0..rank as i64).contains(&a).then_some(a as usize)
}

/// Evaluates `value` if it is computed from initializers (and `Constant` nodes) only.
///
/// Each intermediate value is computed once and handed to its consumers by value:
/// a value read by several nodes is kept (cloned) only until its last reader takes
/// it, so a decoder of n elements holds O(n) memory, not one copy per step.
pub fn eval(g: &Graph, value: &str) -> Result<Option<Val>> {
    let mut ev = Evaluator {
        g,
        uses: HashMap::new(),
        memo: HashMap::new(),
    };
    ev.count_uses(value, 0);
    ev.get(value, 0)
}

struct Evaluator<'a, 'g> {
    g: &'a Graph<'g>,
    /// Readers of each value inside the evaluated subgraph not yet served.
    uses: HashMap<String, usize>,
    memo: HashMap<String, Option<Val>>,
}

impl Evaluator<'_, '_> {
    /// Counts the readers of every value reachable from `value` (once per edge).
    fn count_uses(&mut self, value: &str, depth: usize) {
        let first = !self.uses.contains_key(value);
        *self.uses.entry(value.to_string()).or_insert(0) += 1;
        if !first || depth > 64 {
            return;
        }
        let g = self.g;
        if g.constant_proto(value).is_some() {
            return;
        }
        if let Some((idx, 0)) = g.producer(value) {
            for i in &g.node(idx).input {
                if !i.is_empty() {
                    self.count_uses(i, depth + 1);
                }
            }
        }
    }

    /// The value, computed once; the last of its readers takes it without a copy.
    fn get(&mut self, value: &str, depth: usize) -> Result<Option<Val>> {
        let left = self.uses.get_mut(value).map(|u| {
            *u = u.saturating_sub(1);
            *u
        });
        if let Some(v) = self.memo.get(value) {
            return Ok(if left == Some(0) {
                self.memo.remove(value).flatten()
            } else {
                v.clone()
            });
        }
        if depth > 64 {
            return Ok(None);
        }
        let v = self.compute(value, depth)?;
        if left.is_some_and(|l| l > 0) {
            self.memo.insert(value.to_string(), v.clone());
        }
        Ok(v)
    }

    fn compute(&mut self, value: &str, depth: usize) -> Result<Option<Val>> {
        let g = self.g;
        if let Some(d) = g.constant(value)? {
            return Ok(Val::from_data(d));
        }
        let Some((idx, slot)) = g.producer(value) else {
            return Ok(None);
        };
        if slot != 0 {
            return Ok(None);
        }
        let n = g.node(idx);
        let mut ins = Vec::new();
        for i in &n.input {
            if i.is_empty() {
                ins.push(None);
                continue;
            }
            match self.get(i, depth + 1)? {
                Some(v) => ins.push(Some(v)),
                None => return Ok(None),
            }
        }
        Ok(apply(g, n, ins))
    }
}

fn apply(g: &Graph, n: &NodeProto, mut slots: Vec<Option<Val>>) -> Option<Val> {
    // Each input is taken once, by value.
    let mut input = |i: usize| slots.get_mut(i).and_then(Option::take);
    match n.op_type() {
        "Identity" => input(0),
        "Reshape" => {
            let x = input(0)?;
            let shape = input(1)?.ints()?;
            let dims = reshape_dims(x.shape(), &shape, attr_i(n, "allowzero") == Some(1))?;
            reshape(x, &dims)
        }
        "Unsqueeze" | "Squeeze" => {
            let x = input(0)?;
            let axes = match input(1) {
                Some(a) => a.ints()?,
                None => attr_ints(n, "axes").unwrap_or_default(),
            };
            let dims = squeeze_dims(x.shape(), &axes, n.op_type() == "Unsqueeze")?;
            reshape(x, &dims)
        }
        "Slice" => {
            let x = input(0)?;
            let starts = input(1)?.ints()?;
            let ends = input(2)?.ints()?;
            let axes = match input(3) {
                Some(a) => Some(a.ints()?),
                None => None,
            };
            let steps = match input(4) {
                Some(s) => Some(s.ints()?),
                None => None,
            };
            let ranges = slice_ranges(x.shape(), &starts, &ends, axes, steps)?;
            let mut out = x;
            for (a, s, e) in ranges {
                if s == 0 && e == out.shape()[a] {
                    continue;
                }
                let sl = Slice::from(s as isize..e as isize);
                out = match out {
                    Val::F(a0) => Val::F(a0.slice_axis(Axis(a), sl).to_owned()),
                    Val::I(a0, t) => Val::I(a0.slice_axis(Axis(a), sl).to_owned(), t),
                    Val::B(a0) => Val::B(a0.slice_axis(Axis(a), sl).to_owned()),
                };
            }
            Some(out)
        }
        "Cast" => {
            let to = DataType::try_from(attr_i(n, "to")? as i32).ok()?;
            let x = input(0)?;
            Some(match (x, to) {
                (Val::F(a), DataType::Float) => Val::F(a),
                // float16 values are held as the float32 numbers they are.
                (Val::F(a), DataType::Float16) => {
                    Val::F(a.mapv(|v| half::f16::from_f32(v).to_f32()))
                }
                (Val::I(a, _), DataType::Float) => Val::F(a.mapv(|v| v as f32)),
                (Val::B(a), DataType::Float) => Val::F(a.mapv(|v| v as u8 as f32)),
                (Val::F(a), DataType::Bool) => Val::B(a.mapv(|v| v != 0.0)),
                (Val::I(a, _), DataType::Bool) => Val::B(a.mapv(|v| v != 0)),
                (Val::B(a), DataType::Bool) => Val::B(a),
                (v, t) if is_int(t) => {
                    let a = match v {
                        Val::F(a) => {
                            if a.iter().any(|x| !x.is_finite()) {
                                return None;
                            }
                            a.mapv(|x| x.trunc() as i64)
                        }
                        Val::I(a, _) => a,
                        Val::B(a) => a.mapv(|x| x as i64),
                    };
                    Val::I(a.mapv(|v| wrap(v, t)), t)
                }
                _ => return None,
            })
        }
        "BitShift" => {
            let (Val::I(a, t), Val::I(b, _)) = (input(0)?, input(1)?) else {
                return None;
            };
            let bits = match t {
                DataType::Uint8 => 8,
                DataType::Uint16 => 16,
                DataType::Uint32 => 32,
                DataType::Uint64 => 64,
                _ => return None,
            };
            let left = match n
                .attribute
                .iter()
                .find(|a| a.name() == "direction")
                .map(|a| a.s())
            {
                Some(b"LEFT") => true,
                Some(b"RIGHT") => false,
                _ => return None,
            };
            let out = zip2(&a, &b, |x, s| {
                let x = x as u64;
                let r = if !(0..bits).contains(&s) {
                    0
                } else if left {
                    x << s
                } else {
                    x >> s
                };
                r as i64
            })?;
            Some(Val::I(out.mapv(|v| wrap(v, t)), t))
        }
        "Mod" | "BitwiseAnd" | "Add" | "Sub" | "Mul" => {
            let op = n.op_type();
            match (input(0)?, input(1)?) {
                (Val::F(a), Val::F(b)) => Some(Val::F(match op {
                    "Add" => zip2(&a, &b, |x, y| x + y)?,
                    "Sub" => zip2(&a, &b, |x, y| x - y)?,
                    "Mul" => zip2(&a, &b, |x, y| x * y)?,
                    _ => return None,
                })),
                (Val::I(a, t), Val::I(b, t2)) if t == t2 => {
                    let out = match op {
                        "Add" => zip2(&a, &b, |x, y| x.wrapping_add(y))?,
                        "Sub" => zip2(&a, &b, |x, y| x.wrapping_sub(y))?,
                        "Mul" => zip2(&a, &b, |x, y| x.wrapping_mul(y))?,
                        "BitwiseAnd" => zip2(&a, &b, |x, y| x & y)?,
                        _ => {
                            // Mod with fmod = 0: the result takes the divisor's sign.
                            if attr_i(n, "fmod") == Some(1) || b.iter().any(|&y| y == 0) {
                                return None;
                            }
                            zip2(&a, &b, |x, y| {
                                let r = x % y;
                                if r != 0 && ((r < 0) != (y < 0)) {
                                    r + y
                                } else {
                                    r
                                }
                            })?
                        }
                    };
                    Some(Val::I(out.mapv(|v| wrap(v, t)), t))
                }
                _ => None,
            }
        }
        "ReduceSum" => {
            let x = input(0)?;
            let rank = x.shape().len();
            let axes = match input(1) {
                Some(a) => a.ints()?,
                None => attr_ints(n, "axes").unwrap_or_default(),
            };
            let keep = attr_i(n, "keepdims").unwrap_or(1) == 1;
            let mut ax: Vec<usize> = if axes.is_empty() {
                if attr_i(n, "noop_with_empty_axes") == Some(1) {
                    return Some(x);
                }
                (0..rank).collect()
            } else {
                axes.iter()
                    .map(|&a| norm_axis(a, rank))
                    .collect::<Option<_>>()?
            };
            ax.sort();
            ax.dedup();
            let mut out = x;
            for &a in ax.iter().rev() {
                out = match out {
                    Val::F(v) => Val::F(sum_axis(&v, a, keep, 0.0f32, |s, x| s + x)),
                    Val::I(v, t) => Val::I(
                        sum_axis(&v, a, keep, 0i64, |s, x| wrap(s.wrapping_add(x), t)),
                        t,
                    ),
                    Val::B(_) => return None,
                };
            }
            Some(out)
        }
        "CumSum" => {
            let x = input(0)?;
            let axis = norm_axis(*input(1)?.ints()?.first()?, x.shape().len())?;
            let exclusive = attr_i(n, "exclusive") == Some(1);
            let reverse = attr_i(n, "reverse") == Some(1);
            match x {
                Val::F(mut a) => {
                    cumsum(&mut a, axis, exclusive, reverse, 0.0, |s, x| s + x);
                    Some(Val::F(a))
                }
                Val::I(mut a, t) => {
                    cumsum(&mut a, axis, exclusive, reverse, 0, |s, x| {
                        wrap(s.wrapping_add(x), t)
                    });
                    Some(Val::I(a, t))
                }
                Val::B(_) => None,
            }
        }
        "Gather" => {
            let data = input(0)?;
            let idx = input(1)?;
            let Val::I(ix, it) = idx else { return None };
            if !matches!(it, DataType::Int32 | DataType::Int64) {
                return None;
            }
            let rank = data.shape().len();
            let axis = norm_axis(attr_i(n, "axis").unwrap_or(0), rank)?;
            let dim = data.shape()[axis] as i64;
            let flat: Vec<usize> = ix
                .iter()
                .map(|&i| {
                    let j = if i < 0 { i + dim } else { i };
                    (0..dim).contains(&j).then_some(j as usize)
                })
                .collect::<Option<_>>()?;
            let mut shape = data.shape()[..axis].to_vec();
            shape.extend_from_slice(ix.shape());
            shape.extend_from_slice(&data.shape()[axis + 1..]);
            let picked = match data {
                Val::F(a) => Val::F(a.select(Axis(axis), &flat)),
                Val::I(a, t) => Val::I(a.select(Axis(axis), &flat), t),
                Val::B(a) => Val::B(a.select(Axis(axis), &flat)),
            };
            reshape(picked, &shape)
        }
        "Where" => {
            let Val::B(c) = input(0)? else { return None };
            let (a, b) = (input(1)?, input(2)?);
            let s = broadcast_shape(&broadcast_shape(c.shape(), a.shape())?, b.shape())?;
            let c = c.broadcast(IxDyn(&s))?;
            Some(match (a, b) {
                (Val::F(a), Val::F(b)) => Val::F(select(&c, &a, &b, &s)?),
                (Val::I(a, t), Val::I(b, t2)) if t == t2 => Val::I(select(&c, &a, &b, &s)?, t),
                _ => return None,
            })
        }
        "ConstantOfShape" => {
            let dims: Vec<usize> = input(0)?
                .ints()?
                .iter()
                .map(|&d| usize::try_from(d).ok())
                .collect::<Option<_>>()?;
            let fill = match n.attribute.iter().find(|a| a.name() == "value") {
                Some(a) => Val::from_data(TensorData::from_proto(a.t.as_ref()?).ok()?)?,
                None => Val::F(ArrayD::zeros(IxDyn(&[1]))),
            };
            Some(match fill {
                Val::F(v) => Val::F(ArrayD::from_elem(IxDyn(&dims), *v.iter().next()?)),
                Val::I(v, t) => Val::I(ArrayD::from_elem(IxDyn(&dims), *v.iter().next()?), t),
                Val::B(v) => Val::B(ArrayD::from_elem(IxDyn(&dims), *v.iter().next()?)),
            })
        }
        _ => {
            let _ = g;
            None
        }
    }
}

fn is_int(t: DataType) -> bool {
    matches!(
        t,
        DataType::Uint8
            | DataType::Int8
            | DataType::Uint16
            | DataType::Int16
            | DataType::Uint32
            | DataType::Int32
            | DataType::Uint64
            | DataType::Int64
    )
}

fn reshape(x: Val, dims: &[usize]) -> Option<Val> {
    let len: usize = x.shape().iter().product();
    if dims.iter().product::<usize>() != len {
        return None;
    }
    fn re<T: Clone>(a: ArrayD<T>, d: &[usize]) -> Option<ArrayD<T>> {
        // Row-major order: a standard-layout array keeps its buffer.
        let a = if a.is_standard_layout() {
            a
        } else {
            a.as_standard_layout().into_owned()
        };
        a.into_shape_with_order(IxDyn(d)).ok()
    }
    Some(match x {
        Val::F(a) => Val::F(re(a, dims)?),
        Val::I(a, t) => Val::I(re(a, dims)?, t),
        Val::B(a) => Val::B(re(a, dims)?),
    })
}

fn sum_axis<T: Copy>(
    a: &ArrayD<T>,
    axis: usize,
    keep: bool,
    zero: T,
    add: impl Fn(T, T) -> T,
) -> ArrayD<T> {
    let out = a.map_axis(Axis(axis), |lane| lane.iter().fold(zero, |s, &x| add(s, x)));
    if keep {
        out.insert_axis(Axis(axis))
    } else {
        out
    }
}

fn cumsum<T: Copy>(
    a: &mut ArrayD<T>,
    axis: usize,
    exclusive: bool,
    reverse: bool,
    zero: T,
    add: impl Fn(T, T) -> T,
) {
    for mut lane in a.lanes_mut(Axis(axis)) {
        let n = lane.len();
        let mut s = zero;
        for k in 0..n {
            let i = if reverse { n - 1 - k } else { k };
            let x = lane[i];
            if exclusive {
                lane[i] = s;
                s = add(s, x);
            } else {
                s = add(s, x);
                lane[i] = s;
            }
        }
    }
}

/// The ONNX element type (`TensorProto.DataType` as i32) of `value`, found
/// without computing any element: a constant's own type, Cast's `to`, INT64 for
/// shape-like ops (Shape, Size, NonZero, ArgMax/ArgMin), BOOL for comparisons and
/// logic, DequantizeLinear's scale type, Where's second input, and otherwise its
/// first input's type (ONNX elementwise, movement and gather ops keep it). `None`
/// for graph inputs and anything else unknown, at most 64 steps back. Used to
/// tell a decoded weight (float) from integer shape arithmetic before handing
/// either to shape inference as a float input.
pub fn elem_type(g: &Graph, value: &str) -> Option<i32> {
    let mut v = value.to_string();
    for _ in 0..64 {
        if let Some(t) = g.constant_proto(&v) {
            return t.data_type;
        }
        let (idx, slot) = g.producer(&v)?;
        let n = g.node(idx);
        let input = |i: usize| n.input.get(i).filter(|s| !s.is_empty()).cloned();
        let next = match n.op_type() {
            "Constant" => {
                let a = n.attribute.first()?;
                return match a.name() {
                    "value_float" | "value_floats" => Some(DataType::Float as i32),
                    "value_int" | "value_ints" => Some(DataType::Int64 as i32),
                    "value_string" | "value_strings" => Some(DataType::String as i32),
                    _ => a.t.as_ref().and_then(|t| t.data_type),
                };
            }
            "Cast" => return attr_i(n, "to").map(|t| t as i32),
            "Shape" | "Size" | "NonZero" | "ArgMax" | "ArgMin" => {
                return Some(DataType::Int64 as i32)
            }
            "Equal" | "Less" | "LessOrEqual" | "Greater" | "GreaterOrEqual" | "Not" | "And"
            | "Or" | "Xor" | "IsNaN" | "IsInf" => return Some(DataType::Bool as i32),
            "DequantizeLinear" => input(1)?,
            "Where" => input(1)?,
            _ if slot == 0 => input(0)?,
            _ => return None,
        };
        v = next;
    }
    None
}

/// The shape `eval` would give `value`, found without computing any element:
/// shapes propagate through the same ops with the same rules (broadcasting,
/// Reshape's 0 and -1, Slice's clamping, Gather, ReduceSum, Squeeze/Unsqueeze),
/// reading only the small integer constants that decide them (shapes, axes,
/// starts and ends). `None` wherever `eval` would say "not evaluable" for a reason
/// a shape can show, or where a deciding input is itself computed: callers then
/// evaluate. Used to give shape inference a decoded weight's shape without
/// decoding it.
pub fn shape(g: &Graph, value: &str) -> Option<Vec<usize>> {
    let mut memo = HashMap::new();
    shape_memo(g, value, &mut memo, 0)
}

fn shape_memo(
    g: &Graph,
    value: &str,
    memo: &mut HashMap<String, Option<Vec<usize>>>,
    depth: usize,
) -> Option<Vec<usize>> {
    if let Some(s) = memo.get(value) {
        return s.clone();
    }
    if depth > 64 {
        return None;
    }
    let s = shape_uncached(g, value, memo, depth);
    memo.insert(value.to_string(), s.clone());
    s
}

fn shape_uncached(
    g: &Graph,
    value: &str,
    memo: &mut HashMap<String, Option<Vec<usize>>>,
    depth: usize,
) -> Option<Vec<usize>> {
    if let Some(t) = g.constant_proto(value) {
        return t.dims.iter().map(|&d| usize::try_from(d).ok()).collect();
    }
    let (idx, slot) = g.producer(value)?;
    if slot != 0 {
        return None;
    }
    let n = g.node(idx);
    if n.op_type() == "Constant" {
        return Some(g.constant(value).ok()??.shape().to_vec());
    }
    // Small integer constants that decide a shape.
    let ints = |i: usize| -> Option<Vec<i64>> {
        let v = n.input.get(i).filter(|v| !v.is_empty())?;
        Some(g.constant(v).ok()??.to_i64()?.iter().copied().collect())
    };
    let mut input = |i: usize| -> Option<Vec<usize>> {
        let v = n.input.get(i).filter(|v| !v.is_empty())?;
        shape_memo(g, v, memo, depth + 1)
    };
    match n.op_type() {
        "Identity" | "Cast" | "CumSum" => input(0),
        "Reshape" => {
            let x = input(0)?;
            reshape_dims(&x, &ints(1)?, attr_i(n, "allowzero") == Some(1))
        }
        "Unsqueeze" | "Squeeze" => {
            let dims = input(0)?;
            let axes = if n.input.get(1).is_some_and(|v| !v.is_empty()) {
                ints(1)?
            } else {
                attr_ints(n, "axes").unwrap_or_default()
            };
            squeeze_dims(&dims, &axes, n.op_type() == "Unsqueeze")
        }
        "Slice" => {
            let mut dims = input(0)?;
            let given = |i: usize| n.input.get(i).is_some_and(|v| !v.is_empty());
            let axes = if given(3) { Some(ints(3)?) } else { None };
            let steps = if given(4) { Some(ints(4)?) } else { None };
            for (a, s, e) in slice_ranges(&dims, &ints(1)?, &ints(2)?, axes, steps)? {
                dims[a] = e - s;
            }
            Some(dims)
        }
        "BitShift" | "Mod" | "BitwiseAnd" | "Add" | "Sub" | "Mul" => {
            let (a, b) = (input(0)?, input(1)?);
            broadcast_shape(&a, &b)
        }
        "Where" => {
            let (c, a, b) = (input(0)?, input(1)?, input(2)?);
            broadcast_shape(&broadcast_shape(&c, &a)?, &b)
        }
        "ReduceSum" => {
            let x = input(0)?;
            let rank = x.len();
            let axes = if n.input.len() > 1 && !n.input[1].is_empty() {
                ints(1)?
            } else {
                attr_ints(n, "axes").unwrap_or_default()
            };
            let keep = attr_i(n, "keepdims").unwrap_or(1) == 1;
            if axes.is_empty() {
                if attr_i(n, "noop_with_empty_axes") == Some(1) {
                    return Some(x);
                }
                return Some(if keep { vec![1; rank] } else { vec![] });
            }
            let ax: Vec<usize> = axes
                .iter()
                .map(|&a| norm_axis(a, rank))
                .collect::<Option<_>>()?;
            Some(
                x.iter()
                    .enumerate()
                    .filter_map(|(i, &d)| match (ax.contains(&i), keep) {
                        (false, _) => Some(d),
                        (true, true) => Some(1),
                        (true, false) => None,
                    })
                    .collect(),
            )
        }
        "Gather" => {
            let data = input(0)?;
            let idx = input(1)?;
            let axis = norm_axis(attr_i(n, "axis").unwrap_or(0), data.len())?;
            let mut shape = data[..axis].to_vec();
            shape.extend_from_slice(&idx);
            shape.extend_from_slice(&data[axis + 1..]);
            Some(shape)
        }
        "ConstantOfShape" => ints(0)?.iter().map(|&d| usize::try_from(d).ok()).collect(),
        "DequantizeLinear" => input(0),
        _ => None,
    }
}
