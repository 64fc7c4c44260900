//! CIFAR-10 / CIFAR-100 binary files: fixed-size records, label byte(s) followed
//! by 3072 bytes (1024 red, 1024 green, 1024 blue; each 32x32 row-major).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{file_name, list_files, read_exact_growing, Pixels, Record, Source, Src};
use crate::{Error, Result};

const PIXELS: usize = 3 * 32 * 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Cifar10,
    Cifar100,
}

impl Kind {
    fn record(self) -> usize {
        match self {
            Kind::Cifar10 => 1 + PIXELS,
            Kind::Cifar100 => 2 + PIXELS,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Cifar10 => "CIFAR-10",
            Kind::Cifar100 => "CIFAR-100",
        }
    }
    fn flag(self) -> &'static str {
        match self {
            Kind::Cifar10 => "cifar10",
            Kind::Cifar100 => "cifar100",
        }
    }
    fn other(self) -> Kind {
        match self {
            Kind::Cifar10 => Kind::Cifar100,
            Kind::Cifar100 => Kind::Cifar10,
        }
    }
}

/// What a name says: "100" anywhere means CIFAR-100; "cifar10"/"cifar-10"/the CIFAR-10
/// batch names mean CIFAR-10.
fn hint(name: &str) -> Option<Kind> {
    let n = name.to_ascii_lowercase();
    if n.contains("100") {
        Some(Kind::Cifar100)
    } else if [
        "cifar10",
        "cifar-10",
        "cifar_10",
        "data_batch",
        "test_batch",
    ]
    .iter()
    .any(|k| n.contains(k))
    {
        Some(Kind::Cifar10)
    } else {
        None
    }
}

/// Decides the kind of one file from `forced`, its name (then its folder's), and
/// which record size divides its length.
fn kind_of(path: &Path, len: u64, forced: Option<Kind>) -> Result<Kind> {
    let divides = |k: Kind| len.is_multiple_of(k.record() as u64);
    let not_multiple = |k: Kind, why: &str| {
        let mut m = format!(
            "{len} bytes is not a whole number of {} records ({} bytes: {}label + 3072 pixels){why}",
            k.name(),
            k.record(),
            if k == Kind::Cifar100 { "coarse + fine " } else { "" },
        );
        if divides(k.other()) {
            m.push_str(&format!(
                "; it is a whole number of {} records: pass --data-format {}",
                k.other().name(),
                k.other().flag()
            ));
        } else {
            m.push_str(&format!(
                " nor of {} records ({} bytes): truncated or not a CIFAR binary",
                k.other().name(),
                k.other().record()
            ));
        }
        Error::invalid(path, m)
    };
    if len == 0 {
        return Err(Error::invalid(path, "is empty"));
    }
    if let Some(k) = forced {
        return if divides(k) {
            Ok(k)
        } else {
            Err(not_multiple(k, ""))
        };
    }
    let by_name = hint(&file_name(path)).or_else(|| {
        path.parent()
            .and_then(|p| p.file_name())
            .and_then(|n| hint(&n.to_string_lossy()))
    });
    if let Some(k) = by_name {
        return if divides(k) {
            Ok(k)
        } else {
            Err(not_multiple(k, " (the kind taken from the name)"))
        };
    }
    match (divides(Kind::Cifar10), divides(Kind::Cifar100)) {
        (true, false) => Ok(Kind::Cifar10),
        (false, true) => Ok(Kind::Cifar100),
        (true, true) => Err(Error::invalid(
            path,
            format!(
                "{len} bytes is a whole number of both CIFAR-10 (3073-byte) and CIFAR-100 (3074-byte) \
                 records and the name does not say which: pass --data-format cifar10 or cifar100"
            ),
        )),
        (false, false) => Err(Error::invalid(
            path,
            format!(
                "{len} bytes is a whole number of neither CIFAR-10 records (3073 bytes: label + 3072 pixels) \
                 nor CIFAR-100 records (3074 bytes: coarse + fine label + 3072 pixels)"
            ),
        )),
    }
}

/// One file's records, at most `want` of them, appended to `records` / `blocks`.
fn read_one(
    path: &Path,
    forced: Option<Kind>,
    want: Option<usize>,
    records: &mut Vec<Record>,
    blocks: &mut Vec<Pixels>,
) -> Result<(Kind, usize, usize)> {
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    let kind = kind_of(path, len, forced)?;
    let rec = kind.record();
    let n_file = (len / rec as u64) as usize;
    let n = want.map_or(n_file, |w| w.min(n_file));
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let (data, _) = read_exact_growing(f, (n * rec) as u64).map_err(|e| Error::io(path, e))?;
    if data.len() != n * rec {
        return Err(Error::invalid(
            path,
            format!(
                "file shrank while reading: wanted {} bytes, got {}",
                n * rec,
                data.len()
            ),
        ));
    }
    let shared = Arc::new(path.to_path_buf());
    let fname = file_name(path);
    let block = blocks.len();
    for i in 0..n {
        let r = &data[i * rec..(i + 1) * rec];
        let label = match kind {
            Kind::Cifar10 => {
                if r[0] > 9 {
                    return Err(Error::invalid(
                        path,
                        format!("record {i}: CIFAR-10 label {} is out of range 0..=9", r[0]),
                    ));
                }
                r[0] as usize
            }
            Kind::Cifar100 => {
                if r[0] > 19 {
                    return Err(Error::invalid(
                        path,
                        format!(
                            "record {i}: CIFAR-100 coarse label {} is out of range 0..=19",
                            r[0]
                        ),
                    ));
                }
                if r[1] > 99 {
                    return Err(Error::invalid(
                        path,
                        format!(
                            "record {i}: CIFAR-100 fine label {} is out of range 0..=99",
                            r[1]
                        ),
                    ));
                }
                r[1] as usize
            }
        };
        records.push(Record {
            path: shared.clone(),
            index: Some(i),
            name: format!("{fname} record {i}"),
            label: Some(label),
            src: Src::Block {
                block,
                offset: i * rec + (rec - PIXELS),
                h: 32,
                w: 32,
                c: 3,
                planar: true,
            },
        });
    }
    blocks.push(Pixels::U8(data));
    Ok((kind, n, n_file))
}

/// `n` records in the files, of which `read` were read (the limit).
fn describe(kind: Kind, files: &[PathBuf], split: &str, n: usize, read: usize) -> String {
    let labels = if kind == Kind::Cifar100 {
        " (fine labels)"
    } else {
        ""
    };
    let what = if files.len() == 1 {
        file_name(&files[0])
    } else {
        format!(
            "{} files ({})",
            files.len(),
            files
                .iter()
                .map(|p| file_name(p))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let mut d = format!("{} binary{labels}, {split}{what}, {n} records", kind.name());
    if read < n {
        d.push_str(&format!(", first {read} kept"));
    }
    d
}

pub(crate) fn read_file(path: &Path, forced: Option<Kind>, limit: Option<usize>) -> Result<Source> {
    let mut records = Vec::new();
    let mut blocks = Vec::new();
    let (kind, read, n) = read_one(path, forced, limit, &mut records, &mut blocks)?;
    Ok(Source {
        description: describe(kind, &[path.to_path_buf()], "", n, read),
        records,
        blocks,
    })
}

/// A folder of CIFAR binaries: its test files (`test*.bin`) when it has any, else
/// every `.bin`, sorted; all of one kind.
pub(crate) fn read_dir(dir: &Path, forced: Option<Kind>, limit: Option<usize>) -> Result<Source> {
    let bins: Vec<PathBuf> = list_files(dir)?
        .into_iter()
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e.to_string_lossy().eq_ignore_ascii_case("bin"))
        })
        .collect();
    if bins.is_empty() {
        return Err(Error::invalid(dir, "holds no CIFAR .bin files"));
    }
    let tests: Vec<PathBuf> = bins
        .iter()
        .filter(|p| file_name(p).to_ascii_lowercase().starts_with("test"))
        .cloned()
        .collect();
    let (files, split) = if tests.is_empty() {
        (bins, "")
    } else {
        (tests, "test split: ")
    };
    let mut records = Vec::new();
    let mut blocks = Vec::new();
    let mut kind: Option<Kind> = None;
    let (mut read, mut total) = (0usize, 0usize);
    for f in &files {
        let want = limit.map(|l| l.saturating_sub(read));
        let k = if want == Some(0) {
            // Past the limit: only the kind and count, so that a mixed or broken
            // folder is an error whatever the limit.
            let len = std::fs::metadata(f).map_err(|e| Error::io(f, e))?.len();
            let k = kind_of(f, len, forced)?;
            total += (len / k.record() as u64) as usize;
            k
        } else {
            let (k, r, n) = read_one(f, forced, want, &mut records, &mut blocks)?;
            read += r;
            total += n;
            k
        };
        check_same(dir, f, kind, k)?;
        kind = Some(k);
    }
    let kind = kind.unwrap_or(Kind::Cifar10);
    let description = describe(kind, &files, split, total, read);
    Ok(Source {
        description,
        records,
        blocks,
    })
}

fn check_same(dir: &Path, f: &Path, seen: Option<Kind>, k: Kind) -> Result<()> {
    match seen {
        Some(s) if s != k => Err(Error::invalid(
            dir,
            format!(
                "mixes {} and {} files ({} is {}); point at one file or pass --data-format",
                s.name(),
                k.name(),
                file_name(f),
                k.name()
            ),
        )),
        _ => Ok(()),
    }
}
