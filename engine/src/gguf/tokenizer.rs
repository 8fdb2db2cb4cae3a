//! Building `tokenizer.json` and `tokenizer_config.json` from a GGUF's `tokenizer.*` metadata.
//!
//! The target is bit-for-bit the tokenizer transformers builds when it loads the same GGUF
//! (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`, transformers 5.x,
//! `integrations/gguf/gguf_tokenizer_mapping.py`), so that the `tokenizers` crate on our file gives
//! the same ids. For `tokenizer.ggml.model == "gpt2"` (byte-level BPE) that is:
//!
//! * model: BPE over the file's tokens, where a token using any character outside the GPT-2
//!   byte alphabet is respelled from its UTF-8 bytes, and the file's merges, split on `' '`;
//! * pre-tokenizer: `ByteLevel` with GPT-2's split regex (no prefix space), except for the
//!   `tokenizer.ggml.pre` values transformers knows a split regex for, where it is
//!   `Sequence[Split(regex, Isolated), ByteLevel(use_regex=false)]`;
//! * decoder `ByteLevel`; no normalizer; a `TemplateProcessing` post-processor adding BOS/EOS only
//!   where `add_bos_token` / `add_eos_token` say so (SmolLM2: neither);
//! * added tokens: the tokens typed CONTROL (3) that are spelled in the byte alphabet, as special;
//!   those typed USER_DEFINED (4) that are vocabulary keys, as non-special; plus the
//!   bos/eos/unk/pad tokens, as special.
//!
//! One deliberate difference: transformers 5.x has no mapping for `pre = "smollm"` and falls back
//! to GPT-2's regex, which keeps digit runs together, where the model's own `tokenizer.json` and
//! llama.cpp split digits one by one. We write the model's own pre-tokenizer (the one it was
//! trained with). The ids differ from transformers-on-GGUF only where whitespace runs end in a
//! digit (`"a  1"`) and for a few `\p{N}` symbols (`" ½"`); the reference fixture records both.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use super::reader::{GgufFile, GgufValue};
use super::GgufError;

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*",
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
const GPT4O_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// The split regex transformers uses for a `tokenizer.ggml.pre` value, if it overrides GPT-2's.
fn split_regex(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3_SPLIT,
        "tekken" => TEKKEN_SPLIT,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_SPLIT,
        "qwen35" => QWEN35_SPLIT,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O_SPLIT,
        _ => return None,
    })
}

/// GPT-2's byte-to-character table: printable bytes stand for themselves, the other 68 map to
/// U+0100.. in byte order.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        table[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or('\u{FFFD}'); // 256..324: always valid
            next += 1;
            c
        };
    }
    table
}

/// The special tokens the GGUF names, as strings (`None` where absent or out of range).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct SpecialTokens {
    pub bos: Option<(u32, String)>,
    pub eos: Option<(u32, String)>,
    pub unk: Option<(u32, String)>,
    pub pad: Option<(u32, String)>,
}

/// The `tokenizer.*` metadata a conversion needs, read and type-checked.
pub(crate) struct GgufVocab<'a> {
    pub model: &'a str,
    pub pre: Option<&'a str>,
    pub tokens: Vec<&'a str>,
    pub token_types: Vec<i64>,
    pub merges: Vec<&'a str>,
    pub special: SpecialTokens,
    pub add_bos: bool,
    pub add_eos: bool,
    pub chat_template: Option<&'a str>,
}

fn str_array<'a>(g: &'a GgufFile, key: &str) -> Result<Option<Vec<&'a str>>, GgufError> {
    let Some(v) = g.get(key) else { return Ok(None) };
    let bad = || GgufError::BadMetadata {
        key: key.into(),
        reason: "expected an array of strings".into(),
    };
    let arr = v.as_array().ok_or_else(bad)?;
    arr.iter()
        .map(|x| x.as_str().ok_or_else(bad))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn opt_str<'a>(g: &'a GgufFile, key: &str) -> Result<Option<&'a str>, GgufError> {
    match g.get(key) {
        None => Ok(None),
        Some(GgufValue::String(s)) => Ok(Some(s)),
        Some(v) => Err(GgufError::BadMetadata {
            key: key.into(),
            reason: format!("expected a string, got {}", v.type_name()),
        }),
    }
}

fn opt_bool(g: &GgufFile, key: &str) -> Result<Option<bool>, GgufError> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or_else(|| GgufError::BadMetadata {
            key: key.into(),
            reason: format!("expected a bool, got {}", v.type_name()),
        }),
    }
}

impl<'a> GgufVocab<'a> {
    /// Reads the tokenizer metadata of `g`.
    pub fn from_gguf(g: &'a GgufFile) -> Result<Self, GgufError> {
        let model = opt_str(g, "tokenizer.ggml.model")?
            .ok_or_else(|| GgufError::MissingKey("tokenizer.ggml.model".into()))?;
        let tokens = str_array(g, "tokenizer.ggml.tokens")?
            .ok_or_else(|| GgufError::MissingKey("tokenizer.ggml.tokens".into()))?;
        let token_types = match g.get("tokenizer.ggml.token_type") {
            None => Vec::new(),
            Some(v) => {
                let bad = || GgufError::BadMetadata {
                    key: "tokenizer.ggml.token_type".into(),
                    reason: format!("expected an array of {} integers", tokens.len()),
                };
                let arr = v.as_array().ok_or_else(bad)?;
                if arr.len() != tokens.len() {
                    return Err(bad());
                }
                arr.iter()
                    .map(|x| x.as_i64().ok_or_else(bad))
                    .collect::<Result<_, _>>()?
            }
        };
        let merges = str_array(g, "tokenizer.ggml.merges")?.unwrap_or_default();
        let special_id = |key: &str| -> Result<Option<(u32, String)>, GgufError> {
            let Some(v) = g.get(key) else { return Ok(None) };
            let id = v
                .as_u64()
                .filter(|&i| (i as usize) < tokens.len() && i <= u32::MAX as u64)
                .ok_or_else(|| GgufError::BadMetadata {
                    key: key.into(),
                    reason: format!("{v:?} is not a token id below {}", tokens.len()),
                })?;
            Ok(Some((id as u32, tokens[id as usize].to_string())))
        };
        let special = SpecialTokens {
            bos: special_id("tokenizer.ggml.bos_token_id")?,
            eos: special_id("tokenizer.ggml.eos_token_id")?,
            unk: special_id("tokenizer.ggml.unknown_token_id")?,
            pad: special_id("tokenizer.ggml.padding_token_id")?,
        };
        // transformers defaults add_bos_token to true only for sentencepiece ("llama") vocabularies.
        let add_bos = opt_bool(g, "tokenizer.ggml.add_bos_token")?.unwrap_or(model == "llama");
        let add_eos = opt_bool(g, "tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        Ok(GgufVocab {
            model,
            pre: opt_str(g, "tokenizer.ggml.pre")?,
            tokens,
            token_types,
            merges,
            special,
            add_bos,
            add_eos,
            chat_template: opt_str(g, "tokenizer.chat_template")?,
        })
    }

    /// `tokenizer.json` for the `tokenizers` crate (see the module docs for what it contains).
    pub fn tokenizer_json(&self) -> Result<Value, GgufError> {
        if self.model != "gpt2" {
            return Err(GgufError::UnsupportedModel(format!(
                "tokenizer.ggml.model {:?} (only byte-level BPE, \"gpt2\", is converted)",
                self.model
            )));
        }
        let table = bytes_to_unicode();
        let alphabet: std::collections::HashSet<char> = table.iter().copied().collect();
        let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));

        // Later duplicates win, as in a Python dict comprehension.
        let mut vocab: HashMap<String, u32> = HashMap::with_capacity(self.tokens.len());
        for (id, t) in self.tokens.iter().enumerate() {
            let key = if in_alphabet(t) {
                t.to_string()
            } else {
                t.bytes().map(|b| table[b as usize]).collect()
            };
            vocab.insert(key, id as u32);
        }
        if self.merges.is_empty() {
            return Err(GgufError::MissingKey("tokenizer.ggml.merges".into()));
        }
        let mut merges = Vec::with_capacity(self.merges.len());
        for m in &self.merges {
            let mut parts = m.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) if vocab.contains_key(a) && vocab.contains_key(b) => {
                    merges.push(json!([a, b]))
                }
                _ => {
                    return Err(GgufError::BadMetadata {
                        key: "tokenizer.ggml.merges".into(),
                        reason: format!(
                            "merge {m:?} is not two vocabulary tokens separated by one space"
                        ),
                    })
                }
            }
        }

        // Added tokens, keyed by id so each appears once; special wins over plain.
        let mut added: std::collections::BTreeMap<u32, (String, bool)> = Default::default();
        let ty = |i: usize| self.token_types.get(i).copied().unwrap_or(1);
        for (i, t) in self.tokens.iter().enumerate() {
            if ty(i) == TOKEN_TYPE_CONTROL && in_alphabet(t) {
                if let Some(&id) = vocab.get(*t) {
                    added.insert(id, (t.to_string(), true));
                }
            }
        }
        let s = &self.special;
        for (_, t) in [&s.bos, &s.eos, &s.unk, &s.pad].into_iter().flatten() {
            if let Some(&id) = vocab.get(t.as_str()) {
                added.insert(id, (t.clone(), true));
            }
        }
        for (i, t) in self.tokens.iter().enumerate() {
            if ty(i) == TOKEN_TYPE_USER_DEFINED {
                if let Some(&id) = vocab.get(*t) {
                    added.entry(id).or_insert((t.to_string(), false));
                }
            }
        }
        let added_tokens: Vec<Value> = added
            .into_iter()
            .map(|(id, (content, special))| {
                json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": special})
            })
            .collect();

        let pre_tokenizer = match self.pre.and_then(split_regex) {
            // SmolLM's own tokenizer.json (and llama.cpp's `smollm`): every digit alone, then
            // GPT-2's byte-level split. transformers 5.x has no mapping for it (see module docs).
            _ if self.pre == Some("smollm") => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            ]}),
            Some(re) => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
            ]}),
            None => {
                json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
            }
        };

        let vocab: Map<String, Value> = vocab.into_iter().map(|(k, v)| (k, json!(v))).collect();
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added_tokens,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": self.post_processor()?,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges,
            },
        }))
    }

    /// `TemplateProcessing` as transformers' `update_post_processor` builds it:
    /// `[BOS] $A [EOS]` for one sequence, `[BOS] $A [EOS] [BOS] $B:1 [EOS]` for a pair.
    fn post_processor(&self) -> Result<Value, GgufError> {
        let need = |flag: bool,
                    tok: &Option<(u32, String)>,
                    key: &str|
         -> Result<Option<(u32, String)>, GgufError> {
            match (flag, tok) {
                (false, _) => Ok(None),
                (true, Some(t)) => Ok(Some(t.clone())),
                (true, None) => Err(GgufError::MissingKey(format!(
                    "tokenizer.ggml.{key}_token_id"
                ))),
            }
        };
        let bos = need(self.add_bos, &self.special.bos, "bos")?;
        let eos = need(self.add_eos, &self.special.eos, "eos")?;
        let special = |t: &(u32, String), type_id: u32| json!({"SpecialToken": {"id": t.1, "type_id": type_id}});
        let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
        let mut single = Vec::new();
        let mut pair = Vec::new();
        for (name, type_id, out) in [("A", 0u32, &mut single), ("B", 1, &mut pair)] {
            if let Some(b) = &bos {
                out.push(special(b, type_id));
            }
            out.push(seq(name, type_id));
            if let Some(e) = &eos {
                out.push(special(e, type_id));
            }
        }
        let pair: Vec<Value> = single.iter().cloned().chain(pair).collect();
        let mut specials = Map::new();
        for t in [&bos, &eos].into_iter().flatten() {
            specials.insert(
                t.1.clone(),
                json!({"id": t.1, "ids": [t.0], "tokens": [t.1]}),
            );
        }
        Ok(
            json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials}),
        )
    }

    /// `tokenizer_config.json`: special tokens as strings, `add_bos_token`, the chat template.
    pub fn tokenizer_config_json(&self, model_max_length: u64) -> Value {
        let name = |t: &Option<(u32, String)>| t.as_ref().map(|t| t.1.clone());
        let mut cfg = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "bos_token": name(&self.special.bos),
            "eos_token": name(&self.special.eos),
            "unk_token": name(&self.special.unk),
            "pad_token": name(&self.special.pad),
            "clean_up_tokenization_spaces": false,
            "model_max_length": model_max_length,
        });
        if let (Some(t), Some(obj)) = (self.chat_template, cfg.as_object_mut()) {
            obj.insert("chat_template".into(), json!(t));
        }
        cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_matches_gpt2() {
        let t = bytes_to_unicode();
        assert_eq!(t[b'!' as usize], '!');
        assert_eq!(t[b' ' as usize], 'Ġ'); // U+0120
        assert_eq!(t[b'\n' as usize], 'Ċ'); // U+010A
        assert_eq!(t[0], '\u{100}');
        assert_eq!(t[0xAD], '\u{143}');
        let distinct: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }
}
