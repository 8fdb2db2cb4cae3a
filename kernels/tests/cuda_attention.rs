//! Attention parity of the CUDA backend against the CPU backend at the SmolLM2-135M and
//! Llama-3.1-8B shapes: the decode and prefill kernels, split-K, long decode contexts and the
//! tensor-core flash kernel (harness and tolerances as in `cuda_parity.rs`). Without a CUDA
//! device each test prints `skipped: no CUDA device` and passes.

mod common;

use common::parity::*;
use common::vals;

use farsight_kernels::cuda::{AttnKernel, CudaBackend};
use farsight_kernels::{AttnShape, Backend, CausalAttn, DType};

/// One attention case; caches filled through `cache_write` from the same f32 rows on both sides.
#[allow(clippy::too_many_arguments)]
fn attention_case(
    cu: &CudaBackend,
    m: &Model,
    dt: DType,
    n_past: usize,
    n_q: usize,
    window: Option<usize>,
    q_row0: usize,
    out_row0: usize,
    seed: u64,
    label: &str,
) {
    let shape = AttnShape {
        n_heads: m.heads,
        n_kv_heads: m.kv_heads,
        head_dim: m.head_dim,
        window,
    };
    let (qw, kvw) = (shape.q_width(), shape.kv_width());
    let total = n_past + n_q;
    // Keys scaled so that the softmax is peaked enough to matter.
    let kv: Vec<f32> = vals(total * 2 * kvw, seed)
        .iter()
        .map(|v| v * 2.0)
        .collect();
    let (kvc, kvg) = both(cu, total, 2 * kvw, &kv);
    let mut kc = cpu().cache(total + 3, kvw, dt).unwrap();
    let mut vc = cpu().cache(total + 3, kvw, dt).unwrap();
    let mut kg = cu.cache(total + 3, kvw, dt).unwrap();
    let mut vg = cu.cache(total + 3, kvw, dt).unwrap();
    cpu().cache_write(&mut kc, 0, &kvc, 0, 0, total).unwrap();
    cpu().cache_write(&mut vc, 0, &kvc, 0, kvw, total).unwrap();
    cu.cache_write(&mut kg, 0, &kvg, 0, 0, total).unwrap();
    cu.cache_write(&mut vg, 0, &kvg, 0, kvw, total).unwrap();
    // q sits in a fused q|k|v row at column 0; q rows start at q_row0.
    let qcols = qw + 2 * kvw;
    let q = vals((q_row0 + n_q) * qcols, seed + 1);
    let (qc, qg) = both(cu, q_row0 + n_q, qcols, &q);
    let (mut oc, mut og) = poisoned(cu, out_row0 + n_q, qw);
    let args = CausalAttn {
        shape,
        q_row0,
        q_col0: 0,
        n_q,
        n_past,
        out_row0,
        scale: 1.0 / (m.head_dim as f32).sqrt(),
    };
    cpu().attention(&args, &qc, &kc, &vc, &mut oc).unwrap();
    cu.attention(&args, &qg, &kg, &vg, &mut og).unwrap();
    let got = cu.read_rows(&og, out_row0, n_q).unwrap();
    let want = &oc.data[out_row0 * qw..(out_row0 + n_q) * qw];
    let kernel = cu.attention_kernel(&args, dt);
    let case = format!(
        "{} {dt} past={n_past} q={n_q}{}{label} [{kernel:?}]",
        m.name,
        window.map_or(String::new(), |w| format!(" window={w}"))
    );
    // The f32 kernels meet the f32 bound with every KV dtype (both caches hold the same rounded
    // rows); the flash kernel rounds Q and P to the KV dtype on the way into the tensor cores.
    let t = if kernel == AttnKernel::Flash {
        tol(dt)
    } else {
        1e-4
    };
    check("attention", &case, &got, want, t);
}

#[test]
fn attention_matches_cpu() {
    let Some(cu) = cuda() else { return };
    let mut seed = 9000;
    for m in [SMOL, LLAMA] {
        for &dt in &DTYPES {
            // (n_past, n_q, window, q_row0, out_row0)
            for (n_past, n_q, window, q_row0, out_row0) in [
                (0, 64, None, 0, 0),         // prefill from scratch
                (300, 37, None, 2, 3),       // a later prefill chunk, offset rows
                (4000, 1, None, 0, 0),       // decode
                (2, 1, None, 0, 0),          // decode, fewer keys than warps
                (500, 20, Some(128), 1, 0),  // sliding window
                (4095, 1, Some(4096), 0, 0), // window exactly the context
            ] {
                seed += 7;
                attention_case(cu, &m, dt, n_past, n_q, window, q_row0, out_row0, seed, "");
            }
        }
    }
}

/// Split-K forced to small chunks (many splits, some of them empty for the early queries of a
/// prefill), with each attention kernel (GQA key-per-lane and per-head), on a backend of its own
/// so that the settings do not leak into other tests.
#[test]
fn attention_split_k_matches_cpu() {
    if cuda().is_none() {
        return;
    }
    let cu = CudaBackend::new(0).unwrap();
    let mut seed = 12_000;
    for (chunk, gqa) in [(64usize, true), (100, true), (64, false), (100, false)] {
        cu.set_attention_chunk(Some(chunk));
        cu.set_attention_gqa(gqa);
        let label = format!(
            " chunk={chunk} {}",
            if gqa { "gqa-kernel" } else { "per-head-kernel" }
        );
        for m in [SMOL, LLAMA] {
            for &dt in &DTYPES {
                for (n_past, n_q, window, q_row0, out_row0) in [
                    (0, 300, None, 0, 0), // splits past the early queries' keys are empty
                    (300, 37, None, 2, 3),
                    (4000, 1, None, 0, 0),
                    (500, 20, Some(128), 1, 0),
                    (63, 1, None, 0, 0), // one key short of a whole chunk
                ] {
                    seed += 7;
                    attention_case(
                        &cu, &m, dt, n_past, n_q, window, q_row0, out_row0, seed, &label,
                    );
                }
            }
        }
    }
}

#[test]
fn attention_long_decode_matches_cpu() {
    let Some(cu) = cuda() else { return };
    for &dt in &[DType::BF16, DType::F16] {
        attention_case(cu, &LLAMA, dt, 32_767, 1, None, 0, 0, 77, "");
        attention_case(cu, &SMOL, dt, 32_767, 2, None, 0, 0, 78, "");
        attention_case(cu, &LLAMA, dt, 131_071, 1, None, 0, 0, 79, "");
    }
}

/// The tensor-core flash kernel at the real shapes: prefill from 0 (tile-aligned and not),
/// chunked prefill at n_past > 0 with row offsets, long chunks, sliding windows (including rows
/// whose first key tiles are entirely outside their window), f16 and bf16 caches. The f32 path
/// of the same calls (flash off) is checked beside it.
#[test]
fn flash_attention_matches_cpu() {
    if cuda().is_none() {
        return;
    }
    let cu = CudaBackend::new(0).unwrap();
    let mut seed = 20_000;
    for m in [SMOL, LLAMA] {
        for &dt in &[DType::BF16, DType::F16] {
            for (n_past, n_q, window, q_row0, out_row0) in [
                (0, 16, None, 0, 0),          // the smallest flash call
                (0, 64, None, 0, 0),          // one tile
                (0, 333, None, 0, 0),         // partial last tiles
                (300, 37, None, 2, 3),        // a chunk at n_past > 0, offset rows
                (1000, 512, None, 0, 0),      // a long chunk
                (4000, 129, None, 5, 1),      // late chunk, a partial query tile
                (0, 700, Some(128), 0, 0),    // window inside one prefill call
                (500, 200, Some(100), 1, 0),  // window, chunked; whole tiles masked for rows
                (4095, 64, Some(4096), 0, 0), // window exactly the context
            ] {
                seed += 7;
                attention_case(&cu, &m, dt, n_past, n_q, window, q_row0, out_row0, seed, "");
            }
        }
    }
}

/// A 512-query prefill chunk at 32K keys through the flash kernel (Llama shape).
#[test]
fn flash_attention_long_chunk_matches_cpu() {
    let Some(cu) = cuda() else { return };
    attention_case(
        cu,
        &LLAMA,
        DType::BF16,
        32_768 - 512,
        512,
        None,
        0,
        0,
        99,
        "",
    );
}
