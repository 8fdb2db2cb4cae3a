//! Teacher-forced evaluation: perplexity of a token sequence.

use std::time::Instant;

use farsight_kernels::{Backend, DType};

use crate::error::{EngineError, Result};
use crate::generate::new_cache;
use crate::model::{Logits, Model, Segment};

/// Perplexity of a text.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Perplexity {
    /// Tokens evaluated (predictions = tokens - 1).
    pub tokens: usize,
    /// Mean negative log-likelihood (nats) of tokens 1.. given their prefixes.
    pub nll_mean: f64,
    pub ppl: f64,
    pub seconds: f64,
}

/// `-log softmax(logits)[target]`, in f64.
pub fn nll(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    (sum.ln() + max) - logits[target as usize] as f64
}

/// Perplexity of `tokens`: every token after the first predicted from all before it, in
/// `chunk`-token forward calls over one KV cache (the same as one pass over the whole text).
pub fn perplexity<B: Backend>(
    model: &Model<B>,
    tokens: &[u32],
    chunk: usize,
    kv_dtype: DType,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Perplexity> {
    if tokens.len() < 2 {
        return Err(EngineError::Invalid(format!(
            "perplexity needs at least 2 tokens, the text has {}",
            tokens.len()
        )));
    }
    let context = model.cfg.context_length();
    if tokens.len() > context {
        return Err(EngineError::PromptTooLong { tokens: tokens.len(), context });
    }
    let t0 = Instant::now();
    let chunk = chunk.max(1);
    let mut kv = new_cache(model, kv_dtype)?;
    let mut ws = model.workspace(chunk.min(tokens.len()), chunk.min(tokens.len()))?;
    let vocab = model.cfg.vocab_size;
    let mut total = 0.0f64;
    let mut count = 0usize;
    let mut start = 0;
    while start < tokens.len() {
        let end = (start + chunk).min(tokens.len());
        let part = &tokens[start..end];
        let mut segs = [Segment { tokens: part, kv: &mut kv, logits: Logits::All }];
        let logits = model.forward(&mut ws, &mut segs)?.swap_remove(0);
        for i in 0..part.len() {
            let pos = start + i;
            if pos + 1 < tokens.len() {
                total += nll(&logits[i * vocab..(i + 1) * vocab], tokens[pos + 1]);
                count += 1;
            }
        }
        start = end;
        progress(start, tokens.len());
    }
    let nll_mean = total / count as f64;
    Ok(Perplexity { tokens: tokens.len(), nll_mean, ppl: nll_mean.exp(), seconds: t0.elapsed().as_secs_f64() })
}
