//! Loading and saving ONNX models.
//!
//! Loading memory-maps the file and decodes it with prost; tensor payloads
//! (`raw_data`) stay slices of the map, so a 2 GiB model is not copied. Tensors
//! whose data lives in side files (`data_location = EXTERNAL`) are resolved the
//! same way: each side file is mapped once, and the tensor's `raw_data` becomes a
//! slice of it. A `location` that is absolute, contains `..`, or resolves (through
//! links) outside the model's folder is refused. Every tensor's stored size is
//! checked against its dims before anything is computed from them. The graph's
//! structure (missing values, cycles) is checked one layer up, by
//! `crate::load`, which runs this loader and `graph::check`.
//!
//! Saving writes a temporary file in the target folder and renames it into place,
//! so a failed write never leaves a half-written output, and refuses to write over
//! the input model or any file it reads. The layout is a single file, or the model
//! plus one side file `<output>.data` holding every initializer of at least
//! `external_threshold` bytes (chosen explicitly, or automatically when the single
//! file would pass protobuf's 2 GiB limit).

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use prost::Message;

use super::proto::{
    tensor_proto::DataLocation, GraphProto, ModelProto, StringStringEntryProto, TensorProto,
};
use super::tensor::{check_stored_size, is_external, raw_len, TensorData};
use super::visit::{self, Site};
use crate::error::{Error, Result};

/// Protobuf messages cannot exceed 2 GiB; past this the saver switches to external data.
pub const PROTOBUF_LIMIT: usize = (1 << 31) - 1;

/// A decoded model, with every tensor's data in memory (external data resolved).
#[derive(Debug, Clone)]
pub struct Model {
    pub proto: ModelProto,
    /// The file it was loaded from, if any.
    pub path: Option<PathBuf>,
    /// Side files whose data was read (canonical paths), in first-use order.
    pub external_files: Vec<PathBuf>,
}

impl Model {
    /// The main graph (loading refuses models without one).
    pub fn graph(&self) -> &GraphProto {
        self.proto
            .graph
            .as_ref()
            .expect("loaded models have a graph")
    }

    /// The main graph, to edit.
    pub fn graph_mut(&mut self) -> &mut GraphProto {
        self.proto
            .graph
            .as_mut()
            .expect("loaded models have a graph")
    }

    /// The version of the default operator set (`""` or `ai.onnx`) the model
    /// imports (1 when it imports none).
    pub fn opset(&self) -> i64 {
        self.proto
            .opset_import
            .iter()
            .find(|o| matches!(o.domain(), "" | "ai.onnx"))
            .map(|o| o.version())
            .unwrap_or(1)
    }
}

/// Loads a model: decodes it and checks every tensor's stored size (see the module
/// documentation). `crate::load` also checks the graph.
pub fn load(path: &Path) -> Result<Model> {
    let bytes = map_file(path)?;
    if bytes.is_empty() {
        return Err(Error::invalid(path, "the file is empty"));
    }
    let dir = path.parent().map(|p| {
        if p.as_os_str().is_empty() {
            Path::new(".")
        } else {
            p
        }
    });
    decode_model(bytes, path, dir)
}

/// Decodes a model from bytes. `path` names it in errors; `dir` is the folder
/// that external data `location`s are relative to (`None`: external data is an error).
pub fn decode_model(bytes: Bytes, path: &Path, dir: Option<&Path>) -> Result<Model> {
    let mut proto = ModelProto::decode(bytes).map_err(|source| Error::Decode {
        path: path.to_path_buf(),
        source,
    })?;
    // prost accepts many byte strings that are not ONNX (every field is optional);
    // a model has at least an IR version and a graph.
    if proto.ir_version.is_none() && proto.graph.is_none() {
        return Err(Error::invalid(
            path,
            "not an ONNX model (no ir_version and no graph)",
        ));
    }
    if proto.graph.is_none() {
        return Err(Error::invalid(path, "the model has no graph"));
    }
    let mut external = ExternalFiles::new(path, dir);
    visit::tensors_mut(&mut proto, &mut |t: &mut TensorProto,
                                         _site|
     -> Result<()> {
        if is_external(t) {
            external.resolve(t)?;
        }
        check_stored_size(t).map(|_| ())
    })
    .map_err(|e| match e {
        Error::Tensor { tensor, message } => {
            Error::invalid(path, format!("tensor '{tensor}': {message}"))
        }
        other => other,
    })?;
    Ok(Model {
        proto,
        path: Some(path.to_path_buf()),
        external_files: external.used,
    })
}

/// Maps a file into memory (or reads it, where mapping is not possible).
fn map_file(path: &Path) -> Result<Bytes> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: the map is read-only and private to this process. If another process
    // truncates the file while we hold the map, reads may fault; onnx-micronet never
    // writes to its inputs (outputs go to a new file renamed into place).
    match unsafe { memmap2::Mmap::map(&file) } {
        Ok(map) => Ok(Bytes::from_owner(map)),
        Err(_) => std::fs::read(path)
            .map(Bytes::from)
            .map_err(|e| Error::io(path, e)),
    }
}

/// The side files of one model, each mapped once.
struct ExternalFiles<'a> {
    model_path: &'a Path,
    dir: Option<&'a Path>,
    canonical_dir: Option<PathBuf>,
    maps: HashMap<String, Bytes>,
    used: Vec<PathBuf>,
}

impl<'a> ExternalFiles<'a> {
    fn new(model_path: &'a Path, dir: Option<&'a Path>) -> Self {
        ExternalFiles {
            model_path,
            dir,
            canonical_dir: None,
            maps: HashMap::new(),
            used: Vec::new(),
        }
    }

    fn err(&self, t: &TensorProto, message: impl Into<String>) -> Error {
        Error::ExternalData {
            path: self.model_path.to_path_buf(),
            tensor: t.name().to_string(),
            message: message.into(),
        }
    }

    /// Replaces the tensor's external reference by its bytes.
    fn resolve(&mut self, t: &mut TensorProto) -> Result<()> {
        let mut location = None;
        let mut offset = 0u64;
        let mut length = None;
        for e in &t.external_data {
            let value = e.value();
            match e.key() {
                "location" => location = Some(value.to_string()),
                "offset" => {
                    offset = value
                        .parse()
                        .map_err(|_| self.err(t, format!("offset '{value}' is not a number")))?
                }
                "length" => {
                    length =
                        Some(value.parse::<u64>().map_err(|_| {
                            self.err(t, format!("length '{value}' is not a number"))
                        })?)
                }
                _ => {} // "checksum" and unknown keys carry no layout
            }
        }
        let location = location.ok_or_else(|| self.err(t, "no 'location' entry"))?;
        let data = self.file(t, &location)?;
        let file_len = data.len() as u64;
        let length = length.unwrap_or(file_len.saturating_sub(offset));
        let end = offset
            .checked_add(length)
            .filter(|&end| end <= file_len)
            .ok_or_else(|| {
                self.err(
                    t,
                    format!(
                        "bytes {offset}..{} are past the end of '{location}' ({file_len} bytes)",
                        offset as u128 + length as u128
                    ),
                )
            })?;
        let numel = super::tensor::shape_of(t)?
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| self.err(t, "dims overflow"))?;
        let want = raw_len(t.data_type(), numel)
            .ok_or_else(|| self.err(t, "element type cannot be stored as external data"))?;
        if length != want as u64 {
            return Err(self.err(
                t,
                format!(
                    "'{location}' holds {length} bytes for it but dims {:?} need {want}",
                    t.dims
                ),
            ));
        }
        t.raw_data = Some(data.slice(offset as usize..end as usize));
        t.external_data.clear();
        t.data_location = None;
        Ok(())
    }

    /// The mapped bytes of a side file, checking that `location` stays inside the model folder.
    fn file(&mut self, t: &TensorProto, location: &str) -> Result<Bytes> {
        if let Some(b) = self.maps.get(location) {
            return Ok(b.clone());
        }
        let dir = self.dir.ok_or_else(|| {
            self.err(
                t,
                "the model has external data but no folder to read it from",
            )
        })?;
        let rel = Path::new(location);
        if location.is_empty() {
            return Err(self.err(t, "empty location"));
        }
        if rel.is_absolute() || location.starts_with('/') || location.starts_with('\\') {
            return Err(self.err(
                t,
                format!(
                    "location '{location}' is absolute; it must be relative to the model's folder"
                ),
            ));
        }
        if rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
            || location.contains("..")
        {
            return Err(self.err(
                t,
                format!("location '{location}' leaves the model's folder"),
            ));
        }
        if self.canonical_dir.is_none() {
            self.canonical_dir = Some(dir.canonicalize().map_err(|e| Error::io(dir, e))?);
        }
        let canonical_dir = self.canonical_dir.as_ref().expect("set above");
        let full = dir.join(rel);
        let canonical = full
            .canonicalize()
            .map_err(|e| self.err(t, format!("cannot open '{}': {e}", full.display())))?;
        if !canonical.starts_with(canonical_dir) {
            return Err(self.err(
                t,
                format!(
                    "location '{location}' resolves to '{}', outside the model's folder",
                    canonical.display()
                ),
            ));
        }
        if !canonical.is_file() {
            return Err(self.err(t, format!("location '{location}' is not a regular file")));
        }
        let bytes = map_file(&canonical)?;
        self.used.push(canonical);
        self.maps.insert(location.to_string(), bytes.clone());
        Ok(bytes)
    }
}

/// Where tensor data goes when saving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// One file, unless it would pass protobuf's 2 GiB limit.
    #[default]
    Auto,
    /// Always one file (an error past 2 GiB).
    SingleFile,
    /// The model plus one side file `<output>.data`.
    External,
}

/// How to save.
#[derive(Debug, Clone)]
pub struct SaveOptions {
    pub layout: Layout,
    /// Initializers of at least this many bytes go to the side file.
    pub external_threshold: usize,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            layout: Layout::Auto,
            external_threshold: 1024,
        }
    }
}

/// What a save wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SaveReport {
    pub path: PathBuf,
    pub model_bytes: u64,
    /// The side file, its size and the number of tensors in it.
    pub external: Option<(PathBuf, u64, usize)>,
}

/// Offsets in the side file are multiples of this (lets readers map tensors aligned).
const EXTERNAL_ALIGN: u64 = 64;

/// Saves the model to `path` (see the module documentation).
pub fn save(model: &Model, path: &Path, opts: &SaveOptions) -> Result<SaveReport> {
    let data_path = side_file_path(path)?;
    refuse_overwriting_inputs(model, path)?;
    let external = match opts.layout {
        Layout::SingleFile => false,
        Layout::External => true,
        Layout::Auto => model.proto.encoded_len() > PROTOBUF_LIMIT,
    };
    if !external {
        let len = model.proto.encoded_len();
        if len > PROTOBUF_LIMIT {
            return Err(Error::Usage(format!(
                "{}: the model encodes to {len} bytes, past protobuf's 2 GiB limit; save it with external data",
                path.display()
            )));
        }
        write_atomically(path, |f| encode_into_file(&model.proto, f))?;
        return Ok(SaveReport {
            path: path.to_path_buf(),
            model_bytes: len as u64,
            external: None,
        });
    }

    refuse_overwriting_inputs(model, &data_path)?;
    let location = data_path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            Error::Usage(format!(
                "{}: output name is not valid UTF-8",
                path.display()
            ))
        })?
        .to_string();
    // The proto's payloads are reference-counted slices: this clone copies only the
    // typed repeated fields, which exporters rarely use for large tensors.
    let mut proto = model.proto.clone();
    let mut count = 0usize;
    let mut data_len = 0u64;
    let data_tmp = write_atomically_deferred(&data_path, |f| {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        let mut offset = 0u64;
        visit::tensors_mut(&mut proto, &mut |t: &mut TensorProto,
                                             site|
         -> std::io::Result<()> {
            if site != Site::Initializer {
                return Ok(());
            }
            let raw: Bytes = match t.raw_data.as_ref() {
                Some(r) => r.clone(),
                None => match TensorData::from_proto(t) {
                    Ok(d) => d.to_proto("").raw_data.unwrap_or_default(),
                    Err(_) => return Ok(()), // strings and exotic types stay inline
                },
            };
            if raw.len() < opts.external_threshold {
                return Ok(());
            }
            let pad = offset.next_multiple_of(EXTERNAL_ALIGN) - offset;
            w.write_all(&[0u8; EXTERNAL_ALIGN as usize][..pad as usize])?;
            offset += pad;
            w.write_all(&raw)?;
            let entry = |k: &str, v: String| StringStringEntryProto {
                key: Some(k.to_string()),
                value: Some(v),
            };
            t.external_data = vec![
                entry("location", location.clone()),
                entry("offset", offset.to_string()),
                entry("length", raw.len().to_string()),
            ];
            t.data_location = Some(DataLocation::External as i32);
            t.raw_data = None;
            t.float_data.clear();
            t.int32_data.clear();
            t.int64_data.clear();
            t.double_data.clear();
            t.uint64_data.clear();
            offset += raw.len() as u64;
            count += 1;
            Ok(())
        })?;
        data_len = offset;
        w.flush()
    })?;
    let buf = proto.encode_to_vec();
    if buf.len() > PROTOBUF_LIMIT {
        return Err(Error::Usage(format!(
            "{}: even with external data the graph encodes to {} bytes, past protobuf's 2 GiB limit",
            path.display(),
            buf.len()
        )));
    }
    let model_tmp = write_atomically_deferred(path, |f| f.write_all(&buf))?;
    // Both files are complete: put the data in place first, then the model that refers to it.
    persist(data_tmp, &data_path)?;
    persist(model_tmp, path)?;
    Ok(SaveReport {
        path: path.to_path_buf(),
        model_bytes: buf.len() as u64,
        external: Some((data_path, data_len, count)),
    })
}

/// Encodes straight into the file: small fields through a 1 MiB buffer, tensor
/// payloads (`Bytes`, usually slices of the mapped input) written as they are. Peak
/// memory stays near the input's size instead of input + output.
fn encode_into_file(proto: &ModelProto, file: &mut File) -> std::io::Result<()> {
    let mut sink = FileSink {
        file,
        buf: Vec::with_capacity(FileSink::CAPACITY),
        error: None,
    };
    proto
        .encode(&mut sink)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    sink.flush();
    match sink.error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A `BufMut` over a file. `BufMut` cannot fail, so the first write error is kept
/// and reported after encoding.
struct FileSink<'f> {
    file: &'f mut File,
    buf: Vec<u8>,
    error: Option<std::io::Error>,
}

impl FileSink<'_> {
    const CAPACITY: usize = 1 << 20;

    /// Writes the buffer out (keeping the first error).
    fn flush(&mut self) {
        if !self.buf.is_empty() && self.error.is_none() {
            if let Err(e) = self.file.write_all(&self.buf) {
                self.error = Some(e);
            }
        }
        self.buf.clear();
    }
}

// SAFETY: `chunk_mut` hands out the vector's spare capacity, and `advance_mut`
// only extends the length over bytes the caller has just written there.
unsafe impl bytes::BufMut for FileSink<'_> {
    fn remaining_mut(&self) -> usize {
        usize::MAX - self.buf.len()
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        let len = self.buf.len() + cnt;
        assert!(len <= self.buf.capacity(), "advance_mut past the chunk");
        // SAFETY: the caller initialised `cnt` bytes of the chunk from `chunk_mut`.
        unsafe { self.buf.set_len(len) };
    }

    fn chunk_mut(&mut self) -> &mut bytes::buf::UninitSlice {
        if self.buf.len() == self.buf.capacity() {
            self.flush();
        }
        bytes::buf::UninitSlice::uninit(self.buf.spare_capacity_mut())
    }

    fn put<T: bytes::Buf>(&mut self, mut src: T)
    where
        Self: Sized,
    {
        while src.has_remaining() {
            let chunk = src.chunk();
            let n = chunk.len();
            if n >= Self::CAPACITY / 4 {
                // A tensor payload: write it through, not via the buffer.
                self.flush();
                if self.error.is_none() {
                    if let Err(e) = self.file.write_all(chunk) {
                        self.error = Some(e);
                    }
                }
            } else {
                self.put_slice(chunk);
            }
            src.advance(n);
        }
    }

    fn put_slice(&mut self, mut src: &[u8]) {
        while !src.is_empty() {
            if self.buf.len() == self.buf.capacity() {
                self.flush();
            }
            let room = self.buf.capacity() - self.buf.len();
            let n = room.min(src.len());
            self.buf.extend_from_slice(&src[..n]);
            src = &src[n..];
        }
    }
}

/// `<output>.data`, next to the output.
fn side_file_path(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::Usage(format!("'{}' is not a file name", path.display())))?;
    let mut data = name.to_os_string();
    data.push(".data");
    Ok(path.with_file_name(data))
}

/// Refuses to write `out` when it is the model's own file or one of its side files.
fn refuse_overwriting_inputs(model: &Model, out: &Path) -> Result<()> {
    let inputs = model.path.iter().chain(model.external_files.iter());
    for input in inputs {
        if same_file(input, out) {
            return Err(Error::Usage(format!(
                "refusing to write '{}': it is an input of this run ('{}'); choose another output path",
                out.display(),
                input.display()
            )));
        }
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(ma), Ok(mb)) => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::MetadataExt;
                ma.dev() == mb.dev() && ma.ino() == mb.ino()
            }
            #[cfg(not(unix))]
            {
                let _ = (ma, mb);
                a.canonicalize().ok() == b.canonicalize().ok()
            }
        }
        _ => false,
    }
}

/// Checks, before any work, that `path` can be written as a file: it is not a
/// folder, its folder exists and accepts a new file. `what` names the option
/// (`-o`, `--report`) in the error. `-` (standard output) passes.
pub fn check_output_path(path: &Path, what: &str) -> Result<()> {
    if path.as_os_str() == "-" {
        return Ok(());
    }
    let shown = path.display();
    let trailing = path.as_os_str().to_string_lossy().ends_with(['/', '\\']);
    if trailing || path.is_dir() {
        return Err(Error::Usage(format!(
            "{what} '{shown}' is a folder: give a file path (e.g. '{}')",
            path.join("model.onnx").display()
        )));
    }
    let dir = parent_dir(path);
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::Usage(format!(
                "{what} '{shown}': '{}' is not a folder",
                dir.display()
            )))
        }
        Err(_) => {
            return Err(Error::Usage(format!(
                "{what} '{shown}': folder '{}' does not exist",
                dir.display()
            )))
        }
    }
    tempfile::Builder::new()
        .prefix(".onnx-micronet-probe-")
        .tempfile_in(dir)
        .map(drop)
        .map_err(|e| {
            Error::Usage(format!(
                "{what} '{shown}': cannot create a file in '{}' ({})",
                dir.display(),
                e.kind()
            ))
        })
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes a complete temporary file next to `path`, not yet renamed.
fn write_atomically_deferred(
    path: &Path,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<tempfile::NamedTempFile> {
    let dir = parent_dir(path);
    let mut tmp = tempfile::Builder::new()
        .prefix(".onnx-micronet-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    write(tmp.as_file_mut())
        .and_then(|_| tmp.as_file().sync_all())
        .map_err(|e| Error::io(path, e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = tmp
            .as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644));
    }
    Ok(tmp)
}

fn persist(tmp: tempfile::NamedTempFile, path: &Path) -> Result<()> {
    tmp.persist(path)
        .map(|_| ())
        .map_err(|e| Error::io(path, e.error))
}

/// Writes `path` through a temporary file renamed into place.
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = write_atomically_deferred(path, write)?;
    persist(tmp, path)
}
