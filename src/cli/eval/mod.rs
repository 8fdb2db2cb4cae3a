//! `farsight eval`: accuracy measurements (perplexity, passkey retrieval, sparse-vs-dense
//! agreement, and sweeps over the sparse settings). Every command prints the settings it ran.
//!
//! This file holds the subcommand enum, the dispatch, and the helpers the commands share
//! (loading a text, a perplexity run, the sparse counters as JSON); each command lives in its
//! own module.

mod agreement;
mod logits;
mod passkey;
mod ppl;
mod sweep;

use std::io::Write;
use std::path::PathBuf;

use clap::Subcommand;
use farsight_engine::eval::{perplexity_with, Perplexity};
use farsight_engine::kv::{new_sparse_store, new_store, Attention};
use farsight_offload::sparse::{SparseStats, CACHE_FACTORS};
use farsight_offload::{KvMemory, KvStore};

use super::common::{read_text, token_progress, with_model, AnyModel, CliError, ModelArgs};

pub use logits::LogitsArgs;
pub use passkey::PasskeyArgs;
pub use ppl::PplArgs;
pub use sweep::SweepArgs;

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

pub fn run(c: EvalCommand) -> Result<(), CliError> {
    match c {
        EvalCommand::Ppl(a) => ppl::ppl(a),
        EvalCommand::Passkey(a) => passkey::passkey(a),
        EvalCommand::Agreement(a) => agreement::agree(a),
        EvalCommand::Sweep(a) => sweep::sweep(a),
        EvalCommand::Logits(a) => logits::logits(a),
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
