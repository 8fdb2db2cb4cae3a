//! Errors of the engine: each names the file, field or value that was wrong.

use std::path::{Path, PathBuf};

/// What went wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("model directory {} not found{hint}", path.display())]
    MissingModel { path: PathBuf, hint: String },
    #[error("{}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
    #[error("{}: {msg}", path.display())]
    Weights { path: PathBuf, msg: String },
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {tokens} tokens but the model's context is {context} tokens")]
    PromptTooLong { tokens: usize, context: usize },
    #[error("invalid setting: {0}")]
    Invalid(String),
    #[error(transparent)]
    Kernel(#[from] farsight_kernels::KernelError),
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
}

impl EngineError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> EngineError {
        EngineError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Result of engine calls.
pub type Result<T> = std::result::Result<T, EngineError>;
