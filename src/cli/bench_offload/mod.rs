//! `farsight bench offload`: offloaded Double Sparsity decode of a synthetic model on the GPU.
//!
//! For each context `T` and batch `B`: `B` sequences whose full KV (`T - 1` random rows per
//! layer, different per sequence) lives in pinned host memory ([`OffloadKvStore`]), then, per
//! token budget, `--warmup + --steps` decode steps of the whole batch through the real forward
//! pass (the context grows by one token per step), each timed by the host clock from the call
//! to the logits on the host. Reported: median [min, max] ms per step, tokens/s, the row cache's
//! hit rate, bytes over PCIe per step, layer-ahead recall (extra steps that also make the true
//! selection), GPU and host footprint; in the same run, at batch 1, the same store with its rows
//! in device memory (compute only: nothing crosses PCIe) and dense decode with the KV on the GPU
//! where it fits (else the out-of-memory error), and the floors: HBM (weights + labels + rows
//! read per step at `--hbm-gbs`) and PCIe (the missed rows at `--pcie-gbs`).

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use farsight_engine::synthetic::{shape_config, spread_channels};
use farsight_engine::Model;
use farsight_kernels::cuda::CudaBackend;
use farsight_kernels::{Backend, DType};
use farsight_offload::sparse::{LabelBits, Predict, TokenBudget, MAX_PAGE_TOKENS};
use farsight_offload::{KvStore, KvStoreSpec};
use farsight_prefetch::{OffloadConfig, OffloadKvStore, RowHome};

use super::bench::{parse_count, Stats};
use super::common::CliError;
use super::preflight::disk_free;
use super::report::{host_memory_free, human_bytes};

mod measure;
mod prefill;
mod table;

use measure::{measure, reference};

use prefill::prefill_host;
use table::print_tables;

#[derive(Args, Debug)]
pub struct OffloadBenchArgs {
    /// Model shape (llama-3.1-8b, llama-2-7b, smollm2-135m), random bf16 weights made on the GPU.
    #[arg(long, default_value = "llama-3.1-8b")]
    pub shape: String,
    /// Context lengths (comma-separated; `32k` = 32768).
    #[arg(long, default_value = "32k,128k,256k", value_delimiter = ',', value_parser = parse_count)]
    pub context: Vec<usize>,
    /// Batch sizes (sequences decoded together).
    #[arg(long, default_value = "1", value_delimiter = ',')]
    pub batch: Vec<usize>,
    /// Token budgets per KV head, sinks and recent window included (`1/16`, `1/64`, or a count).
    #[arg(long, default_value = "1/16,1/64", value_delimiter = ',')]
    pub token_budget: Vec<TokenBudget>,
    /// Label channels per KV head (labels on the GPU, see --label-bits), spread over the RoPE
    /// frequencies.
    #[arg(long, default_value_t = 16)]
    pub label_channels: usize,
    /// Standard deviation of a fixed random query bias in every layer, against ~1 for the
    /// per-token part of the query: how much of the query persists from step to step, and so how
    /// much of last step's selection the next one reuses (the row cache's hit rate). 0: the
    /// queries of consecutive steps are independent, the worst case.
    #[arg(long, default_value_t = 0.0)]
    pub query_bias: f32,
    #[arg(long, default_value_t = 4)]
    pub sink: usize,
    #[arg(long, default_value_t = 64)]
    pub recent: usize,
    /// Which query selects a layer's rows: layer-ahead (prefetch stream) or same-layer.
    #[arg(long, default_value = "layer-ahead")]
    pub predict: Predict,
    /// Where the full KV lives: `host` (pinned memory) or `disk:PATH` (a file at PATH, or a new
    /// file in the directory PATH, removed afterwards; rows read through pinned staging).
    #[arg(long, default_value = "host")]
    pub kv_store: KvStoreSpec,
    /// `cuda` or `cuda:N`.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// KV dtype (bf16 or f16).
    #[arg(long, default_value = "bf16")]
    pub kv_dtype: String,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Extra steps that measure layer-ahead recall (0: none).
    #[arg(long, default_value_t = 4)]
    pub recall_steps: usize,
    /// Skip the batch-1 references (rows in device memory; dense KV on the GPU).
    #[arg(long)]
    pub no_reference: bool,
    /// Device memory bandwidth for the HBM floor, GB/s.
    #[arg(long, default_value_t = 2970.0)]
    pub hbm_gbs: f64,
    /// Host-to-device bandwidth for the PCIe floor, GB/s (shared/measurements: 54.8).
    #[arg(long, default_value_t = 54.8)]
    pub pcie_gbs: f64,
    /// Also time a real chunked prefill of this many token ids into host KV (0: none).
    #[arg(long, default_value = "0", value_parser = parse_count_or_zero)]
    pub prefill_context: usize,
    /// Tokens per prefill chunk (earlier chunks' rows stream back from host per layer).
    #[arg(long, default_value = "16k", value_parser = parse_count)]
    pub prefill_chunk: usize,
    /// The GPU's dense bf16 matmul peak for the prefill's fraction-of-peak, TFLOP/s.
    #[arg(long, default_value_t = 989.0)]
    pub peak_tflops: f64,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Label precision on the GPU: 16 (f16) or 4 (4-bit codes with a per-row minimum and scale).
    #[arg(long, default_value = "16")]
    pub label_bits: LabelBits,
    /// Most blocks of the gathers from pinned host memory, one run each (comma-separated);
    /// default: the backend's (`FARSIGHT_GATHER_BLOCKS`, else SMs / 4).
    #[arg(long, value_delimiter = ',')]
    pub gather_blocks: Vec<usize>,
    /// GPU row cache per (layer, KV head) in multiples of the top-k, one run each
    /// (comma-separated): 1 holds exactly the current selection, more also keep rows recent
    /// steps selected (least recently selected evicted first), so fewer rows cross PCIe.
    #[arg(long, default_value = "1", value_delimiter = ',')]
    pub row_cache: Vec<usize>,
    /// Page-granular selection, one set of stores each (comma-separated): the top-k taken in
    /// aligned pages of P tokens of one KV head, each page fetched as one unit of P rows (1:
    /// token-level). Host tier only.
    #[arg(long, default_value = "1", value_delimiter = ',')]
    pub page_tokens: Vec<usize>,
    /// Extra steps with timing events around each layer-ahead chain and each wait of the
    /// compute stream for one: the stall and chain time per step (0: none).
    #[arg(long, default_value_t = 3)]
    pub timing_steps: usize,
}

fn parse_count_or_zero(s: &str) -> Result<usize, String> {
    if s.trim() == "0" {
        Ok(0)
    } else {
        parse_count(s)
    }
}

fn device(s: &str) -> Result<usize, CliError> {
    match s {
        "cuda" => Ok(0),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| {
                CliError::Usage(format!(
                    "--device {s}: bench offload runs on `cuda` or `cuda:N`"
                ))
            }),
    }
}

pub fn run(a: OffloadBenchArgs) -> Result<(), CliError> {
    if a.steps == 0 || a.batch.contains(&0) || a.token_budget.is_empty() {
        return Err(CliError::Usage(
            "--steps and every --batch must be at least 1, and give a --token-budget".into(),
        ));
    }
    if a.row_cache.is_empty() || a.row_cache.contains(&0) {
        return Err(CliError::Usage(
            "--row-cache: every value at least 1 (times the top-k)".into(),
        ));
    }
    if a.page_tokens.is_empty() || a.page_tokens.iter().any(|&p| p == 0 || p > MAX_PAGE_TOKENS) {
        return Err(CliError::Usage(format!(
            "--page-tokens: every value from 1 to {MAX_PAGE_TOKENS}"
        )));
    }
    if a.page_tokens.iter().any(|&p| p > 1) && matches!(a.kv_store, KvStoreSpec::Disk(_)) {
        return Err(CliError::Usage(
            "--page-tokens above 1 with --kv-store disk: not supported (host tier only)".into(),
        ));
    }
    if a.gather_blocks.contains(&0) {
        return Err(CliError::Usage(
            "--gather-blocks: every value at least 1".into(),
        ));
    }
    if !(a.query_bias.is_finite() && a.query_bias >= 0.0) {
        return Err(CliError::Usage(format!(
            "--query-bias {}: a finite value >= 0",
            a.query_bias
        )));
    }
    let kv_dtype = match a.kv_dtype.as_str() {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        o => return Err(CliError::Usage(format!("--kv-dtype {o}: bf16 or f16"))),
    };
    let mut cfg = shape_config(&a.shape)?;
    // Room for the longest context and its decode steps (RoPE extends past the trained context;
    // the values are random, so only speed and memory are measured).
    let need = a
        .context
        .iter()
        .max()
        .copied()
        .unwrap_or(0)
        .max(a.prefill_context)
        + a.warmup
        + a.steps
        + a.recall_steps
        + a.timing_steps
        + 2;
    cfg.max_position_embeddings = cfg.max_position_embeddings.max(need);
    if a.label_channels == 0 || a.label_channels > cfg.head_dim {
        return Err(CliError::Usage(format!(
            "--label-channels {}: 1 to {}",
            a.label_channels, cfg.head_dim
        )));
    }
    let n = device(&a.device)?;
    let be =
        CudaBackend::new(n).map_err(|e| CliError::Usage(format!("--device {}: {e}", a.device)))?;
    let t0 = Instant::now();
    let mut model = Model::synthetic(cfg.clone(), be, DType::BF16, 1)?;
    if a.query_bias != 0.0 {
        model
            .add_query_bias(a.query_bias, 77)
            .map_err(|e| CliError::Usage(format!("--query-bias: {e}")))?;
    }
    let channels = vec![
        vec![spread_channels(cfg.head_dim, a.label_channels); cfg.num_kv_heads];
        cfg.num_layers
    ];
    if a.predict == Predict::LayerAhead {
        model.enable_layer_ahead(&channels)?;
    }
    let weight_bytes = model.weight_bytes();
    let dev_name = model.backend.name();
    if let Some((g, r)) = model.backend.gather_partition() {
        eprintln!("SM partition: host row gathers on {g} SMs, everything else on {r}");
    }
    eprintln!(
        "synthetic {}: {:.2} GB of bf16 weights on {dev_name} in {:.1} s, query bias {}",
        a.shape,
        weight_bytes as f64 / 1e9,
        t0.elapsed().as_secs_f64(),
        a.query_bias
    );
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let mut rows = Vec::new();
    let mut refs = Vec::new();
    // The largest budget first: the stores are made for it and swept down.
    let mut budgets = a.token_budget.clone();
    budgets.sort_by_key(|b| std::cmp::Reverse(b.tokens(1 << 20)));
    for &ctx in &a.context {
        for (&batch, &page) in a
            .batch
            .iter()
            .flat_map(|b| a.page_tokens.iter().map(move |p| (b, p)))
        {
            let base = OffloadConfig {
                budget: budgets[0],
                sink: a.sink,
                recent: a.recent,
                channels: channels.clone(),
                label_bits: a.label_bits,
                predict: a.predict,
                dtype: kv_dtype,
                capacity: ctx + a.warmup + a.steps + a.recall_steps + a.timing_steps + 2,
                home: RowHome::Host,
                measure_recall: false,
                row_cache: a.row_cache[0],
                page_tokens: page,
            };
            match offloaded(&model, &a, &base, ctx, batch, &budgets) {
                Ok(mut r) => rows.append(&mut r),
                Err(e) => {
                    eprintln!("context {ctx} batch {batch}: {e}");
                    rows.push(serde_json::json!({"context": ctx, "batch": batch,
                        "page_tokens": page, "error": e.to_string()}));
                }
            }
            if !a.no_reference {
                // Dense decode does not depend on the pages: once per context and batch.
                let dense = page == a.page_tokens[0];
                refs.push(reference(&model, &a, &base, ctx, batch, &budgets, dense));
            }
        }
    }
    let prefill_run = if a.prefill_context > 0 {
        match prefill_host(&model, &a, &channels, kv_dtype) {
            Ok(v) => v,
            Err(e) => serde_json::json!({"tokens": a.prefill_context, "error": e.to_string()}),
        }
    } else {
        serde_json::Value::Null
    };
    let report = serde_json::json!({
        "prefill": prefill_run,
        "command": command,
        "shape": a.shape,
        "device": dev_name,
        "weight_bytes": weight_bytes,
        "kv_dtype": kv_dtype.name(),
        "label_channels": a.label_channels,
        "query_bias": a.query_bias,
        "label_bits": a.label_bits.to_string(),
        "gather_partition_sms": model.backend.gather_partition().map(|p| p.0),
        "sink": a.sink,
        "recent": a.recent,
        "predict": a.predict.to_string(),
        "hbm_gbs": a.hbm_gbs,
        "pcie_gbs": a.pcie_gbs,
        "offloaded": rows,
        "references": refs,
    });
    print_tables(&report).map_err(CliError::Output)?;
    if let Some(p) = &a.json {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| CliError::io(dir, e))?;
        }
        std::fs::write(p, serde_json::to_string_pretty(&report).unwrap_or_default())
            .map_err(|e| CliError::io(p, e))?;
    }
    Ok(())
}

fn offloaded(
    m: &Model<CudaBackend>,
    a: &OffloadBenchArgs,
    base: &OffloadConfig,
    ctx: usize,
    batch: usize,
    budgets: &[TokenBudget],
) -> Result<Vec<serde_json::Value>, CliError> {
    let be = &m.backend;
    check_kv_room(m, &a.kv_store, base, batch)?;
    let t0 = Instant::now();
    let mut stores = Vec::with_capacity(batch);
    for i in 0..batch {
        let mut s = new_store(m, &a.kv_store, base.clone())?;
        s.fill_random(be, ctx - 1, 1.0, 1000 + i as u64)?;
        stores.push(s);
    }
    let (gpu_used, gpu_total) = be.mem_info()?;
    let (store_gpu, store_host): (usize, usize) = stores
        .iter()
        .map(|s| s.footprint())
        .fold((0, 0), |(g, h), (a, b)| (g + a, h + b));
    let host_pages = stores[0].host_pages().map_or("-", |k| k.name());
    let disk_bytes: usize = stores.iter().map(|s| s.disk_bytes()).sum();
    let kv_home = match &a.kv_store {
        KvStoreSpec::Host => format!(
            "{:.1} GiB of pinned host KV ({host_pages})",
            store_host as f64 / GIB
        ),
        KvStoreSpec::Disk(_) => format!(
            "{:.1} GiB of KV on disk ({}; {:.2} GiB of pinned buffers)",
            disk_bytes as f64 / GIB,
            stores[0].memory().tier,
            store_host as f64 / GIB
        ),
    };
    eprintln!(
        "context {ctx} batch {batch}: {kv_home} filled in {:.1} s; GPU {:.2} GiB used of {:.1} (stores {:.2} GiB)",
        t0.elapsed().as_secs_f64(),
        gpu_used as f64 / GIB,
        gpu_total as f64 / GIB,
        store_gpu as f64 / GIB
    );
    let labels_bytes = base.label_bytes_per_token();
    let mut out = Vec::new();
    let gather_runs: Vec<Option<usize>> = if a.gather_blocks.is_empty() {
        vec![None]
    } else {
        a.gather_blocks.iter().map(|&g| Some(g)).collect()
    };
    let default_blocks = be.gather_blocks();
    let mut runs = Vec::new();
    for &b in budgets {
        for &rc in &a.row_cache {
            for &g in &gather_runs {
                runs.push((b, rc, g));
            }
        }
    }
    for (budget, row_cache, gb) in runs {
        let blocks = gb.unwrap_or(default_blocks);
        be.set_gather_blocks(blocks);
        for s in stores.iter_mut() {
            s.set_gather_blocks(blocks);
            s.truncate(ctx - 1);
            s.set_budget_and_cache(be, budget, row_cache)?;
            s.set_measure_recall(false);
        }
        let (gpu_used, _) = be.mem_info()?;
        let store_gpu: usize = stores.iter().map(|s| s.footprint().0).sum();
        let r = measure(m, &mut stores, a)?;
        let per_step = |x: u64| x as f64 / (a.steps * batch) as f64;
        // The store's settings (with pages, its recent window ends on a page boundary).
        let used = stores[0].config();
        let rows_per_head = used.sink + used.recent + base_topk(used, budget, ctx);
        let fetched = per_step(r.stats.fetched_bytes) * batch as f64;
        let label_read = (labels_bytes * ctx) as f64;
        let row_read = (m.cfg.num_layers
            * m.cfg.num_kv_heads
            * rows_per_head
            * 2
            * m.cfg.head_dim
            * base.dtype.size()) as f64;
        let hbm_floor = (m.weight_bytes() as f64 + batch as f64 * (label_read + row_read))
            / (a.hbm_gbs * 1e9)
            * 1e3;
        let pcie_floor = fetched / (a.pcie_gbs * 1e9) * 1e3;
        let st = Stats::of(&r.ms);
        // Transfer-only: the prefetch chain of every layer alone (batch 1, layer-ahead).
        let chain = if batch == 1 && base.predict == Predict::LayerAhead {
            // Alternating query buffers: each run selects other rows than the caches hold.
            // Then the same without the gather: the selection's share of the chain.
            let mut v = Vec::with_capacity(5);
            let mut w = Vec::with_capacity(5);
            for i in 0..5 {
                v.push(stores[0].time_prefetch_chain(i % 2 == 1, true)?);
            }
            for i in 0..5 {
                w.push(stores[0].time_prefetch_chain(i % 2 == 1, false)?);
            }
            Some((Stats::of(&v[1..]), Stats::of(&w[1..])))
        } else {
            None
        };
        if let Some((c, w)) = &chain {
            eprintln!("  budget {budget}: prefetch chain alone (transfer-only) {:.2} ms [{:.2}, {:.2}]; without the gather {:.2} ms [{:.2}, {:.2}]", c.median, c.min, c.max, w.median, w.min, w.max);
        }
        let (chain, chain_select) = match chain {
            Some((c, w)) => (Some(c), Some(w)),
            None => (None, None),
        };
        eprintln!(
            "  budget {budget}, pages of {}, row cache {row_cache}x, {blocks} gather blocks: {:.2} ms/step [{:.2}, {:.2}], {:.0} tok/s, hit rate {:.3}, {:.1} MB over PCIe per step, recall {}",
            base.page(),
            st.median,
            st.min,
            st.max,
            batch as f64 * 1e3 / st.median,
            r.stats.hit_rate(),
            fetched / 1e6,
            r.recall.map_or("-".into(), |x| format!("{x:.3}"))
        );
        if let Some(t) = &r.timing {
            eprintln!(
                "  budget {budget}: timed steps: compute stream stalled {:.2} ms/step waiting for the prefetch stream; chains {:.2} ms/step ({} chains, {} waits)",
                t.stall_ms, t.chain_ms, t.chains, t.waits
            );
        }
        out.push(serde_json::json!({
            "context": ctx,
            "batch": batch,
            "budget": budget.to_string(),
            "rows_per_kv_head": rows_per_head,
            "host_pages": host_pages,
            "step_ms": st,
            "steps_ms": r.ms,
            "tok_s": batch as f64 * 1e3 / st.median,
            "hit_rate": r.stats.hit_rate(),
            "pcie_bytes_per_step": fetched,
            "host_write_bytes_per_step": per_step(r.stats.written_bytes) * batch as f64,
            "recall": r.recall,
            "hbm_floor_ms": hbm_floor,
            "pcie_floor_ms": pcie_floor,
            "transfer_only_ms": chain,
            "chain_without_gather_ms": chain_select,
            "gpu_used_bytes": gpu_used,
            "gpu_store_bytes": store_gpu,
            "host_kv_bytes": store_host,
            "disk_kv_bytes": disk_bytes,
            "kv_store": a.kv_store.to_string(),
            "gather_blocks": blocks,
            "row_cache": row_cache,
            "page_tokens": base.page(),
            "stall_ms_per_step": r.timing.map(|t| t.stall_ms),
            "chain_ms_per_step": r.timing.map(|t| t.chain_ms),
        }));
    }
    Ok(out)
}

/// Pinned host memory (or disk space) the run's full KV needs against what the machine has:
/// a clear error before anything is allocated (pinned memory cannot be swapped out, and running
/// past it gets the process killed rather than an allocation error).
fn check_kv_room(
    m: &Model<CudaBackend>,
    spec: &KvStoreSpec,
    cfg: &OffloadConfig,
    batch: usize,
) -> Result<(), CliError> {
    let shape = m.attn_shape();
    let need = batch
        * m.cfg.num_layers
        * cfg.capacity
        * shape.n_kv_heads
        * 2
        * shape.head_dim
        * cfg.dtype.size();
    let (what, room) = match spec {
        // Headroom for the process itself and the system: 4 GiB.
        KvStoreSpec::Host => (
            "pinned host memory (MemAvailable less 4 GiB)",
            host_memory_free().map(|b| b.saturating_sub(4 << 30)),
        ),
        KvStoreSpec::Disk(p) => ("disk space", disk_free(p)),
    };
    match room {
        Some(room) if need > room => Err(CliError::Usage(format!(
            "out of memory: the full KV of {batch} x {} tokens needs {} of {what}, {} is available",
            cfg.capacity,
            human_bytes(need),
            human_bytes(room)
        ))),
        _ => Ok(()),
    }
}

/// An offloaded store with its rows where `--kv-store` says.
fn new_store(
    m: &Model<CudaBackend>,
    spec: &KvStoreSpec,
    cfg: OffloadConfig,
) -> Result<OffloadKvStore, CliError> {
    let (be, shape, layers) = (&m.backend, m.attn_shape(), m.cfg.num_layers);
    Ok(match spec {
        KvStoreSpec::Host => OffloadKvStore::new(be, cfg, shape, layers)?,
        KvStoreSpec::Disk(p) => OffloadKvStore::new_on_disk(be, cfg, shape, layers, p)?,
    })
}

/// Rows a query at `ctx` selects (whole pages with page-granular selection).
fn base_topk(c: &OffloadConfig, budget: TokenBudget, ctx: usize) -> usize {
    let mut c = c.clone();
    c.budget = budget;
    c.top_k(ctx) / c.page() * c.page()
}

const GIB: f64 = (1u64 << 30) as f64;

impl OffloadBenchArgs {
    fn clone_args(&self) -> OffloadBenchArgs {
        OffloadBenchArgs {
            shape: self.shape.clone(),
            context: self.context.clone(),
            batch: self.batch.clone(),
            token_budget: self.token_budget.clone(),
            label_channels: self.label_channels,
            query_bias: self.query_bias,
            sink: self.sink,
            recent: self.recent,
            predict: self.predict,
            kv_store: self.kv_store.clone(),
            device: self.device.clone(),
            kv_dtype: self.kv_dtype.clone(),
            steps: self.steps,
            warmup: self.warmup,
            recall_steps: self.recall_steps,
            gather_blocks: self.gather_blocks.clone(),
            row_cache: self.row_cache.clone(),
            page_tokens: self.page_tokens.clone(),
            timing_steps: self.timing_steps,
            no_reference: self.no_reference,
            hbm_gbs: self.hbm_gbs,
            pcie_gbs: self.pcie_gbs,
            prefill_context: 0,
            prefill_chunk: self.prefill_chunk,
            peak_tflops: self.peak_tflops,
            json: None,
            label_bits: self.label_bits,
        }
    }
}
