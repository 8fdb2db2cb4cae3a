//! farsight-engine: the model. Config and weights (safetensors, GGUF import), tokenizer and chat
//! template, the Llama forward pass written once over a `Backend`, sampling and generation.

pub mod ahead;
pub mod batch;
pub mod calibrate;
pub mod chat;
pub mod config;
pub mod decode;
pub mod error;
pub mod eval;
pub mod generate;
pub mod gguf;
pub mod kv;
pub mod model;
pub mod passkey;
pub mod rope;
pub mod sampler;
pub mod tokenizer;
pub mod weights;

pub use config::ModelConfig;
pub use error::{EngineError, Result};
pub use model::synthetic;
pub use model::{Logits, Model, Output, Segment, Workspace};
pub use tokenizer::TextTokenizer;
