//! Generation for one sequence: chunked prefill, then token-by-token decode with sampling,
//! streaming text out as it completes and stopping on EOS, stop strings, the token limit or the
//! end of the model's context.

use std::time::Instant;

use farsight_kernels::{Backend, DType};
use farsight_offload::{DenseKvCache, KvStore};

use crate::error::{EngineError, Result};
use crate::kv::{new_store, Attention};
use crate::model::{Logits, Model, Output, Segment, Workspace};
use crate::sampler::SamplingParams;
use crate::tokenizer::TextTokenizer;

use crate::decode::Continuation;
pub use crate::decode::FinishReason;

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
    /// The KV store's footprint at the end.
    pub kv_memory: farsight_offload::KvMemory,
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

/// A dense KV cache sized for `model`.
pub fn new_cache<B: Backend>(model: &Model<B>, dtype: DType) -> Result<DenseKvCache<B>> {
    let c = &model.cfg;
    Ok(DenseKvCache::new(
        &model.backend,
        c.num_layers,
        c.kv_width(),
        dtype,
        c.context_length(),
    )?)
}

/// Runs `prompt` through `model` into `kv` in chunks, reporting `(0, total)` first and
/// `(done, total)` after each chunk; returns the last token's logits.
pub fn prefill<B: Backend>(
    model: &Model<B>,
    ws: &mut Workspace<B>,
    kv: &mut dyn KvStore<B>,
    prompt: &[u32],
    chunk: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<f32>> {
    prefill_for(model, ws, kv, prompt, chunk, Logits::Last, progress).map(Output::into_logits)
}

/// As [`prefill`], the last chunk asking for `last` (e.g. a token sampled on the backend).
pub fn prefill_for<B: Backend>(
    model: &Model<B>,
    ws: &mut Workspace<B>,
    kv: &mut dyn KvStore<B>,
    prompt: &[u32],
    chunk: usize,
    last: Logits,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Output> {
    let chunk = chunk.max(1);
    let mut out = Output::Nothing;
    let mut done = 0;
    progress(0, prompt.len());
    for part in prompt.chunks(chunk) {
        done += part.len();
        let want = if done == prompt.len() {
            last
        } else {
            Logits::None
        };
        let mut segs = [Segment {
            tokens: part,
            kv: &mut *kv,
            logits: want,
        }];
        out = model.forward(ws, &mut segs)?.swap_remove(0);
        progress(done, prompt.len());
    }
    Ok(out)
}

/// The checks of a generation request, made before any store is allocated.
fn check_request<B: Backend>(
    model: &Model<B>,
    prompt: &[u32],
    opts: &GenerateOptions,
) -> Result<()> {
    if prompt.is_empty() {
        return Err(EngineError::EmptyPrompt);
    }
    let context = model.cfg.context_length();
    if prompt.len() > context {
        return Err(EngineError::PromptTooLong {
            tokens: prompt.len(),
            context,
        });
    }
    opts.sampling.validate()
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
    check_request(model, prompt, opts)?;
    let mut kv = new_store(model, opts.kv_dtype, &opts.attention)?;
    generate_in(model, tok, prompt, opts, kv.as_mut(), progress, on_text)
}

/// As [`generate`] into a given empty store (`opts.attention` is not used): for callers that
/// inspect the store afterwards.
pub fn generate_in<B: Backend + 'static>(
    model: &Model<B>,
    tok: &TextTokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    kv: &mut dyn KvStore<B>,
    progress: &mut dyn FnMut(usize, usize),
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    check_request(model, prompt, opts)?;
    if !kv.is_empty() {
        return Err(EngineError::Invalid(format!(
            "generate_in: the store already holds {} tokens",
            kv.len()
        )));
    }
    let context = model.cfg.context_length();
    let mut ws = model.workspace(opts.prefill_chunk.min(prompt.len()), 1)?;
    let mut seq = Continuation::new(
        opts.sampling.clone(),
        opts.stop.clone(),
        opts.max_new_tokens,
        context,
    );

    // Tokens are picked by the backend (on the GPU only the id comes back), each with a draw
    // from the sequence's generator: the same tokens for a seed as sampling on the host.
    let t0 = Instant::now();
    let first = Logits::Sample(seq.next_spec());
    let chunk = opts.prefill_chunk;
    let mut next = prefill_for(model, &mut ws, kv, prompt, chunk, first, progress)?.into_token()?;
    let prefill_s = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let mut steps = 0;
    let reason = loop {
        if let Some(reason) = seq.accept(tok, next, kv.len(), on_text)? {
            break reason;
        }
        let mut segs = [Segment {
            tokens: std::slice::from_ref(&next),
            kv,
            logits: Logits::Sample(seq.next_spec()),
        }];
        next = model
            .forward(&mut ws, &mut segs)?
            .swap_remove(0)
            .into_token()?;
        steps += 1;
    };
    let done = seq.finish(tok, reason, on_text)?;
    Ok(Generation {
        prompt_tokens: prompt.len(),
        new_token_ids: done.ids,
        text: done.text,
        finish: done.finish,
        prefill_s,
        decode_s: t1.elapsed().as_secs_f64(),
        decode_steps: steps,
        kv_memory: kv.memory(),
    })
}
