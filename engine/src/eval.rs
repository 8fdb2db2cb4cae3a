//! Teacher-forced evaluation: perplexity of a token sequence.

use std::time::Instant;

use farsight_kernels::{Backend, DType};
use farsight_offload::KvStore;

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
    check_text(model, tokens)?;
    let mut kv = new_cache(model, kv_dtype)?;
    perplexity_with(model, tokens, chunk, &mut kv, progress)
}

fn check_text<B: Backend>(model: &Model<B>, tokens: &[u32]) -> Result<()> {
    if tokens.len() < 2 {
        return Err(EngineError::Invalid(format!(
            "perplexity needs at least 2 tokens, the text has {}",
            tokens.len()
        )));
    }
    let context = model.cfg.context_length();
    if tokens.len() > context {
        return Err(EngineError::PromptTooLong {
            tokens: tokens.len(),
            context,
        });
    }
    Ok(())
}

/// [`perplexity`] over a given (empty) store: with a sparse store whose multi-token calls
/// select per query, every position attends as decode would.
pub fn perplexity_with<B: Backend>(
    model: &Model<B>,
    tokens: &[u32],
    chunk: usize,
    kv: &mut dyn KvStore<B>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Perplexity> {
    check_text(model, tokens)?;
    let t0 = Instant::now();
    let chunk = chunk.max(1);
    let mut ws = model.workspace(chunk.min(tokens.len()), chunk.min(tokens.len()))?;
    let vocab = model.cfg.vocab_size;
    let mut total = 0.0f64;
    let mut count = 0usize;
    let mut start = 0;
    while start < tokens.len() {
        let end = (start + chunk).min(tokens.len());
        let part = &tokens[start..end];
        let mut segs = [Segment {
            tokens: part,
            kv: &mut *kv,
            logits: Logits::All,
        }];
        let logits = model
            .forward(&mut ws, &mut segs)?
            .swap_remove(0)
            .into_logits();
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
    Ok(Perplexity {
        tokens: tokens.len(),
        nll_mean,
        ppl: nll_mean.exp(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// How closely one store's logits follow another's (sparse vs dense) over a text.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Agreement {
    /// Positions compared.
    pub positions: usize,
    /// Fraction of positions whose arg-max token is the same.
    pub top1: f64,
    /// Mean KL(reference || candidate) of the next-token distributions, in nats.
    pub mean_kl: f64,
    /// Largest KL at one position.
    pub max_kl: f64,
    pub seconds: f64,
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    logits.iter().map(|&v| v as f64 - lse).collect()
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold(0, |b, (i, &x)| if x > v[b] { i } else { b })
}

/// Teacher-forces `tokens` through two stores (`reference`, `candidate`) in `chunk`-token calls
/// and compares their logits at every position.
pub fn agreement<B: Backend>(
    model: &Model<B>,
    tokens: &[u32],
    chunk: usize,
    reference: &mut dyn KvStore<B>,
    candidate: &mut dyn KvStore<B>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Agreement> {
    check_text(model, tokens)?;
    let t0 = Instant::now();
    let chunk = chunk.max(1);
    let mut ws = model.workspace(chunk.min(tokens.len()), chunk.min(tokens.len()))?;
    let vocab = model.cfg.vocab_size;
    let (mut same, mut kl_sum, mut kl_max, mut n) = (0usize, 0.0f64, 0.0f64, 0usize);
    for (ci, part) in tokens.chunks(chunk).enumerate() {
        let mut a = [Segment {
            tokens: part,
            kv: &mut *reference,
            logits: Logits::All,
        }];
        let la = model.forward(&mut ws, &mut a)?.swap_remove(0).into_logits();
        let mut b = [Segment {
            tokens: part,
            kv: &mut *candidate,
            logits: Logits::All,
        }];
        let lb = model.forward(&mut ws, &mut b)?.swap_remove(0).into_logits();
        for i in 0..part.len() {
            let (ra, rb) = (
                &la[i * vocab..(i + 1) * vocab],
                &lb[i * vocab..(i + 1) * vocab],
            );
            same += usize::from(argmax(ra) == argmax(rb));
            let (pa, pb) = (log_softmax(ra), log_softmax(rb));
            let kl: f64 = pa
                .iter()
                .zip(&pb)
                .map(|(x, y)| x.exp() * (x - y))
                .sum::<f64>()
                .max(0.0);
            kl_sum += kl;
            kl_max = kl_max.max(kl);
            n += 1;
        }
        progress((ci * chunk + part.len()).min(tokens.len()), tokens.len());
    }
    Ok(Agreement {
        positions: n,
        top1: same as f64 / n as f64,
        mean_kl: kl_sum / n as f64,
        max_kl: kl_max,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
