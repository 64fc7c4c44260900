//! Labelled (or unlabelled) image data for `validate`, calibration and
//! `optimize --data`: readers for the common classifier data formats and the
//! torchvision-style preprocessing that turns their pixels into the model's input.
//!
//! [`load`] detects the format from the path (or takes a [`Format`]), reads the
//! records in a deterministic order (sorted file names; records in file order),
//! and runs every image through [`Preprocess`] in parallel:
//!
//! 1. channels: grey images fed to a 3-channel model are replicated, RGB images
//!    fed to a 1-channel model become ITU-R 601 luma (PIL's `convert("L")`);
//! 2. geometry ([`Resize`]): none, exact bilinear, or torchvision's
//!    `Resize(S)` + `CenterCrop(H, W)`; the bilinear filter is PIL's (an
//!    antialiasing triangle filter whose support grows with the downscale
//!    factor, 8-bit fixed point), so 8-bit images come out byte-identical to
//!    `PIL.Image.resize(..., BILINEAR)`; JPEGs are decoded by libjpeg-turbo's
//!    decoder (PIL's), so a torchvision `Resize(256)` + `CenterCrop(224)` pipeline
//!    is reproduced to float rounding;
//! 3. values: `(raw * scale - mean[c]) / std[c]`, raw being the 0..255 byte (or the
//!    stored value for float arrays), `c` the model's input channel.
//!
//! Bad data is an [`Error::Invalid`] naming the file and, inside container
//! formats, the record. Sizes claimed by headers are checked against the bytes
//! that are really there before anything is allocated for them.

mod cifar;
mod folder;
mod idx;
mod npy;
mod preprocess;
mod resample;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use ndarray::Array4;
use rayon::prelude::*;

pub use preprocess::{ChannelOrder, Layout, Preprocess, Resize};
pub use resample::Interpolation;

use crate::{Error, Result};

/// Preprocessed images with their labels, ready to feed a model.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Preprocessed images, N x C x H x W (Layout::Nchw) or N x H x W x C (Layout::Nhwc), f32.
    pub images: Array4<f32>,
    /// One label per image; None when the source has no labels (calibration data may be unlabelled).
    pub labels: Vec<Option<usize>>,
    /// Where each image came from, for error messages and reports (e.g. "test.bin record 17", "cifar10_03_0.png").
    pub names: Vec<String>,
    /// Human description of the source and format ("CIFAR-10 binary, 2 files, 20000 records").
    pub description: String,
    /// What looked wrong with the data without being an error (e.g. float data that
    /// seem normalized already); the CLI prints these.
    pub warnings: Vec<String>,
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// True when every image has a label.
    pub fn is_labelled(&self) -> bool {
        !self.labels.is_empty() && self.labels.iter().all(Option::is_some)
    }

    /// Each image followed by its left-right mirror (the width axis reversed:
    /// axis 3 of NCHW, axis 2 of NHWC), so 2N images; labels repeat, names of the
    /// copies end in " (mirrored)". An image and its mirror are neighbours, so
    /// they fall in the same chunk of a capture (and the same half of its folds).
    pub fn with_mirrors(&self, layout: Layout) -> Dataset {
        let axis = match layout {
            Layout::Nchw => 2,
            Layout::Nhwc => 1,
        };
        let n = self.len();
        let mut views = Vec::with_capacity(2 * n);
        let mirrored: Vec<ndarray::Array3<f32>> = self
            .images
            .outer_iter()
            .map(|img| {
                let mut m = img.to_owned();
                m.invert_axis(ndarray::Axis(axis));
                m
            })
            .collect();
        for (img, m) in self.images.outer_iter().zip(&mirrored) {
            views.push(img);
            views.push(m.view());
        }
        let images = ndarray::stack(ndarray::Axis(0), &views).expect("images of one shape");
        Dataset {
            images,
            labels: self.labels.iter().flat_map(|l| [*l, *l]).collect(),
            names: self
                .names
                .iter()
                .flat_map(|n| [n.clone(), format!("{n} (mirrored)")])
                .collect(),
            description: format!("{}, each with its mirror", self.description),
            warnings: self.warnings.clone(),
        }
    }

    /// The names of this set's images whose preprocessed content (every value, bit
    /// for bit) is also an image of `other`: the same photo in both sets, whatever
    /// its file name. Used to warn when evaluation images were also calibration
    /// images (agreement on them is in-sample).
    pub fn also_in(&self, other: &Dataset) -> Vec<String> {
        use std::collections::HashSet;
        use std::hash::{Hash, Hasher};
        let key = |img: ndarray::ArrayView3<f32>| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            for v in img.iter() {
                v.to_bits().hash(&mut h);
            }
            h.finish()
        };
        let theirs: HashSet<u64> = other.images.outer_iter().map(key).collect();
        self.images
            .outer_iter()
            .zip(&self.names)
            .filter(|(img, _)| theirs.contains(&key(img.view())))
            .map(|(_, name)| name.clone())
            .collect()
    }
}

/// A data format, for the `--data-format` override of the detection in [`load`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// CIFAR-10 binary: 3073-byte records, label byte + 3072 bytes (R, G, B planes of 32x32).
    Cifar10,
    /// CIFAR-100 binary: 3074-byte records, coarse label + fine label + 3072 bytes; the fine label is used.
    Cifar100,
    /// IDX (MNIST, Fashion-MNIST): `*-images-idx3-ubyte[.gz]` with `*-labels-idx1-ubyte[.gz]` beside it.
    Idx,
    /// One NumPy `.npy` array of images, unlabelled.
    Npy,
    /// A NumPy `.npz` archive with an images array and optionally a labels array.
    Npz,
    /// PNG/JPEG files in a folder (or one image file).
    ImageFolder,
}

impl Format {
    /// The names [`FromStr`] accepts (canonical spelling first).
    pub const NAMES: [&'static str; 6] =
        ["cifar10", "cifar100", "idx", "npy", "npz", "image-folder"];

    pub fn name(self) -> &'static str {
        match self {
            Format::Cifar10 => "cifar10",
            Format::Cifar100 => "cifar100",
            Format::Idx => "idx",
            Format::Npy => "npy",
            Format::Npz => "npz",
            Format::ImageFolder => "image-folder",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let norm = s.trim().to_ascii_lowercase().replace('_', "-");
        Ok(match norm.as_str() {
            "cifar10" | "cifar-10" => Format::Cifar10,
            "cifar100" | "cifar-100" => Format::Cifar100,
            "idx" | "mnist" | "ubyte" => Format::Idx,
            "npy" => Format::Npy,
            "npz" => Format::Npz,
            "image-folder" | "imagefolder" | "folder" | "images" | "png" | "jpeg" | "jpg" => {
                Format::ImageFolder
            }
            _ => {
                return Err(Error::Usage(format!(
                    "unknown data format '{s}': expected one of {}",
                    Format::NAMES.join(", ")
                )))
            }
        })
    }
}

/// Reads any supported format, detected from the path (or forced with `format`),
/// keeps the first `limit` records and preprocesses them for the model.
///
/// Formats and how they are recognised:
/// - a directory holding `*.bin` files: CIFAR binaries. When the folder holds a test
///   split (`test_batch.bin`, `test.bin`, any `test*.bin`) only those files are read,
///   so the standard distribution folders validate on the test set; otherwise every
///   `.bin` file, sorted. Point at one file to pick another split.
/// - a `.bin` file: CIFAR-10 (3073-byte records: label + 3072) or CIFAR-100 (3074-byte
///   records: coarse + fine + 3072; the fine label is used). The kind comes from the
///   file or folder name (containing "100": CIFAR-100; "cifar10", "cifar-10",
///   "data_batch", "test_batch": CIFAR-10), else from which record size divides the
///   file length; when both divide it, it is an error asking for `format`.
/// - IDX (MNIST / Fashion-MNIST): an images file `*idx3-ubyte[.gz]`, with the labels
///   found beside it by the standard naming (`train-images-idx3-ubyte` <->
///   `train-labels-idx1-ubyte`, `images-idx3-ubyte.gz` <-> `labels-idx1-ubyte.gz`,
///   `t10k-...`), or a directory containing such files (the test `t10k-`/`test`
///   images when several). Compression is recognised by the gzip magic bytes.
/// - `.npy`: one array of images, unlabelled. `.npz`: an images array named
///   `images`, `x`, `data` or `x_test` (or the only array) and a labels array named
///   `labels`, `y`, `targets` or `y_test` (integers, or one-hot rows). Images may be
///   uint8 (bytes 0..255) or any numeric type (taken as stored: use scale 1 for arrays
///   that are already scaled), shaped NHWC, NCHW, NHW (grey), or N x (C*H*W) / N x (H*W)
///   flattened rows (C-order, planar) at the model's size; NHWC vs NCHW is told
///   by which axis has 1 or 3 entries, ties broken by the model's height and width.
/// - an image folder (PNG/JPEG, searched recursively, hidden entries skipped):
///   labels from a `labels.txt` / `labels.csv` at its top (`filename,label` or
///   `filename label` per line, file names relative to the folder, `#` comments and
///   a header line allowed), else from class subfolders (sorted subfolder names ->
///   0..K-1, or the numbers themselves when every subfolder name is a number), else
///   from foolbox-style file names `<set>_<idx>_<label>.png` (when every file is named
///   so); otherwise unlabelled. A single PNG/JPEG file is a dataset of one image.
///
/// `limit` keeps the first N records in that order. Names in [`Dataset::names`] are
/// `"<file> record <i>"` (0-based, in file order) for container formats and the path
/// relative to the folder for image folders.
pub fn load(
    path: &Path,
    pre: &Preprocess,
    format: Option<Format>,
    limit: Option<usize>,
) -> Result<Dataset> {
    pre.validate()?;
    if limit == Some(0) {
        return Err(Error::Usage("a limit of 0 keeps no images".into()));
    }
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let is_dir = meta.is_dir();
    let reader = match format {
        Some(Format::Cifar10) => Reader::Cifar(Some(cifar::Kind::Cifar10)),
        Some(Format::Cifar100) => Reader::Cifar(Some(cifar::Kind::Cifar100)),
        Some(Format::Idx) => Reader::Idx,
        Some(f @ (Format::Npy | Format::Npz)) if is_dir => {
            return Err(Error::invalid(
                path,
                format!("is a directory; data format {f} wants a file"),
            ))
        }
        Some(Format::Npy) => Reader::Npy,
        Some(Format::Npz) => Reader::Npz,
        Some(Format::ImageFolder) => Reader::Folder,
        None => detect(path, is_dir)?,
    };
    let mut source = match reader {
        Reader::Cifar(kind) if is_dir => cifar::read_dir(path, kind, limit)?,
        Reader::Cifar(kind) => cifar::read_file(path, kind, limit)?,
        Reader::Idx => idx::read(path, is_dir)?,
        Reader::Npy => npy::read_npy_source(path, pre)?,
        Reader::Npz => npy::read_npz_source(path, pre)?,
        Reader::Folder => folder::read(path, is_dir)?,
    };
    if source.records.is_empty() {
        return Err(Error::invalid(path, "holds no images"));
    }
    if let Some(n) = limit {
        if source.records.len() > n {
            source.records.truncate(n);
            source.description.push_str(&format!(", first {n} kept"));
        }
    }
    process(source, pre)
}

/// Which reader to run; CIFAR's kind is `None` when the reader decides per file.
enum Reader {
    Cifar(Option<cifar::Kind>),
    Idx,
    Npy,
    Npz,
    Folder,
}

/// Detects the format from the path's name and, for files with an unknown name,
/// from their first bytes.
fn detect(path: &Path, is_dir: bool) -> Result<Reader> {
    if is_dir {
        let files = list_files(path)?;
        let names: Vec<String> = files
            .iter()
            .filter_map(|p| {
                p.file_name()
                    .map(|n| n.to_string_lossy().to_ascii_lowercase())
            })
            .collect();
        if names.iter().any(|n| n.ends_with(".bin")) {
            return Ok(Reader::Cifar(None));
        }
        if names.iter().any(|n| idx::is_images_name(n)) {
            return Ok(Reader::Idx);
        }
        return Ok(Reader::Folder);
    }
    let name = file_name(path).to_ascii_lowercase();
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "bin" => return Ok(Reader::Cifar(None)),
        "npy" => return Ok(Reader::Npy),
        "npz" => return Ok(Reader::Npz),
        "png" | "jpg" | "jpeg" => return Ok(Reader::Folder),
        _ => {}
    }
    if name.contains("ubyte") || name.contains("idx") {
        return Ok(Reader::Idx);
    }
    // Unknown name: look at the first bytes.
    let mut head = [0u8; 8];
    let n = {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut n = 0;
        while n < head.len() {
            match f.read(&mut head[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => return Err(Error::io(path, e)),
            }
        }
        n
    };
    let head = &head[..n];
    if head.starts_with(b"\x93NUMPY") {
        return Ok(Reader::Npy);
    }
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        return Ok(Reader::Npz);
    }
    if head.starts_with(&[0x1f, 0x8b]) || (head.len() >= 4 && head[..2] == [0, 0] && head[2] >= 8) {
        return Ok(Reader::Idx);
    }
    if head.starts_with(b"\x89PNG") || head.starts_with(&[0xff, 0xd8, 0xff]) {
        return Ok(Reader::Folder);
    }
    if head.first() == Some(&0x80) {
        return Err(Error::invalid(
            path,
            "looks like a Python pickle (e.g. CIFAR's python version), which is not read: \
             use the binary version (.bin files) or an .npz",
        ));
    }
    Err(Error::invalid(
        path,
        format!(
            "cannot tell the data format from the name or the first bytes; pass --data-format ({})",
            Format::NAMES.join(", ")
        ),
    ))
}

// ---------------------------------------------------------------------------
// Sources: what the readers hand to the preprocessing.

/// Pixel storage shared by many records.
pub(crate) enum Pixels {
    U8(Vec<u8>),
    F32(Vec<f32>),
}

/// Where one record's pixels are.
pub(crate) enum Src {
    /// `h x w x c` values at `offset` in block `block`; `planar` = C x H x W order, else H x W x C.
    Block {
        block: usize,
        offset: usize,
        h: usize,
        w: usize,
        c: usize,
        planar: bool,
    },
    /// An image file (PNG/JPEG), decoded when processed.
    File,
}

pub(crate) struct Record {
    /// The file the record is in (named by errors).
    pub path: Arc<PathBuf>,
    /// The record's index inside its file, for container formats.
    pub index: Option<usize>,
    /// Name for reports.
    pub name: String,
    pub label: Option<usize>,
    pub src: Src,
}

impl Record {
    /// An error about this record: the file, then "record i: " for container formats.
    pub(crate) fn error(&self, message: impl fmt::Display) -> Error {
        match self.index {
            Some(i) => Error::invalid(self.path.as_path(), format!("record {i}: {message}")),
            None => Error::invalid(self.path.as_path(), message.to_string()),
        }
    }
}

pub(crate) struct Source {
    pub description: String,
    pub records: Vec<Record>,
    pub blocks: Vec<Pixels>,
}

/// Runs the preprocessing over all records in parallel into one N x ... array.
fn process(source: Source, pre: &Preprocess) -> Result<Dataset> {
    let n = source.records.len();
    let per = pre.channels * pre.height * pre.width;
    let total = n
        .checked_mul(per)
        .filter(|t| t.checked_mul(4).is_some_and(|b| b <= isize::MAX as usize))
        .ok_or_else(|| {
            Error::Usage(format!(
                "{n} images of {}x{}x{} do not fit in memory; use --limit",
                pre.channels, pre.height, pre.width
            ))
        })?;
    let mut out = vec![0f32; total];
    let blocks = &source.blocks;
    let results: Vec<Result<()>> = source
        .records
        .par_iter()
        .zip(out.par_chunks_mut(per))
        .map(|(rec, dst)| match &rec.src {
            Src::Block {
                block,
                offset,
                h,
                w,
                c,
                planar,
            } => {
                let len = h * w * c;
                match &blocks[*block] {
                    Pixels::U8(v) => {
                        let view =
                            preprocess::View::new(&v[*offset..*offset + len], *h, *w, *c, *planar);
                        pre.apply_u8(&view, dst).map_err(|m| rec.error(m))
                    }
                    Pixels::F32(v) => {
                        let view =
                            preprocess::View::new(&v[*offset..*offset + len], *h, *w, *c, *planar);
                        pre.apply_f32(&view, dst).map_err(|m| rec.error(m))
                    }
                }
            }
            Src::File => {
                let img = folder::decode(rec.path.as_path())?;
                let view = preprocess::View::new(&img.data, img.h, img.w, img.c, false);
                pre.apply_u8(&view, dst).map_err(|m| rec.error(m))
            }
        })
        .collect();
    if let Some(err) = results.into_iter().find_map(|r| r.err()) {
        return Err(err);
    }
    let shape = match pre.layout {
        Layout::Nchw => (n, pre.channels, pre.height, pre.width),
        Layout::Nhwc => (n, pre.height, pre.width, pre.channels),
    };
    let images = Array4::from_shape_vec(shape, out)
        .map_err(|e| Error::Usage(format!("internal: output shape: {e}")))?;
    let mut labels = Vec::with_capacity(n);
    let mut names = Vec::with_capacity(n);
    for r in source.records {
        labels.push(r.label);
        names.push(r.name);
    }
    let warnings = normalized_twice(&source.blocks, pre).into_iter().collect();
    Ok(Dataset {
        images,
        labels,
        names,
        description: source.description,
        warnings,
    })
}

/// A warning when float arrays look normalized already (a negative value, or
/// nothing above 1) while the preprocessing scales and normalizes raw 0..255
/// pixels: the data would be normalized twice. Byte images cannot be.
fn normalized_twice(blocks: &[Pixels], pre: &Preprocess) -> Option<String> {
    let identity =
        pre.scale == 1.0 && pre.mean.iter().all(|m| *m == 0.0) && pre.std.iter().all(|s| *s == 1.0);
    if identity {
        return None;
    }
    let (mut lo, mut hi, mut any) = (f32::INFINITY, f32::NEG_INFINITY, false);
    for b in blocks {
        if let Pixels::F32(v) = b {
            for x in v.iter() {
                lo = lo.min(*x);
                hi = hi.max(*x);
                any = true;
            }
        }
    }
    (any && (lo < 0.0 || hi <= 1.0)).then(|| {
        format!(
            "the float data hold values in [{lo}, {hi}], which look already scaled or normalized, \
             while the preprocessing divides raw 0..255 pixels by {} and normalizes them: if the \
             arrays are model-ready, pass --preprocess raw",
            1.0 / pre.scale
        )
    })
}

// ---------------------------------------------------------------------------
// Small helpers shared by the readers.

pub(crate) fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// The regular files directly in `dir`, sorted by name, hidden ones skipped.
pub(crate) fn list_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let p = e.path();
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if p.is_file() {
            v.push(p);
        }
    }
    v.sort();
    Ok(v)
}

/// Reads exactly `len` bytes (no more are wanted) from `r`, growing the buffer as the
/// bytes arrive rather than trusting `len` for the allocation.
pub(crate) fn read_exact_growing<R: std::io::Read>(
    r: R,
    len: u64,
) -> std::io::Result<(Vec<u8>, bool)> {
    use std::io::Read;
    let mut buf = Vec::new();
    // One byte more than wanted tells "exactly" from "too long".
    r.take(len.saturating_add(1)).read_to_end(&mut buf)?;
    let too_long = buf.len() as u64 > len;
    buf.truncate(len as usize);
    Ok((buf, too_long))
}

#[cfg(test)]
mod tests {
    use super::{Dataset, Layout};

    /// Two 1-channel 2x3 images [[1, 2, 3], [4, 5, 6]] and [[7, 8, 9], [10, 11,
    /// 12]]: each is followed by its mirror, the columns reversed ([[3, 2, 1],
    /// [6, 5, 4]]), in NCHW and NHWC alike.
    #[test]
    fn mirrors_reverse_the_width_by_hand() {
        let v: Vec<f32> = (1..=12).map(|x| x as f32).collect();
        let set = |images| Dataset {
            images,
            labels: vec![Some(3), None],
            names: vec!["a".into(), "b".into()],
            description: "two".into(),
            warnings: Vec::new(),
        };
        let want = [
            1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 3.0, 2.0, 1.0, 6.0, 5.0, 4.0, //
            7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 9.0, 8.0, 7.0, 12.0, 11.0, 10.0,
        ];
        let nchw = set(ndarray::Array4::from_shape_vec((2, 1, 2, 3), v.clone()).unwrap());
        let m = nchw.with_mirrors(Layout::Nchw);
        assert_eq!(m.images.shape(), &[4, 1, 2, 3]);
        assert_eq!(m.images.iter().copied().collect::<Vec<_>>(), want);
        assert_eq!(m.labels, vec![Some(3), Some(3), None, None]);
        assert_eq!(m.names, vec!["a", "a (mirrored)", "b", "b (mirrored)"]);
        let nhwc = set(ndarray::Array4::from_shape_vec((2, 2, 3, 1), v).unwrap());
        let m = nhwc.with_mirrors(Layout::Nhwc);
        assert_eq!(m.images.shape(), &[4, 2, 3, 1]);
        assert_eq!(m.images.iter().copied().collect::<Vec<_>>(), want);
    }
}
