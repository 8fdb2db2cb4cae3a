//! Continuous batching: many sequences share one model, one [`Model::forward`] call per step.
//!
//! Each step, every running sequence that has a sampled token feeds it (one decode row each),
//! and sequences still reading their prompt take the next chunk of it from a per-step budget of
//! prompt tokens ([`BatchConfig::prefill_tokens_per_step`]), oldest first, so the time of a step
//! (and with it the latency between two tokens of a decoding sequence) stays bounded however
//! long a new prompt is. A sequence that finishes leaves at the end of the step; waiting ones
//! are admitted at the start of the next, up to [`BatchConfig::max_running`] sequences and the
//! KV token budget. Every sequence has its own KV cache, sampler, stop strings and token limit;
//! text streams out through its [`TextSink`] as tokens complete it. The per-sequence decoding
//! state is [`Continuation`], the same as single-sequence [`crate::generate::generate`] uses.

use std::collections::VecDeque;
use std::time::Instant;

use farsight_kernels::{Backend, DType};
use farsight_offload::{DenseKvCache, KvStore};

use crate::decode::{Continuation, FinishReason};
use crate::error::{EngineError, Result};
use crate::generate::new_cache;
use crate::model::{Logits, Model, Segment, Workspace};
use crate::sampler::SamplingParams;
use crate::tokenizer::TextTokenizer;

/// How the scheduler shares the model.
#[derive(Clone, Debug)]
pub struct BatchConfig {
    /// Most sequences running (holding a KV cache) at once.
    pub max_running: usize,
    /// Prompt tokens processed per step, over all sequences still reading their prompt.
    pub prefill_tokens_per_step: usize,
    pub kv_dtype: DType,
    /// KV tokens the running sequences may reserve together (each reserves its prompt plus its
    /// token limit, capped at the context); 0: no limit. A sequence also never grows past it.
    pub kv_token_budget: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_running: 8,
            prefill_tokens_per_step: 256,
            kv_dtype: DType::F16,
            kv_token_budget: 0,
        }
    }
}

/// One sequence to generate.
#[derive(Clone, Debug)]
pub struct SeqRequest {
    /// Prompt token ids (not empty).
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends before the first occurrence of any of these.
    pub stop: Vec<String>,
}

/// Receives a sequence's text deltas; returning false cancels the sequence (its reader is gone).
pub type TextSink<'s> = Box<dyn FnMut(&str) -> bool + 's>;

/// A sequence's number, given by [`Scheduler::submit`] in submission order.
pub type SeqId = u64;

/// Where a sequence's time went (seconds).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct SeqTimings {
    /// Submission to admission.
    pub queued_s: f64,
    /// Admission to the first sampled token (prompt forward passes, shared with other sequences).
    pub prefill_s: f64,
    /// First token to the end.
    pub decode_s: f64,
}

/// A finished sequence.
#[derive(Clone, Debug)]
pub struct SeqOutput {
    pub id: SeqId,
    pub prompt_tokens: usize,
    /// Every sampled id (an EOS that ended generation included).
    pub new_token_ids: Vec<u32>,
    /// The text, cut before a stop string, without special tokens.
    pub text: String,
    pub finish: FinishReason,
    pub timings: SeqTimings,
}

/// Counters over the scheduler's life.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct SchedulerStats {
    /// Forward calls.
    pub steps: u64,
    /// Forward calls that carried more than one sequence.
    pub batched_steps: u64,
    /// Most sequences in one forward call.
    pub max_batch: usize,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    pub finished: u64,
}

struct Waiting<'s> {
    id: SeqId,
    req: SeqRequest,
    sink: TextSink<'s>,
    submitted: Instant,
}

struct Running<'s, B: Backend> {
    id: SeqId,
    prompt: Vec<u32>,
    sink: TextSink<'s>,
    kv: DenseKvCache<B>,
    /// KV tokens reserved against the budget.
    reserved: usize,
    /// Prompt tokens already in `kv`.
    prefilled: usize,
    /// The sampled token to feed next; `None` while the prompt is being read.
    next: Option<u32>,
    seq: Continuation,
    submitted: Instant,
    admitted: Instant,
    first_token: Option<Instant>,
}

/// The continuous-batching scheduler over one model.
pub struct Scheduler<'m, 's, B: Backend> {
    model: &'m Model<B>,
    tok: &'m TextTokenizer,
    cfg: BatchConfig,
    ws: Workspace<B>,
    waiting: VecDeque<Waiting<'s>>,
    running: Vec<Running<'s, B>>,
    next_id: SeqId,
    stats: SchedulerStats,
}

impl<'m, 's, B: Backend> Scheduler<'m, 's, B> {
    /// A scheduler with no sequences.
    pub fn new(model: &'m Model<B>, tok: &'m TextTokenizer, cfg: BatchConfig) -> Result<Self> {
        if cfg.max_running == 0 || cfg.prefill_tokens_per_step == 0 {
            return Err(EngineError::Invalid(
                "batch size and prefill tokens per step must be at least 1".into(),
            ));
        }
        let ws = model.workspace(
            cfg.max_running + cfg.prefill_tokens_per_step,
            cfg.max_running,
        )?;
        Ok(Scheduler {
            model,
            tok,
            cfg,
            ws,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            stats: SchedulerStats::default(),
        })
    }

    /// The longest a sequence may grow (prompt plus new tokens): the context, or the KV budget.
    pub fn max_sequence_tokens(&self) -> usize {
        let context = self.model.cfg.context_length();
        match self.cfg.kv_token_budget {
            0 => context,
            b => b.min(context),
        }
    }

    /// Queues a sequence. Refuses an empty prompt, one that does not fit
    /// [`Scheduler::max_sequence_tokens`], or meaningless sampling settings.
    pub fn submit(&mut self, req: SeqRequest, sink: TextSink<'s>) -> Result<SeqId> {
        if req.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let limit = self.max_sequence_tokens();
        if req.prompt.len() > limit {
            let context = self.model.cfg.context_length();
            return Err(if limit == context {
                EngineError::PromptTooLong {
                    tokens: req.prompt.len(),
                    context,
                }
            } else {
                EngineError::Invalid(format!(
                    "the prompt has {} tokens but the KV budget is {limit} tokens",
                    req.prompt.len()
                ))
            });
        }
        req.sampling.validate()?;
        let id = self.next_id;
        self.next_id += 1;
        self.waiting.push_back(Waiting {
            id,
            req,
            sink,
            submitted: Instant::now(),
        });
        Ok(id)
    }

    /// True when no sequence is running or waiting.
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Sequences holding a KV cache.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Sequences queued for admission.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn stats(&self) -> SchedulerStats {
        self.stats
    }

    /// KV tokens a request reserves: its prompt plus its token limit, capped.
    fn reservation(&self, req: &SeqRequest) -> usize {
        req.prompt
            .len()
            .saturating_add(req.max_new_tokens)
            .min(self.max_sequence_tokens())
    }

    /// Moves waiting sequences in, oldest first, while there is room.
    fn admit(&mut self) -> Result<()> {
        let mut reserved: usize = self.running.iter().map(|r| r.reserved).sum();
        while self.running.len() < self.cfg.max_running {
            let Some(w) = self.waiting.front() else { break };
            let need = self.reservation(&w.req);
            if self.cfg.kv_token_budget > 0 && reserved + need > self.cfg.kv_token_budget {
                break;
            }
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            reserved += need;
            let limit = self.max_sequence_tokens();
            let Waiting {
                id,
                req,
                sink,
                submitted,
            } = w;
            self.running.push(Running {
                id,
                kv: new_cache(self.model, self.cfg.kv_dtype)?,
                reserved: need,
                prefilled: 0,
                next: None,
                seq: Continuation::new(req.sampling, req.stop, req.max_new_tokens, limit),
                prompt: req.prompt,
                sink,
                submitted,
                admitted: Instant::now(),
                first_token: None,
            });
        }
        Ok(())
    }

    /// One step: admit, run one forward call over every running sequence, sample, stream.
    /// Returns the sequences that finished in this step (in admission order).
    pub fn step(&mut self) -> Result<Vec<SeqOutput>> {
        self.admit()?;
        if self.running.is_empty() {
            return Ok(Vec::new());
        }
        // Plan and build the segments: decode rows first-come, prompt chunks from the budget.
        let mut budget = self.cfg.prefill_tokens_per_step;
        let mut segs = Vec::with_capacity(self.running.len());
        let mut rows = Vec::with_capacity(self.running.len());
        for (i, r) in self.running.iter_mut().enumerate() {
            let Running {
                kv,
                prompt,
                next,
                prefilled,
                seq,
                ..
            } = r;
            // A row that ends a prompt or decodes gets its token picked by the backend.
            let (tokens, logits) = match next {
                Some(t) => (std::slice::from_ref(&*t), Logits::Sample(seq.next_spec())),
                None if budget > 0 => {
                    let end = prompt.len().min(*prefilled + budget);
                    budget -= end - *prefilled;
                    let want = if end == prompt.len() {
                        Logits::Sample(seq.next_spec())
                    } else {
                        Logits::None
                    };
                    (&prompt[*prefilled..end], want)
                }
                None => continue,
            };
            rows.push((i, tokens.len()));
            segs.push(Segment {
                tokens,
                kv: kv as &mut dyn KvStore<B>,
                logits,
            });
        }
        let outputs = self.model.forward(&mut self.ws, &mut segs)?;
        drop(segs);
        self.stats.steps += 1;
        self.stats.batched_steps += u64::from(rows.len() > 1);
        self.stats.max_batch = self.stats.max_batch.max(rows.len());

        // Stream the sampled tokens; note who ends.
        let mut ended: Vec<(usize, FinishReason)> = Vec::new();
        for ((i, n), out) in rows.into_iter().zip(outputs) {
            let r = &mut self.running[i];
            if r.next.is_none() {
                r.prefilled += n;
                self.stats.prompt_tokens += n as u64;
            }
            let Some(t) = out.token() else {
                continue; // a prompt chunk that is not the last
            };
            if r.first_token.is_none() {
                r.first_token = Some(Instant::now());
            }
            let mut alive = true;
            let sink = &mut r.sink;
            let before = r.seq.generated();
            let end = r
                .seq
                .accept(self.tok, t, r.kv.len(), &mut |d| alive &= sink(d))?;
            self.stats.generated_tokens += (r.seq.generated() - before) as u64;
            match (end, alive) {
                (Some(reason), _) => ended.push((i, reason)),
                (None, false) => ended.push((i, FinishReason::Cancelled)),
                (None, true) => r.next = Some(t),
            }
        }
        let mut out = Vec::with_capacity(ended.len());
        for &(i, reason) in ended.iter().rev() {
            let r = self.running.remove(i);
            out.push(self.finish(r, reason)?);
        }
        out.reverse();
        Ok(out)
    }

    fn finish(&mut self, r: Running<'s, B>, reason: FinishReason) -> Result<SeqOutput> {
        let Running {
            id,
            prompt,
            mut sink,
            seq,
            submitted,
            admitted,
            first_token,
            ..
        } = r;
        let done = seq.finish(self.tok, reason, &mut |d| {
            sink(d);
        })?;
        let now = Instant::now();
        let first = first_token.unwrap_or(now);
        self.stats.finished += 1;
        Ok(SeqOutput {
            id,
            prompt_tokens: prompt.len(),
            new_token_ids: done.ids,
            text: done.text,
            finish: done.finish,
            timings: SeqTimings {
                queued_s: (admitted - submitted).as_secs_f64(),
                prefill_s: (first - admitted).as_secs_f64(),
                decode_s: (now - first).as_secs_f64(),
            },
        })
    }
}
