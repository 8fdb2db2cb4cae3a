//! Errors a backend op can return.

/// A backend op failed.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// Operands whose shapes do not fit together (a bug in the caller, reported not panicked).
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// An argument outside its domain (a sampling temperature, top-p or draw).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The backend could not allocate a buffer.
    #[error("out of memory on {device}: {what}")]
    OutOfMemory { device: String, what: String },
    /// The requested device is not usable.
    #[error("device unavailable: {0}")]
    Device(String),
    /// A file operation failed (the KV disk tier); `what` says which operation, and for a full
    /// disk or a file size limit (ENOSPC, EFBIG) says so in words.
    #[error("I/O error on {}: {what}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        what: String,
        source: std::io::Error,
    },
}
