//! The timed parts of `farsight bench offload`: decode steps of the offloaded stores (timed,
//! timing-event and recall steps) and the same-run references (rows in device memory, dense KV
//! on the GPU).

use std::time::Instant;

use farsight_engine::generate::new_cache;
use farsight_engine::model::{Logits, Segment};
use farsight_engine::synthetic::fill_kv_random;
use farsight_engine::Model;
use farsight_kernels::cuda::CudaBackend;
use farsight_kernels::SampleSpec;
use farsight_offload::sparse::{Predict, TokenBudget};
use farsight_offload::KvStore;
use farsight_prefetch::{OffloadConfig, OffloadKvStore, OffloadStats, RowHome, StreamTiming};

use super::super::bench::Stats;
use super::super::common::CliError;
use super::OffloadBenchArgs;

/// One measured configuration.
pub(super) struct Run {
    pub ms: Vec<f64>,
    pub stats: OffloadStats,
    pub recall: Option<f64>,
    /// Per step (all sequences of the batch summed), from the timing steps.
    pub timing: Option<StreamTiming>,
}

/// Decode steps of `stores` (one token each); returns the step times in ms.
fn steps(
    m: &Model<CudaBackend>,
    stores: &mut [&mut dyn KvStore<CudaBackend>],
    n: usize,
    toks: &mut [u32],
) -> Result<Vec<f64>, CliError> {
    let mut ws = m.workspace(stores.len(), stores.len())?;
    let mut ms = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let mut segs: Vec<Segment<'_, CudaBackend>> = stores
            .iter_mut()
            .zip(toks.iter())
            .map(|(kv, tok)| Segment {
                tokens: std::slice::from_ref(tok),
                kv: &mut **kv,
                logits: Logits::Sample(SampleSpec::GREEDY),
            })
            .collect();
        let outs = m.forward(&mut ws, &mut segs)?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        for (tok, out) in toks.iter_mut().zip(outs) {
            *tok = out.into_token()?;
        }
    }
    Ok(ms)
}

/// Timed steps, then recall steps; the stores are left `warmup + steps + recall` tokens longer.
pub(super) fn measure(
    m: &Model<CudaBackend>,
    stores: &mut [OffloadKvStore],
    a: &OffloadBenchArgs,
) -> Result<Run, CliError> {
    let be = &m.backend;
    let mut toks: Vec<u32> = (0..stores.len() as u32).map(|i| 1 + i).collect();
    store_steps(m, stores, a.warmup, &mut toks)?;
    let before = sum_stats(be, stores)?;
    let ms = store_steps(m, stores, a.steps, &mut toks)?;
    let after = sum_stats(be, stores)?;
    let mut stats = after;
    stats.misses -= before.misses;
    stats.hits -= before.hits;
    stats.fetched_bytes -= before.fetched_bytes;
    stats.written_bytes -= before.written_bytes;
    let mut timing = None;
    if a.predict == Predict::LayerAhead && a.timing_steps > 0 {
        for s in stores.iter_mut() {
            s.set_timing(true);
        }
        store_steps(m, stores, a.timing_steps, &mut toks)?;
        let mut t = StreamTiming::default();
        for s in stores.iter_mut() {
            if let Some(x) = s.take_timing()? {
                t.stall_ms += x.stall_ms / a.timing_steps as f64;
                t.chain_ms += x.chain_ms / a.timing_steps as f64;
                t.waits += x.waits;
                t.chains += x.chains;
            }
            s.set_timing(false);
        }
        timing = Some(t);
    }
    let mut recall = None;
    if a.predict == Predict::LayerAhead && a.recall_steps > 0 {
        for s in stores.iter_mut() {
            s.set_measure_recall(true);
        }
        store_steps(m, stores, a.recall_steps, &mut toks)?;
        let r = sum_stats(be, stores)?;
        recall = Some(
            (r.recall_hits - after.recall_hits) as f64
                / (r.recall_total - after.recall_total).max(1) as f64,
        );
    }
    Ok(Run {
        ms,
        stats,
        recall,
        timing,
    })
}

/// [`steps`] of every offloaded store together.
fn store_steps(
    m: &Model<CudaBackend>,
    stores: &mut [OffloadKvStore],
    n: usize,
    toks: &mut [u32],
) -> Result<Vec<f64>, CliError> {
    let mut refs: Vec<&mut dyn KvStore<CudaBackend>> = stores
        .iter_mut()
        .map(|s| s as &mut dyn KvStore<CudaBackend>)
        .collect();
    steps(m, &mut refs, n, toks)
}

fn sum_stats(be: &CudaBackend, stores: &[OffloadKvStore]) -> Result<OffloadStats, CliError> {
    let mut t = OffloadStats::default();
    for s in stores {
        let s = s.stats(be)?;
        t.misses += s.misses;
        t.hits += s.hits;
        t.recall_hits += s.recall_hits;
        t.recall_total += s.recall_total;
        t.fetched_bytes += s.fetched_bytes;
        t.written_bytes += s.written_bytes;
    }
    Ok(t)
}

/// Batch 1 only for the device-resident rows (compute only); dense for every batch.
pub(super) fn reference(
    m: &Model<CudaBackend>,
    a: &OffloadBenchArgs,
    base: &OffloadConfig,
    ctx: usize,
    batch: usize,
    budgets: &[TokenBudget],
    with_dense: bool,
) -> serde_json::Value {
    let mut out = serde_json::json!({"context": ctx, "batch": batch, "page_tokens": base.page()});
    if batch == 1 {
        let mut per_budget = Vec::new();
        let r = (|| -> Result<(), CliError> {
            let mut c = base.clone();
            c.home = RowHome::Device;
            let mut s = OffloadKvStore::new(&m.backend, c, m.attn_shape(), m.cfg.num_layers)?;
            s.fill_random(&m.backend, ctx - 1, 1.0, 1000)?;
            let mut stores = vec![s];
            for &b in budgets {
                stores[0].truncate(ctx - 1);
                stores[0].set_budget(&m.backend, b)?;
                let a2 = OffloadBenchArgs {
                    recall_steps: 0,
                    timing_steps: 0,
                    ..a.clone_args()
                };
                let r = measure(m, &mut stores, &a2)?;
                let st = Stats::of(&r.ms);
                eprintln!("  rows in device memory (compute only), budget {b}, pages of {}: {:.2} ms/step [{:.2}, {:.2}]", base.page(), st.median, st.min, st.max);
                per_budget.push(serde_json::json!({"budget": b.to_string(), "step_ms": st}));
            }
            Ok(())
        })();
        out["device_rows"] = match r {
            Ok(()) => serde_json::Value::Array(per_budget),
            Err(e) => serde_json::json!({"error": e.to_string()}),
        };
    }
    if !with_dense {
        return out;
    }
    let dense = (|| -> Result<Stats, CliError> {
        let mut caches: Vec<Box<dyn KvStore<CudaBackend>>> = Vec::with_capacity(batch);
        for i in 0..batch {
            let mut kv: Box<dyn KvStore<CudaBackend>> = Box::new(new_cache(m, base.dtype)?);
            fill_kv_random(
                m,
                kv.as_mut(),
                ctx - 1,
                a.warmup + a.steps + 1,
                2000 + i as u64,
            )?;
            caches.push(kv);
        }
        let mut toks: Vec<u32> = (0..batch as u32).map(|i| 1 + i).collect();
        let mut refs: Vec<&mut dyn KvStore<CudaBackend>> = Vec::with_capacity(batch);
        for c in caches.iter_mut() {
            refs.push(c.as_mut());
        }
        steps(m, &mut refs, a.warmup, &mut toks)?;
        let ms = steps(m, &mut refs, a.steps, &mut toks)?;
        drop(refs);
        Ok(Stats::of(&ms))
    })();
    match dense {
        Ok(st) => {
            eprintln!(
                "  dense KV on the GPU, batch {batch}: {:.2} ms/step [{:.2}, {:.2}]",
                st.median, st.min, st.max
            );
            out["dense"] =
                serde_json::json!({"step_ms": st, "tok_s": batch as f64 * 1e3 / st.median});
        }
        Err(e) => {
            eprintln!("  dense KV on the GPU, batch {batch}: {e}");
            out["dense"] = serde_json::json!({"error": e.to_string()});
        }
    }
    out
}
