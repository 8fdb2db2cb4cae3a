//! GGUF import (reader, dequantisation, conversion to a Hugging Face model directory).

/// Placeholder until the reader lands.
#[derive(Debug, thiserror::Error)]
#[error("gguf: {0}")]
pub struct GgufError(pub String);
