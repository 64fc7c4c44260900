//! onnx-micronet: compress trained ONNX image classifiers and score them by the
//! NeurIPS 2019 MicroNet challenge rules.
//!
//! Data flows one way: bytes -> [`onnx::Model`] -> [`graph::Graph`] view -> passes
//! -> model -> bytes, with scoring and validation reading the model from the side.
//! The library never prints; the `onnx-micronet` binary is a thin CLI over it.

pub mod data;
pub mod engine;
pub mod error;
pub mod graph;
pub mod inspect;
pub mod onnx;
pub mod optimize;
pub mod passes;
pub mod recipe;
pub mod score;
pub mod validate;

pub use error::{Error, Result};
