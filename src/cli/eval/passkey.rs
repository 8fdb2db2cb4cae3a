//! `farsight eval passkey`: passkey retrieval, a number hidden in filler at given prompt
//! lengths and depths, with the sparse settings (and optionally dense) in one table.

use clap::Args;
use farsight_engine::kv::Attention;
use farsight_engine::passkey::passkey_trial;

use super::out_line;
use crate::cli::common::{with_model, CliError, ModelArgs};
use crate::cli::sparse::SparseArgs;

#[derive(Args, Debug)]
pub struct PasskeyArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sparse: SparseArgs,
    /// Prompt lengths in tokens (comma-separated, k suffix allowed).
    #[arg(long, default_value = "1k,2k,4k,6k", value_delimiter = ',', value_parser = crate::cli::bench::parse_count)]
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

pub(super) fn passkey(a: PasskeyArgs) -> Result<(), CliError> {
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
                        crate::cli::report::print_after_run(crate::cli::report::footprint(
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
