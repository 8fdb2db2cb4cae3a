//! farsight-engine: the model. Config and weights (safetensors, GGUF import), tokenizer and chat
//! template, the Llama forward pass written once over a `Backend`, sampling and generation.

pub mod gguf;
