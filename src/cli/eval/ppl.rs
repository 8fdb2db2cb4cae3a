//! `farsight eval ppl`: perplexity of a text, teacher-forced in chunks, with the sparse
//! counters (rows read, layer-ahead recall, selection reuse, row-cache hit rates) when sparse.

use std::path::PathBuf;

use clap::Args;
use farsight_offload::sparse::CACHE_FACTORS;

use super::{load_text, out_line, recall_json, run_ppl};
use crate::cli::common::{CliError, ModelArgs};
use crate::cli::sparse::SparseArgs;

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

pub(super) fn ppl(a: PplArgs) -> Result<(), CliError> {
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
        crate::cli::report::print_after_run(crate::cli::report::footprint(
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
