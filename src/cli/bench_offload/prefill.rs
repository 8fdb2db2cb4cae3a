//! `--prefill-context`: a real chunked prefill into an offloaded store (time, tokens/s, the
//! projections' fraction of the matmul peak).

use std::time::Instant;

use farsight_engine::Model;
use farsight_kernels::cuda::CudaBackend;
use farsight_kernels::DType;
use farsight_prefetch::{OffloadConfig, RowHome};

use super::{new_store, OffloadBenchArgs, GIB};
use crate::cli::common::CliError;

/// A real chunked prefill of `--prefill-context` token ids into an offloaded store.
pub(super) fn prefill_host(
    m: &Model<CudaBackend>,
    a: &OffloadBenchArgs,
    channels: &[Vec<Vec<usize>>],
    dtype: DType,
) -> Result<serde_json::Value, CliError> {
    let n = a.prefill_context;
    let chunk = a.prefill_chunk.min(n);
    let cfg = OffloadConfig {
        budget: a.token_budget[0],
        sink: a.sink,
        recent: a.recent,
        channels: channels.to_vec(),
        label_bits: a.label_bits,
        predict: a.predict,
        dtype,
        capacity: n + 1,
        home: RowHome::Host,
        measure_recall: false,
        row_cache: 1,
        page_tokens: 1,
    };
    let mut s = new_store(m, &a.kv_store, cfg)?;
    let v = m.cfg.vocab_size as u64;
    let prompt: Vec<u32> = (0..n as u64)
        .map(|i| ((i * 2_654_435_761) % v) as u32)
        .collect();
    let mut ws = m.workspace(chunk, 1)?;
    let t = Instant::now();
    let logits = farsight_engine::generate::prefill(
        m,
        &mut ws,
        &mut s,
        &prompt,
        chunk,
        &mut |done, total| {
            eprint!(
                "\rprefill {done}/{total} tokens, {:.0} s",
                t.elapsed().as_secs_f64()
            );
        },
    )?;
    let secs = t.elapsed().as_secs_f64();
    eprintln!();
    if !logits.iter().all(|x| x.is_finite()) {
        return Err(CliError::Usage(
            "non-finite logits after the prefill".into(),
        ));
    }
    let st = s.stats(&m.backend)?;
    // Matmul FLOPs: 2 x the per-token weights of the projections (no embedding lookup).
    let c = &m.cfg;
    let per_layer = c.hidden_size * (c.q_width() + 2 * c.kv_width())
        + c.q_width() * c.hidden_size
        + 3 * c.hidden_size * c.intermediate_size;
    let flops = 2.0 * (per_layer * c.num_layers) as f64 * n as f64;
    let frac = flops / secs / (a.peak_tflops * 1e12);
    let (gpu_used, _) = m.backend.mem_info()?;
    eprintln!(
        "prefill of {n} tokens into {} KV in chunks of {chunk}: {secs:.1} s, {:.0} tok/s, projections at {:.1}% of {:.0} TFLOP/s, {:.1} GB staged back from the KV tier, GPU {:.2} GiB used",
        a.kv_store,
        n as f64 / secs,
        100.0 * frac,
        a.peak_tflops,
        st.staged_bytes as f64 / 1e9,
        gpu_used as f64 / GIB
    );
    Ok(serde_json::json!({
        "tokens": n, "chunk": chunk, "seconds": secs, "tok_s": n as f64 / secs,
        "matmul_fraction_of_peak": frac, "staged_bytes": st.staged_bytes, "written_bytes": st.written_bytes,
        "gpu_used_bytes": gpu_used,
    }))
}
