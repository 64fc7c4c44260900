//! IDX files (MNIST, Fashion-MNIST, EMNIST): magic `00 00 <type> <ndims>`, the
//! dimensions as big-endian u32, then the values row-major; optionally gzip'd.
//! Images are unsigned bytes, N x H x W (grey) or N x H x W x C; labels N bytes.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flate2::read::MultiGzDecoder;

use super::{file_name, list_files, read_exact_growing, Pixels, Record, Source, Src};
use crate::{Error, Result};

/// An IDX images file name: `*idx3-ubyte*` (or idx4, or `.idx3-ubyte`).
pub(crate) fn is_images_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    (n.contains("idx3") || n.contains("idx4")) && n.contains("ubyte")
}

struct Idx {
    dims: Vec<usize>,
    data: Vec<u8>,
}

fn type_name(t: u8) -> &'static str {
    match t {
        0x08 => "unsigned byte",
        0x09 => "signed byte",
        0x0B => "short",
        0x0C => "int",
        0x0D => "float",
        0x0E => "double",
        _ => "unknown",
    }
}

/// Reads a whole IDX file of unsigned bytes. The header's size claim is checked
/// against the bytes really there: the file length for plain files, the stream
/// for gzip'd ones (read as it comes, never allocated from the claim).
fn read_idx(path: &Path) -> Result<Idx> {
    let io = |e| Error::io(path, e);
    let mut f = File::open(path).map_err(io)?;
    let file_len = f.metadata().map_err(io)?.len();
    let mut magic2 = [0u8; 2];
    let got = read_up_to(&mut f, &mut magic2).map_err(io)?;
    let gz = got == 2 && magic2 == [0x1f, 0x8b];
    let f = File::open(path).map_err(io)?;
    let mut r: Box<dyn Read> = if gz {
        Box::new(MultiGzDecoder::new(BufReader::new(f)))
    } else {
        Box::new(BufReader::new(f))
    };
    let bad = |m: String| Error::invalid(path, m);
    let mut magic = [0u8; 4];
    let n = read_up_to(&mut r, &mut magic).map_err(|e| bad(format!("cannot read: {e}")))?;
    if n < 4 || magic[0] != 0 || magic[1] != 0 {
        return Err(bad(format!(
            "not an IDX file: magic {:02x?} is not 00 00 <type> <dims>",
            &magic[..n]
        )));
    }
    let (t, nd) = (magic[2], magic[3] as usize);
    if t != 0x08 {
        return Err(bad(format!(
            "IDX element type 0x{t:02x} ({}) is not read; images and labels must be unsigned bytes (0x08)",
            type_name(t)
        )));
    }
    if nd == 0 || nd > 4 {
        return Err(bad(format!("IDX header has {nd} dimensions; want 1 to 4")));
    }
    let mut dims_raw = vec![0u8; 4 * nd];
    let n = read_up_to(&mut r, &mut dims_raw).map_err(|e| bad(format!("cannot read: {e}")))?;
    if n < dims_raw.len() {
        return Err(bad(format!(
            "IDX header ends early: {nd} dimensions need {} bytes, file has {n}",
            dims_raw.len()
        )));
    }
    let dims: Vec<usize> = dims_raw
        .chunks(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    let shape = dims
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("x");
    let want = dims
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
        .ok_or_else(|| bad(format!("IDX dimensions {shape} overflow")))?;
    let header = 4 + 4 * nd as u64;
    if !gz && file_len - header.min(file_len) != want {
        return Err(bad(format!(
            "IDX header says {shape} = {want} bytes of data, but the file has {} after the {header}-byte header",
            file_len.saturating_sub(header)
        )));
    }
    let (data, too_long) =
        read_exact_growing(r, want).map_err(|e| bad(format!("cannot decompress: {e}")))?;
    if data.len() as u64 != want || too_long {
        return Err(bad(format!(
            "IDX header says {shape} = {want} bytes of data, but the decompressed data has {}",
            if too_long {
                "more".to_string()
            } else {
                data.len().to_string()
            }
        )));
    }
    Ok(Idx { dims, data })
}

fn read_up_to<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The labels file names that go with an images file name, in the order tried.
fn label_candidates(images: &Path) -> Vec<PathBuf> {
    let name = file_name(images);
    let stem = name.strip_suffix(".gz").unwrap_or(&name);
    let lower = stem.to_ascii_lowercase();
    if !(lower.contains("images") || lower.contains("idx3") || lower.contains("idx4")) {
        return Vec::new();
    }
    let mut s = stem.replace("images", "labels").replace("Images", "Labels");
    s = s.replace("idx3", "idx1").replace("idx4", "idx1");
    let dir = images.parent().unwrap_or(Path::new(""));
    let mut v = vec![dir.join(&s), dir.join(format!("{s}.gz"))];
    if name.ends_with(".gz") {
        v.swap(0, 1);
    }
    v
}

/// Picks the images file in a folder: the only one, else the test (`t10k`/`test`) one.
fn images_in_dir(dir: &Path) -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = list_files(dir)?
        .into_iter()
        .filter(|p| is_images_name(&file_name(p)))
        .collect();
    // The same file plain and gzip'd: keep the plain one.
    let names: Vec<String> = found.iter().map(|p| file_name(p)).collect();
    found.retain(|p| {
        let n = file_name(p);
        !(n.ends_with(".gz") && names.contains(&n[..n.len() - 3].to_string()))
    });
    if found.len() > 1 {
        let tests: Vec<PathBuf> = found
            .iter()
            .filter(|p| {
                let n = file_name(p).to_ascii_lowercase();
                n.starts_with("t10k") || n.contains("test")
            })
            .cloned()
            .collect();
        if !tests.is_empty() {
            found = tests;
        }
    }
    match found.len() {
        0 => Err(Error::invalid(
            dir,
            "holds no IDX images file (*idx3-ubyte[.gz])",
        )),
        1 => Ok(found.remove(0)),
        _ => Err(Error::invalid(
            dir,
            format!(
                "holds several IDX images files ({}); point at one",
                found
                    .iter()
                    .map(|p| file_name(p))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

pub(crate) fn read(path: &Path, is_dir: bool) -> Result<Source> {
    let images_path = if is_dir {
        images_in_dir(path)?
    } else {
        path.to_path_buf()
    };
    let p = images_path.as_path();
    let img = read_idx(p)?;
    let (n, h, w, c) = match img.dims[..] {
        [n, h, w] => (n, h, w, 1),
        [n, h, w, c] => (n, h, w, c),
        [n] => {
            return Err(Error::invalid(
                p,
                format!("is an IDX labels file ({n} labels, 1 dimension): give the images file (*-images-idx3-ubyte)"),
            ))
        }
        _ => {
            return Err(Error::invalid(
                p,
                format!(
                    "IDX images need 3 (N x H x W) or 4 (N x H x W x C) dimensions, the header has {}",
                    img.dims.len()
                ),
            ))
        }
    };
    if h == 0 || w == 0 || c == 0 {
        return Err(Error::invalid(
            p,
            format!("IDX images of size {h}x{w}x{c} are empty"),
        ));
    }
    let labels_path = label_candidates(p).into_iter().find(|c| c.is_file());
    let labels: Option<Vec<u8>> = match &labels_path {
        None => None,
        Some(lp) => {
            let l = read_idx(lp)?;
            if l.dims.len() != 1 {
                return Err(Error::invalid(
                    lp.as_path(),
                    format!(
                        "an IDX labels file has 1 dimension, this one has {}",
                        l.dims.len()
                    ),
                ));
            }
            if l.dims[0] != n {
                return Err(Error::invalid(
                    lp.as_path(),
                    format!(
                        "{} labels for the {n} images of {}",
                        l.dims[0],
                        file_name(p)
                    ),
                ));
            }
            Some(l.data)
        }
    };
    let shared = Arc::new(images_path.clone());
    let fname = file_name(p);
    let per = h * w * c;
    let records = (0..n)
        .map(|i| Record {
            path: shared.clone(),
            index: Some(i),
            name: format!("{fname} record {i}"),
            label: labels.as_ref().map(|l| l[i] as usize),
            src: Src::Block {
                block: 0,
                offset: i * per,
                h,
                w,
                c,
                planar: false,
            },
        })
        .collect();
    let description = match &labels_path {
        Some(lp) => format!("IDX, {fname} ({n} images {h}x{w}x{c}) + {}", file_name(lp)),
        None => format!(
            "IDX, {fname} ({n} images {h}x{w}x{c}), unlabelled (no {} beside it)",
            label_candidates(p)
                .first()
                .map(|c| file_name(c))
                .unwrap_or_else(|| "*-labels-idx1-ubyte file".into())
        ),
    };
    Ok(Source {
        description,
        records,
        blocks: vec![Pixels::U8(img.data)],
    })
}
