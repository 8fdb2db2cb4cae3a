//! The model's tokenizer (`tokenizer.json`, via the `tokenizers` crate), its special tokens and
//! chat template (`tokenizer_config.json` / `chat_template.jinja`), and a streaming decoder.

use std::path::Path;

use serde_json::Value;

use crate::chat::ChatTemplate;
use crate::error::{EngineError, Result};

/// Tokenizer plus the special tokens and chat template of a model directory.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    /// Ids that end generation (config, generation config and the eos token, deduplicated).
    pub eos_ids: Vec<u32>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub chat_template: Option<ChatTemplate>,
}

fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| EngineError::Config {
            path: path.to_path_buf(),
            msg: format!("not valid JSON: {e}"),
        })
}

fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => Vec::new(),
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` and the special tokens of `dir`; `config_eos` are the ids from
    /// `config.json`.
    pub fn from_dir(dir: &Path, config_eos: &[u32]) -> Result<TextTokenizer> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(EngineError::Tokenizer(format!(
                "{} not found",
                path.display()
            )));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))?;
        let cfg = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let bos_token = token_string(cfg.get("bos_token"));
        let eos_token = token_string(cfg.get("eos_token"));
        let mut eos_ids = config_eos.to_vec();
        if let Some(gen) = read_json(&dir.join("generation_config.json"))? {
            eos_ids.extend(ids_of(gen.get("eos_token_id")));
        }
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            eos_ids.push(id);
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();

        let template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string),
            _ => {
                let p = dir.join("chat_template.jinja");
                if p.exists() {
                    Some(std::fs::read_to_string(&p).map_err(|e| EngineError::io(&p, e))?)
                } else {
                    None
                }
            }
        };
        let chat_template = template
            .map(|t| ChatTemplate::new(t, bos_token.clone(), eos_token.clone()))
            .transpose()?;
        Ok(TextTokenizer {
            inner,
            eos_ids,
            bos_token,
            eos_token,
            chat_template,
        })
    }

    /// Token ids of `text`, with the special tokens the tokenizer's post-processor adds (for
    /// raw text of a model without `add_bos_token`, none).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.inner
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Turns a stream of ids into text deltas, holding back bytes of an incomplete UTF-8 character
/// (decoded as U+FFFD) until the token that completes it arrives.
#[derive(Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl StreamDecoder {
    /// Adds a token; returns the new text it completes, if any.
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let now = tok.decode(&self.ids[self.prefix..])?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            let delta = now.get(before.len()..).map(str::to_string);
            if delta.is_some() {
                self.prefix = self.read;
                self.read = self.ids.len();
            }
            return Ok(delta);
        }
        Ok(None)
    }

    /// Whatever is still held back (at the end of generation).
    pub fn flush(&mut self, tok: &TextTokenizer) -> Result<Option<String>> {
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let now = tok.decode(&self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(now
            .get(before.len()..)
            .filter(|d| !d.is_empty())
            .map(str::to_string))
    }
}
