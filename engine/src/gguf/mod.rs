//! GGUF import: a reader for GGUF files, dequantisation of the common ggml tensor types, and
//! conversion of a llama-architecture GGUF into a Hugging Face `LlamaForCausalLM` directory
//! (config, safetensors weights, tokenizer) that the rest of farsight loads.
//!
//! The format is specified in ggml's `docs/gguf.md`
//! (<https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>); the block layouts of the
//! quantised types are ggml's `ggml-common.h`. Versions 2 and 3 (64-bit lengths) are read,
//! little-endian only. The conversion reproduces what transformers does when it loads a GGUF
//! (`transformers/modeling_gguf_pytorch_utils.py`, `transformers/integrations/gguf/`).
//!
//! Module layout:
//! * [`reader`]: [`GgufFile`] and tensor infos, with hard caps on every length; `value`: [`GgufValue`];
//! * [`dequant`]: ggml types and their dequantisation to `f32`;
//! * `convert`: [`convert_gguf`] and its options and summary; `config`: `config.json`;
//! * `tokenizer`: `tokenizer.json` / `tokenizer_config.json` from the GGUF vocabulary;
//! * `error`: [`GgufError`].

// `u64::is_multiple_of` needs Rust 1.87; the workspace supports 1.80.
#![allow(clippy::manual_is_multiple_of)]

mod config;
mod convert;
mod cursor;
pub mod dequant;
mod error;
pub mod reader;
mod tokenizer;
mod value;

#[cfg(test)]
mod tests;

pub use convert::{convert_file, convert_gguf, ConvertOptions, ConvertSummary, OutDtype};
pub use dequant::GgmlType;
pub use error::GgufError;
pub use reader::{GgufFile, GgufValue, TensorInfo};
