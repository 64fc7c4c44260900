//! onnx-micronet: compress trained ONNX image classifiers and score them by the
//! NeurIPS 2019 MicroNet challenge rules.
//!
//! Data flows one way: bytes -> [`onnx::Model`] -> [`graph::Graph`] view -> passes
//! -> model -> bytes, with scoring and validation reading the model from the side.
//! The library never prints; the `onnx-micronet` binary is a thin CLI over it.
//!
//! Layers, top first (every arrow points down): `optimize` -> `recipe` ->
//! `passes` | `score` (siblings: neither imports the other) -> `repr` (how
//! tensors are represented in the file) -> `engine`, `graph` -> `onnx` -> `error`.

pub mod data;
pub mod engine;
pub mod error;
pub mod graph;
pub mod html;
pub mod inspect;
pub mod onnx;
pub mod optimize;
pub mod passes;
pub mod recipe;
pub mod repr;
pub mod score;
pub mod validate;

use std::path::Path;

pub use error::{Error, Result};

/// How to load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Check the graph structure (missing values, cycles) after decoding.
    pub check_graph: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { check_graph: true }
    }
}

/// Loads a model and checks it: decoding and tensor sizes ([`onnx::io::load`]),
/// then the graph's structure ([`graph::check`]); errors name the file.
pub fn load(path: &Path) -> Result<onnx::Model> {
    load_with(path, &LoadOptions::default())
}

/// [`load`] with options.
pub fn load_with(path: &Path, opts: &LoadOptions) -> Result<onnx::Model> {
    checked(onnx::io::load(path)?, path, opts)
}

/// Decodes a model from bytes and checks it as [`load`] does. `dir` is the folder
/// external data `location`s are relative to (`None`: external data is an error).
pub fn decode_model(
    bytes: bytes::Bytes,
    path: &Path,
    dir: Option<&Path>,
    opts: &LoadOptions,
) -> Result<onnx::Model> {
    checked(onnx::io::decode_model(bytes, path, dir)?, path, opts)
}

fn checked(model: onnx::Model, path: &Path, opts: &LoadOptions) -> Result<onnx::Model> {
    if opts.check_graph {
        graph::check(model.graph()).map_err(|e| Error::invalid(path, e.to_string()))?;
    }
    Ok(model)
}
