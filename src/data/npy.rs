//! NumPy `.npy` arrays and `.npz` archives of them.
//!
//! The `.npy` format: magic `\x93NUMPY`, version (1.0: u16 header length; 2.0/3.0:
//! u32), a Python dict literal `{'descr': '<f4', 'fortran_order': False, 'shape': (N, 32, 32, 3), }`
//! padded with spaces, then the values. Parsed here rather than with a crate so that
//! the element type can be any numeric one (decided at run time), and so that the
//! size the header claims is checked against the bytes that are there before
//! anything is allocated.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;
use std::sync::Arc;

use super::{file_name, read_exact_growing, Pixels, Preprocess, Record, Source, Src};
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bool,
    Int,
    Uint,
    Float,
}

#[derive(Debug, Clone, Copy)]
struct Dtype {
    kind: Kind,
    size: usize,
    big_endian: bool,
}

impl Dtype {
    fn parse(descr: &str) -> Option<Dtype> {
        let b = descr.as_bytes();
        if b.len() < 2 {
            return None;
        }
        let (order, rest) = match b[0] {
            b'<' | b'>' | b'|' | b'=' => (b[0], &descr[1..]),
            _ => (b'=', descr),
        };
        let kind = match rest.as_bytes().first()? {
            b'b' => Kind::Bool,
            b'i' => Kind::Int,
            b'u' => Kind::Uint,
            b'f' => Kind::Float,
            _ => return None,
        };
        let size: usize = rest[1..].parse().ok()?;
        let ok = match kind {
            Kind::Bool => size == 1,
            Kind::Int | Kind::Uint => matches!(size, 1 | 2 | 4 | 8),
            Kind::Float => matches!(size, 2 | 4 | 8),
        };
        if !ok {
            return None;
        }
        Some(Dtype {
            kind,
            size,
            big_endian: order == b'>' || (order == b'=' && cfg!(target_endian = "big")),
        })
    }

    fn numpy_name(&self) -> String {
        match self.kind {
            Kind::Bool => "bool".into(),
            Kind::Int => format!("int{}", self.size * 8),
            Kind::Uint => format!("uint{}", self.size * 8),
            Kind::Float => format!("float{}", self.size * 8),
        }
    }
}

struct Array {
    shape: Vec<usize>,
    dtype: Dtype,
    bytes: Vec<u8>,
}

impl Array {
    fn len(&self) -> usize {
        self.bytes.len() / self.dtype.size
    }

    fn describe(&self) -> String {
        format!("{} {:?}", self.dtype.numpy_name(), self.shape)
    }

    /// Element `i` as f64.
    fn get(&self, i: usize) -> f64 {
        let s = self.dtype.size;
        let b = &self.bytes[i * s..(i + 1) * s];
        let mut a = [0u8; 8];
        if self.dtype.big_endian {
            for (j, &x) in b.iter().rev().enumerate() {
                a[j] = x;
            }
        } else {
            a[..s].copy_from_slice(b);
        }
        match (self.dtype.kind, s) {
            (Kind::Bool | Kind::Uint, 1) => a[0] as f64,
            (Kind::Int, 1) => a[0] as i8 as f64,
            (Kind::Uint, 2) => u16::from_le_bytes([a[0], a[1]]) as f64,
            (Kind::Int, 2) => i16::from_le_bytes([a[0], a[1]]) as f64,
            (Kind::Uint, 4) => u32::from_le_bytes([a[0], a[1], a[2], a[3]]) as f64,
            (Kind::Int, 4) => i32::from_le_bytes([a[0], a[1], a[2], a[3]]) as f64,
            (Kind::Uint, 8) => u64::from_le_bytes(a) as f64,
            (Kind::Int, 8) => i64::from_le_bytes(a) as f64,
            (Kind::Float, 2) => half::f16::from_le_bytes([a[0], a[1]]).to_f64(),
            (Kind::Float, 4) => f32::from_le_bytes([a[0], a[1], a[2], a[3]]) as f64,
            (Kind::Float, 8) => f64::from_le_bytes(a),
            _ => f64::NAN,
        }
    }

    /// Pixels: uint8 stays bytes (0..255, scaled like image files); anything else
    /// becomes f32 as stored.
    fn into_pixels(self) -> Pixels {
        if self.dtype.kind == Kind::Uint && self.dtype.size == 1 {
            return Pixels::U8(self.bytes);
        }
        if self.dtype.kind == Kind::Float && self.dtype.size == 4 && !self.dtype.big_endian {
            return Pixels::F32(
                self.bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            );
        }
        Pixels::F32((0..self.len()).map(|i| self.get(i) as f32).collect())
    }
}

/// Parses the header dict. Returns (descr, fortran_order, shape).
fn parse_header(h: &str) -> std::result::Result<(String, bool, Vec<usize>), String> {
    let h = h.trim();
    let find = |key: &str| -> std::result::Result<&str, String> {
        for q in ['\'', '"'] {
            let k = format!("{q}{key}{q}");
            if let Some(i) = h.find(&k) {
                let rest = h[i + k.len()..].trim_start();
                let rest = rest
                    .strip_prefix(':')
                    .ok_or_else(|| format!("header: no ':' after '{key}'"))?;
                return Ok(rest.trim_start());
            }
        }
        Err(format!("header has no '{key}': {h}"))
    };
    let d = find("descr")?;
    let q = d.chars().next().unwrap_or(' ');
    if q != '\'' && q != '"' {
        return Err(format!(
            "header 'descr' is not a simple type string (structured arrays are not read): {h}"
        ));
    }
    let end = d[1..]
        .find(q)
        .ok_or_else(|| format!("header: unterminated 'descr': {h}"))?;
    let descr = d[1..1 + end].to_string();
    let f = find("fortran_order")?;
    let fortran = if f.starts_with("True") {
        true
    } else if f.starts_with("False") {
        false
    } else {
        return Err(format!("header: bad 'fortran_order': {h}"));
    };
    let s = find("shape")?;
    let s = s
        .strip_prefix('(')
        .ok_or_else(|| format!("header: 'shape' is not a tuple: {h}"))?;
    let end = s
        .find(')')
        .ok_or_else(|| format!("header: unterminated 'shape': {h}"))?;
    let mut shape = Vec::new();
    for part in s[..end].split(',') {
        let p = part.trim().trim_end_matches('L');
        if p.is_empty() {
            continue;
        }
        shape.push(
            p.parse::<usize>()
                .map_err(|_| format!("header: bad dimension '{p}' in 'shape': {h}"))?,
        );
    }
    Ok((descr, fortran, shape))
}

/// Reads one `.npy` stream of `available` bytes (the file or zip entry size).
fn read_array<R: Read>(mut r: R, available: u64) -> std::result::Result<Array, String> {
    let mut pre = [0u8; 10];
    r.read_exact(&mut pre)
        .map_err(|_| "not a .npy array: shorter than the 10-byte preamble".to_string())?;
    if &pre[..6] != b"\x93NUMPY" {
        return Err("not a .npy array: no \\x93NUMPY magic".into());
    }
    let (hlen, pre_len) = match pre[6] {
        1 => (u16::from_le_bytes([pre[8], pre[9]]) as u64, 10u64),
        2 | 3 => {
            let mut more = [0u8; 2];
            r.read_exact(&mut more)
                .map_err(|_| ".npy header ends early".to_string())?;
            (
                u32::from_le_bytes([pre[8], pre[9], more[0], more[1]]) as u64,
                12,
            )
        }
        v => return Err(format!(".npy format version {v}.{} is not read", pre[7])),
    };
    if pre_len + hlen > available || hlen > 1 << 20 {
        return Err(format!(
            ".npy header length {hlen} does not fit in the {available} bytes"
        ));
    }
    let mut hb = vec![0u8; hlen as usize];
    r.read_exact(&mut hb)
        .map_err(|_| ".npy header ends early".to_string())?;
    let header = String::from_utf8_lossy(&hb);
    let (descr, fortran, shape) = parse_header(&header)?;
    let dtype = Dtype::parse(&descr).ok_or_else(|| {
        format!("element type '{descr}' is not read (want bool, int, uint or float)")
    })?;
    if fortran {
        return Err(
            "array is stored in Fortran order; save it with np.ascontiguousarray".to_string(),
        );
    }
    let count = shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
        .and_then(|c| c.checked_mul(dtype.size as u64))
        .ok_or_else(|| format!("shape {shape:?} overflows"))?;
    let data_avail = available - pre_len - hlen;
    if count != data_avail {
        return Err(format!(
            "header says {} {shape:?} = {count} bytes of data, but {data_avail} follow the header",
            dtype.numpy_name()
        ));
    }
    let (bytes, _) = read_exact_growing(r, count).map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 != count {
        return Err(format!(
            "header says {count} bytes of data, only {} could be read",
            bytes.len()
        ));
    }
    Ok(Array {
        shape,
        dtype,
        bytes,
    })
}

/// How an images array is laid out.
struct Geometry {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    planar: bool,
    layout: &'static str,
}

/// Tells NHWC / NCHW / NHW / flattened rows from the shape, with the model's size as
/// the tie-breaker.
fn geometry(shape: &[usize], pre: &Preprocess) -> std::result::Result<Geometry, String> {
    let chans = |c: usize| c == 1 || c == 3 || c == pre.channels;
    let g = |n, h, w, c, planar, layout| Geometry {
        n,
        h,
        w,
        c,
        planar,
        layout,
    };
    match *shape {
        [n, a, b, c] => {
            let nchw = chans(a);
            let nhwc = chans(c);
            let pick_nchw = match (nchw, nhwc) {
                (true, false) => true,
                (false, true) => false,
                (true, true) => {
                    let m = (pre.height, pre.width);
                    match ((b, c) == m, (a, b) == m) {
                        (true, false) => true,
                        (false, true) => false,
                        // Same size either way (e.g. 3x3x3): NHWC unless the model's
                        // channel count only fits NCHW.
                        _ if a == c => false,
                        _ => {
                            return Err(format!(
                                "images shape {shape:?} could be NCHW or NHWC; the model's {}x{} does not tell",
                                pre.height, pre.width
                            ))
                        }
                    }
                }
                (false, false) => {
                    return Err(format!(
                        "images shape {shape:?} has no channel axis of 1 or 3 (or the model's {}) in position 1 (NCHW) or 3 (NHWC)",
                        pre.channels
                    ))
                }
            };
            Ok(if pick_nchw {
                g(n, b, c, a, true, "NCHW")
            } else {
                g(n, a, b, c, false, "NHWC")
            })
        }
        [n, h, w] => Ok(g(n, h, w, 1, false, "NHW (grey)")),
        [n, d] => {
            let (h, w) = (pre.height, pre.width);
            if d == pre.channels * h * w {
                Ok(g(n, h, w, pre.channels, true, "flattened C*H*W rows"))
            } else if d == h * w {
                Ok(g(n, h, w, 1, false, "flattened H*W rows (grey)"))
            } else {
                Err(format!(
                    "images shape {shape:?}: rows of {d} values are neither C*H*W = {} nor H*W = {} of the model input",
                    pre.channels * h * w,
                    h * w
                ))
            }
        }
        _ => Err(format!(
            "images shape {shape:?}: want 4 dimensions (NHWC or NCHW), 3 (NHW) or 2 (flattened rows)"
        )),
    }
}

fn images_source(
    path: &Path,
    what: &str,
    arr: Array,
    pre: &Preprocess,
    labels: Option<Vec<usize>>,
) -> Result<(Source, Geometry)> {
    let g = geometry(&arr.shape, pre).map_err(|m| Error::invalid(path, format!("{what}{m}")))?;
    if g.h == 0 || g.w == 0 || g.c == 0 {
        return Err(Error::invalid(
            path,
            format!("{what}images of size {}x{}x{} are empty", g.h, g.w, g.c),
        ));
    }
    let shared = Arc::new(path.to_path_buf());
    let fname = file_name(path);
    let per = g.h * g.w * g.c;
    let records = (0..g.n)
        .map(|i| Record {
            path: shared.clone(),
            index: Some(i),
            name: format!("{fname} record {i}"),
            label: labels.as_ref().map(|l| l[i]),
            src: Src::Block {
                block: 0,
                offset: i * per,
                h: g.h,
                w: g.w,
                c: g.c,
                planar: g.planar,
            },
        })
        .collect();
    Ok((
        Source {
            description: String::new(),
            records,
            blocks: vec![arr.into_pixels()],
        },
        g,
    ))
}

pub(crate) fn read_npy_source(path: &Path, pre: &Preprocess) -> Result<Source> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let arr = read_array(BufReader::new(f), len).map_err(|m| Error::invalid(path, m))?;
    let desc = arr.describe();
    let (mut s, g) = images_source(path, "", arr, pre, None)?;
    s.description = format!(
        "NumPy .npy, {}: {desc} read as {}, {} images, unlabelled",
        file_name(path),
        g.layout,
        g.n
    );
    Ok(s)
}

const IMAGE_NAMES: [&str; 4] = ["images", "x", "data", "x_test"];
const LABEL_NAMES: [&str; 4] = ["labels", "y", "targets", "y_test"];

/// Labels as class indices: integers (or integral floats) >= 0, shape (N,) or (N, 1),
/// or one-hot rows (N, K).
fn labels_of(arr: &Array, n: usize) -> std::result::Result<Vec<usize>, String> {
    let as_class = |v: f64, i: usize| -> std::result::Result<usize, String> {
        if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v <= u32::MAX as f64 {
            Ok(v as usize)
        } else {
            Err(format!("label of record {i} is {v}, not a class index"))
        }
    };
    match arr.shape[..] {
        [m] | [m, 1] => {
            if m != n {
                return Err(format!("{m} labels for {n} images"));
            }
            (0..m).map(|i| as_class(arr.get(i), i)).collect()
        }
        [m, k] => {
            if m != n {
                return Err(format!("{m} label rows for {n} images"));
            }
            (0..m)
                .map(|i| {
                    let row: Vec<f64> = (0..k).map(|j| arr.get(i * k + j)).collect();
                    let ones: Vec<usize> = (0..k).filter(|&j| row[j] == 1.0).collect();
                    if ones.len() == 1 && row.iter().all(|&v| v == 0.0 || v == 1.0) {
                        Ok(ones[0])
                    } else {
                        Err(format!("labels are {m}x{k} but row {i} is not one-hot"))
                    }
                })
                .collect()
        }
        _ => Err(format!(
            "labels shape {:?}: want (N,), (N, 1) or one-hot (N, K)",
            arr.shape
        )),
    }
}

pub(crate) fn read_npz_source(path: &Path, pre: &Preprocess) -> Result<Source> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(f))
        .map_err(|e| Error::invalid(path, format!("not a valid .npz (zip) archive: {e}")))?;
    let arrays: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok()?.strip_suffix(".npy").map(str::to_string))
        .collect();
    let mut sorted = arrays.clone();
    sorted.sort();
    let listing = sorted.join(", ");
    let images_name = IMAGE_NAMES
        .iter()
        .find(|n| arrays.iter().any(|a| a == *n))
        .map(|s| s.to_string())
        .or_else(|| (arrays.len() == 1).then(|| arrays[0].clone()))
        .ok_or_else(|| {
            Error::invalid(
                path,
                format!(
                    "has no images array: want one named {} (arrays here: {})",
                    IMAGE_NAMES.join(", "),
                    if listing.is_empty() { "none" } else { &listing }
                ),
            )
        })?;
    let mut label_order: Vec<&str> = LABEL_NAMES.to_vec();
    if images_name == "x_test" {
        label_order.retain(|n| *n != "y_test");
        label_order.insert(0, "y_test");
    }
    let labels_name = label_order
        .iter()
        .find(|n| arrays.iter().any(|a| a == *n))
        .map(|s| s.to_string());
    let mut read_entry = |name: &str| -> Result<Array> {
        let entry = format!("{name}.npy");
        let file = zip
            .by_name(&entry)
            .map_err(|e| Error::invalid(path, format!("array '{name}': {e}")))?;
        let size = file.size();
        read_array(file, size).map_err(|m| Error::invalid(path, format!("array '{name}': {m}")))
    };
    let images = read_entry(&images_name)?;
    let images_desc = images.describe();
    let labels_arr = match &labels_name {
        Some(l) => Some(read_entry(l)?),
        None => None,
    };
    let g = geometry(&images.shape, pre)
        .map_err(|m| Error::invalid(path, format!("array '{images_name}': {m}")))?;
    let labels = match (&labels_arr, &labels_name) {
        (Some(a), Some(l)) => {
            Some(labels_of(a, g.n).map_err(|m| Error::invalid(path, format!("array '{l}': {m}")))?)
        }
        _ => None,
    };
    let what = format!("array '{images_name}': ");
    let (mut s, g) = images_source(path, &what, images, pre, labels)?;
    s.description = match (&labels_name, &labels_arr) {
        (Some(l), Some(a)) => format!(
            "NumPy .npz, {}: images '{images_name}' {images_desc} read as {}, labels '{l}' {}, {} images",
            file_name(path),
            g.layout,
            a.describe(),
            g.n
        ),
        _ => format!(
            "NumPy .npz, {}: images '{images_name}' {images_desc} read as {}, {} images, unlabelled (no array named {})",
            file_name(path),
            g.layout,
            g.n,
            LABEL_NAMES.join(", ")
        ),
    };
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_dicts() {
        let (d, f, s) =
            parse_header("{'descr': '<f4', 'fortran_order': False, 'shape': (10, 32, 32, 3), }")
                .unwrap();
        assert_eq!((d.as_str(), f, s), ("<f4", false, vec![10, 32, 32, 3]));
        let (_, _, s) =
            parse_header("{'descr': '|u1', 'fortran_order': False, 'shape': (7,), }").unwrap();
        assert_eq!(s, vec![7]);
        let (_, _, s) =
            parse_header("{'descr': '<i8', 'fortran_order': False, 'shape': (), }").unwrap();
        assert!(s.is_empty());
        assert!(
            parse_header("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }")
                .is_err()
        );
    }

    #[test]
    fn dtypes() {
        assert!(Dtype::parse("|u1").is_some());
        assert!(Dtype::parse(">f8").unwrap().big_endian);
        assert!(Dtype::parse("<c8").is_none());
        assert!(Dtype::parse("<U10").is_none());
        assert!(Dtype::parse("|O").is_none());
    }
}
