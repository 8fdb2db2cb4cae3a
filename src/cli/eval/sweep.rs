//! `farsight eval sweep`: perplexity over a grid of budgets x label channels x label bits,
//! dense in the same markdown table (optionally written to a file and plotted).

use std::path::PathBuf;

use clap::Args;
use farsight_engine::kv::Attention;
use farsight_offload::sparse::{LabelBits, TokenBudget};

use super::{load_text, out_line, recall_json, run_ppl};
use crate::cli::common::{CliError, ModelArgs};
use crate::cli::plot::{SweepPlot, SweepPoint};
use crate::cli::sparse::{AttentionKind, SparseArgs};

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

pub(super) fn sweep(a: SweepArgs) -> Result<(), CliError> {
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
        crate::cli::plot::announce(
            &crate::cli::plot::sweep_chart(&data, base)
                .map_err(|e| CliError::Usage(e.to_string()))?,
        );
    }
    if a.json {
        let v = serde_json::json!({ "dense_ppl": dense.ppl, "rows": rows,
            "settings": { "model": a.model.model, "text": a.text, "tokens": ids.len(), "kv_dtype": a.model.kv_dtype.name(), "sink": a.sparse.sink, "recent": a.sparse.recent } });
        return out_line(&v.to_string());
    }
    out_line(md.trim_end())
}
