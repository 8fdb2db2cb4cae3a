//! Passkey retrieval (Mohtashami & Jaggi): a number hidden at a given depth of repetitive filler;
//! the model is asked for it at the end and its greedy answer is parsed.

use farsight_kernels::{Backend, DType};

use crate::error::{EngineError, Result};
use crate::generate::{generate, GenerateOptions};
use crate::kv::Attention;
use crate::model::Model;
use crate::sampler::SamplingParams;
use crate::tokenizer::TextTokenizer;

const INTRO: &str = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. \
I will quiz you about the important information there.\n";
const FILLER: &str = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
const QUESTION: &str = "\nWhat is the pass key? The pass key is";

/// One retrieval trial.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PasskeyTrial {
    /// Prompt tokens.
    pub tokens: usize,
    /// Where the key sits, as a fraction of the filler (0: start, 1: end).
    pub depth: f64,
    pub key: String,
    /// The model's answer (its first run of digits), if any.
    pub answer: Option<String>,
    pub correct: bool,
    /// The KV store's footprint after the answer (tokens kept and evicted under a budget).
    pub kv_memory: farsight_offload::KvMemory,
}

/// A prompt of about `length` tokens with `key` at `depth`.
pub fn passkey_prompt(tok: &TextTokenizer, length: usize, depth: f64, key: &str) -> Result<Vec<u32>> {
    let needle = format!(" The pass key is {key}. Remember it. {key} is the pass key.");
    let fixed = tok.encode(&format!("{INTRO}{needle}{QUESTION}"))?.len();
    let unit = tok.encode(FILLER)?.len().max(1);
    if length < fixed + unit {
        return Err(EngineError::Invalid(format!("passkey length {length} is too short (at least {} tokens)", fixed + unit)));
    }
    let units = (length - fixed) / unit;
    let before = ((units as f64) * depth.clamp(0.0, 1.0)).round() as usize;
    let text = format!(
        "{INTRO}{}{needle}{}{QUESTION}",
        FILLER.repeat(before),
        FILLER.repeat(units - before)
    );
    tok.encode(&text)
}

/// The first run of ASCII digits in `text`.
pub fn first_number(text: &str) -> Option<String> {
    let start = text.find(|c: char| c.is_ascii_digit())?;
    let digits: String = text[start..].chars().take_while(|c| c.is_ascii_digit()).collect();
    Some(digits)
}

/// Tokens a trial with `key` decodes (what a budget's planned tokens add to the prompt).
pub fn answer_tokens(key: &str) -> usize {
    key.len() + 4
}

/// Runs one trial with greedy decoding, the prompt prefilled in `prefill_chunk`-token calls (a
/// store with a byte budget evicts between them).
#[allow(clippy::too_many_arguments)]
pub fn passkey_trial<B: Backend + 'static>(
    model: &Model<B>,
    tok: &TextTokenizer,
    length: usize,
    depth: f64,
    key: &str,
    kv_dtype: DType,
    attention: &Attention,
    prefill_chunk: usize,
) -> Result<PasskeyTrial> {
    let prompt = passkey_prompt(tok, length, depth, key)?;
    let opts = GenerateOptions {
        max_new_tokens: answer_tokens(key),
        prefill_chunk,
        sampling: SamplingParams { temperature: 0.0, ..SamplingParams::default() },
        kv_dtype,
        attention: attention.clone(),
        ..GenerateOptions::default()
    };
    let g = generate(model, tok, &prompt, &opts, &mut |_, _| {}, &mut |_| {})?;
    let answer = first_number(&g.text);
    Ok(PasskeyTrial {
        tokens: prompt.len(),
        depth,
        key: key.to_string(),
        correct: answer.as_deref() == Some(key),
        answer,
        kv_memory: g.kv_memory,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_parsed() {
        assert_eq!(first_number(" 71432. Remember"), Some("71432".into()));
        assert_eq!(first_number("no digits"), None);
        assert_eq!(first_number("is 0042x"), Some("0042".into()));
    }
}
