//! onnx-micronet: compress trained ONNX image classifiers and score them by the
//! NeurIPS 2019 MicroNet challenge rules.
//!
//! Data flows one way: bytes -> [`onnx::Model`] -> [`graph::Graph`] view -> passes
//! -> model -> bytes, with scoring and validation reading the model from the side.
//! The library never prints; the `onnx-micronet` binary is a thin CLI over it.

pub mod engine;
pub mod error;
pub mod graph;
pub mod inspect;
pub mod onnx;
pub mod score;

pub use error::{Error, Result};
