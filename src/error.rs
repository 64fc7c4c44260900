//! The library's error type. Every variant names what it is about (a file, a node,
//! a tensor, an option) so the one line the CLI prints is enough to act on.

use std::path::PathBuf;

/// Errors raised by onnx-micronet's library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The bytes are not a protobuf-encoded ONNX model.
    #[error("{path}: not a valid ONNX protobuf ({source})")]
    Decode {
        path: PathBuf,
        #[source]
        source: prost::DecodeError,
    },

    /// The model decodes but breaks a structural rule (missing value, cycle, ...).
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },

    /// A tensor's declared type, shape and stored bytes disagree, or it uses a
    /// type this operation cannot handle.
    #[error("tensor '{tensor}': {message}")]
    Tensor { tensor: String, message: String },

    /// External data that is missing, out of range, or points outside the model folder.
    #[error("{path}: tensor '{tensor}': external data: {message}")]
    ExternalData {
        path: PathBuf,
        tensor: String,
        message: String,
    },

    /// The graph breaks a structural rule: a value used but never defined, a value
    /// defined twice, a cycle.
    #[error("{0}")]
    Graph(String),

    /// A node attribute of the wrong type, or with a value the operator does not allow.
    #[error("node '{node}': attribute '{attribute}' {message}")]
    Attribute {
        node: String,
        attribute: String,
        message: String,
    },

    /// A request that cannot be carried out as asked (bad option value, output over input, ...).
    #[error("{0}")]
    Usage(String),

    /// A weight-width budget below what the layers outside the allocation already
    /// take (a mean width no plan can meet).
    #[error("{0}")]
    Budget(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }

    pub(crate) fn tensor(tensor: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Tensor {
            tensor: tensor.into(),
            message: message.into(),
        }
    }
}
