//! Element types and tensors as typed arrays.
//!
//! A `TensorProto` stores its values either as little-endian `raw_data` or in one
//! of the typed repeated fields (`float_data`, `int32_data`, ...). [`stored_size`]
//! checks that the declared dims agree with what is stored *before* anything is
//! allocated from the dims; [`TensorData::from_proto`] then reads the values into
//! an `ndarray` of the matching Rust type, and [`TensorData::to_proto`] writes
//! them back as `raw_data`.

use half::{bf16, f16};
use ndarray::{ArrayD, IxDyn};

use super::proto::{tensor_proto::DataLocation, tensor_proto::DataType, TensorProto};
use crate::error::{Error, Result};

/// Bits per element of an ONNX element type (`None` for STRING and unknown codes).
pub fn elem_bits(data_type: i32) -> Option<u64> {
    use DataType as D;
    Some(match DataType::try_from(data_type).ok()? {
        D::Float | D::Int32 | D::Uint32 => 32,
        D::Uint8 | D::Int8 | D::Bool => 8,
        D::Uint16 | D::Int16 | D::Float16 | D::Bfloat16 => 16,
        D::Int64 | D::Uint64 | D::Double | D::Complex64 => 64,
        D::Complex128 => 128,
        D::Float8e4m3fn | D::Float8e4m3fnuz | D::Float8e5m2 | D::Float8e5m2fnuz | D::Float8e8m0 => {
            8
        }
        D::Uint4 | D::Int4 | D::Float4e2m1 => 4,
        D::Float6e2m3 | D::Float6e3m2 => 6,
        D::Uint2 | D::Int2 => 2,
        D::String | D::Undefined => return None,
    })
}

/// Short lowercase name of an element type ("float32", "int8", ...).
pub fn dtype_name(data_type: i32) -> String {
    use DataType as D;
    let s = match DataType::try_from(data_type) {
        Ok(D::Undefined) => "undefined",
        Ok(D::Float) => "float32",
        Ok(D::Uint8) => "uint8",
        Ok(D::Int8) => "int8",
        Ok(D::Uint16) => "uint16",
        Ok(D::Int16) => "int16",
        Ok(D::Int32) => "int32",
        Ok(D::Int64) => "int64",
        Ok(D::String) => "string",
        Ok(D::Bool) => "bool",
        Ok(D::Float16) => "float16",
        Ok(D::Double) => "float64",
        Ok(D::Uint32) => "uint32",
        Ok(D::Uint64) => "uint64",
        Ok(D::Complex64) => "complex64",
        Ok(D::Complex128) => "complex128",
        Ok(D::Bfloat16) => "bfloat16",
        Ok(D::Float8e4m3fn) => "float8e4m3fn",
        Ok(D::Float8e4m3fnuz) => "float8e4m3fnuz",
        Ok(D::Float8e5m2) => "float8e5m2",
        Ok(D::Float8e5m2fnuz) => "float8e5m2fnuz",
        Ok(D::Uint4) => "uint4",
        Ok(D::Int4) => "int4",
        Ok(D::Float4e2m1) => "float4e2m1",
        Ok(D::Float8e8m0) => "float8e8m0",
        Ok(D::Uint2) => "uint2",
        Ok(D::Int2) => "int2",
        Ok(D::Float6e2m3) => "float6e2m3",
        Ok(D::Float6e3m2) => "float6e3m2",
        Err(_) => return format!("type#{data_type}"),
    };
    s.to_string()
}

/// The dims as `usize`, refusing negative dims and element counts that overflow.
pub fn shape_of(t: &TensorProto) -> Result<Vec<usize>> {
    let name = t.name();
    t.dims
        .iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| {
                Error::tensor(name, format!("negative dimension {d} in dims {:?}", t.dims))
            })
        })
        .collect::<Result<Vec<_>>>()
        .and_then(|shape| {
            numel_of(&shape).ok_or_else(|| {
                Error::tensor(
                    name,
                    format!("dims {:?} overflow the element count", t.dims),
                )
            })?;
            Ok(shape)
        })
}

/// Product of dims, `None` on overflow.
pub fn numel_of(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Bytes that `numel` elements of this type take as `raw_data` (sub-byte types packed).
pub fn raw_len(data_type: i32, numel: usize) -> Option<usize> {
    let bits = elem_bits(data_type)?;
    let total = (numel as u128) * bits as u128;
    usize::try_from(total.div_ceil(8)).ok()
}

/// Whether the tensor's payload lives in an external file.
pub fn is_external(t: &TensorProto) -> bool {
    t.data_location == Some(DataLocation::External as i32)
}

/// Checks that what the tensor stores matches its dims and type, and returns its
/// element count. Nothing is allocated from the dims: they are only multiplied
/// (with overflow checks) and compared with the stored length.
///
/// External tensors are checked by the loader, which knows the side file.
pub fn check_stored_size(t: &TensorProto) -> Result<usize> {
    let name = t.name();
    let shape = shape_of(t)?;
    let numel = numel_of(&shape).expect("checked by shape_of");
    let dt = t.data_type();
    if dt == DataType::Undefined as i32 {
        return Err(Error::tensor(name, "data_type is UNDEFINED"));
    }
    if DataType::try_from(dt).is_err() {
        return Err(Error::tensor(
            name,
            format!("unknown element type code {dt}"),
        ));
    }
    if is_external(t) {
        return Ok(numel);
    }
    if let Some(raw) = t.raw_data.as_ref() {
        if dt == DataType::String as i32 {
            return Err(Error::tensor(name, "a STRING tensor cannot use raw_data"));
        }
        let want = raw_len(dt, numel)
            .ok_or_else(|| Error::tensor(name, format!("dims {:?} are too large", t.dims)))?;
        if raw.len() != want {
            return Err(Error::tensor(
                name,
                format!(
                    "raw_data has {} bytes but {} x {} needs {want}",
                    raw.len(),
                    fmt_dims(&t.dims),
                    dtype_name(dt)
                ),
            ));
        }
        return Ok(numel);
    }
    let (field, have, per_elem_min, per_elem_max) = typed_field_len(t);
    // Sub-byte types may be stored one per int32 or packed; accept both.
    let fits = |n: usize| {
        let lo = n
            .checked_mul(per_elem_min.0)
            .map(|x| x.div_ceil(per_elem_min.1));
        let hi = n
            .checked_mul(per_elem_max.0)
            .map(|x| x.div_ceil(per_elem_max.1));
        matches!((lo, hi), (Some(lo), Some(hi)) if (lo..=hi).contains(&have))
    };
    if numel == 0 && have == 0 {
        return Ok(0);
    }
    if have == 0 {
        return Err(Error::tensor(
            name,
            format!("holds no data for {} elements", numel),
        ));
    }
    if !fits(numel) {
        return Err(Error::tensor(
            name,
            format!(
                "{field} has {have} entries but dims {} ({}) need {}",
                fmt_dims(&t.dims),
                dtype_name(dt),
                numel.saturating_mul(per_elem_max.0) / per_elem_max.1
            ),
        ));
    }
    Ok(numel)
}

/// (field name, entries present, (num, den) entries per element at least, at most).
fn typed_field_len(t: &TensorProto) -> (&'static str, usize, (usize, usize), (usize, usize)) {
    use DataType as D;
    let one = (1, 1);
    match DataType::try_from(t.data_type()).unwrap_or(D::Undefined) {
        D::Float => ("float_data", t.float_data.len(), one, one),
        D::Complex64 => ("float_data", t.float_data.len(), (2, 1), (2, 1)),
        D::Double => ("double_data", t.double_data.len(), one, one),
        D::Complex128 => ("double_data", t.double_data.len(), (2, 1), (2, 1)),
        D::Int64 => ("int64_data", t.int64_data.len(), one, one),
        D::Uint32 | D::Uint64 => ("uint64_data", t.uint64_data.len(), one, one),
        D::String => ("string_data", t.string_data.len(), one, one),
        D::Uint4 | D::Int4 | D::Float4e2m1 => ("int32_data", t.int32_data.len(), (1, 2), one),
        D::Uint2 | D::Int2 => ("int32_data", t.int32_data.len(), (1, 4), one),
        D::Float6e2m3 | D::Float6e3m2 => ("int32_data", t.int32_data.len(), (6, 32), one),
        _ => ("int32_data", t.int32_data.len(), one, one),
    }
}

fn fmt_dims(dims: &[i64]) -> String {
    let parts: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join("x"))
}

/// A tensor's values as a typed array.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F32(ArrayD<f32>),
    F64(ArrayD<f64>),
    F16(ArrayD<f16>),
    BF16(ArrayD<bf16>),
    I8(ArrayD<i8>),
    U8(ArrayD<u8>),
    I16(ArrayD<i16>),
    U16(ArrayD<u16>),
    I32(ArrayD<i32>),
    U32(ArrayD<u32>),
    I64(ArrayD<i64>),
    U64(ArrayD<u64>),
    Bool(ArrayD<bool>),
    /// int4 (values in [-8, 7]), stored two per byte, first element in the low nibble.
    I4(ArrayD<i8>),
    /// uint4 (values in [0, 15]), stored as int4.
    U4(ArrayD<u8>),
}

macro_rules! for_each_variant {
    ($self:expr, $a:ident => $e:expr) => {
        match $self {
            TensorData::F32($a) => $e,
            TensorData::F64($a) => $e,
            TensorData::F16($a) => $e,
            TensorData::BF16($a) => $e,
            TensorData::I8($a) => $e,
            TensorData::U8($a) => $e,
            TensorData::I16($a) => $e,
            TensorData::U16($a) => $e,
            TensorData::I32($a) => $e,
            TensorData::U32($a) => $e,
            TensorData::I64($a) => $e,
            TensorData::U64($a) => $e,
            TensorData::Bool($a) => $e,
            TensorData::I4($a) => $e,
            TensorData::U4($a) => $e,
        }
    };
}

/// Nibbles of packed 4-bit data, first element in the low nibble (ONNX
/// `onnx.proto`, INT4/UINT4): `n` values.
fn nibbles(bytes: impl Iterator<Item = u8>, n: usize) -> Vec<u8> {
    bytes.flat_map(|b| [b & 0xF, b >> 4]).take(n).collect()
}

/// Packs 4-bit values two per byte, first in the low nibble.
fn pack_nibbles(v: impl Iterator<Item = u8>, out: &mut Vec<u8>) {
    let v: Vec<u8> = v.collect();
    for pair in v.chunks(2) {
        out.push((pair[0] & 0xF) | (pair.get(1).copied().unwrap_or(0) << 4));
    }
}

/// Decode `n` little-endian values of `W` bytes each.
fn le<const W: usize, T>(raw: &[u8], f: impl Fn([u8; W]) -> T) -> Vec<T> {
    raw.chunks_exact(W)
        .map(|c| f(c.try_into().expect("chunks_exact")))
        .collect()
}

impl TensorData {
    /// Reads the tensor's values. The tensor must hold its data (external data is
    /// resolved by the loader) and pass [`check_stored_size`].
    pub fn from_proto(t: &TensorProto) -> Result<TensorData> {
        use DataType as D;
        let name = t.name();
        if is_external(t) {
            return Err(Error::tensor(name, "external data was not resolved"));
        }
        check_stored_size(t)?;
        let shape = IxDyn(&shape_of(t)?);
        let dt = DataType::try_from(t.data_type()).unwrap_or(D::Undefined);
        let raw = t.raw_data.as_deref();
        fn arr<T>(shape: &IxDyn, v: Vec<T>) -> std::result::Result<ArrayD<T>, ndarray::ShapeError> {
            ArrayD::from_shape_vec(shape.clone(), v)
        }
        // Typed fields: int32_data carries every type of 16 bits or less.
        let small = |conv: &dyn Fn(i32) -> i64| -> Vec<i64> {
            t.int32_data.iter().map(|&x| conv(x)).collect()
        };
        let ok = |r: std::result::Result<TensorData, ndarray::ShapeError>| {
            r.map_err(|e| Error::tensor(name, format!("shape: {e}")))
        };
        ok(match dt {
            D::Float => arr(
                &shape,
                match raw {
                    Some(r) => le(r, f32::from_le_bytes),
                    None => t.float_data.clone(),
                },
            )
            .map(TensorData::F32),
            D::Double => arr(
                &shape,
                match raw {
                    Some(r) => le(r, f64::from_le_bytes),
                    None => t.double_data.clone(),
                },
            )
            .map(TensorData::F64),
            D::Float16 => arr(
                &shape,
                match raw {
                    Some(r) => le(r, |b| f16::from_bits(u16::from_le_bytes(b))),
                    None => t
                        .int32_data
                        .iter()
                        .map(|&x| f16::from_bits(x as u16))
                        .collect(),
                },
            )
            .map(TensorData::F16),
            D::Bfloat16 => arr(
                &shape,
                match raw {
                    Some(r) => le(r, |b| bf16::from_bits(u16::from_le_bytes(b))),
                    None => t
                        .int32_data
                        .iter()
                        .map(|&x| bf16::from_bits(x as u16))
                        .collect(),
                },
            )
            .map(TensorData::BF16),
            D::Int8 => arr(
                &shape,
                match raw {
                    Some(r) => r.iter().map(|&b| b as i8).collect(),
                    None => small(&|x| x as i64).into_iter().map(|x| x as i8).collect(),
                },
            )
            .map(TensorData::I8),
            D::Uint8 => arr(
                &shape,
                match raw {
                    Some(r) => r.to_vec(),
                    None => small(&|x| x as i64).into_iter().map(|x| x as u8).collect(),
                },
            )
            .map(TensorData::U8),
            D::Int16 => arr(
                &shape,
                match raw {
                    Some(r) => le(r, i16::from_le_bytes),
                    None => t.int32_data.iter().map(|&x| x as i16).collect(),
                },
            )
            .map(TensorData::I16),
            D::Uint16 => arr(
                &shape,
                match raw {
                    Some(r) => le(r, u16::from_le_bytes),
                    None => t.int32_data.iter().map(|&x| x as u16).collect(),
                },
            )
            .map(TensorData::U16),
            D::Int32 => arr(
                &shape,
                match raw {
                    Some(r) => le(r, i32::from_le_bytes),
                    None => t.int32_data.clone(),
                },
            )
            .map(TensorData::I32),
            D::Uint32 => arr(
                &shape,
                match raw {
                    Some(r) => le(r, u32::from_le_bytes),
                    None => t.uint64_data.iter().map(|&x| x as u32).collect(),
                },
            )
            .map(TensorData::U32),
            D::Int64 => arr(
                &shape,
                match raw {
                    Some(r) => le(r, i64::from_le_bytes),
                    None => t.int64_data.clone(),
                },
            )
            .map(TensorData::I64),
            D::Uint64 => arr(
                &shape,
                match raw {
                    Some(r) => le(r, u64::from_le_bytes),
                    None => t.uint64_data.clone(),
                },
            )
            .map(TensorData::U64),
            D::Bool => arr(
                &shape,
                match raw {
                    Some(r) => r.iter().map(|&b| b != 0).collect(),
                    None => t.int32_data.iter().map(|&x| x != 0).collect(),
                },
            )
            .map(TensorData::Bool),
            D::Int4 | D::Uint4 => {
                let n = ndarray::Dimension::size(&shape);
                let v = match raw {
                    Some(r) => nibbles(r.iter().copied(), n),
                    None => nibbles(t.int32_data.iter().map(|&x| x as u8), n),
                };
                if dt == D::Int4 {
                    // Sign-extend the low 4 bits.
                    let v = v.into_iter().map(|x| ((x << 4) as i8) >> 4).collect();
                    arr(&shape, v).map(TensorData::I4)
                } else {
                    arr(&shape, v).map(TensorData::U4)
                }
            }
            _ => {
                return Err(Error::tensor(
                    name,
                    format!(
                        "element type {} is not supported here",
                        dtype_name(t.data_type())
                    ),
                ))
            }
        })
    }

    /// A new tensor named `name` holding these values as `raw_data`.
    pub fn to_proto(&self, name: &str) -> TensorProto {
        let mut raw = Vec::with_capacity(self.len() * (self.elem_bits() as usize / 8));
        match self {
            TensorData::F32(a) => a
                .iter()
                .for_each(|x| raw.extend_from_slice(&x.to_le_bytes())),
            TensorData::F64(a) => a
                .iter()
                .for_each(|x| raw.extend_from_slice(&x.to_le_bytes())),
            TensorData::F16(a) => a
                .iter()
                .for_each(|x| raw.extend_from_slice(&x.to_bits().to_le_bytes())),
            TensorData::BF16(a) => a
                .iter()
                .for_each(|x| raw.extend_from_slice(&x.to_bits().to_le_bytes())),
            TensorData::I8(a) => raw.extend(a.iter().map(|&x| x as u8)),
            TensorData::U8(a) => raw.extend(a.iter().copied()),
            TensorData::I16(a) => a
                .iter()
                .for_each(|x| raw.extend_from_slice(&x.to_le_bytes())),
            TensorData::U16(a) => a
                .iter()
                .for_each(|x| raw.extend_from_slice(&x.to_le_bytes())),
            TensorData::I32(a) => a
                .iter()
                .for_each(|x| raw.extend_from_slice(&x.to_le_bytes())),
            TensorData::U32(a) => a
                .iter()
                .for_each(|x| raw.extend_from_slice(&x.to_le_bytes())),
            TensorData::I64(a) => a
                .iter()
                .for_each(|x| raw.extend_from_slice(&x.to_le_bytes())),
            TensorData::U64(a) => a
                .iter()
                .for_each(|x| raw.extend_from_slice(&x.to_le_bytes())),
            TensorData::Bool(a) => raw.extend(a.iter().map(|&x| x as u8)),
            TensorData::I4(a) => pack_nibbles(a.iter().map(|&x| x as u8), &mut raw),
            TensorData::U4(a) => pack_nibbles(a.iter().copied(), &mut raw),
        }
        TensorProto {
            dims: self.shape().iter().map(|&d| d as i64).collect(),
            data_type: Some(self.data_type() as i32),
            name: Some(name.to_string()),
            raw_data: Some(raw.into()),
            ..Default::default()
        }
    }

    pub fn data_type(&self) -> DataType {
        match self {
            TensorData::F32(_) => DataType::Float,
            TensorData::F64(_) => DataType::Double,
            TensorData::F16(_) => DataType::Float16,
            TensorData::BF16(_) => DataType::Bfloat16,
            TensorData::I8(_) => DataType::Int8,
            TensorData::U8(_) => DataType::Uint8,
            TensorData::I16(_) => DataType::Int16,
            TensorData::U16(_) => DataType::Uint16,
            TensorData::I32(_) => DataType::Int32,
            TensorData::U32(_) => DataType::Uint32,
            TensorData::I64(_) => DataType::Int64,
            TensorData::U64(_) => DataType::Uint64,
            TensorData::Bool(_) => DataType::Bool,
            TensorData::I4(_) => DataType::Int4,
            TensorData::U4(_) => DataType::Uint4,
        }
    }

    pub fn elem_bits(&self) -> u64 {
        elem_bits(self.data_type() as i32).expect("numeric type")
    }

    pub fn shape(&self) -> &[usize] {
        for_each_variant!(self, a => a.shape())
    }

    pub fn len(&self) -> usize {
        for_each_variant!(self, a => a.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of elements exactly equal to zero (`-0.0` counts as zero, NaN does not).
    pub fn zeros(&self) -> usize {
        match self {
            TensorData::F32(a) => a.iter().filter(|&&x| x == 0.0).count(),
            TensorData::F64(a) => a.iter().filter(|&&x| x == 0.0).count(),
            TensorData::F16(a) => a.iter().filter(|x| x.to_f32() == 0.0).count(),
            TensorData::BF16(a) => a.iter().filter(|x| x.to_f32() == 0.0).count(),
            TensorData::Bool(a) => a.iter().filter(|&&x| !x).count(),
            TensorData::I8(a) => a.iter().filter(|&&x| x == 0).count(),
            TensorData::U8(a) => a.iter().filter(|&&x| x == 0).count(),
            TensorData::I16(a) => a.iter().filter(|&&x| x == 0).count(),
            TensorData::U16(a) => a.iter().filter(|&&x| x == 0).count(),
            TensorData::I32(a) => a.iter().filter(|&&x| x == 0).count(),
            TensorData::U32(a) => a.iter().filter(|&&x| x == 0).count(),
            TensorData::I64(a) => a.iter().filter(|&&x| x == 0).count(),
            TensorData::U64(a) => a.iter().filter(|&&x| x == 0).count(),
            TensorData::I4(a) => a.iter().filter(|&&x| x == 0).count(),
            TensorData::U4(a) => a.iter().filter(|&&x| x == 0).count(),
        }
    }

    /// The values as f32 (exact for every type but f64 and 32/64-bit integers
    /// beyond 2^24), for passes and scoring that work in float.
    pub fn to_f32(&self) -> ArrayD<f32> {
        match self {
            TensorData::F32(a) => a.clone(),
            TensorData::F64(a) => a.mapv(|x| x as f32),
            TensorData::F16(a) => a.mapv(|x| x.to_f32()),
            TensorData::BF16(a) => a.mapv(|x| x.to_f32()),
            TensorData::I8(a) => a.mapv(|x| x as f32),
            TensorData::U8(a) => a.mapv(|x| x as f32),
            TensorData::I16(a) => a.mapv(|x| x as f32),
            TensorData::U16(a) => a.mapv(|x| x as f32),
            TensorData::I32(a) => a.mapv(|x| x as f32),
            TensorData::U32(a) => a.mapv(|x| x as f32),
            TensorData::I64(a) => a.mapv(|x| x as f32),
            TensorData::U64(a) => a.mapv(|x| x as f32),
            TensorData::Bool(a) => a.mapv(|x| x as u8 as f32),
            TensorData::I4(a) => a.mapv(|x| x as f32),
            TensorData::U4(a) => a.mapv(|x| x as f32),
        }
    }

    /// As [`to_f32`](Self::to_f32), taking the data: float32 values are moved,
    /// not copied.
    pub fn into_f32(self) -> ArrayD<f32> {
        match self {
            TensorData::F32(a) => a,
            other => other.to_f32(),
        }
    }

    /// Integer values (for shape constants and indices); `None` for float types.
    pub fn to_i64(&self) -> Option<ArrayD<i64>> {
        Some(match self {
            TensorData::I8(a) => a.mapv(|x| x as i64),
            TensorData::U8(a) => a.mapv(|x| x as i64),
            TensorData::I16(a) => a.mapv(|x| x as i64),
            TensorData::U16(a) => a.mapv(|x| x as i64),
            TensorData::I32(a) => a.mapv(|x| x as i64),
            TensorData::U32(a) => a.mapv(|x| x as i64),
            TensorData::I64(a) => a.clone(),
            TensorData::U64(a) => a.mapv(|x| x as i64),
            TensorData::Bool(a) => a.mapv(|x| x as i64),
            TensorData::I4(a) => a.mapv(|x| x as i64),
            TensorData::U4(a) => a.mapv(|x| x as i64),
            _ => return None,
        })
    }
}
