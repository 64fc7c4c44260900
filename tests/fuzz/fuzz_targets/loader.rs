//! The loader on arbitrary bytes: decode, size checks, graph checks. Must return an
//! error, never panic, and never allocate what the bytes do not justify (libFuzzer's
//! -malloc_limit_mb catches that; run with -rss_limit_mb=512).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use onnx_micronet::{decode_model, LoadOptions};

fuzz_target!(|data: &[u8]| {
    let _ = decode_model(
        bytes::Bytes::copy_from_slice(data),
        Path::new("fuzz.onnx"),
        None,
        &LoadOptions::default(),
    );
});
