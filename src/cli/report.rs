//! `farsight report memory` and `--report-memory`: the footprint per tier (GPU, host, disk) of
//! weights, labels, KV rows, GPU row windows and the workspace, the full KV it stands for and
//! the compression ratio. `report memory` predicts it for `--context N` tokens without running
//! the model (the store's growth replayed chunk by chunk); `--report-memory` reads it from the
//! store after a run and adds the process's peak RSS (VmHWM).
//!
//! Labels are listed on the compute tier: host memory on the CPU, the GPU for the offloaded
//! GPU store (they grow with the context there too). The `windows` line is the offloaded
//! store's other device memory (recent windows, row caches, selection scratch); 0 on the CPU,
//! and in predictions (`report memory` does not model the GPU store yet).

use std::path::PathBuf;

use clap::{Args, Subcommand};
use farsight_engine::kv::{full_kv_bytes, label_bytes_per_token, Attention};
use farsight_offload::sparse::evict::EVICT_EXTENT_SLOTS;
use farsight_offload::{KvMemory, KvStoreSpec, SparseConfig};

use super::bench::parse_count;
use super::common::{with_model, AnyModel, CliError, ModelArgs};
use super::plot::{MemoryPlot, MemoryPoint};
use super::sparse::{AttentionKind, SparseArgs};

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
    /// Tokens of context, comma-separated (`4k` = 4096; default: the model's context, or
    /// --context-override); one footprint each.
    #[arg(long, value_delimiter = ',', value_parser = parse_count)]
    pub context: Vec<usize>,
    /// Tokens per prefill call.
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// Print one JSON object per context.
    #[arg(long)]
    pub json: bool,
    /// Also plot the footprint per item against context, with the full dense KV: PATH.svg and
    /// PATH.png (PATH without extension).
    #[arg(long, value_name = "PATH")]
    pub plot: Option<PathBuf>,
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
pub fn footprint(
    model: &AnyModel,
    kv_dtype: farsight_kernels::DType,
    kv: KvMemory,
    rows: usize,
    logit_rows: usize,
) -> Footprint {
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
        Line {
            tier: compute,
            what: "weights",
            bytes: weights,
        },
        Line {
            tier: compute,
            what: "workspace",
            bytes: workspace,
        },
        Line {
            tier: "gpu",
            what: "windows",
            bytes: kv.device_bytes,
        },
        // The offloaded GPU store keeps its labels on the GPU (they grow with the context).
        Line {
            tier: compute,
            what: "labels",
            bytes: kv.label_bytes,
        },
        Line {
            tier: rows_tier,
            what: "rows",
            bytes: kv.row_bytes,
        },
    ];
    let full = full_kv_bytes(model.cfg(), kv_dtype, kv.positions);
    let kv_bytes = kv.row_bytes + kv.label_bytes;
    let host: usize = lines
        .iter()
        .filter(|l| l.tier == "host")
        .map(|l| l.bytes)
        .sum();
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

/// The `KEY: N kB` line of a Linux /proc file, in bytes.
fn proc_kib(path: &str, key: &str) -> Option<usize> {
    let s = std::fs::read_to_string(path).ok()?;
    let line = s
        .lines()
        .find(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Peak resident set of this process (Linux `VmHWM`).
pub fn peak_rss() -> Option<usize> {
    proc_kib("/proc/self/status", "VmHWM")
}

/// Host memory the system can still give this process (`MemAvailable`).
pub fn host_memory_free() -> Option<usize> {
    proc_kib("/proc/meminfo", "MemAvailable")
}

/// Host memory this process holds now (`VmRSS`) plus what the system can still give it
/// (`MemAvailable`).
pub fn host_memory_available() -> Option<usize> {
    Some(proc_kib("/proc/meminfo", "MemAvailable")? + proc_kib("/proc/self/status", "VmRSS")?)
}

fn mib(b: usize) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

/// `24.0 GiB`, `512.0 MiB`, `12.0 KiB`.
pub fn human_bytes(b: usize) -> String {
    let f = b as f64;
    match b {
        _ if b >= 1 << 30 => format!("{:.1} GiB", f / (1u64 << 30) as f64),
        _ if b >= 1 << 20 => mib(b),
        _ => format!("{:.1} KiB", f / 1024.0),
    }
}

/// The footprint as a table (one line per tier and item).
pub fn table(f: &Footprint) -> String {
    let mut s = String::from("| tier | item | bytes | MiB |\n| --- | --- | --- | --- |\n");
    for l in &f.lines {
        s += &format!(
            "| {} | {} | {} | {} |\n",
            l.tier,
            l.what,
            l.bytes,
            mib(l.bytes)
        );
    }
    for tier in ["gpu", "host", "disk"] {
        let t: usize = f
            .lines
            .iter()
            .filter(|l| l.tier == tier)
            .map(|l| l.bytes)
            .sum();
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
    s += &format!(
        "\npredicted peak RSS {} (load {}, host total {})",
        mib(f.predicted_peak_rss_bytes),
        mib(f.load_peak_bytes),
        mib(f
            .lines
            .iter()
            .filter(|l| l.tier == "host")
            .map(|l| l.bytes)
            .sum())
    );
    if let Some(b) = f.kv.budget_bytes {
        s += &format!(
            "; budget {} ({b} B); {} evictions, {} tokens, {} freed",
            mib(b),
            f.kv.evictions,
            f.kv.evicted_tokens,
            mib(f.kv.bytes_freed as usize)
        );
    }
    if let Some(r) = f.peak_rss_bytes {
        let p = f.predicted_peak_rss_bytes;
        s += &format!(
            "\npeak RSS {} measured vs {} predicted ({:+.1}%)",
            mib(r),
            mib(p),
            100.0 * (r as f64 / p as f64 - 1.0)
        );
    }
    s
}

/// Prints the footprint after a run (with the peak RSS) on stderr.
pub fn print_after_run(mut f: Footprint) {
    f.peak_rss_bytes = peak_rss();
    eprintln!("{}", table(&f));
}

/// Rows + labels of one token of a sparse store (what a host KV budget is spent on).
pub fn sparse_token_bytes(
    c: &farsight_engine::ModelConfig,
    kv_dtype: farsight_kernels::DType,
    s: &SparseConfig,
) -> usize {
    full_kv_bytes(c, kv_dtype, 1) + label_bytes_per_token(c, s)
}

/// Tokens whose rows and labels a sparse store under this host KV budget can hold at once
/// (whole 64-slot extents; `usize::MAX` without a budget), as the store computes it.
pub fn budget_slot_cap(
    c: &farsight_engine::ModelConfig,
    kv_dtype: farsight_kernels::DType,
    s: &SparseConfig,
) -> usize {
    s.evict.as_ref().map_or(usize::MAX, |e| {
        e.slot_cap(sparse_token_bytes(c, kv_dtype, s), EVICT_EXTENT_SLOTS)
    })
}

/// Tokens done at the first call boundary after `n` (calls of `chunk` tokens, the last shorter).
fn boundary_after(n: usize, chunk: usize, context: usize) -> usize {
    ((n / chunk + 1) * chunk).min(context)
}

/// Replays the store's growth for `context` tokens in `chunk`-token calls (one token per call
/// after the prompt is irrelevant: growth depends only on the live tokens). Only the calls where
/// an allocation grows are visited, so any context costs a few dozen steps.
pub fn predict(
    model: &AnyModel,
    kv_dtype: farsight_kernels::DType,
    attention: &Attention,
    context: usize,
    chunk: usize,
) -> KvMemory {
    let c = model.cfg();
    let per_token_rows = full_kv_bytes(c, kv_dtype, 1);
    let chunk = chunk.max(1);
    match attention {
        Attention::Dense => {
            // DenseKvCache: 64 rows, then max(needed, 2 x capacity) up to the model's context.
            let max = c.context_length().max(1);
            let mut cap = 64.min(max);
            while cap < context.min(max) {
                cap = boundary_after(cap, chunk, context).max(cap * 2).min(max);
            }
            KvMemory {
                tier: "device".into(),
                row_bytes: cap * per_token_rows,
                positions: context,
                live_tokens: context,
                ..KvMemory::default()
            }
        }
        Attention::DoubleSparse(s) => {
            let per_label = label_bytes_per_token(c, &s.cfg);
            let slot_cap = budget_slot_cap(c, kv_dtype, &s.cfg);
            let extent = if s.cfg.evict.is_some() {
                EVICT_EXTENT_SLOTS
            } else {
                1024
            };
            let (pool, labels) = sparse_growth(context, chunk, slot_cap);
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

/// (slots in use at the peak, label table rows) of a sparse store after `context` tokens in
/// `chunk`-token calls: a call of `n` tokens holds at most `max(slot_cap, n)` slots; the label
/// table grows to the slots in use, at least doubling (from 64), at most `slot_cap`.
fn sparse_growth(context: usize, chunk: usize, slot_cap: usize) -> (usize, usize) {
    let grow = |pool: usize, labels: usize| {
        if pool > labels {
            pool.max((labels * 2).max(64).min(slot_cap))
        } else {
            labels
        }
    };
    let full = slot_cap.max(chunk);
    let (mut pool, mut labels) = (0usize, 0usize);
    if context == 0 {
        return (0, 0);
    }
    loop {
        // The first whole call (not the last) whose slots pass the label table.
        let done = (labels / chunk + 1) * chunk;
        if done < context && full > labels {
            pool = pool.max(done.min(full));
            labels = grow(pool, labels);
            continue;
        }
        let last = context - (context - 1) / chunk * chunk;
        pool = pool.max(context.min(slot_cap.max(last)));
        return (pool, grow(pool, labels));
    }
}

fn memory(a: MemoryArgs) -> Result<(), CliError> {
    if a.chunk == 0 {
        return Err(CliError::Usage("--chunk must be at least 1".into()));
    }
    let mut model = a.model.load_model()?;
    a.sparse.apply_context(&mut model)?;
    let max = model.cfg().context_length();
    let contexts = if a.context.is_empty() {
        vec![max]
    } else {
        a.context.clone()
    };
    if let Some(n) = contexts.iter().find(|&&n| n > max) {
        return Err(CliError::Usage(format!(
            "--context {n}: the model's context is {max} tokens (--context-override N to pass it)"
        )));
    }
    let mut plot = Vec::new();
    let kind = match (&a.sparse.attention, &a.sparse.host_kv_budget) {
        (AttentionKind::Dense, _) => "dense".to_string(),
        (AttentionKind::DoubleSparse, None) => {
            format!("double-sparse, {} store", a.sparse.kv_store)
        }
        (AttentionKind::DoubleSparse, Some(b)) => {
            format!("double-sparse, {} store, budget {b}", a.sparse.kv_store)
        }
    };
    for &context in &contexts {
        let attention = a.sparse.attention_planned(&a.model, &mut model, context)?;
        if matches!(a.sparse.kv_store, KvStoreSpec::Disk(_))
            && !matches!(attention, Attention::DoubleSparse(_))
        {
            return Err(CliError::Usage(
                "--kv-store disk needs --attention double-sparse".into(),
            ));
        }
        let kv = predict(&model, a.model.kv_dtype, &attention, context, a.chunk);
        let f = footprint(
            &model,
            a.model.kv_dtype,
            kv,
            a.chunk.min(context),
            a.chunk.min(context),
        );
        let described = attention.describe();
        if a.json {
            let v = serde_json::json!({ "footprint": f, "settings": { "model": a.model.model, "context": context, "chunk": a.chunk,
                "kv_dtype": a.model.kv_dtype.name(), "attention": described, "device": model.device_name() } });
            println!("{v}");
        } else {
            println!(
                "memory for {context} tokens, attention {described}, device {}",
                model.device_name()
            );
            println!("{}", table(&f));
        }
        plot.push(MemoryPoint {
            context,
            lines: f
                .lines
                .iter()
                .map(|l| (format!("{} ({})", l.what, l.tier), l.bytes))
                .collect(),
            full_kv: f.full_kv_bytes,
        });
    }
    if let Some(base) = &a.plot {
        let data = MemoryPlot {
            title: format!(
                "{}: memory ({kind}, KV {}, {})",
                a.model
                    .model
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy(),
                a.model.kv_dtype,
                model.device_name().split(" (").next().unwrap_or_default()
            ),
            footnote: std::env::args().collect::<Vec<_>>().join(" "),
            points: plot,
        };
        super::plot::announce(
            &super::plot::memory_chart(&data, base).map_err(|e| CliError::Usage(e.to_string()))?,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The store's own growth, one call at a time (what `sparse_growth` jumps through).
    fn sparse_growth_naive(context: usize, chunk: usize, slot_cap: usize) -> (usize, usize) {
        let (mut pool, mut labels, mut done) = (0usize, 0usize, 0usize);
        while done < context {
            let n = chunk.min(context - done);
            pool = pool.max((done + n).min(slot_cap.max(n)));
            if pool > labels {
                labels = pool.max((labels * 2).max(64).min(slot_cap));
            }
            done += n;
        }
        (pool, labels)
    }

    #[test]
    fn sparse_growth_matches_the_call_by_call_replay() {
        for context in [
            0, 1, 5, 63, 64, 65, 100, 511, 512, 513, 1000, 4096, 5000, 70_001,
        ] {
            for chunk in [1, 7, 64, 512, 600] {
                for cap in [0, 10, 64, 100, 640, 4096, usize::MAX] {
                    assert_eq!(
                        sparse_growth(context, chunk, cap),
                        sparse_growth_naive(context, chunk, cap),
                        "{context} {chunk} {cap}"
                    );
                }
            }
        }
    }

    #[test]
    fn dense_growth_follows_the_cache() {
        // DenseKvCache::reserve, call by call, against the jumps of `predict`.
        for (context, chunk, max) in [
            (5000, 512, 8192),
            (2048, 512, 8192),
            (10, 512, 8192),
            (8192, 100, 8192),
            (3, 1, 2),
            (70_000, 512, 65_536),
        ] {
            let (mut cap, mut done) = (64.min(max), 0);
            while done < context.min(max) {
                done += chunk.min(context - done);
                if done > cap {
                    cap = done.max(cap * 2).min(max);
                }
            }
            let mut jump = 64.min(max);
            while jump < context.min(max) {
                jump = boundary_after(jump, chunk, context).max(jump * 2).min(max);
            }
            assert_eq!(jump, cap, "{context} {chunk} {max}");
        }
    }
}
