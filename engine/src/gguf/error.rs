//! The error type of the GGUF module.
//!
//! Every variant names what was wrong (field, offset, value), so that a corrupt or unsupported file
//! can be diagnosed from the message alone. Parsing never panics on file-controlled data: every
//! problem ends up here.

use std::path::PathBuf;

/// Everything that can go wrong while reading or converting a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// An I/O error, with the path it happened on.
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The first four bytes are not `GGUF`.
    #[error("not a GGUF file: bad magic {found:#010x} (expected 0x46554747, \"GGUF\")")]
    BadMagic { found: u32 },

    /// A version this reader does not support (only v2 and v3 use 64-bit lengths).
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    UnsupportedVersion(u32),

    /// The file ended before a field could be read.
    #[error("unexpected end of file reading {field} at offset {offset} (need {need} bytes, file has {len})")]
    Truncated {
        field: &'static str,
        offset: u64,
        need: u64,
        len: u64,
    },

    /// A length or count read from the file is above the reader's hard cap or cannot fit in what is
    /// left of the file.
    #[error("{field} at offset {offset} is {value}, above the limit {limit}")]
    LimitExceeded {
        field: &'static str,
        offset: u64,
        value: u64,
        limit: u64,
    },

    /// A field has a value that is not allowed (unknown type id, bad bool, bad alignment, ...).
    #[error("invalid {field} at offset {offset}: {reason}")]
    Invalid {
        field: &'static str,
        offset: u64,
        reason: String,
    },

    /// A string that is not valid UTF-8.
    #[error("{field} at offset {offset} is not valid UTF-8")]
    Utf8 { field: &'static str, offset: u64 },

    /// The same metadata key appears twice.
    #[error("duplicate metadata key {key:?}")]
    DuplicateKey { key: String },

    /// The same tensor name appears twice.
    #[error("duplicate tensor name {name:?}")]
    DuplicateTensor { name: String },

    /// A tensor's shape or data range does not fit the file.
    #[error("tensor {name:?}: {reason}")]
    BadTensor { name: String, reason: String },

    /// A tensor type this crate cannot dequantise.
    #[error("unsupported tensor type {type_name} for tensor {tensor}")]
    UnsupportedTensorType { type_name: String, tensor: String },

    /// A tensor that was asked for is not in the file.
    #[error("tensor {0:?} not found")]
    TensorNotFound(String),

    /// A metadata key that the conversion needs is absent.
    #[error("missing metadata key {0:?}")]
    MissingKey(String),

    /// A metadata key has an unexpected type or value.
    #[error("metadata key {key:?}: {reason}")]
    BadMetadata { key: String, reason: String },

    /// The model in the file is not something the converter handles.
    #[error("unsupported model: {0}")]
    UnsupportedModel(String),

    /// Building or writing an output file failed.
    #[error("writing {file}: {reason}")]
    Output { file: String, reason: String },
}

impl GgufError {
    /// Wraps an `io::Error` with the path it concerns.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        GgufError::Io {
            path: path.into(),
            source,
        }
    }
}
