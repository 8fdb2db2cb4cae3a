//! `farsight bench attention`: the Double Sparsity decode attention operator on the GPU (label
//! scoring of every token + exact top-k per KV head + attention over the selected rows, read by
//! index from the device KV cache) against the dense decode attention kernel at the same context,
//! one layer, one query, batch 1; then the offload case: the selected rows gathered from pinned
//! host memory (UVA zero-copy) into a compact device buffer and attended there.
//!
//! Each figure: `--repeats` measurements, each the mean of `--calls` back-to-back calls timed by
//! the host clock around a synchronize, after `--warmup` calls; median [min, max].

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use farsight_engine::synthetic::shape_config;
use farsight_kernels::cuda::{CudaBackend, DevBuf, KvRows, DS_MAX_R};
use farsight_kernels::{AttnShape, Backend, CausalAttn, DType};
use farsight_offload::sparse::LabelBits;
use farsight_prefetch::{gpu_label_bytes, GpuLabels};

use super::bench::{parse_count, Stats};
use super::common::CliError;

/// A token budget: `1/16` (a fraction of the context) or a count (`2048`, `4k`).
fn parse_budget(s: &str) -> Result<String, String> {
    if let Some((a, b)) = s.split_once('/') {
        let (a, b) = (a.trim().parse::<usize>(), b.trim().parse::<usize>());
        match (a, b) {
            (Ok(a), Ok(b)) if a > 0 && b >= a => Ok(s.to_string()),
            _ => Err(format!("`{s}` is not a budget fraction")),
        }
    } else {
        parse_count(s).map(|_| s.to_string())
    }
}

fn budget_of(s: &str, context: usize) -> usize {
    match s.split_once('/') {
        Some((a, b)) => {
            context * a.trim().parse::<usize>().unwrap_or(1)
                / b.trim().parse::<usize>().unwrap_or(1)
        }
        None => parse_count(s).unwrap_or(0),
    }
}

#[derive(Args, Debug)]
pub struct AttnBenchArgs {
    /// Model shape (llama-3.1-8b, llama-2-7b, smollm2-135m): heads, KV heads, head dim.
    #[arg(long, default_value = "llama-3.1-8b")]
    pub shape: String,
    /// Context lengths (comma-separated; `4k` = 4096).
    #[arg(long, default_value = "32k,128k,256k", value_delimiter = ',', value_parser = parse_count)]
    pub context: Vec<usize>,
    /// Token budgets per KV head (sinks and recent window included): `1/16`, or a count.
    #[arg(long, default_value = "1/16,1/64", value_delimiter = ',', value_parser = parse_budget)]
    pub token_budget: Vec<String>,
    /// `cuda` or `cuda:N` (the operator is GPU-only).
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// KV dtype (bf16 or f16).
    #[arg(long, default_value = "bf16")]
    pub kv_dtype: String,
    /// Label channels per KV head.
    #[arg(long, default_value_t = 16)]
    pub label_channels: usize,
    /// First tokens always attended.
    #[arg(long, default_value_t = 4)]
    pub sink: usize,
    /// Most recent tokens always attended.
    #[arg(long, default_value_t = 64)]
    pub recent: usize,
    #[arg(long, default_value_t = 15)]
    pub repeats: usize,
    #[arg(long, default_value_t = 10)]
    pub calls: usize,
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Skip the pinned-host (offload) measurements.
    #[arg(long)]
    pub no_host: bool,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Label precision: 16 (f16) or 4 (4-bit codes with a per-row minimum and scale).
    #[arg(long, default_value = "16")]
    pub label_bits: LabelBits,
}

fn time_ms(
    be: &CudaBackend,
    a: &AttnBenchArgs,
    mut f: impl FnMut() -> Result<(), CliError>,
) -> Result<Stats, CliError> {
    for _ in 0..a.warmup {
        f()?;
    }
    be.synchronize()?;
    let mut v = Vec::with_capacity(a.repeats);
    for _ in 0..a.repeats {
        let t = Instant::now();
        for _ in 0..a.calls {
            f()?;
        }
        be.synchronize()?;
        v.push(t.elapsed().as_secs_f64() * 1e3 / a.calls as f64);
    }
    Ok(Stats::of(&v))
}

pub fn run(a: AttnBenchArgs) -> Result<(), CliError> {
    let ordinal = match a.device.as_str() {
        "cuda" => 0,
        d => d
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| {
                CliError::Usage(format!(
                    "--device {d}: the attention bench runs on cuda or cuda:N"
                ))
            })?,
    };
    let kv_dtype = match a.kv_dtype.as_str() {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        d => return Err(CliError::Usage(format!("--kv-dtype {d}: bf16 or f16"))),
    };
    if a.repeats == 0 || a.calls == 0 {
        return Err(CliError::Usage(
            "--repeats and --calls must be at least 1".into(),
        ));
    }
    let cfg = shape_config(&a.shape)?;
    let (nh, nkv, d, r) = (
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        a.label_channels,
    );
    let group = nh / nkv;
    if r == 0 || r > d.min(DS_MAX_R) {
        return Err(CliError::Usage(format!(
            "--label-channels {r}: 1 to {}",
            d.min(DS_MAX_R)
        )));
    }
    let bits = a.label_bits;
    let be = CudaBackend::new(ordinal)
        .map_err(|e| CliError::Usage(format!("--device {}: {e}", a.device)))?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let scale = 1.0 / (d as f32).sqrt();
    let es = kv_dtype.size();
    let row = 2 * d * es;
    let shape = AttnShape {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: d,
        window: None,
    };
    let mut q = be.tensor(1, nh * d)?;
    be.fill_random(&mut q, 1.0, 3)?;
    let mut out = be.tensor(1, nh * d)?;
    // Label channels: a fixed spread per KV head (the timing does not depend on which).
    let chan_h: Vec<i32> = (0..nkv * r)
        .map(|i| ((i % r) * d / r + (i / r) % (d / r).max(1)) as i32)
        .collect();
    let chan = be.dev_upload(&chan_h)?;
    let max_ctx = a.context.iter().copied().max().unwrap_or(0);
    let mut host = if a.no_host {
        None
    } else {
        Some(be.pinned(max_ctx * nkv * row)?)
    };
    if let Some(h) = host.as_mut() {
        // bf16/f16 values near 1 (no NaN/inf), a cheap pattern.
        let s = h.as_mut_slice()?;
        let base: u16 = if kv_dtype == DType::BF16 {
            0x3f80
        } else {
            0x3c00
        };
        for (i, c) in s.chunks_exact_mut(2).enumerate() {
            let v = base
                ^ ((i as u32).wrapping_mul(2_654_435_761) >> 25) as u16
                ^ (((i & 1) as u16) << 15);
            c.copy_from_slice(&v.to_le_bytes());
        }
    }
    eprintln!(
        "{} on {}: {nh} heads / {nkv} KV heads / D {d}, {} KV, {r} label channels of {bits} bits",
        a.shape,
        be.name(),
        kv_dtype.name()
    );
    let mut results = Vec::new();
    for &t in &a.context {
        let mut k = be.cache(t, nkv * d, kv_dtype)?;
        let mut v = be.cache(t, nkv * d, kv_dtype)?;
        be.fill_cache_random(&mut k, 1.0, 10 + t as u64)?;
        be.fill_cache_random(&mut v, 1.0, 20 + t as u64)?;
        let rows = KvRows {
            k: be.cache_ptr(&k),
            v: be.cache_ptr(&v),
            tok_stride: nkv * d,
            head_stride: d,
            dtype: kv_dtype,
        };
        let mut labels = GpuLabels::new(&be, bits, nkv, t, r)?;
        labels.write_from_cache(&be, &rows, d, &chan, 0, t)?;
        let attn = CausalAttn {
            shape,
            q_row0: 0,
            q_col0: 0,
            n_q: 1,
            n_past: t - 1,
            out_row0: 0,
            scale,
        };
        let dense = time_ms(&be, &a, || Ok(be.attention(&attn, &q, &k, &v, &mut out)?))?;
        eprintln!("context {t}: dense {:.4} ms", dense.median);
        let mut scores: DevBuf<f32> = be.dev_zeros(nkv * t)?;
        let mut scratch = be.ds_topk_scratch(nkv, t)?;
        for b in &a.token_budget {
            let budget = budget_of(b, t).min(t);
            let sink = a.sink.min(t);
            let recent0 = t.saturating_sub(a.recent).max(sink);
            let n_recent = t - recent0;
            let mid = recent0 - sink;
            let kk = budget.saturating_sub(sink + n_recent).min(mid);
            let n_sel = sink + kk + n_recent;
            if kk == 0 {
                eprintln!("context {t}, budget {b}: nothing to select, skipped");
                continue;
            }
            let mut idx: DevBuf<i32> = be.dev_zeros(nkv * n_sel)?;
            be.ds_fixed_rows(&mut idx, nkv, n_sel, sink, kk, recent0, n_recent)?;
            let mut score = || -> Result<(), CliError> {
                labels.scores(&be, &q, 0, &chan, group, d, sink, recent0, &mut scores)?;
                Ok(())
            };
            let t_scores = time_ms(&be, &a, &mut score)?;
            let t_topk = time_ms(&be, &a, || {
                Ok(be.ds_topk(
                    &scores,
                    nkv,
                    mid,
                    kk,
                    sink,
                    &mut idx,
                    n_sel,
                    sink,
                    &mut scratch,
                )?)
            })?;
            let t_attn = time_ms(&be, &a, || {
                Ok(be.sparse_attention(
                    &q,
                    &rows,
                    Some(&idx),
                    n_sel,
                    n_sel,
                    nh,
                    nkv,
                    d,
                    scale,
                    &mut out,
                )?)
            })?;
            let op = time_ms(&be, &a, || {
                labels.scores(&be, &q, 0, &chan, group, d, sink, recent0, &mut scores)?;
                be.ds_topk(
                    &scores,
                    nkv,
                    mid,
                    kk,
                    sink,
                    &mut idx,
                    n_sel,
                    sink,
                    &mut scratch,
                )?;
                be.sparse_attention(
                    &q,
                    &rows,
                    Some(&idx),
                    n_sel,
                    n_sel,
                    nh,
                    nkv,
                    d,
                    scale,
                    &mut out,
                )?;
                Ok(())
            })?;
            let label_bytes = nkv * mid * gpu_label_bytes(bits, r);
            let sel_bytes = nkv * n_sel * row;
            let mut rec = serde_json::json!({
                "context": t, "budget": b, "selected_rows_per_kv_head": n_sel, "top_k": kk,
                "sink": sink, "recent": n_recent,
                "dense_ms": dense, "sparse_ms": op, "speedup": dense.median / op.median,
                "parts_ms": {"label_scores": t_scores, "topk": t_topk, "sparse_attention": t_attn},
                "label_bytes": label_bytes, "selected_kv_bytes": sel_bytes,
                "dense_kv_bytes": 2 * t * nkv * d * es,
            });
            eprintln!(
                "context {t}, budget {b}: sparse {:.4} ms ({:.1}x)",
                op.median,
                dense.median / op.median
            );
            if let Some(h) = host.as_ref() {
                let hp = h.ptr()?;
                let mut dst: DevBuf<u8> = be.dev_zeros(sel_bytes)?;
                let dp = be.dev_ptr(&dst);
                let compact = KvRows {
                    k: dp,
                    v: dp + (d * es) as u64,
                    tok_stride: 2 * d,
                    head_stride: n_sel * 2 * d,
                    dtype: kv_dtype,
                };
                let gather = time_ms(&be, &a, || {
                    Ok(be.ds_gather_rows(
                        hp,
                        nkv * row,
                        row,
                        &idx,
                        n_sel,
                        n_sel,
                        nkv,
                        row,
                        &mut dst,
                    )?)
                })?;
                let full = time_ms(&be, &a, || {
                    labels.scores(&be, &q, 0, &chan, group, d, sink, recent0, &mut scores)?;
                    be.ds_topk(
                        &scores,
                        nkv,
                        mid,
                        kk,
                        sink,
                        &mut idx,
                        n_sel,
                        sink,
                        &mut scratch,
                    )?;
                    be.ds_gather_rows(hp, nkv * row, row, &idx, n_sel, n_sel, nkv, row, &mut dst)?;
                    be.sparse_attention(&q, &compact, None, 0, n_sel, nh, nkv, d, scale, &mut out)?;
                    Ok(())
                })?;
                // Zero-copy attention straight from pinned host memory (no gather).
                let host_rows = KvRows {
                    k: hp,
                    v: hp + (d * es) as u64,
                    tok_stride: nkv * 2 * d,
                    head_stride: 2 * d,
                    dtype: kv_dtype,
                };
                let direct = time_ms(&be, &a, || {
                    Ok(be.sparse_attention(
                        &q,
                        &host_rows,
                        Some(&idx),
                        n_sel,
                        n_sel,
                        nh,
                        nkv,
                        d,
                        scale,
                        &mut out,
                    )?)
                })?;
                let gbs = |s: &Stats| sel_bytes as f64 / (s.median * 1e-3) / 1e9;
                rec["host"] = serde_json::json!({
                    "row_bytes": row, "gather_ms": gather, "gather_gbs": gbs(&gather),
                    "operator_ms": full, "operator_speedup_vs_dense_on_gpu": dense.median / full.median,
                    "zero_copy_attention_ms": direct, "zero_copy_attention_gbs": gbs(&direct),
                });
                eprintln!(
                    "  host: gather {:.4} ms ({:.1} GB/s), operator {:.4} ms",
                    gather.median,
                    gbs(&gather),
                    full.median
                );
            }
            results.push(rec);
        }
    }
    let report = serde_json::json!({
        "command": command, "device": be.name(), "shape": a.shape, "kv_dtype": kv_dtype.name(),
        "heads": nh, "kv_heads": nkv, "head_dim": d, "label_channels": r, "label_bits": bits.to_string(),
        "repeats": a.repeats, "calls_per_repeat": a.calls, "warmup_calls": a.warmup,
        "timing": "host clock around `calls` back-to-back calls + synchronize, per call; median [min, max] over repeats",
        "results": results,
    });
    let mut o = std::io::stdout().lock();
    let f = |s: &Stats| format!("{:.4} [{:.4}, {:.4}]", s.median, s.min, s.max);
    let st = |x: &serde_json::Value| -> Stats {
        serde_json::from_value::<StatsDe>(x.clone())
            .map(|s| Stats {
                median: s.median,
                min: s.min,
                max: s.max,
            })
            .unwrap_or(Stats {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
            })
    };
    let mut w = |s: String| writeln!(o, "{s}").map_err(CliError::Output);
    w(format!("\n{} on {}, {} KV, {r} label channels of {bits} bits, sink {}, recent {}; one layer, batch 1; ms per call, median [min, max]; reproduce: `{command}`\n", a.shape, be.name(), kv_dtype.name(), a.sink, a.recent))?;
    w("| context | budget | rows/KV head | dense ms | sparse ms (scores + top-k + attention) | speedup | scores | top-k | attention | host gather ms | gather GB/s | host operator ms | zero-copy attn ms |".into())?;
    w("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |".into())?;
    for x in &results {
        let p = &x["parts_ms"];
        let (hg, hgb, ho, hz) = match x.get("host") {
            Some(h) => (
                f(&st(&h["gather_ms"])),
                format!("{:.1}", h["gather_gbs"].as_f64().unwrap_or(f64::NAN)),
                f(&st(&h["operator_ms"])),
                f(&st(&h["zero_copy_attention_ms"])),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        w(format!(
            "| {} | {} | {} | {} | {} | {:.1}x | {:.4} | {:.4} | {:.4} | {hg} | {hgb} | {ho} | {hz} |",
            x["context"], x["budget"].as_str().unwrap_or(""), x["selected_rows_per_kv_head"],
            f(&st(&x["dense_ms"])), f(&st(&x["sparse_ms"])), x["speedup"].as_f64().unwrap_or(f64::NAN),
            st(&p["label_scores"]).median, st(&p["topk"]).median, st(&p["sparse_attention"]).median,
        ))?;
    }
    if let Some(path) = &a.json {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&report).unwrap_or_default(),
        )
        .map_err(|e| CliError::Io {
            path: path.clone(),
            source: e,
        })?;
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct StatsDe {
    median: f64,
    min: f64,
    max: f64,
}
