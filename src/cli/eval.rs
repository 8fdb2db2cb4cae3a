//! `farsight eval`: accuracy measurements (perplexity, passkey retrieval, sparse-vs-dense
//! agreement, and sweeps over the sparse settings). Every command prints the settings it ran.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use farsight_engine::eval::{agreement, perplexity_with, Perplexity};
use farsight_engine::kv::{new_sparse_store, new_store, Attention};
use farsight_engine::passkey::passkey_trial;
use farsight_offload::sparse::{LabelBits, SparseStats, TokenBudget, CACHE_FACTORS};
use farsight_offload::{KvMemory, KvStore};

use super::common::{read_text, token_progress, with_model, AnyModel, CliError, ModelArgs};
use super::plot::{SweepPlot, SweepPoint};
use super::sparse::{AttentionKind, SparseArgs};

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// Perplexity of the first N tokens of a text file, teacher-forced (with sparse attention,
    /// every position attends as decode would).
    Ppl(PplArgs),
    /// Passkey retrieval: a number hidden in filler at given lengths and depths.
    Passkey(PasskeyArgs),
    /// Top-1 agreement and mean KL of sparse vs dense logits over a text.
    Agreement(PplArgs),
    /// Perplexity over a grid of budgets x label channels x label bits, dense in the same table.
    Sweep(SweepArgs),
    /// Logits of every position of given token ids (no tokenizer needed), then N greedy tokens:
    /// for comparing with another implementation (scripts/gpu-parity.py).
    #[command(hide = true)]
    Logits(LogitsArgs),
}

#[derive(Args, Debug)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Token ids, separated by whitespace or commas (a JSON array works too).
    #[arg(long)]
    pub tokens: PathBuf,
    /// Output: a JSON summary here, and the logits (little-endian f32, tokens x vocab,
    /// row-major) in the same path with the extension `.bin`.
    #[arg(long)]
    pub out: PathBuf,
    /// Greedy tokens to generate after the given ids (decode steps, one token per call).
    #[arg(long, default_value_t = 0)]
    pub greedy: usize,
    /// Tokens per prefill forward call.
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
}

#[derive(Args, Debug)]
pub struct PplArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sparse: SparseArgs,
    /// The text file.
    #[arg(long)]
    pub text: PathBuf,
    /// Tokens to evaluate from the start of the text (0: all, up to the model's context).
    #[arg(long, default_value_t = 0)]
    pub max_tokens: usize,
    /// Tokens per forward call.
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct PasskeyArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sparse: SparseArgs,
    /// Prompt lengths in tokens (comma-separated, k suffix allowed).
    #[arg(long, default_value = "1k,2k,4k,6k", value_delimiter = ',', value_parser = super::bench::parse_count)]
    pub lengths: Vec<usize>,
    /// Depths of the key in the filler, 0..1 (comma-separated).
    #[arg(long, default_value = "0.1,0.3,0.5,0.7,0.9", value_delimiter = ',')]
    pub depths: Vec<f64>,
    /// Keys tried per (length, depth).
    #[arg(long, default_value_t = 2)]
    pub trials: usize,
    /// Also run dense attention on the same prompts, in the same table.
    #[arg(long)]
    pub compare_dense: bool,
    /// Prompt tokens per prefill forward call (a `--host-kv-budget` store evicts between calls,
    /// so a small budget needs a small chunk).
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct SweepArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sparse: SparseArgs,
    /// The text file.
    #[arg(long)]
    pub text: PathBuf,
    /// Tokens to evaluate.
    #[arg(long, default_value_t = 2048)]
    pub max_tokens: usize,
    /// Tokens per forward call.
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// Budgets (comma-separated).
    #[arg(long, default_value = "1/4,1/8,1/16,1/32", value_delimiter = ',')]
    pub budgets: Vec<TokenBudget>,
    /// Label channels (comma-separated).
    #[arg(long, default_value = "4,8,16,32", value_delimiter = ',')]
    pub channels: Vec<usize>,
    /// Label bits (comma-separated).
    #[arg(long, default_value = "16,4", value_delimiter = ',')]
    pub bits: Vec<LabelBits>,
    /// Markdown table file (also printed).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also plot perplexity against budget: PATH.svg and PATH.png (PATH without extension).
    #[arg(long, value_name = "PATH")]
    pub plot: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(c: EvalCommand) -> Result<(), CliError> {
    match c {
        EvalCommand::Ppl(a) => ppl(a),
        EvalCommand::Passkey(a) => passkey(a),
        EvalCommand::Agreement(a) => agree(a),
        EvalCommand::Sweep(a) => sweep(a),
        EvalCommand::Logits(a) => logits(a),
    }
}

fn out_line(s: &str) -> Result<(), CliError> {
    writeln!(std::io::stdout().lock(), "{s}").map_err(CliError::Output)
}

/// Loads the model and the text's first tokens.
fn load_text(
    model: &ModelArgs,
    text: &PathBuf,
    max_tokens: usize,
    chunk: usize,
) -> Result<(super::common::Loaded, Vec<u32>), CliError> {
    if chunk == 0 {
        return Err(CliError::Usage("--chunk must be at least 1".into()));
    }
    let text = read_text(text)?;
    let loaded = model.load()?;
    let mut ids = loaded.tok.encode(&text)?;
    let limit = if max_tokens == 0 {
        loaded.model.cfg().context_length()
    } else {
        max_tokens
    };
    ids.truncate(limit);
    Ok((loaded, ids))
}

/// Perplexity with `attention` (per position), and the sparse counters when sparse.
fn run_ppl(
    model: &AnyModel,
    ids: &[u32],
    chunk: usize,
    kv_dtype: farsight_kernels::DType,
    attention: &Attention,
    label: &str,
) -> Result<(Perplexity, Option<SparseStats>, KvMemory), CliError> {
    let pb = token_progress(ids.len(), label, 2048);
    let mut progress = |d: usize, _| pb.set_position(d as u64);
    let r = with_model!(model, m => match attention.per_position() {
        Attention::Dense => {
            let mut kv = new_store(m, kv_dtype, &Attention::Dense)?;
            perplexity_with(m, ids, chunk, kv.as_mut(), &mut progress).map(|p| (p, None, kv.memory()))
        }
        Attention::DoubleSparse(s) => {
            let mut kv = new_sparse_store(m, kv_dtype, &s)?;
            kv.simulate_row_caches(true);
            perplexity_with(m, ids, chunk, &mut kv, &mut progress).map(|p| (p, Some(kv.stats()), KvStore::<farsight_kernels::cpu::CpuBackend>::memory(&kv)))
        }
    })?;
    pb.finish_and_clear();
    Ok(r)
}

fn recall_json(st: &Option<SparseStats>) -> serde_json::Value {
    match st {
        Some(s) => serde_json::json!({
            "read_fraction": s.read_fraction(),
            "layer_ahead_recall": s.recall(),
            "layer_ahead_recall_per_layer": s.recall_per_layer(),
            "step_reuse": s.step_reuse(),
            "step_reuse_per_layer": s.reuse_per_layer(),
            "layer_ahead_step_reuse": s.ahead_step_reuse(),
            "layer_ahead_step_reuse_per_layer": s.ahead_reuse_per_layer(),
            "row_cache_hit_rate": CACHE_FACTORS.iter().enumerate().map(|(i, f)| {
                serde_json::json!({
                    "factor": f,
                    "hit_rate": s.cache_hit_rate(i),
                    "per_layer": s.cache_hit_rate_per_layer(i),
                })
            }).collect::<Vec<_>>(),
            "counters": s,
        }),
        None => serde_json::Value::Null,
    }
}

fn logits(a: LogitsArgs) -> Result<(), CliError> {
    if a.chunk == 0 {
        return Err(CliError::Usage("--chunk must be at least 1".into()));
    }
    let text = read_text(&a.tokens)?;
    let ids: Vec<u32> = text
        .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>().map_err(|_| {
                CliError::Usage(format!("`{s}` in {} is not a token id", a.tokens.display()))
            })
        })
        .collect::<Result<_, _>>()?;
    if ids.is_empty() {
        return Err(CliError::Usage(format!(
            "{} holds no token ids",
            a.tokens.display()
        )));
    }
    let model = a.model.load_model()?;
    let vocab = model.cfg().vocab_size;
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(CliError::Usage(format!(
            "token id {bad} outside the vocabulary ({vocab})"
        )));
    }
    let t0 = std::time::Instant::now();
    let (all, greedy) = with_model!(&model, m => teacher_forced_then_greedy(m, &ids, a.chunk, a.greedy, a.model.kv_dtype))?;
    let seconds = t0.elapsed().as_secs_f64();
    let bin = a.out.with_extension("bin");
    let bytes: Vec<u8> = all.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&bin, bytes).map_err(|e| CliError::io(&bin, e))?;
    let argmax: Vec<u32> = all
        .chunks(vocab)
        .map(farsight_engine::sampler::argmax)
        .collect();
    let v = serde_json::json!({
        "tokens": ids,
        "vocab": vocab,
        "logits_file": bin,
        "logits_shape": [ids.len(), vocab],
        "argmax": argmax,
        "greedy": greedy,
        "seconds": seconds,
        "device": model.device_name(),
        "weights_dtype": model.weight_dtype().name(),
        "kv_dtype": a.model.kv_dtype.name(),
        "chunk": a.chunk,
    });
    std::fs::write(&a.out, v.to_string()).map_err(|e| CliError::io(&a.out, e))?;
    eprintln!(
        "logits of {} positions -> {}; {} greedy tokens; {:.2} s",
        ids.len(),
        bin.display(),
        greedy.len(),
        seconds
    );
    Ok(())
}

/// All-position logits of `ids` (prefill in `chunk`-token calls), then `greedy` decode steps.
fn teacher_forced_then_greedy<B: farsight_kernels::Backend>(
    m: &farsight_engine::Model<B>,
    ids: &[u32],
    chunk: usize,
    greedy: usize,
    kv_dtype: farsight_kernels::DType,
) -> Result<(Vec<f32>, Vec<u32>), CliError> {
    use farsight_engine::model::{Logits, Segment};
    let mut kv = farsight_engine::generate::new_cache(m, kv_dtype)?;
    let mut ws = m.workspace(chunk.min(ids.len()), chunk.min(ids.len()))?;
    let mut all = Vec::with_capacity(ids.len() * m.cfg.vocab_size);
    for part in ids.chunks(chunk) {
        let mut segs = [Segment {
            tokens: part,
            kv: &mut kv,
            logits: Logits::All,
        }];
        all.extend(m.forward(&mut ws, &mut segs)?.swap_remove(0).into_logits());
    }
    let vocab = m.cfg.vocab_size;
    let mut next = farsight_engine::sampler::argmax(&all[all.len() - vocab..]);
    let mut out = Vec::with_capacity(greedy);
    for i in 0..greedy {
        out.push(next);
        if i + 1 == greedy {
            break;
        }
        let mut segs = [Segment {
            tokens: std::slice::from_ref(&next),
            kv: &mut kv,
            logits: Logits::Sample(farsight_kernels::SampleSpec::GREEDY),
        }];
        next = m.forward(&mut ws, &mut segs)?.swap_remove(0).into_token()?;
    }
    Ok((all, out))
}

fn ppl(a: PplArgs) -> Result<(), CliError> {
    let (mut loaded, ids) = load_text(&a.model, &a.text, a.max_tokens, a.chunk)?;
    let attention = a
        .sparse
        .attention_planned(&a.model, &mut loaded.model, ids.len())?;
    eprintln!(
        "eval ppl: model {}, {} tokens of {}, device {}, kv {}, attention {}",
        a.model.model.display(),
        ids.len(),
        a.text.display(),
        loaded.model.device_name(),
        a.model.kv_dtype,
        attention.describe()
    );
    let (r, st, mem) = run_ppl(
        &loaded.model,
        &ids,
        a.chunk,
        a.model.kv_dtype,
        &attention,
        "eval",
    )?;
    if a.sparse.report_memory {
        let rows = a.chunk.min(ids.len());
        super::report::print_after_run(super::report::footprint(
            &loaded.model,
            a.model.kv_dtype,
            mem.clone(),
            rows,
            rows,
        ));
    }
    if a.json {
        let v = serde_json::json!({
            "ppl": r.ppl,
            "nll_mean": r.nll_mean,
            "tokens": r.tokens,
            "seconds": r.seconds,
            "sparse": recall_json(&st),
            "kv_memory": mem,
            "settings": {
                "model": a.model.model,
                "text": a.text,
                "max_tokens": a.max_tokens,
                "device": loaded.model.device_name(),
                "kv_dtype": a.model.kv_dtype.name(),
                "attention": attention.describe(),
            },
        });
        return out_line(&v.to_string());
    }
    out_line(&format!(
        "perplexity {:.4} over {} tokens (mean NLL {:.5}, {:.1} s)",
        r.ppl, r.tokens, r.nll_mean, r.seconds
    ))?;
    if let Some(s) = &st {
        out_line(&format!(
            "rows read: {:.2}% of the visible rows",
            100.0 * s.read_fraction().unwrap_or(1.0)
        ))?;
        if let Some(rc) = s.recall() {
            let per: Vec<String> = s
                .recall_per_layer()
                .iter()
                .map(|r| r.map_or("-".into(), |v| format!("{:.3}", v)))
                .collect();
            out_line(&format!(
                "layer-ahead recall {:.4}; per layer: {}",
                rc,
                per.join(" ")
            ))?;
        }
        let per = |v: Vec<Option<f64>>| -> String {
            v.iter()
                .map(|r| r.map_or("-".into(), |v| format!("{:.3}", v)))
                .collect::<Vec<String>>()
                .join(" ")
        };
        if let Some(r) = s.step_reuse() {
            out_line(&format!(
                "step-to-step selection reuse {:.4}; per layer: {}",
                r,
                per(s.reuse_per_layer())
            ))?;
        }
        if let Some(r) = s.ahead_step_reuse() {
            out_line(&format!(
                "step-to-step selection reuse of the layer-ahead guess {:.4}; per layer: {}",
                r,
                per(s.ahead_reuse_per_layer())
            ))?;
        }
        for (i, f) in CACHE_FACTORS.iter().enumerate() {
            if let Some(r) = s.cache_hit_rate(i) {
                out_line(&format!(
                    "hit rate of an LRU row cache of {f}x the top-k (rows read) {:.4}; per layer: {}",
                    r,
                    per(s.cache_hit_rate_per_layer(i))
                ))?;
            }
        }
    }
    Ok(())
}

fn agree(a: PplArgs) -> Result<(), CliError> {
    if a.sparse.attention == AttentionKind::Dense {
        return Err(CliError::Usage(
            "eval agreement compares sparse with dense: pass --attention double-sparse".into(),
        ));
    }
    let (mut loaded, ids) = load_text(&a.model, &a.text, a.max_tokens, a.chunk)?;
    let attention = a
        .sparse
        .attention_planned(&a.model, &mut loaded.model, ids.len())?
        .per_position();
    eprintln!(
        "eval agreement: model {}, {} tokens of {}, device {}, kv {}, {} vs dense",
        a.model.model.display(),
        ids.len(),
        a.text.display(),
        loaded.model.device_name(),
        a.model.kv_dtype,
        attention.describe()
    );
    let pb = token_progress(ids.len(), "agreement", 2048);
    let r = with_model!(&loaded.model, m => {
        let mut dense = new_store(m, a.model.kv_dtype, &Attention::Dense)?;
        let mut sparse = new_store(m, a.model.kv_dtype, &attention)?;
        agreement(m, &ids, a.chunk, dense.as_mut(), sparse.as_mut(), &mut |d, _| pb.set_position(d as u64))
    })?;
    pb.finish_and_clear();
    if a.json {
        let v = serde_json::json!({
            "agreement": r,
            "settings": { "model": a.model.model, "text": a.text, "tokens": ids.len(), "kv_dtype": a.model.kv_dtype.name(), "attention": attention.describe() },
        });
        return out_line(&v.to_string());
    }
    out_line(&format!(
        "top-1 agreement {:.4} over {} positions; mean KL {:.5} nats (max {:.4}); {:.1} s",
        r.top1, r.positions, r.mean_kl, r.max_kl, r.seconds
    ))
}

fn passkey(a: PasskeyArgs) -> Result<(), CliError> {
    if a.depths.iter().any(|d| !(0.0..=1.0).contains(d)) {
        return Err(CliError::Usage("--depths must lie between 0 and 1".into()));
    }
    if a.chunk == 0 {
        return Err(CliError::Usage("--chunk must be at least 1".into()));
    }
    let mut loaded = a.model.load()?;
    // Deterministic five-digit keys.
    let key_of = |len: usize, depth: f64, t: usize| {
        format!(
            "{}",
            10000 + (len * 7919 + (depth * 1000.0) as usize * 104729 + t * 15485863) % 90000
        )
    };
    // A budget given as a fraction is of the full KV of each length's planned tokens: the
    // length plus the answer's tokens.
    let answer = farsight_engine::passkey::answer_tokens(&key_of(0, 0.0, 0));
    let first = a.lengths.first().copied().unwrap_or(0);
    let attention = a
        .sparse
        .attention_planned(&a.model, &mut loaded.model, first + answer)?;
    let mut per_length = Vec::with_capacity(a.lengths.len());
    for (i, &len) in a.lengths.iter().enumerate() {
        per_length.push(if i == 0 {
            attention.clone()
        } else {
            a.sparse
                .budget_for(&a.model, &loaded.model, &attention, len + answer)?
        });
    }
    let sparse_name = a.sparse.label(&attention);
    // (name, attention per length)
    let mut runs: Vec<(String, Vec<Attention>)> = vec![(sparse_name, per_length)];
    if a.compare_dense && !matches!(attention, Attention::Dense) {
        runs.insert(0, ("dense".into(), vec![Attention::Dense; a.lengths.len()]));
    }
    eprintln!(
        "eval passkey: model {}, lengths {:?}, depths {:?}, {} trials each, prefill chunks of {}, device {}, kv {}, attention {}",
        a.model.model.display(),
        a.lengths,
        a.depths,
        a.trials,
        a.chunk,
        loaded.model.device_name(),
        a.model.kv_dtype,
        runs.iter().map(|r| r.0.clone()).collect::<Vec<_>>().join(" | ")
    );
    let mut results = Vec::new();
    for (li, &len) in a.lengths.iter().enumerate() {
        for &depth in &a.depths {
            for t in 0..a.trials {
                let key = key_of(len, depth, t);
                for (name, atts) in &runs {
                    let att = &atts[li];
                    let r = with_model!(&loaded.model, m => passkey_trial(m, &loaded.tok, len, depth, &key, a.model.kv_dtype, att, a.chunk))?;
                    if !a.json {
                        out_line(&format!(
                            "{name:>12}  length {:>5} (prompt {:>5})  depth {:.2}  key {}  answer {:<8} {}{}",
                            len,
                            r.tokens,
                            depth,
                            key,
                            r.answer.clone().unwrap_or_else(|| "-".into()),
                            if r.correct { "ok" } else { "MISS" },
                            match r.kv_memory.budget_bytes {
                                Some(_) => format!(
                                    "  (kept {} of {} tokens; key digits kept {})",
                                    r.kv_memory.live_tokens,
                                    r.kv_memory.positions,
                                    match (r.key_tokens_kept, r.key_tokens) {
                                        (Some(k), Some(n)) => format!("{k}/{n}"),
                                        _ => "-".into(),
                                    }
                                ),
                                None => String::new(),
                            }
                        ))?;
                    }
                    if a.sparse.report_memory {
                        eprintln!(
                            "memory after {name}, length {len}, depth {depth:.2}, key {key}:"
                        );
                        let rows = a.chunk.min(r.tokens);
                        super::report::print_after_run(super::report::footprint(
                            &loaded.model,
                            a.model.kv_dtype,
                            r.kv_memory.clone(),
                            rows,
                            1,
                        ));
                    }
                    results.push((name.clone(), len, r));
                }
            }
        }
    }
    let mut summary = Vec::new();
    for (name, _) in &runs {
        let mine: Vec<_> = results.iter().filter(|r| &r.0 == name).collect();
        let ok = mine.iter().filter(|r| r.2.correct).count();
        let per_length: Vec<_> = a
            .lengths
            .iter()
            .map(|&len| {
                let at: Vec<_> = mine.iter().filter(|r| r.1 == len).collect();
                serde_json::json!({ "length": len, "correct": at.iter().filter(|r| r.2.correct).count(), "trials": at.len() })
            })
            .collect();
        summary.push(serde_json::json!({ "attention": name, "correct": ok, "trials": mine.len(), "per_length": per_length }));
        if !a.json {
            out_line(&format!("{name}: {ok}/{} correct", mine.len()))?;
        }
    }
    if a.json {
        let trials: Vec<_> = results
            .iter()
            .map(|(n, len, r)| serde_json::json!({ "attention": n, "length": len, "trial": r }))
            .collect();
        let budgets: Vec<_> = runs
            .last()
            .map(|(_, atts)| {
                atts.iter()
                    .zip(&a.lengths)
                    .map(|(att, &len)| {
                        let bytes = match att {
                            Attention::DoubleSparse(s) => {
                                s.cfg.evict.as_ref().map(|e| e.budget_bytes)
                            }
                            Attention::Dense => None,
                        };
                        serde_json::json!({ "length": len, "host_kv_budget_bytes": bytes })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let v = serde_json::json!({ "summary": summary, "trials": trials,
            "settings": { "model": a.model.model, "device": loaded.model.device_name(), "kv_dtype": a.model.kv_dtype.name(),
                "lengths": a.lengths, "depths": a.depths, "chunk": a.chunk, "budgets": budgets } });
        out_line(&v.to_string())?;
    }
    Ok(())
}

fn sweep(a: SweepArgs) -> Result<(), CliError> {
    if a.sparse.attention == AttentionKind::Dense {
        return Err(CliError::Usage(
            "eval sweep varies sparse settings: pass --attention double-sparse".into(),
        ));
    }
    let (mut loaded, ids) = load_text(&a.model, &a.text, a.max_tokens, a.chunk)?;
    eprintln!(
        "eval sweep: model {}, {} tokens of {}, device {}, kv {}, budgets {:?}, channels {:?}, bits {:?}, sink {}, recent {}",
        a.model.model.display(),
        ids.len(),
        a.text.display(),
        loaded.model.device_name(),
        a.model.kv_dtype,
        a.budgets.iter().map(|b| b.to_string()).collect::<Vec<_>>(),
        a.channels,
        a.bits.iter().map(|b| b.to_string()).collect::<Vec<_>>(),
        a.sparse.sink,
        a.sparse.recent
    );
    let (dense, _, _) = run_ppl(
        &loaded.model,
        &ids,
        a.chunk,
        a.model.kv_dtype,
        &Attention::Dense,
        "dense",
    )?;
    let mut rows = Vec::new();
    let mut points = Vec::new();
    let mut md = format!(
        "| attention | budget | channels | label bits | perplexity | vs dense | rows read |\n| --- | --- | --- | --- | --- | --- | --- |\n| dense | all | - | - | {:.4} | +0.00% | 100% |\n",
        dense.ppl
    );
    for &bits in &a.bits {
        for &budget in &a.budgets {
            for &ch in &a.channels {
                let mut cfg = a.sparse.config();
                cfg.budget = budget;
                cfg.label_channels = ch;
                cfg.label_bits = bits;
                let att = a
                    .sparse
                    .attention_with(&a.model, &mut loaded.model, cfg, ids.len())?;
                let (r, st, _) = run_ppl(
                    &loaded.model,
                    &ids,
                    a.chunk,
                    a.model.kv_dtype,
                    &att,
                    &format!("{budget} r{ch} b{bits}"),
                )?;
                let rel = 100.0 * (r.ppl / dense.ppl - 1.0);
                let frac = st.as_ref().and_then(|s| s.read_fraction()).unwrap_or(1.0);
                let line = format!(
                    "| double-sparse | {budget} | {ch} | {bits} | {:.4} | {rel:+.2}% | {:.1}% |",
                    r.ppl,
                    100.0 * frac
                );
                if !a.json {
                    eprintln!("{line}");
                }
                md.push_str(&line);
                md.push('\n');
                let budget_fraction = match budget {
                    TokenBudget::Fraction(n) => 1.0 / n as f64,
                    TokenBudget::Tokens(k) => (k as f64 / ids.len().max(1) as f64).min(1.0),
                };
                points.push(SweepPoint {
                    budget: budget_fraction,
                    channels: ch,
                    bits: bits.to_string(),
                    ppl: r.ppl,
                });
                rows.push(serde_json::json!({ "budget": budget.to_string(), "channels": ch, "bits": bits.to_string(),
                    "ppl": r.ppl, "vs_dense": r.ppl / dense.ppl - 1.0, "read_fraction": frac, "sparse": recall_json(&st) }));
            }
        }
    }
    if let Some(out) = &a.out {
        std::fs::write(out, &md).map_err(|e| CliError::io(out, e))?;
    }
    if let Some(base) = &a.plot {
        let data = SweepPlot {
            title: format!(
                "{}: {} tokens of {}, sink {}, recent {}, KV {}",
                a.model.model.display(),
                ids.len(),
                a.text.file_name().unwrap_or_default().to_string_lossy(),
                a.sparse.sink,
                a.sparse.recent,
                a.model.kv_dtype
            ),
            footnote: std::env::args().collect::<Vec<_>>().join(" "),
            dense_ppl: dense.ppl,
            points,
        };
        super::plot::announce(
            &super::plot::sweep_chart(&data, base).map_err(|e| CliError::Usage(e.to_string()))?,
        );
    }
    if a.json {
        let v = serde_json::json!({ "dense_ppl": dense.ppl, "rows": rows,
            "settings": { "model": a.model.model, "text": a.text, "tokens": ids.len(), "kv_dtype": a.model.kv_dtype.name(), "sink": a.sparse.sink, "recent": a.sparse.recent } });
        return out_line(&v.to_string());
    }
    out_line(md.trim_end())
}
