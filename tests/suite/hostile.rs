//! Hostile inputs: a deterministic, bounded mutation test over the fixtures.
//!
//! Mutations (a fixed xorshift stream, so every run tries the same inputs):
//! bit flips and byte overwrites (mostly in the protobuf structure, not inside
//! weight payloads), truncations, corrupted length varints of any length-delimited
//! field at any depth, and decoded-then-re-encoded models whose dims, graph input
//! shapes or node attributes are blown up (huge, negative, zero). External data
//! gets its own cases on the real dynamo export: locations that escape the folder
//! (absolute, `..`, a file link, a folder link, NUL bytes, the folder itself) and
//! offsets/lengths that overflow.
//!
//! Every mutant goes through the library (load in `catch_unwind`, with a per-thread
//! allocation counter; then inspect, fold, prune, score, save and reload) and a share
//! of them through the `optimize` CLI (with a timeout). Nothing may panic or hang;
//! the loader may not allocate more than the bytes justify; errors are one line;
//! the CLI exits 0 (and wrote a model that loads) or 2 (and wrote nothing, not even
//! a temporary file); the input is never touched.
//!
//! `ONNX_MICRONET_HOSTILE_SCALE=N` multiplies the number of mutants (default 1; the
//! opt-in long run is e.g. 50). Failing mutants are kept under `target/hostile-failures/`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use bytes::Bytes;
use onnx_micronet::onnx::proto::{
    tensor_proto::DataLocation, tensor_shape_proto::dimension::Value as Dim, type_proto,
    ModelProto, StringStringEntryProto,
};
use onnx_micronet::onnx::{self, SaveOptions};
use onnx_micronet::passes::prune::PruneSection;
use onnx_micronet::passes::Context;
use onnx_micronet::recipe::Recipe;
use onnx_micronet::score::{self, ScoreOptions};
use onnx_micronet::{decode_model, LoadOptions};
use prost::Message;

// ---------------------------------------------------------------------------
// A per-thread allocation counter: what the loader allocates for one mutant.
// ---------------------------------------------------------------------------

struct Counting;

thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
    static CURRENT: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    let _ = TRACK.try_with(|t| {
        if t.get() {
            let _ = CURRENT.try_with(|c| {
                let now = c.get() + delta;
                c.set(now);
                let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
            });
        }
    });
}

// SAFETY: forwards to the system allocator; the bookkeeping touches only const-initialised
// thread-locals (no allocation, no re-entry).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size() as isize);
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size() as isize);
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        note(-(l.size() as isize));
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        note(new as isize - l.size() as isize);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result with the peak bytes it allocated on this thread.
fn peak_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    CURRENT.with(|c| c.set(0));
    PEAK.with(|p| p.set(0));
    TRACK.with(|t| t.set(true));
    let r = f();
    TRACK.with(|t| t.set(false));
    (r, PEAK.with(|p| p.get()).max(0) as usize)
}

// ---------------------------------------------------------------------------
// Deterministic randomness and the protobuf structure of a file.
// ---------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

fn read_varint(b: &[u8], mut i: usize) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(i)?;
        i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some((v, i));
        }
    }
    None
}

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

/// A length-delimited field: where its length varint sits and what it frames.
struct LenField {
    len_at: usize,
    len_end: usize,
    payload: std::ops::Range<usize>,
    is_message: bool,
}

/// Parses `range` as a protobuf message, collecting every length-delimited field and
/// recursing into those whose payload parses as a message. False when it does not parse.
fn walk(b: &[u8], range: std::ops::Range<usize>, depth: usize, out: &mut Vec<LenField>) -> bool {
    let mut i = range.start;
    let mut mine = Vec::new();
    while i < range.end {
        let Some((tag, j)) = read_varint(b, i) else {
            return false;
        };
        if tag >> 3 == 0 {
            return false;
        }
        i = match tag & 7 {
            0 => match read_varint(b, j) {
                Some((_, k)) => k,
                None => return false,
            },
            1 => j + 8,
            5 => j + 4,
            2 => {
                let Some((len, k)) = read_varint(b, j) else {
                    return false;
                };
                let Some(end) = k.checked_add(len as usize).filter(|&e| e <= range.end) else {
                    return false;
                };
                let mut inner = Vec::new();
                let is_message = depth < 10 && end > k && walk(b, k..end, depth + 1, &mut inner);
                mine.push(LenField {
                    len_at: j,
                    len_end: k,
                    payload: k..end,
                    is_message,
                });
                mine.extend(inner);
                end
            }
            _ => return false,
        };
        if i > range.end {
            return false;
        }
    }
    out.extend(mine);
    true
}

/// Byte positions of the protobuf structure (tags, lengths, small fields): everything
/// but the payloads of large leaf fields (weights).
fn structure_positions(b: &[u8], fields: &[LenField]) -> Vec<usize> {
    let mut blob = vec![false; b.len()];
    for f in fields {
        if !f.is_message && f.payload.len() > 64 {
            blob[f.payload.clone()].iter_mut().for_each(|x| *x = true);
        }
    }
    (0..b.len()).filter(|&i| !blob[i]).collect()
}

// ---------------------------------------------------------------------------
// Mutations.
// ---------------------------------------------------------------------------

struct Seed {
    name: String,
    bytes: Vec<u8>,
    fields: Vec<LenField>,
    structure: Vec<usize>,
    proto: ModelProto,
    /// The side file that must sit beside the mutant (file name, bytes).
    side: Option<(String, Vec<u8>)>,
}

impl Seed {
    fn new(name: &str, bytes: Vec<u8>, side: Option<(String, Vec<u8>)>) -> Seed {
        let mut fields = Vec::new();
        assert!(
            walk(&bytes, 0..bytes.len(), 0, &mut fields),
            "{name} parses"
        );
        let structure = structure_positions(&bytes, &fields);
        let proto = ModelProto::decode(&bytes[..]).unwrap();
        Seed {
            name: name.into(),
            bytes,
            fields,
            structure,
            proto,
            side,
        }
    }
}

const HUGE_DIMS: &[i64] = &[
    0,
    -1,
    -7,
    1 << 31,
    (1 << 32) + 1,
    1 << 40,
    i64::MAX,
    i64::MIN,
];

/// One mutant of `seed`, and what was done (for the failure report).
fn mutate(seed: &Seed, rng: &mut Rng) -> (Vec<u8>, String) {
    let b = &seed.bytes;
    match rng.below(7) {
        0 | 1 => {
            let mut m = b.clone();
            let flips = 1 + rng.below(4);
            let mut at = Vec::new();
            for _ in 0..flips {
                let pos = if rng.below(5) > 0 {
                    *rng.pick(&seed.structure)
                } else {
                    rng.below(m.len())
                };
                m[pos] ^= 1 << rng.below(8);
                at.push(pos);
            }
            (m, format!("bit flips at {at:?}"))
        }
        2 => {
            let mut m = b.clone();
            let pos = *rng.pick(&seed.structure);
            let v = *rng.pick(&[0x00u8, 0xff, 0x80, 0x7f, 0x0a, 0x12]);
            m[pos] = v;
            (m, format!("byte {pos} := {v:#04x}"))
        }
        3 => {
            let cut = rng.below(b.len());
            (b[..cut].to_vec(), format!("truncated to {cut} bytes"))
        }
        4 => {
            let f = rng.pick(&seed.fields);
            let len = f.payload.len() as u64;
            let new = *rng.pick(&[
                len + 1,
                len.saturating_sub(1),
                0,
                len * 2 + 7,
                len + (1 << 20),
                0x7fff_ffff,
                0xffff_ffff,
                u64::MAX,
                1 << 62,
            ]);
            let mut m = b[..f.len_at].to_vec();
            m.extend(varint(new));
            m.extend_from_slice(&b[f.len_end..]);
            (m, format!("length varint at {} : {len} -> {new}", f.len_at))
        }
        _ => mutate_semantics(seed, rng),
    }
}

/// Decoded, changed, re-encoded: dims, input shapes and attributes blown up.
fn mutate_semantics(seed: &Seed, rng: &mut Rng) -> (Vec<u8>, String) {
    let mut p = seed.proto.clone();
    let g = p.graph.as_mut().unwrap();
    let what = match rng.below(4) {
        0 if !g.initializer.is_empty() => {
            let k = rng.below(g.initializer.len());
            let t = &mut g.initializer[k];
            let d = *rng.pick(HUGE_DIMS);
            if t.dims.is_empty() || rng.below(3) == 0 {
                t.dims.push(d);
            } else {
                let j = rng.below(t.dims.len());
                t.dims[j] = d;
            }
            format!("initializer '{}' dims := {:?}", t.name(), t.dims)
        }
        1 if !g.input.is_empty() => {
            let vi = &mut g.input[0];
            let Some(type_proto::Value::TensorType(tt)) =
                vi.r#type.as_mut().and_then(|t| t.value.as_mut())
            else {
                return (seed.bytes.clone(), "unchanged".into());
            };
            let shape = tt.shape.get_or_insert_with(Default::default);
            if shape.dim.is_empty() {
                return (seed.bytes.clone(), "unchanged".into());
            }
            let j = rng.below(shape.dim.len());
            let v = *rng.pick(&[0, -1, 1 << 20, 1 << 40, i64::MAX]);
            shape.dim[j].value = Some(Dim::DimValue(v));
            format!("input '{}' dim {j} := {v}", vi.name())
        }
        2 => {
            let nodes: Vec<usize> = (0..g.node.len())
                .filter(|&i| !g.node[i].attribute.is_empty())
                .collect();
            if nodes.is_empty() {
                return (seed.bytes.clone(), "unchanged".into());
            }
            let n = &mut g.node[*rng.pick(&nodes)];
            let node_name = n.name().to_string();
            let a = rng.below(n.attribute.len());
            let attr = &mut n.attribute[a];
            let v = *rng.pick(&[0, -1, -3, 1 << 31, i64::MAX, i64::MIN]);
            if !attr.ints.is_empty() {
                let j = rng.below(attr.ints.len());
                attr.ints[j] = v;
            } else {
                attr.i = Some(v);
            }
            format!("node '{node_name}' attribute '{}' := {v}", attr.name())
        }
        _ => {
            // A node reads a different value, or its op changes.
            let k = rng.below(g.node.len());
            let n = &mut g.node[k];
            if rng.below(2) == 0 && !n.input.is_empty() {
                let j = rng.below(n.input.len());
                n.input[j] = String::new();
                format!("node '{}' input {j} := ''", n.name())
            } else {
                let op = *rng.pick(&["Conv", "Gemm", "BatchNormalization", "Add", "Reshape"]);
                n.op_type = Some(op.into());
                format!("node '{}' op := {op}", n.name())
            }
        }
    };
    (p.encode_to_vec(), what)
}

// ---------------------------------------------------------------------------
// Running a mutant.
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Tally {
    library_runs: usize,
    library_loaded: usize,
    cli_runs: usize,
    cli_ok: usize,
    max_alloc_ratio: f64,
    errors: BTreeMap<String, usize>,
    failures: Vec<String>,
}

impl Tally {
    fn fail(&mut self, seed: &str, what: &str, bytes: &[u8], why: String) {
        let dir = root().join("target/hostile-failures");
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("{}-{}.onnx", seed, self.failures.len()));
        std::fs::write(&p, bytes).unwrap();
        self.failures.push(format!(
            "{seed}: {what}: {why} (mutant kept in {})",
            p.display()
        ));
    }

    /// Groups error messages by their shape (digits and quoted names elided).
    fn error_kind(&mut self, msg: &str) {
        let mut k = String::new();
        let mut quoted = false;
        for c in msg.chars() {
            match c {
                '\'' => {
                    quoted = !quoted;
                    k.push(c);
                }
                _ if quoted => {}
                '0'..='9' => {
                    if !k.ends_with('#') {
                        k.push('#')
                    }
                }
                _ => k.push(c),
            }
        }
        let k = k
            .rsplit(".onnx: ")
            .next()
            .unwrap_or(&k)
            .chars()
            .take(90)
            .collect();
        *self.errors.entry(k).or_default() += 1;
    }
}

fn panic_text(e: &Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// Loader allowance: what a decoded model may hold beyond its bytes (names, vectors,
/// the graph view's maps). Payloads stay slices of the input.
fn alloc_allowance(len: usize) -> usize {
    8 * len + (4 << 20)
}

/// The library path: load (with the allocation counter), then everything a loaded
/// model goes through.
fn library(t: &mut Tally, seed: &Seed, what: &str, bytes: &[u8], dir: &Path) {
    t.library_runs += 1;
    let path = dir.join("m.onnx");
    let data = Bytes::copy_from_slice(bytes);
    let (r, peak) = peak_alloc(|| {
        std::panic::catch_unwind(|| decode_model(data, &path, Some(dir), &LoadOptions::default()))
    });
    let side_len = seed.side.as_ref().map_or(0, |s| s.1.len());
    let ratio = peak as f64 / (bytes.len() + side_len).max(1) as f64;
    t.max_alloc_ratio = t.max_alloc_ratio.max(ratio);
    if peak > alloc_allowance(bytes.len()) {
        t.fail(
            &seed.name,
            what,
            bytes,
            format!(
                "loader allocated {peak} bytes for a {}-byte file",
                bytes.len()
            ),
        );
    }
    let model = match r {
        Err(e) => {
            let msg = panic_text(&e);
            return t.fail(&seed.name, what, bytes, format!("loader panicked: {msg}"));
        }
        Ok(Err(e)) => {
            let msg = e.to_string();
            // (A newline here comes from a name in the file; the CLI escapes it.)
            if !msg.contains("m.onnx") {
                t.fail(
                    &seed.name,
                    what,
                    bytes,
                    format!("loader error does not name the file: {msg}"),
                );
            }
            t.error_kind(&msg);
            return;
        }
        Ok(Ok(m)) => m,
    };
    t.library_loaded += 1;
    let stages = std::panic::catch_unwind(|| -> Vec<String> {
        let mut errs = Vec::new();
        if let Err(e) = onnx_micronet::inspect::inspect(&model) {
            errs.push(format!("inspect: {e}"));
        }
        let cx = Context {
            threads: 1,
            ..Default::default()
        };
        let recipe = Recipe {
            prune: Some(PruneSection::from_flag("magnitude:0.5").unwrap()),
            ..Default::default()
        };
        let rewritten = match onnx_micronet::optimize::run(&model, &recipe, &cx) {
            Ok((m, _)) => Some(m),
            Err(e) => {
                errs.push(format!("optimize: {e}"));
                None
            }
        };
        if let Err(e) = score::score(&model, &ScoreOptions::default()) {
            errs.push(format!("score: {e}"));
        }
        if let Some(m) = rewritten {
            let out = dir.join("saved.onnx");
            match onnx::save(&m, &out, &SaveOptions::default()) {
                Ok(_) => {
                    if let Err(e) = onnx_micronet::load(&out) {
                        errs.push(format!("SAVED MODEL DOES NOT LOAD: {e}"));
                    }
                    let _ = std::fs::remove_file(&out);
                }
                Err(e) => errs.push(format!("save: {e}")),
            }
        }
        errs
    });
    match stages {
        Err(e) => {
            let msg = panic_text(&e);
            t.fail(&seed.name, what, bytes, format!("a pass panicked: {msg}"));
        }
        Ok(errs) => {
            for e in errs {
                if e.contains("SAVED MODEL DOES NOT LOAD") {
                    t.fail(&seed.name, what, bytes, e);
                } else {
                    t.error_kind(&e);
                }
            }
        }
    }
}

/// Runs the binary with a deadline; stdout/stderr go to files (no pipe can fill up).
fn run_with_timeout(args: &[&str], dir: &Path, limit: Duration) -> Option<(i32, String)> {
    let err_path = dir.join("stderr.txt");
    let mut child = Command::new(env!("CARGO_BIN_EXE_onnx-micronet"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("binary runs");
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
            std::fs::remove_file(&err_path).unwrap();
            return Some((st.code().unwrap_or(-1), stderr));
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(&err_path);
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The CLI path: `optimize` with the mutant as input (side file beside it) into an
/// empty output folder.
fn cli_run(t: &mut Tally, seed: &Seed, what: &str, in_dir: &Path, out_dir: &Path, extra: &[&str]) {
    t.cli_runs += 1;
    let input = in_dir.join("m.onnx");
    let before = std::fs::read(&input).unwrap();
    let side_before = seed
        .side
        .as_ref()
        .map(|(n, _)| std::fs::read(in_dir.join(n)).unwrap());
    let in_listing = listing(in_dir);
    let out = out_dir.join("out.onnx");
    let mut args = vec![
        "optimize",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--threads",
        "1",
    ];
    args.extend_from_slice(extra);
    let Some((code, stderr)) = run_with_timeout(&args, out_dir, Duration::from_secs(60)) else {
        return t.fail(&seed.name, what, &before, "optimize hung (60 s)".into());
    };
    let mut why = Vec::new();
    match code {
        0 => {
            t.cli_ok += 1;
            if listing(out_dir) != ["out.onnx"] {
                why.push(format!("exit 0 left {:?}", listing(out_dir)));
            } else if let Err(e) = onnx_micronet::load(&out) {
                why.push(format!("exit 0 but the output does not load: {e}"));
            }
        }
        2 => {
            let line = stderr.trim_end();
            if !line.starts_with("error: ") || line.lines().count() != 1 {
                why.push(format!("exit 2 without a one-line error: {stderr}"));
            } else {
                t.error_kind(line.trim_start_matches("error: "));
            }
            if !listing(out_dir).is_empty() {
                why.push(format!("failed run left {:?}", listing(out_dir)));
            }
        }
        c => why.push(format!("exit {c}: {}", stderr.trim_end())),
    }
    if std::fs::read(&input).unwrap() != before {
        why.push("the input was changed".into());
    }
    if let Some(sb) = side_before {
        if std::fs::read(in_dir.join(&seed.side.as_ref().unwrap().0)).unwrap() != sb {
            why.push("the input's side file was changed".into());
        }
    }
    if listing(in_dir) != in_listing {
        why.push(format!("the input folder now holds {:?}", listing(in_dir)));
    }
    for f in listing(out_dir) {
        std::fs::remove_file(out_dir.join(f)).unwrap();
    }
    if !why.is_empty() {
        t.fail(&seed.name, what, &before, why.join("; "));
    }
}

fn seeds() -> Vec<Seed> {
    let dynamo = fixture("mnist_ccexam_dynamo");
    vec![
        Seed::new("tiny_conv", tiny_conv().encode_to_vec(), None),
        Seed::new(
            "efficientnet_style_bn",
            std::fs::read(fixture("efficientnet_style_bn.onnx")).unwrap(),
            None,
        ),
        Seed::new(
            "cifar10_keras_bn",
            std::fs::read(fixture("cifar10_keras_bn.onnx")).unwrap(),
            None,
        ),
        Seed::new(
            "mnist_ccexam_dynamo",
            std::fs::read(dynamo.join("model.onnx")).unwrap(),
            Some((
                "model.onnx.data".into(),
                std::fs::read(dynamo.join("model.onnx.data")).unwrap(),
            )),
        ),
    ]
}

fn scale() -> usize {
    std::env::var("ONNX_MICRONET_HOSTILE_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1)
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir_in(root().join("target")).unwrap()
}

/// Writes the mutant as `m.onnx` (with the seed's side file beside it, renamed
/// to what the model expects) into a fresh input folder.
fn stage(seed: &Seed, bytes: &[u8], dir: &Path) {
    std::fs::write(dir.join("m.onnx"), bytes).unwrap();
    if let Some((name, data)) = &seed.side {
        if !dir.join(name).exists() {
            std::fs::write(dir.join(name), data).unwrap();
        }
    }
}

#[test]
fn mutated_fixtures_never_panic_hang_or_leave_partial_output() {
    let per_seed_library = 400 * scale();
    // Every 8th mutant also goes through the CLI.
    let cli_every = 8;
    let mut t = Tally::default();
    let started = Instant::now();
    for (si, seed) in seeds().iter().enumerate() {
        let in_dir = tmp();
        let out_dir = tmp();
        let mut rng =
            Rng(0x9E37_79B9_7F4A_7C15 ^ (si as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
        for k in 0..per_seed_library {
            let (bytes, what) = mutate(seed, &mut rng);
            stage(seed, &bytes, in_dir.path());
            library(&mut t, seed, &what, &bytes, in_dir.path());
            if k % cli_every == 0 {
                let extra: &[&str] = if k % (2 * cli_every) == 0 {
                    &[]
                } else {
                    &["--prune", "magnitude:0.5"]
                };
                cli_run(&mut t, seed, &what, in_dir.path(), out_dir.path(), extra);
            }
        }
    }
    eprintln!(
        "hostile: {} library runs ({} mutants still loaded and went through inspect, fold+prune, score, save), \
         {} optimize CLI runs ({} exit 0), {:.1} s; peak loader allocation {:.2}x the input bytes",
        t.library_runs,
        t.library_loaded,
        t.cli_runs,
        t.cli_ok,
        started.elapsed().as_secs_f64(),
        t.max_alloc_ratio
    );
    eprintln!("hostile: error kinds seen ({}):", t.errors.len());
    for (k, n) in &t.errors {
        eprintln!("  {n:>5}  {k}");
    }
    assert!(
        t.failures.is_empty(),
        "{} failures:\n{}",
        t.failures.len(),
        t.failures.join("\n")
    );
    // The mutants do exercise both outcomes.
    assert!(t.library_loaded > 0 && t.library_loaded < t.library_runs);
    assert!(t.cli_ok > 0 && t.cli_ok < t.cli_runs);
}

// ---------------------------------------------------------------------------
// External data on the real dynamo export (tests/suite/bad_input.rs covers `../x`, an
// absolute path, a file link, a missing and a short file on a tiny model).
// ---------------------------------------------------------------------------

fn kv(k: &str, v: &str) -> StringStringEntryProto {
    StringStringEntryProto {
        key: Some(k.into()),
        value: Some(v.into()),
    }
}

/// The dynamo export with every external tensor's entries rewritten by `f`.
fn dynamo_with(f: impl Fn(&str, u64, u64) -> Vec<StringStringEntryProto>) -> Vec<u8> {
    let bytes = std::fs::read(fixture("mnist_ccexam_dynamo/model.onnx")).unwrap();
    let mut m = ModelProto::decode(&bytes[..]).unwrap();
    let mut n = 0;
    for t in &mut m.graph.as_mut().unwrap().initializer {
        if t.data_location != Some(DataLocation::External as i32) {
            continue;
        }
        let get = |k: &str| {
            t.external_data
                .iter()
                .find(|e| e.key() == k)
                .map(|e| e.value().to_string())
        };
        let loc = get("location").unwrap();
        let off: u64 = get("offset").map_or(0, |v| v.parse().unwrap());
        let len: u64 = get("length").unwrap().parse().unwrap();
        t.external_data = f(&loc, off, len);
        n += 1;
    }
    assert!(n >= 4, "the dynamo export keeps its weights outside");
    m.encode_to_vec()
}

#[test]
fn external_data_escapes_and_overflows_are_refused_on_the_real_export() {
    let outer = tmp();
    let model_dir = outer.path().join("model");
    let elsewhere = outer.path().join("elsewhere");
    std::fs::create_dir_all(&model_dir).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    let data = std::fs::read(fixture("mnist_ccexam_dynamo/model.onnx.data")).unwrap();
    std::fs::write(model_dir.join("model.onnx.data"), &data).unwrap();
    std::fs::write(elsewhere.join("model.onnx.data"), &data).unwrap();
    let inside = model_dir.join("model.onnx.data");
    let inside_abs = inside.canonicalize().unwrap();
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(&elsewhere, model_dir.join("linkdir")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", model_dir.join("zero")).unwrap();
    }
    std::fs::create_dir_all(model_dir.join("sub")).unwrap();

    let same = |loc: &str| {
        let loc = loc.to_string();
        move |_: &str, off: u64, len: u64| {
            vec![
                kv("location", &loc),
                kv("offset", &off.to_string()),
                kv("length", &len.to_string()),
            ]
        }
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "absolute path to the real side file inside the folder",
            dynamo_with(same(inside_abs.to_str().unwrap())),
            "is absolute",
        ),
        (
            "dot-dot that comes back into the folder",
            dynamo_with(same("sub/../model.onnx.data")),
            "leaves the model's folder",
        ),
        (
            "dot-dot to a sibling folder",
            dynamo_with(same("../elsewhere/model.onnx.data")),
            "leaves the model's folder",
        ),
        (
            "a linked folder pointing outside",
            dynamo_with(same("linkdir/model.onnx.data")),
            "outside the model's folder",
        ),
        (
            "a link to a device",
            dynamo_with(same("zero")),
            "outside the model's folder",
        ),
        (
            "the folder itself",
            dynamo_with(same(".")),
            "is not a regular file",
        ),
        (
            "a NUL byte",
            dynamo_with(same("model.onnx.data\0../../etc/passwd")),
            "tensor '",
        ),
        (
            "backslash dot-dot",
            dynamo_with(same("..\\elsewhere\\model.onnx.data")),
            "leaves the model's folder",
        ),
        (
            "offset + length overflow u64",
            dynamo_with(|loc, _, len| {
                vec![
                    kv("location", loc),
                    kv("offset", &u64::MAX.to_string()),
                    kv("length", &len.to_string()),
                ]
            }),
            "past the end",
        ),
        (
            "a length past the file",
            dynamo_with(|loc, off, _| {
                vec![
                    kv("location", loc),
                    kv("offset", &off.to_string()),
                    kv("length", "99999999999"),
                ]
            }),
            "past the end",
        ),
        (
            "a negative offset",
            dynamo_with(|loc, _, len| {
                vec![
                    kv("location", loc),
                    kv("offset", "-4"),
                    kv("length", &len.to_string()),
                ]
            }),
            "offset '-4' is not a number",
        ),
        (
            "the right length at a shifted offset past the end",
            dynamo_with(|loc, off, len| {
                vec![
                    kv("location", loc),
                    kv("offset", &(off + data.len() as u64).to_string()),
                    kv("length", &len.to_string()),
                ]
            }),
            "past the end",
        ),
    ];
    let out_dir = tmp();
    for (what, bytes, needle) in &cases {
        let p = model_dir.join("m.onnx");
        std::fs::write(&p, bytes).unwrap();
        // Library.
        let r = std::panic::catch_unwind(|| onnx_micronet::load(&p));
        let err = match r {
            Err(_) => panic!("{what}: the loader panicked"),
            Ok(Ok(_)) => panic!("{what}: loaded"),
            Ok(Err(e)) => e.to_string(),
        };
        assert!(err.contains(needle), "{what}: '{needle}' not in: {err}");
        assert!(!err.contains('\n'), "{what}: {err}");
        // CLI.
        let out = out_dir.path().join("out.onnx");
        let Some((code, stderr)) = run_with_timeout(
            &["optimize", p.to_str().unwrap(), "-o", out.to_str().unwrap()],
            out_dir.path(),
            Duration::from_secs(60),
        ) else {
            panic!("{what}: optimize hung")
        };
        assert_eq!(code, 2, "{what}: {stderr}");
        assert!(stderr.contains(needle), "{what}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{what}: {stderr}");
        assert!(listing(out_dir.path()).is_empty(), "{what}: left files");
        assert_eq!(std::fs::read(&p).unwrap(), *bytes);
        assert_eq!(std::fs::read(&inside).unwrap(), data);
    }
    // The same rewrite done right still loads (the cases fail for their reason only).
    let p = model_dir.join("m.onnx");
    std::fs::write(&p, dynamo_with(same("./model.onnx.data"))).unwrap();
    onnx_micronet::load(&p).unwrap();
    eprintln!("hostile: {} external-data cases refused", cases.len());
}

/// Thousands of corrupted length prefixes never make the loader reserve what the
/// length claims: allocation stays within the allowance for each.
#[test]
fn corrupted_lengths_allocate_nothing_the_bytes_do_not_justify() {
    let seed = &seeds()[1];
    let dir = tmp();
    let mut worst = 0usize;
    let mut n = 0;
    for f in seed.fields.iter().take(3000 * scale()) {
        let new = if f.is_message {
            u64::MAX >> 1
        } else {
            0x7fff_fff0
        };
        let mut m = seed.bytes[..f.len_at].to_vec();
        m.extend(varint(new));
        m.extend_from_slice(&seed.bytes[f.len_end..]);
        let path = dir.path().join("m.onnx");
        let data = Bytes::from(m);
        let len = data.len();
        let (r, peak) = peak_alloc(|| {
            std::panic::catch_unwind(|| {
                decode_model(data, &path, Some(dir.path()), &LoadOptions::default())
            })
        });
        assert!(r.is_ok(), "panic with length {new} at byte {}", f.len_at);
        assert!(
            peak <= alloc_allowance(len),
            "length {new} at byte {}: {peak} bytes allocated",
            f.len_at
        );
        worst = worst.max(peak);
        n += 1;
    }
    eprintln!(
        "hostile: {n} corrupted lengths, worst loader allocation {worst} bytes for a {}-byte file",
        seed.bytes.len()
    );
    assert!(n > 1000);
}
