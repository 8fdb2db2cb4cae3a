//! `farsight report memory` and `--report-memory`: the footprint per tier (GPU, host, disk) of
//! weights, labels, KV rows, GPU row windows and the workspace, the full KV it stands for and
//! the compression ratio. `report memory` predicts it for `--context N` tokens without running
//! the model (the store's growth replayed chunk by chunk); `--report-memory` reads it from the
//! store after a run and adds the process's peak RSS (VmHWM).
//!
//! This build keeps labels in host memory (the sparse attention runs on the host) and has no
//! GPU row window yet: its line is listed at 0 bytes.

use clap::{Args, Subcommand};
use farsight_engine::kv::{full_kv_bytes, label_bytes_per_token, Attention};
use farsight_offload::sparse::evict::EVICT_EXTENT_SLOTS;
use farsight_offload::{KvMemory, KvStoreSpec};

use super::common::{with_model, AnyModel, CliError, ModelArgs};
use super::sparse::SparseArgs;

#[derive(Subcommand, Debug)]
pub enum ReportCommand {
    /// Memory footprint per tier for a context of N tokens, with the sparse and budget flags.
    Memory(MemoryArgs),
}

#[derive(Args, Debug)]
pub struct MemoryArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sparse: SparseArgs,
    /// Tokens of context (default: the model's context, or --context-override).
    #[arg(long)]
    pub context: Option<usize>,
    /// Tokens per prefill call.
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(c: ReportCommand) -> Result<(), CliError> {
    match c {
        ReportCommand::Memory(a) => memory(a),
    }
}

/// One line of the footprint.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Line {
    pub tier: &'static str,
    pub what: &'static str,
    pub bytes: usize,
}

/// A footprint and what it stands for.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Footprint {
    pub lines: Vec<Line>,
    /// Positions the KV covers.
    pub tokens: usize,
    /// What a dense cache of those positions holds.
    pub full_kv_bytes: usize,
    /// KV rows plus labels held.
    pub kv_bytes: usize,
    pub compression_ratio: f64,
    pub total_bytes: usize,
    /// Peak while loading: the checkpoint's mapped pages plus the backend's host copy (CPU).
    pub load_peak_bytes: usize,
    /// What the peak resident set should be: the larger of the load peak and the host total.
    pub predicted_peak_rss_bytes: usize,
    pub kv: KvMemory,
    /// Measured peak resident set of this process (runs only).
    pub peak_rss_bytes: Option<usize>,
}

/// The footprint of `model` with a store in the state `kv` and a workspace of `rows` rows.
pub fn footprint(model: &AnyModel, kv_dtype: farsight_kernels::DType, kv: KvMemory, rows: usize, logit_rows: usize) -> Footprint {
    let gpu = !model.device_name().starts_with("cpu");
    let compute = if gpu { "gpu" } else { "host" };
    let rows_tier = match kv.tier.as_str() {
        "device" => compute,
        t if t.starts_with("disk") => "disk",
        _ => "host",
    };
    let weights = with_model!(model, m => m.weight_bytes());
    let workspace = with_model!(model, m => m.workspace_bytes(rows, logit_rows));
    let lines = vec![
        Line { tier: compute, what: "weights", bytes: weights },
        Line { tier: compute, what: "workspace", bytes: workspace },
        Line { tier: "gpu", what: "windows", bytes: 0 },
        Line { tier: "host", what: "labels", bytes: kv.label_bytes },
        Line { tier: rows_tier, what: "rows", bytes: kv.row_bytes },
    ];
    let full = full_kv_bytes(model.cfg(), kv_dtype, kv.positions);
    let kv_bytes = kv.row_bytes + kv.label_bytes;
    let host: usize = lines.iter().filter(|l| l.tier == "host").map(|l| l.bytes).sum();
    // The checkpoint is memory-mapped while the weights are copied out, then unmapped.
    let load_peak = weights + if gpu { 0 } else { weights };
    Footprint {
        total_bytes: lines.iter().map(|l| l.bytes).sum(),
        load_peak_bytes: load_peak,
        predicted_peak_rss_bytes: load_peak.max(host),
        lines,
        tokens: kv.positions,
        full_kv_bytes: full,
        kv_bytes,
        compression_ratio: full as f64 / kv_bytes.max(1) as f64,
        kv,
        peak_rss_bytes: None,
    }
}

/// Peak resident set of this process (Linux `VmHWM`).
pub fn peak_rss() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn mib(b: usize) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

/// The footprint as a table (one line per tier and item).
pub fn table(f: &Footprint) -> String {
    let mut s = String::from("| tier | item | bytes | MiB |\n| --- | --- | --- | --- |\n");
    for l in &f.lines {
        s += &format!("| {} | {} | {} | {} |\n", l.tier, l.what, l.bytes, mib(l.bytes));
    }
    for tier in ["gpu", "host", "disk"] {
        let t: usize = f.lines.iter().filter(|l| l.tier == tier).map(|l| l.bytes).sum();
        s += &format!("| {tier} | total | {t} | {} |\n", mib(t));
    }
    s += &format!(
        "KV: {} positions, {} live; rows + labels {} stand for a full KV of {} (compression {:.2}x)",
        f.tokens,
        f.kv.live_tokens,
        mib(f.kv_bytes),
        mib(f.full_kv_bytes),
        f.compression_ratio
    );
    s += &format!("\npredicted peak RSS {} (load {}, host total {})", mib(f.predicted_peak_rss_bytes), mib(f.load_peak_bytes), mib(f.lines.iter().filter(|l| l.tier == "host").map(|l| l.bytes).sum()));
    if let Some(b) = f.kv.budget_bytes {
        s += &format!("; budget {} ({b} B); {} evictions, {} tokens, {} freed", mib(b), f.kv.evictions, f.kv.evicted_tokens, mib(f.kv.bytes_freed as usize));
    }
    if let Some(r) = f.peak_rss_bytes {
        let p = f.predicted_peak_rss_bytes;
        s += &format!("\npeak RSS {} measured vs {} predicted ({:+.1}%)", mib(r), mib(p), 100.0 * (r as f64 / p as f64 - 1.0));
    }
    s
}

/// Prints the footprint after a run (with the peak RSS) on stderr.
pub fn print_after_run(mut f: Footprint) {
    f.peak_rss_bytes = peak_rss();
    eprintln!("{}", table(&f));
}

/// Replays the store's growth for `context` tokens in `chunk`-token calls (one token per call
/// after the prompt is irrelevant: growth depends only on the live tokens).
fn predict(model: &AnyModel, kv_dtype: farsight_kernels::DType, attention: &Attention, context: usize, chunk: usize) -> KvMemory {
    let c = model.cfg();
    let per_token_rows = full_kv_bytes(c, kv_dtype, 1);
    match attention {
        Attention::Dense => {
            let mut cap = 64.min(context.max(1));
            while cap < context {
                cap = (cap * 2).min(context);
            }
            KvMemory { tier: "device".into(), row_bytes: cap * per_token_rows, positions: context, live_tokens: context, ..KvMemory::default() }
        }
        Attention::DoubleSparse(s) => {
            let per_label = label_bytes_per_token(c, &s.cfg);
            let (extent, slot_cap) = match &s.cfg.evict {
                Some(e) => (EVICT_EXTENT_SLOTS, e.slot_cap(per_token_rows + per_label, EVICT_EXTENT_SLOTS)),
                None => (1024, usize::MAX),
            };
            let (mut pool, mut labels, mut done) = (0usize, 0usize, 0usize);
            while done < context {
                let n = chunk.min(context - done);
                pool = pool.max((done + n).min(slot_cap.max(n)));
                if pool > labels {
                    labels = pool.max((labels * 2).max(64).min(slot_cap));
                }
                done += n;
            }
            let tier_slots = pool.div_ceil(extent) * extent;
            KvMemory {
                tier: s.store.to_string(),
                row_bytes: tier_slots * per_token_rows,
                label_bytes: labels * per_label,
                positions: context,
                live_tokens: pool.min(context),
                budget_bytes: s.cfg.evict.as_ref().map(|e| e.budget_bytes),
                ..KvMemory::default()
            }
        }
    }
}

fn memory(a: MemoryArgs) -> Result<(), CliError> {
    if a.chunk == 0 {
        return Err(CliError::Usage("--chunk must be at least 1".into()));
    }
    let mut model = a.model.load_model()?;
    let context = a.context.or(a.sparse.context_override).unwrap_or(model.cfg().context_length());
    let attention = a.sparse.attention_planned(&a.model, &mut model, context)?;
    let kv = predict(&model, a.model.kv_dtype, &attention, context, a.chunk);
    if matches!(a.sparse.kv_store, KvStoreSpec::Disk(_)) && !matches!(attention, Attention::DoubleSparse(_)) {
        return Err(CliError::Usage("--kv-store disk needs --attention double-sparse".into()));
    }
    let f = footprint(&model, a.model.kv_dtype, kv, a.chunk.min(context), a.chunk.min(context));
    if a.json {
        let v = serde_json::json!({ "footprint": f, "settings": { "model": a.model.model, "context": context, "chunk": a.chunk,
            "kv_dtype": a.model.kv_dtype.name(), "attention": attention.describe(), "device": model.device_name() } });
        println!("{v}");
    } else {
        println!("memory for {context} tokens, attention {}, device {}", attention.describe(), model.device_name());
        println!("{}", table(&f));
    }
    Ok(())
}
