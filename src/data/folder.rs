//! Folders of PNG/JPEG images, with labels from a labels file, class subfolders or
//! foolbox-style file names; and single image files.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::{ColorType, DynamicImage, ImageReader};

use super::{file_name, Record, Source, Src};
use crate::{Error, Result};

const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];
const LABEL_FILES: [&str; 2] = ["labels.txt", "labels.csv"];

fn is_image(p: &Path) -> bool {
    p.extension().is_some_and(|e| {
        let e = e.to_string_lossy().to_ascii_lowercase();
        EXTENSIONS.contains(&e.as_str())
    })
}

/// A decoded image: interleaved bytes, 1 (grey) or 3 (RGB) channels.
pub(crate) struct Decoded {
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub data: Vec<u8>,
}

/// Largest decoded image accepted (bytes of 8-bit pixels), as the `image` crate's default.
const MAX_DECODED_BYTES: usize = 512 << 20;

/// Decodes a PNG/JPEG (format from the content). Grey (with or without alpha)
/// becomes 1 channel, everything else RGB with alpha dropped, as PIL's
/// `convert("L")` / `convert("RGB")`. JPEGs go through libjpeg-turbo's decoder
/// (mozjpeg), the one PIL uses, so the pixels are PIL's exactly; CMYK/YCCK JPEGs,
/// which libjpeg does not turn into RGB, through the `image` crate.
pub(crate) fn decode(path: &Path) -> Result<Decoded> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        if let Some(d) = decode_jpeg(path, &bytes)? {
            return Ok(d);
        }
    }
    decode_with_image(path, &bytes)
}

fn decode_with_image(path: &Path, bytes: &[u8]) -> Result<Decoded> {
    let bad = |e: image::ImageError| Error::invalid(path, format!("cannot decode image: {e}"));
    let img: DynamicImage = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?
        .decode()
        .map_err(bad)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let grey = matches!(
        img.color(),
        ColorType::L8 | ColorType::La8 | ColorType::L16 | ColorType::La16
    );
    let (c, data) = if grey {
        (1, img.into_luma8().into_raw())
    } else {
        (3, img.into_rgb8().into_raw())
    };
    Ok(Decoded { h, w, c, data })
}

/// A byte slice as `BufRead` that notes when the decoder asks for bytes past the
/// end: libjpeg then fakes an end-of-image marker and fills the rest with grey,
/// where PIL refuses the file as truncated.
struct Tracked<'a> {
    data: &'a [u8],
    pos: usize,
    ran_out: &'a std::cell::Cell<bool>,
}

impl std::io::Read for Tracked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = std::io::BufRead::fill_buf(self)?.len().min(buf.len());
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl std::io::BufRead for Tracked<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if self.pos >= self.data.len() {
            self.ran_out.set(true);
        }
        Ok(&self.data[self.pos.min(self.data.len())..])
    }
    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.data.len());
    }
}

/// libjpeg-turbo decoding (islow IDCT, fancy upsampling: PIL's settings). `None`
/// for colour spaces it cannot convert to RGB. libjpeg's fatal errors arrive as
/// unwinds (the mozjpeg crate's design, no panic message) and become errors here.
fn decode_jpeg(path: &Path, bytes: &[u8]) -> Result<Option<Decoded>> {
    use mozjpeg::{ColorSpace, Decompress};
    let ran_out = std::cell::Cell::new(false);
    let run = || -> std::io::Result<Option<Decoded>> {
        let d = Decompress::new_reader(Tracked {
            data: bytes,
            pos: 0,
            ran_out: &ran_out,
        })?;
        let (w, h) = (d.width(), d.height());
        if w == 0 || h == 0 || w.saturating_mul(h).saturating_mul(3) > MAX_DECODED_BYTES {
            return Err(std::io::Error::other(format!(
                "{w}x{h} (WxH) pixels is beyond the {} MiB limit",
                MAX_DECODED_BYTES >> 20
            )));
        }
        let (mut started, c) = match d.color_space() {
            ColorSpace::JCS_GRAYSCALE => (d.grayscale()?, 1),
            ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK => return Ok(None),
            _ => (d.rgb()?, 3),
        };
        let data: Vec<u8> = started.read_scanlines()?;
        started.finish()?;
        if data.len() != w * h * c {
            return Err(std::io::Error::other(
                "decoded fewer rows than the header says",
            ));
        }
        Ok(Some(Decoded { h, w, c, data }))
    };
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run));
    let result = match out {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "libjpeg error".into());
            return Err(Error::invalid(
                path,
                format!(
                    "cannot decode image: {}",
                    msg.trim_start_matches("libjpeg fatal error: ")
                ),
            ));
        }
    };
    let decoded =
        result.map_err(|e| Error::invalid(path, format!("cannot decode image: JPEG: {e}")))?;
    if ran_out.get() {
        return Err(Error::invalid(
            path,
            "cannot decode image: JPEG data is truncated (ends before the end-of-image marker)",
        ));
    }
    Ok(decoded)
}

/// `<set>_<idx>_<label>` (foolbox's sample names): the label.
pub(crate) fn foolbox_label(stem: &str) -> Option<usize> {
    let mut parts = stem.rsplitn(3, '_');
    let label = parts.next()?;
    let idx = parts.next()?;
    let set = parts.next()?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if set.is_empty() || !digits(idx) || !digits(label) || label.len() > 9 {
        return None;
    }
    label.parse().ok()
}

/// Every image under `root`, recursively, hidden entries skipped, as paths relative
/// to `root` sorted by their '/'-joined text.
fn walk(root: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    // Symlinked folders are followed, each real folder once (no loops).
    let mut seen = std::collections::HashSet::new();
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        if !seen.insert(std::fs::canonicalize(&dir).map_err(|e| Error::io(&dir, e))?) {
            continue;
        }
        for e in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let e = e.map_err(|e| Error::io(&dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let p = e.path();
            let r = rel.join(&name);
            if p.is_dir() {
                stack.push(r);
            } else if p.is_file() && is_image(&p) {
                out.push(
                    r.components()
                        .map(|c| c.as_os_str().to_string_lossy().into_owned())
                        .collect::<Vec<_>>()
                        .join("/"),
                );
            }
        }
    }
    out.sort();
    Ok(out)
}

/// `filename,label` or `filename label` lines; blank lines, `#` comments and a first
/// line whose label is not a number (a header) are skipped.
fn parse_labels_file(path: &Path) -> Result<BTreeMap<String, (usize, usize)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut map = BTreeMap::new();
    let mut first = true;
    for (ln, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, label) = match line.rsplit_once(',') {
            Some((n, l)) => (n.trim(), l.trim()),
            None => match line.rsplit_once(char::is_whitespace) {
                Some((n, l)) => (n.trim(), l.trim()),
                None => {
                    return Err(Error::invalid(
                        path,
                        format!(
                            "line {}: want 'filename,label' or 'filename label', got '{line}'",
                            ln + 1
                        ),
                    ))
                }
            },
        };
        let name = name.trim_matches('"').trim_start_matches("./").to_string();
        let label = label.trim_matches('"');
        let Ok(label) = label.parse::<usize>() else {
            if first {
                first = false;
                continue; // a header such as "filename,label"
            }
            return Err(Error::invalid(
                path,
                format!("line {}: label '{label}' is not a class index", ln + 1),
            ));
        };
        first = false;
        if map.insert(name.clone(), (label, ln + 1)).is_some() {
            return Err(Error::invalid(
                path,
                format!("line {}: '{name}' is listed twice", ln + 1),
            ));
        }
    }
    Ok(map)
}

fn record(root: &Path, rel: &str, label: Option<usize>) -> Record {
    Record {
        path: Arc::new(root.join(rel)),
        index: None,
        name: rel.to_string(),
        label,
        src: Src::File,
    }
}

pub(crate) fn read(path: &Path, is_dir: bool) -> Result<Source> {
    if !is_dir {
        // One image file.
        let name = file_name(path);
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let label = foolbox_label(&stem);
        return Ok(Source {
            description: format!(
                "image file {name}{}",
                if label.is_some() {
                    ", label from the name <set>_<idx>_<label>"
                } else {
                    ", unlabelled"
                }
            ),
            records: vec![Record {
                path: Arc::new(path.to_path_buf()),
                index: None,
                name,
                label,
                src: Src::File,
            }],
            blocks: Vec::new(),
        });
    }
    let root = path;
    let files = walk(root)?;
    if files.is_empty() {
        return Err(Error::invalid(
            root,
            "holds no PNG/JPEG images (.png, .jpg, .jpeg), nor CIFAR .bin / IDX files",
        ));
    }
    let n = files.len();
    let count = format!("{n} PNG/JPEG file{}", if n == 1 { "" } else { "s" });

    // 1. A labels file at the top.
    let label_files: Vec<PathBuf> = LABEL_FILES
        .iter()
        .map(|f| root.join(f))
        .filter(|p| p.is_file())
        .collect();
    if label_files.len() > 1 {
        return Err(Error::invalid(
            root,
            "holds both labels.txt and labels.csv; keep one",
        ));
    }
    if let Some(lf) = label_files.first() {
        let map = parse_labels_file(lf)?;
        let present: HashMap<&str, ()> = files.iter().map(|f| (f.as_str(), ())).collect();
        for (name, (_, line)) in &map {
            if !present.contains_key(name.as_str()) {
                return Err(Error::invalid(
                    lf.as_path(),
                    format!("line {line}: no image '{name}' in {}", root.display()),
                ));
            }
        }
        let mut records = Vec::with_capacity(n);
        for f in &files {
            let Some(&(label, _)) = map.get(f) else {
                return Err(Error::invalid(
                    lf.as_path(),
                    format!("has no label for image '{f}'"),
                ));
            };
            records.push(record(root, f, Some(label)));
        }
        return Ok(Source {
            description: format!("image folder, {count}, labels from {}", file_name(lf)),
            records,
            blocks: Vec::new(),
        });
    }

    // 2. Class subfolders.
    let top_level = files.iter().filter(|f| !f.contains('/')).count();
    if top_level < n {
        if top_level > 0 {
            return Err(Error::invalid(
                root,
                format!(
                    "holds images both at its top ({top_level}) and in subfolders ({}): \
                     use class subfolders only, or a labels.txt",
                    n - top_level
                ),
            ));
        }
        let mut classes: Vec<String> = Vec::new();
        for e in std::fs::read_dir(root).map_err(|e| Error::io(root, e))? {
            let e = e.map_err(|e| Error::io(root, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') && e.path().is_dir() {
                classes.push(name);
            }
        }
        classes.sort();
        let numeric = classes
            .iter()
            .all(|c| !c.is_empty() && c.len() <= 9 && c.bytes().all(|b| b.is_ascii_digit()));
        let index: HashMap<&str, usize> = classes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.as_str(), if numeric { c.parse().unwrap_or(i) } else { i }))
            .collect();
        let records = files
            .iter()
            .map(|f| {
                let class = f.split('/').next().unwrap_or("");
                record(root, f, index.get(class).copied())
            })
            .collect();
        let how = if numeric {
            "labels = the numeric subfolder names".to_string()
        } else {
            format!(
                "labels = index of the class subfolder in sorted order (0 = {}, {} classes)",
                classes.first().map(String::as_str).unwrap_or(""),
                classes.len()
            )
        };
        return Ok(Source {
            description: format!("image folder, {count} in class subfolders, {how}"),
            records,
            blocks: Vec::new(),
        });
    }

    // 3. foolbox names, when every file has one; else unlabelled.
    let labels: Vec<Option<usize>> = files
        .iter()
        .map(|f| {
            let stem = Path::new(f)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            foolbox_label(&stem)
        })
        .collect();
    let named = labels.iter().filter(|l| l.is_some()).count();
    let all = named == n;
    let records = files
        .iter()
        .zip(&labels)
        .map(|(f, l)| record(root, f, if all { *l } else { None }))
        .collect();
    let description = if all {
        format!("image folder, {count}, labels from the file names <set>_<idx>_<label>")
    } else if named > 0 {
        format!(
            "image folder, {count}, unlabelled ({named} of {n} file names look like <set>_<idx>_<label>; \
             all must to be used as labels)"
        )
    } else {
        format!("image folder, {count}, unlabelled")
    };
    Ok(Source {
        description,
        records,
        blocks: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foolbox_names() {
        assert_eq!(foolbox_label("cifar10_03_0"), Some(0));
        assert_eq!(foolbox_label("imagenet_10_541"), Some(541));
        assert_eq!(foolbox_label("fashionMNIST_19_0"), Some(0));
        assert_eq!(foolbox_label("my_set_3_7"), Some(7));
        assert_eq!(foolbox_label("cat"), None);
        assert_eq!(foolbox_label("03_7"), None);
        assert_eq!(foolbox_label("x_03_seven"), None);
        assert_eq!(foolbox_label("_03_7"), None);
    }
}
