//! Passkey retrieval (Mohtashami & Jaggi): a number hidden at a given depth of repetitive filler;
//! the model is asked for it at the end and its greedy answer is parsed.

use farsight_kernels::{Backend, DType};

use crate::error::{EngineError, Result};
use crate::generate::{generate_in, GenerateOptions};
use crate::kv::{new_sparse_store, new_store, Attention};
use crate::model::Model;
use crate::sampler::SamplingParams;
use crate::tokenizer::TextTokenizer;

const INTRO: &str =
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. \
I will quiz you about the important information there.\n";
const FILLER: &str =
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
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
    /// The decoded text the answer was parsed from.
    pub output: String,
    pub correct: bool,
    /// Tokens of the needle sentence (the key said twice) and of the key's digits in it, when
    /// the needle's tokens were found in the prompt.
    pub needle_tokens: Option<usize>,
    pub key_tokens: Option<usize>,
    /// Of those, the ones still in the KV store after the answer (fewer only under a
    /// `--host-kv-budget`, when eviction dropped them).
    pub needle_tokens_kept: Option<usize>,
    pub key_tokens_kept: Option<usize>,
    /// The KV store's footprint after the answer (tokens kept and evicted under a budget).
    pub kv_memory: farsight_offload::KvMemory,
}

/// A prompt of about `length` tokens with `key` at `depth`.
pub fn passkey_prompt(
    tok: &TextTokenizer,
    length: usize,
    depth: f64,
    key: &str,
) -> Result<Vec<u32>> {
    Ok(passkey_prompt_needle(tok, length, depth, key)?.0)
}

/// As [`passkey_prompt`], with the prompt positions of the needle sentence when its tokens
/// appear as they do alone (they do for tokenizers that split at the spaces around it).
pub fn passkey_prompt_needle(
    tok: &TextTokenizer,
    length: usize,
    depth: f64,
    key: &str,
) -> Result<(Vec<u32>, Option<std::ops::Range<usize>>)> {
    let needle = format!(" The pass key is {key}. Remember it. {key} is the pass key.");
    let fixed = tok.encode(&format!("{INTRO}{needle}{QUESTION}"))?.len();
    let unit = tok.encode(FILLER)?.len().max(1);
    if length < fixed + unit {
        return Err(EngineError::Invalid(format!(
            "passkey length {length} is too short (at least {} tokens)",
            fixed + unit
        )));
    }
    let units = (length - fixed) / unit;
    let before = ((units as f64) * depth.clamp(0.0, 1.0)).round() as usize;
    let text = format!(
        "{INTRO}{}{needle}{}{QUESTION}",
        FILLER.repeat(before),
        FILLER.repeat(units - before)
    );
    let ids = tok.encode(&text)?;
    let alone = tok.encode(&needle)?;
    let at = if alone.is_empty() {
        None
    } else {
        ids.windows(alone.len()).position(|w| w == alone.as_slice())
    };
    Ok((ids, at.map(|s| s..s + alone.len())))
}

/// The first run of ASCII digits in `text`.
pub fn first_number(text: &str) -> Option<String> {
    let start = text.find(|c: char| c.is_ascii_digit())?;
    let digits: String = text[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
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
    let (prompt, needle) = passkey_prompt_needle(tok, length, depth, key)?;
    let digit = |p: &usize| {
        tok.decode(&prompt[*p..*p + 1])
            .is_ok_and(|t| !t.trim().is_empty() && t.trim().chars().all(|c| c.is_ascii_digit()))
    };
    let key_pos: Option<Vec<usize>> = needle.clone().map(|r| r.filter(digit).collect());
    let opts = GenerateOptions {
        max_new_tokens: answer_tokens(key),
        prefill_chunk,
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        kv_dtype,
        attention: attention.clone(),
        ..GenerateOptions::default()
    };
    // A typed sparse store, to see which of the needle's tokens survived eviction.
    let (g, kept): (_, Box<dyn Fn(usize) -> bool>) = match attention {
        Attention::DoubleSparse(s) => {
            let mut kv = new_sparse_store(model, kv_dtype, s)?;
            let g = generate_in(
                model,
                tok,
                &prompt,
                &opts,
                &mut kv,
                &mut |_, _| {},
                &mut |_| {},
            )?;
            (g, Box::new(move |p| kv.slot_of(p).is_some()))
        }
        Attention::Dense => {
            let mut kv = new_store(model, kv_dtype, attention)?;
            (
                generate_in(
                    model,
                    tok,
                    &prompt,
                    &opts,
                    kv.as_mut(),
                    &mut |_, _| {},
                    &mut |_| {},
                )?,
                Box::new(|_| true),
            )
        }
    };
    let answer = first_number(&g.text);
    Ok(PasskeyTrial {
        tokens: prompt.len(),
        depth,
        key: key.to_string(),
        correct: answer.as_deref() == Some(key),
        answer,
        output: g.text.clone(),
        needle_tokens: needle.as_ref().map(|r| r.len()),
        key_tokens: key_pos.as_ref().map(|k| k.len()),
        needle_tokens_kept: needle.map(|r| r.filter(|&p| kept(p)).count()),
        key_tokens_kept: key_pos.map(|k| k.into_iter().filter(|&p| kept(p)).count()),
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
