//! `config.json` of a Hugging Face Llama-family model directory: Llama 2/3/3.1/3.2, Mistral,
//! Qwen2, SmolLM2. Fields farsight cannot honour are refused by name rather than ignored.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::EngineError;
use crate::rope::RopeScaling;

/// The architecture facts the forward pass needs.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// `model_type` (llama, mistral, qwen2).
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2, or Llama/Mistral with `attention_bias`).
    pub qkv_bias: bool,
    /// The output projection carries a bias (Llama/Mistral with `attention_bias`).
    pub o_bias: bool,
    /// Mistral's sliding window, when it is in force.
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Declared weight dtype (`torch_dtype` / `dtype`), if any.
    pub dtype: Option<String>,
}

const ARCHITECTURES: &[(&str, &str)] = &[
    ("LlamaForCausalLM", "llama"),
    ("MistralForCausalLM", "mistral"),
    ("Qwen2ForCausalLM", "qwen2"),
];

fn err(path: &Path, msg: impl Into<String>) -> EngineError {
    EngineError::Config {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn get_usize(m: &Map<String, Value>, key: &str, path: &Path) -> Result<Option<usize>, EngineError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
            err(
                path,
                format!("`{key}` must be a non-negative integer, got {v}"),
            )
        }),
    }
}

fn need_usize(m: &Map<String, Value>, key: &str, path: &Path) -> Result<usize, EngineError> {
    get_usize(m, key, path)?.ok_or_else(|| err(path, format!("missing `{key}`")))
}

fn get_f64(m: &Map<String, Value>, key: &str, path: &Path) -> Result<Option<f64>, EngineError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| err(path, format!("`{key}` must be a number, got {v}"))),
    }
}

fn get_bool(m: &Map<String, Value>, key: &str, path: &Path) -> Result<Option<bool>, EngineError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| err(path, format!("`{key}` must be true or false, got {v}"))),
    }
}

fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => Vec::new(),
    }
}

impl ModelConfig {
    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<ModelConfig, EngineError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| EngineError::io(&path, e))?;
        Self::from_json(&text, &path)
    }

    /// Parses the text of a `config.json` (`path` names it in errors).
    pub fn from_json(text: &str, path: &Path) -> Result<ModelConfig, EngineError> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| err(path, format!("not valid JSON: {e}")))?;
        let m = v
            .as_object()
            .ok_or_else(|| err(path, "not a JSON object"))?;

        let model_type = m
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let arch = m
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str);
        match arch {
            Some(a) => match ARCHITECTURES.iter().find(|(name, _)| *name == a) {
                Some(_) => {}
                None => {
                    let known: Vec<_> = ARCHITECTURES.iter().map(|(a, _)| *a).collect();
                    return Err(EngineError::Unsupported(format!(
                        "architecture `{a}` in {} (supported: {})",
                        path.display(),
                        known.join(", ")
                    )));
                }
            },
            None if ARCHITECTURES.iter().any(|(_, t)| *t == model_type) => {}
            None => {
                return Err(EngineError::Unsupported(format!(
                    "model_type `{model_type}` in {} (supported: llama, mistral, qwen2)",
                    path.display()
                )))
            }
        }
        let model_type = if model_type.is_empty() {
            let a = arch.unwrap_or_default();
            ARCHITECTURES
                .iter()
                .find(|(n, _)| *n == a)
                .map(|(_, t)| t.to_string())
                .unwrap_or_default()
        } else if ARCHITECTURES.iter().any(|(_, t)| *t == model_type) {
            model_type
        } else {
            return Err(EngineError::Unsupported(format!(
                "model_type `{model_type}` in {}",
                path.display()
            )));
        };

        if let Some(act) = m.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(EngineError::Unsupported(format!(
                    "hidden_act `{act}` (only silu)"
                )));
            }
        }
        if get_bool(m, "mlp_bias", path)? == Some(true) {
            return Err(EngineError::Unsupported("mlp_bias = true".into()));
        }

        let hidden_size = need_usize(m, "hidden_size", path)?;
        let num_heads = need_usize(m, "num_attention_heads", path)?;
        let num_kv_heads = get_usize(m, "num_key_value_heads", path)?.unwrap_or(num_heads);
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(err(
                path,
                format!("{num_heads} attention heads cannot share {num_kv_heads} KV heads"),
            ));
        }
        let head_dim = get_usize(m, "head_dim", path)?.unwrap_or(hidden_size / num_heads);
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(err(
                path,
                format!("head_dim {head_dim} must be even and positive"),
            ));
        }
        let max_position_embeddings =
            get_usize(m, "max_position_embeddings", path)?.unwrap_or(2048);

        // Rope: transformers 4 writes rope_theta + rope_scaling; transformers 5 rope_parameters.
        let params = m.get("rope_parameters").and_then(Value::as_object);
        let rope_theta = match params
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
        {
            Some(t) => t,
            None => get_f64(m, "rope_theta", path)?.unwrap_or(10000.0),
        };
        let scaling_obj = match m.get("rope_scaling") {
            Some(Value::Object(o)) => Some(o),
            Some(Value::Null) | None => params,
            Some(other) => {
                return Err(err(
                    path,
                    format!("`rope_scaling` must be an object, got {other}"),
                ))
            }
        };
        let rope_scaling = RopeScaling::from_json(scaling_obj, max_position_embeddings)
            .map_err(|msg| err(path, msg))?;
        if let Some(f) = get_f64(m, "partial_rotary_factor", path)? {
            if (f - 1.0).abs() > 1e-9 {
                return Err(EngineError::Unsupported(format!(
                    "partial_rotary_factor {f}"
                )));
            }
        }

        let attention_bias = get_bool(m, "attention_bias", path)? == Some(true);
        let qkv_bias = model_type == "qwen2" || attention_bias;
        let o_bias = model_type != "qwen2" && attention_bias;
        let sliding_window = match model_type.as_str() {
            "mistral" => get_usize(m, "sliding_window", path)?,
            "qwen2" if get_bool(m, "use_sliding_window", path)? == Some(true) => {
                return Err(EngineError::Unsupported(
                    "qwen2 use_sliding_window = true".into(),
                ))
            }
            _ => None,
        };
        let dtype = m
            .get("torch_dtype")
            .or_else(|| m.get("dtype"))
            .and_then(Value::as_str)
            .map(str::to_string);

        Ok(ModelConfig {
            model_type,
            hidden_size,
            intermediate_size: need_usize(m, "intermediate_size", path)?,
            num_layers: need_usize(m, "num_hidden_layers", path)?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: need_usize(m, "vocab_size", path)?,
            rms_norm_eps: get_f64(m, "rms_norm_eps", path)?.unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings: get_bool(m, "tie_word_embeddings", path)?.unwrap_or(false),
            qkv_bias,
            o_bias,
            sliding_window,
            bos_token_id: token_ids(m.get("bos_token_id")).first().copied(),
            eos_token_ids: token_ids(m.get("eos_token_id")),
            dtype,
        })
    }

    /// Tokens a sequence may hold: `max_position_embeddings`, stretched by the factor of dynamic
    /// NTK scaling (which exists to run past it).
    pub fn context_length(&self) -> usize {
        match self.rope_scaling {
            RopeScaling::Dynamic { factor, .. } if factor > 1.0 => {
                (self.max_position_embeddings as f64 * factor) as usize
            }
            _ => self.max_position_embeddings,
        }
    }

    /// Width of one token's K (or V) over all KV heads.
    pub fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Width of one token's Q over all heads.
    pub fn q_width(&self) -> usize {
        self.num_heads * self.head_dim
    }
}

#[cfg(test)]
mod tests;
