//! The model hyper-parameters of a llama GGUF and the `config.json` built from them.
//!
//! Keys follow transformers' `GGUF_CONFIG_MAPPING["llama"]`: `context_length`, `block_count`,
//! `feed_forward_length`, `embedding_length`, `rope.dimension_count` (head_dim), `rope.freq_base`,
//! `attention.head_count(_kv)`, `attention.layer_norm_rms_epsilon`, `vocab_size` (else the token
//! count). `tie_word_embeddings` is true when there is no `output.weight`.

use serde_json::{json, Map, Value};

use super::convert::OutDtype;
use super::reader::GgufFile;
use super::tokenizer::GgufVocab;
use super::GgufError;

/// The model hyper-parameters read from `llama.*` metadata.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LlamaParams {
    pub hidden: u64,
    pub ffn: u64,
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub vocab: u64,
    pub context: u64,
    pub rms_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Value>,
    pub tied: bool,
}

/// Largest value accepted for a model dimension or count: far above any real model, small enough
/// that products of two of them cannot overflow u64.
const MAX_DIM: u64 = 1 << 24;

fn meta_u64(g: &GgufFile, key: &str) -> Result<Option<u64>, GgufError> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_DIM).contains(&n) => Ok(Some(n)),
            _ => Err(GgufError::BadMetadata {
                key: key.into(),
                reason: format!("{v:?} is not an integer in 1..={MAX_DIM}"),
            }),
        },
    }
}

fn meta_f64(g: &GgufFile, key: &str) -> Result<Option<f64>, GgufError> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() => Ok(Some(x)),
            _ => Err(GgufError::BadMetadata {
                key: key.into(),
                reason: format!("{v:?} is not a finite number"),
            }),
        },
    }
}

impl LlamaParams {
    pub fn from_gguf(g: &GgufFile) -> Result<Self, GgufError> {
        let arch = g
            .get("general.architecture")
            .ok_or_else(|| GgufError::MissingKey("general.architecture".into()))?
            .as_str()
            .ok_or_else(|| GgufError::BadMetadata {
                key: "general.architecture".into(),
                reason: "not a string".into(),
            })?;
        if arch != "llama" {
            return Err(GgufError::UnsupportedModel(format!(
                "architecture {arch:?} (only \"llama\" is converted)"
            )));
        }
        let req = |k: &str| {
            meta_u64(g, &format!("llama.{k}"))?
                .ok_or_else(|| GgufError::MissingKey(format!("llama.{k}")))
        };
        let hidden = req("embedding_length")?;
        let heads = req("attention.head_count")?;
        let kv_heads = meta_u64(g, "llama.attention.head_count_kv")?.unwrap_or(heads);
        let head_dim = match meta_u64(g, "llama.rope.dimension_count")? {
            Some(d) => d,
            None => meta_u64(g, "llama.attention.key_length")?.unwrap_or(hidden / heads),
        };
        if heads % kv_heads != 0 || head_dim % 2 != 0 {
            return Err(GgufError::UnsupportedModel(format!(
                "{heads} heads, {kv_heads} KV heads, head_dim {head_dim}: need heads divisible by KV heads and an even head_dim"
            )));
        }
        let vocab = match meta_u64(g, "llama.vocab_size")? {
            Some(v) => v,
            None => g
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|a| a.len() as u64)
                .unwrap_or(0),
        };
        let rope_scaling = match g.get("llama.rope.scaling.type").and_then(|v| v.as_str()) {
            Some("none") | None => meta_f64(g, "llama.rope.scale_linear")?
                .map(|f| json!({"rope_type": "linear", "factor": f})),
            Some(ty) => {
                let mut m = Map::new();
                m.insert("rope_type".into(), json!(ty));
                if let Some(f) = meta_f64(g, "llama.rope.scaling.factor")? {
                    m.insert("factor".into(), json!(f));
                }
                if let Some(n) = meta_u64(g, "llama.rope.scaling.original_context_length")? {
                    m.insert("original_max_position_embeddings".into(), json!(n));
                }
                if let Some(a) = meta_f64(g, "llama.rope.scaling.attn_factor")? {
                    m.insert("attention_factor".into(), json!(a));
                }
                Some(Value::Object(m))
            }
        };
        Ok(LlamaParams {
            hidden,
            ffn: req("feed_forward_length")?,
            layers: req("block_count")?,
            heads,
            kv_heads,
            head_dim,
            vocab,
            context: req("context_length")?,
            rms_eps: meta_f64(g, "llama.attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
            rope_theta: meta_f64(g, "llama.rope.freq_base")?.unwrap_or(10_000.0),
            rope_scaling,
            tied: g.tensor("output.weight").is_none(),
        })
    }

    /// `config.json` for `LlamaForCausalLM`.
    pub fn config_json(&self, vocab: &GgufVocab<'_>, dtype: OutDtype) -> Value {
        let id = |t: &Option<(u32, String)>| t.as_ref().map(|t| t.0);
        let mut c = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.ffn,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.context,
            "vocab_size": self.vocab,
            "tie_word_embeddings": self.tied,
            "attention_bias": false,
            "mlp_bias": false,
            "bos_token_id": id(&vocab.special.bos),
            "eos_token_id": id(&vocab.special.eos),
            "pad_token_id": id(&vocab.special.pad),
            "unk_token_id": id(&vocab.special.unk),
            "torch_dtype": dtype.torch_name(),
            "dtype": dtype.torch_name(),
        });
        if let (Some(s), Some(obj)) = (&self.rope_scaling, c.as_object_mut()) {
            obj.insert("rope_scaling".into(), s.clone());
        }
        c
    }
}
