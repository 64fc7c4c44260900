//! Every integration test in one binary: one build and one link instead of one per
//! file, and libtest spreads all the tests over the cores at once (cargo runs test
//! binaries one after another, so a binary with one long test left cores idle).
//! Each module is one former `tests/<name>.rs`; `cargo test --test suite prune::`
//! runs one of them.

mod bad_input;
mod common;
mod conformance;
mod data_readers;
mod determinism;
mod equalize;
mod fold_bn;
mod fp16;
mod hostile;
mod html_report;
mod io_roundtrip;
mod optimize_cli;
mod pack;
mod prune;
mod prune_channels;
mod quantize;
mod realworld;
mod referee;
mod score_ops;
mod score_ref_parity;
mod validate_ort;
