//! Generation for one sequence: chunked prefill, then token-by-token decode with sampling,
//! streaming text out as it completes and stopping on EOS, stop strings, the token limit or the
//! end of the model's context.

use std::time::Instant;

use farsight_kernels::{Backend, DType};
use farsight_offload::{DenseKvCache, KvStore};

use crate::error::{EngineError, Result};
use crate::kv::{new_store, Attention};
use crate::model::{Logits, Model, Segment, Workspace};
use crate::sampler::{Sampler, SamplingParams};
use crate::tokenizer::{StreamDecoder, TextTokenizer};

/// What to generate and how.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends before the first occurrence of any of these strings.
    pub stop: Vec<String>,
    /// Prompt tokens per prefill forward call.
    pub prefill_chunk: usize,
    pub kv_dtype: DType,
    /// Dense, or Double Sparsity decode (prefill chunks attend densely).
    pub attention: Attention,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 128,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            prefill_chunk: 512,
            kv_dtype: DType::F32,
            attention: Attention::Dense,
        }
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token.
    Eos,
    /// A stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
    /// The model's context is full.
    Context,
}

/// The result of [`generate`].
#[derive(Clone, Debug)]
pub struct Generation {
    pub prompt_tokens: usize,
    /// Every sampled id (an EOS that ended generation included).
    pub new_token_ids: Vec<u32>,
    /// The text, cut before a stop string, without special tokens.
    pub text: String,
    pub finish: FinishReason,
    /// Prompt forward passes, to the first sampled token.
    pub prefill_s: f64,
    /// Decode forward passes and sampling after the first token.
    pub decode_s: f64,
    /// Decode forward passes (one per new token after the first).
    pub decode_steps: usize,
}

impl Generation {
    /// Decode forward passes per second.
    pub fn decode_tokens_per_s(&self) -> f64 {
        if self.decode_s > 0.0 {
            self.decode_steps as f64 / self.decode_s
        } else {
            0.0
        }
    }
    /// Prompt tokens per second of prefill.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        if self.prefill_s > 0.0 {
            self.prompt_tokens as f64 / self.prefill_s
        } else {
            0.0
        }
    }
}

/// Releases text to the caller while holding back any tail that may start a stop string.
struct StopFilter<'a> {
    stops: &'a [String],
    text: String,
    emitted: usize,
}

impl StopFilter<'_> {
    /// Adds a delta; returns true when a stop string was found (the text is then cut before it).
    fn push(&mut self, delta: &str, out: &mut dyn FnMut(&str)) -> bool {
        let from = self.text.len().saturating_sub(self.stops.iter().map(|s| s.len()).max().unwrap_or(0));
        self.text.push_str(delta);
        let mut from = from;
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min();
        if let Some(at) = hit {
            self.text.truncate(at);
            self.release(at, out);
            return true;
        }
        // Hold back the longest tail that is a proper prefix of a stop string.
        let mut safe = self.text.len();
        for (i, _) in self.text.char_indices().rev().take(64) {
            let tail = &self.text[i..];
            if self.stops.iter().any(|s| s.len() > tail.len() && s.starts_with(tail)) {
                safe = i;
            }
        }
        self.release(safe.max(self.emitted), out);
        false
    }

    fn release(&mut self, upto: usize, out: &mut dyn FnMut(&str)) {
        if upto > self.emitted {
            out(&self.text[self.emitted..upto]);
            self.emitted = upto;
        }
    }
}

/// A dense KV cache sized for `model`.
pub fn new_cache<B: Backend>(model: &Model<B>, dtype: DType) -> Result<DenseKvCache<B>> {
    let c = &model.cfg;
    Ok(DenseKvCache::new(&model.backend, c.num_layers, c.kv_width(), dtype, c.context_length())?)
}

/// Runs `prompt` through `model` into `kv` in chunks, reporting `(done, total)` after each;
/// returns the last token's logits.
pub fn prefill<B: Backend>(
    model: &Model<B>,
    ws: &mut Workspace<B>,
    kv: &mut dyn KvStore<B>,
    prompt: &[u32],
    chunk: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<f32>> {
    let chunk = chunk.max(1);
    let mut last = Vec::new();
    let mut done = 0;
    for part in prompt.chunks(chunk) {
        done += part.len();
        let want = if done == prompt.len() { Logits::Last } else { Logits::None };
        let mut segs = [Segment { tokens: part, kv: &mut *kv, logits: want }];
        last = model.forward(ws, &mut segs)?.swap_remove(0);
        progress(done, prompt.len());
    }
    Ok(last)
}

/// Generates a continuation of `prompt` (token ids).
pub fn generate<B: Backend + 'static>(
    model: &Model<B>,
    tok: &TextTokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    progress: &mut dyn FnMut(usize, usize),
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(EngineError::EmptyPrompt);
    }
    let context = model.cfg.context_length();
    if prompt.len() > context {
        return Err(EngineError::PromptTooLong { tokens: prompt.len(), context });
    }
    opts.sampling.validate()?;
    let mut kv = new_store(model, opts.kv_dtype, &opts.attention)?;
    let kv = kv.as_mut();
    let mut ws = model.workspace(opts.prefill_chunk.min(prompt.len()), 1)?;
    let mut sampler = Sampler::new(opts.sampling.clone());
    let mut stream = StreamDecoder::default();
    let mut filter = StopFilter { stops: &opts.stop, text: String::new(), emitted: 0 };

    let t0 = Instant::now();
    let mut logits = prefill(model, &mut ws, kv, prompt, opts.prefill_chunk, progress)?;
    let mut next = sampler.sample(&logits);
    let prefill_s = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let mut ids = Vec::new();
    let mut steps = 0;
    let finish = loop {
        if opts.max_new_tokens == 0 {
            break FinishReason::Length;
        }
        ids.push(next);
        if tok.eos_ids.contains(&next) {
            break FinishReason::Eos;
        }
        if let Some(delta) = stream.push(tok, next)? {
            if filter.push(&delta, on_text) {
                break FinishReason::Stop;
            }
        }
        if ids.len() >= opts.max_new_tokens {
            break FinishReason::Length;
        }
        if kv.len() >= context {
            break FinishReason::Context;
        }
        let mut segs = [Segment { tokens: std::slice::from_ref(&next), kv: &mut *kv, logits: Logits::Last }];
        logits = model.forward(&mut ws, &mut segs)?.swap_remove(0);
        steps += 1;
        next = sampler.sample(&logits);
    };
    if finish != FinishReason::Stop {
        if let Some(delta) = stream.flush(tok)? {
            if filter.push(&delta, on_text) {
                return finish_with(prompt, ids, filter.text, FinishReason::Stop, prefill_s, t1, steps);
            }
        }
        let end = filter.text.len();
        filter.release(end, on_text);
    }
    finish_with(prompt, ids, filter.text, finish, prefill_s, t1, steps)
}

fn finish_with(
    prompt: &[u32],
    ids: Vec<u32>,
    text: String,
    finish: FinishReason,
    prefill_s: f64,
    t1: Instant,
    steps: usize,
) -> Result<Generation> {
    Ok(Generation {
        prompt_tokens: prompt.len(),
        new_token_ids: ids,
        text,
        finish,
        prefill_s,
        decode_s: t1.elapsed().as_secs_f64(),
        decode_steps: steps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool, String) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut f = StopFilter { stops: &stops, text: String::new(), emitted: 0 };
        let mut out = String::new();
        let mut hit = false;
        for d in deltas {
            if f.push(d, &mut |s| out.push_str(s)) {
                hit = true;
                break;
            }
        }
        if !hit {
            let end = f.text.len();
            f.release(end, &mut |s| out.push_str(s));
        }
        (out, hit, f.text)
    }

    #[test]
    fn stop_strings_cut_and_never_leak_a_partial_match() {
        let (out, hit, text) = run(&["\nUser:"], &["Hello", " there\nU", "ser: more"]);
        assert!(hit);
        assert_eq!(out, "Hello there");
        assert_eq!(text, "Hello there");
        // a partial match that does not complete is released at the end
        let (out, hit, _) = run(&["STOP"], &["ab", "ST", "OX"]);
        assert!(!hit);
        assert_eq!(out, "abSTOX");
        let (out, _, _) = run(&[], &["é", "ü"]);
        assert_eq!(out, "éü");
    }
}
