//! Op-by-op parity of the CUDA backend against the CPU backend (the reference), at the shapes of
//! SmolLM2-135M (hidden 576, 9/3 heads, D 64, ffn 1536, vocab 49152) and Llama-3.1-8B (hidden
//! 4096, 32/8 heads, D 128, ffn 14336, vocab 128256; the vocabulary cut to a subset of rows).
//!
//! Inputs are fresh pseudo-random values (never zeros), outputs are poisoned with NaN before each
//! op, and results are compared by relative L2 (computed in f64): < 1e-4 for f32 paths, < 1e-2
//! for paths that round to f16/bf16. Every comparison prints a `parity` line (collected into
//! `kernels/src/cuda/NOTES.md`). Without a CUDA device each test prints `skipped: no CUDA device`
//! and passes.

mod common;

use std::sync::OnceLock;

use common::{rel_l2, vals};

use farsight_kernels::cpu::{CpuBackend, Store};
use farsight_kernels::cuda::{AttnKernel, CudaBackend, GEMV_MAX_ROWS};
use farsight_kernels::{
    sample_row, AttnShape, Backend, CausalAttn, DType, HostMatrix, KernelError, Rope, SampleSpec,
};
use half::{bf16, f16};

// ---- harness ---------------------------------------------------------------------------------

fn cuda() -> Option<&'static CudaBackend> {
    static BE: OnceLock<Option<CudaBackend>> = OnceLock::new();
    let be = BE.get_or_init(|| match CudaBackend::new(0) {
        Ok(be) => {
            eprintln!(
                "using {} (PTX from cache: {})",
                be.name(),
                be.ptx_from_cache()
            );
            Some(be)
        }
        Err(e) => {
            eprintln!("CudaBackend::new(0): {e}");
            None
        }
    });
    if be.is_none() {
        println!("skipped: no CUDA device");
    }
    be.as_ref()
}

fn cpu() -> &'static CpuBackend {
    static BE: OnceLock<CpuBackend> = OnceLock::new();
    BE.get_or_init(|| CpuBackend::new(0).unwrap())
}

/// Deterministic pseudo-random values in [-1, 1) (a different stream per seed).

fn tol(d: DType) -> f64 {
    match d {
        DType::F32 => 1e-4,
        DType::F16 | DType::BF16 => 1e-2,
    }
}

fn check(op: &str, case: &str, got: &[f32], want: &[f32], tol: f64) {
    let r = rel_l2(got, want);
    let norm = want.iter().map(|&w| (w as f64).powi(2)).sum::<f64>().sqrt();
    let diffs = got
        .iter()
        .zip(want)
        .filter(|(g, w)| g.to_bits() != w.to_bits())
        .count();
    println!(
        "parity op={op} case={case} rel_l2={r:.3e} tol={tol:.0e} (|ref|={norm:.3e}, {diffs}/{} differ)",
        want.len()
    );
    assert!(r < tol, "{op} {case}: rel L2 {r:.3e} >= {tol:.0e}");
}

/// `rows x cols` weights in `dtype` as little-endian bytes.
fn weight_bytes(rows: usize, cols: usize, dtype: DType, seed: u64) -> Vec<u8> {
    let scale = 1.0 / (cols as f32).sqrt();
    let v: Vec<f32> = vals(rows * cols, seed)
        .into_iter()
        .map(|x| x * scale)
        .collect();
    match dtype {
        DType::F32 => bytemuck::cast_slice(&v).to_vec(),
        DType::F16 => {
            let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            bytemuck::cast_slice(&h).to_vec()
        }
        DType::BF16 => {
            let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
            bytemuck::cast_slice(&h).to_vec()
        }
    }
}

/// A tensor on each backend holding the same data.
fn both(
    cu: &CudaBackend,
    rows: usize,
    cols: usize,
    data: &[f32],
) -> (
    farsight_kernels::cpu::CpuTensor,
    farsight_kernels::cuda::CudaTensor,
) {
    let mut a = cpu().tensor(rows, cols).unwrap();
    cpu().write_tensor(&mut a, 0, data).unwrap();
    let mut b = cu.tensor(rows, cols).unwrap();
    cu.write_tensor(&mut b, 0, data).unwrap();
    (a, b)
}

/// A NaN-filled tensor on each backend.
fn poisoned(
    cu: &CudaBackend,
    rows: usize,
    cols: usize,
) -> (
    farsight_kernels::cpu::CpuTensor,
    farsight_kernels::cuda::CudaTensor,
) {
    both(cu, rows, cols, &vec![f32::NAN; rows * cols])
}

fn cpu_cache_f32(c: &farsight_kernels::cpu::CpuCache) -> Vec<f32> {
    match &c.data {
        Store::F32(v) => v.clone(),
        Store::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        Store::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
    }
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

struct Model {
    name: &'static str,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ffn: usize,
    vocab_subset: usize,
    theta: f32,
}

const SMOL: Model = Model {
    name: "smollm2-135m",
    hidden: 576,
    heads: 9,
    kv_heads: 3,
    head_dim: 64,
    ffn: 1536,
    vocab_subset: 49152,
    theta: 100_000.0,
};
const LLAMA: Model = Model {
    name: "llama-3.1-8b",
    hidden: 4096,
    heads: 32,
    kv_heads: 8,
    head_dim: 128,
    ffn: 14336,
    vocab_subset: 16384,
    theta: 500_000.0,
};

// ---- tests -----------------------------------------------------------------------------------

#[test]
fn no_device_is_an_error_not_a_panic() {
    match CudaBackend::new(0) {
        Ok(be) => {
            // On a GPU machine: an absent ordinal is a clean error too.
            assert!(matches!(
                CudaBackend::new(4096),
                Err(KernelError::Device(_))
            ));
            println!("device present: {}", be.name());
        }
        Err(e) => {
            assert!(matches!(e, KernelError::Device(_)), "{e}");
            println!("skipped: no CUDA device ({e})");
        }
    }
}

#[test]
fn embedding_matches_cpu() {
    let Some(cu) = cuda() else { return };
    for (mi, m) in [SMOL, LLAMA].iter().enumerate() {
        let rows = m.vocab_subset.min(8192);
        for (di, &dt) in DTYPES.iter().enumerate() {
            let bytes = weight_bytes(rows, m.hidden, dt, 100 + (mi * 3 + di) as u64);
            let hm = HostMatrix {
                rows,
                cols: m.hidden,
                dtype: dt,
                bytes: &bytes,
            };
            let (wc, wg) = (
                cpu().upload_matrix(hm).unwrap(),
                cu.upload_matrix(hm).unwrap(),
            );
            let ids: Vec<u32> = vals(37, 7 + di as u64)
                .iter()
                .map(|v| (((v + 1.0) * 0.5 * rows as f32) as u32).min(rows as u32 - 1))
                .chain([0, rows as u32 - 1])
                .collect();
            let (mut oc, mut og) = poisoned(cu, ids.len(), m.hidden);
            cpu().embedding(&wc, &ids, &mut oc).unwrap();
            cu.embedding(&wg, &ids, &mut og).unwrap();
            let got = cu.read_rows(&og, 0, ids.len()).unwrap();
            check(
                "embedding",
                &format!("{} {dt}", m.name),
                &got,
                &oc.data,
                tol(dt),
            );
        }
    }
    // An id outside the table is a shape error, not a fault.
    let bytes = weight_bytes(4, 8, DType::F32, 1);
    let w = cu
        .upload_matrix(HostMatrix {
            rows: 4,
            cols: 8,
            dtype: DType::F32,
            bytes: &bytes,
        })
        .unwrap();
    let mut o = cu.tensor(1, 8).unwrap();
    assert!(matches!(
        cu.embedding(&w, &[4], &mut o),
        Err(KernelError::Shape(_))
    ));
}

#[test]
fn rms_norm_matches_cpu() {
    let Some(cu) = cuda() else { return };
    for m in [SMOL, LLAMA] {
        for n in [1usize, 7, 130] {
            let x: Vec<f32> = vals(n * m.hidden, 11 + n as u64)
                .iter()
                .map(|v| v * 3.0)
                .collect();
            let w: Vec<f32> = vals(m.hidden, 12).iter().map(|v| 1.0 + 0.5 * v).collect();
            let (xc, xg) = both(cu, n, m.hidden, &x);
            let (wc, wg) = both(cu, 1, m.hidden, &w);
            let (mut oc, mut og) = poisoned(cu, n, m.hidden);
            cpu().rms_norm(&xc, &wc, 1e-5, &mut oc, n).unwrap();
            cu.rms_norm(&xg, &wg, 1e-5, &mut og, n).unwrap();
            let got = cu.read_rows(&og, 0, n).unwrap();
            check(
                "rms_norm",
                &format!("{} n={n}", m.name),
                &got,
                &oc.data,
                1e-4,
            );
        }
    }
}

/// One matmul case: `n` rows through a `out x inp` weight of `dt`, optional bias.
#[allow(clippy::too_many_arguments)]
fn matmul_case(
    cu: &CudaBackend,
    label: &str,
    n: usize,
    inp: usize,
    out: usize,
    dt: DType,
    bias: bool,
    seed: u64,
) {
    let bytes = weight_bytes(out, inp, dt, seed);
    let hm = HostMatrix {
        rows: out,
        cols: inp,
        dtype: dt,
        bytes: &bytes,
    };
    let (wc, wg) = (
        cpu().upload_matrix(hm).unwrap(),
        cu.upload_matrix(hm).unwrap(),
    );
    assert_eq!(cu.matrix_bytes(&wg), bytes.len());
    // A few spare rows past n, so that reading past n would show.
    let x = vals((n + 2) * inp, seed + 1);
    let (xc, xg) = both(cu, n + 2, inp, &x);
    let b = vals(out, seed + 2);
    let (bc, bg) = both(cu, 1, out, &b);
    let (mut oc, mut og) = poisoned(cu, n, out);
    let (bcr, bgr) = if bias {
        (Some(&bc), Some(&bg))
    } else {
        (None, None)
    };
    cpu().matmul(&xc, &wc, bcr, &mut oc, n).unwrap();
    cu.matmul(&xg, &wg, bgr, &mut og, n).unwrap();
    let got = cu.read_rows(&og, 0, n).unwrap();
    let path = match dt {
        DType::F32 => "cublas-f32",
        _ if n <= GEMV_MAX_ROWS => "gemv",
        _ => "cublas-cast",
    };
    let case = format!(
        "{label} {dt} n={n} {out}x{inp} {path}{}",
        if bias { " +bias" } else { "" }
    );
    // f32 paths and the GEMV (exact weights, f32 activations) meet the f32 bound; the cuBLAS path
    // for 16-bit weights rounds the activations to the weight dtype.
    let t = if dt == DType::F32 || n <= GEMV_MAX_ROWS {
        1e-4
    } else {
        tol(dt)
    };
    check("matmul", &case, &got, &oc.data, t);
}

#[test]
fn matmul_smollm2_shapes_match_cpu() {
    let Some(cu) = cuda() else { return };
    let m = SMOL;
    let qkv = m.hidden + 2 * m.kv_heads * m.head_dim;
    let shapes = [
        ("qkv", m.hidden, qkv, true),
        ("o", m.hidden, m.hidden, false),
        ("gate_up", m.hidden, 2 * m.ffn, false),
        ("down", m.ffn, m.hidden, false),
        ("lm_head", m.hidden, 8192, false),
    ];
    let mut seed = 1000;
    for (label, inp, out, bias) in shapes {
        for &dt in &DTYPES {
            for n in [1usize, 3, 8, 9, 64, 257] {
                seed += 10;
                matmul_case(
                    cu,
                    &format!("{} {label}", m.name),
                    n,
                    inp,
                    out,
                    dt,
                    bias,
                    seed,
                );
            }
        }
    }
}

#[test]
fn matmul_llama_shapes_match_cpu() {
    let Some(cu) = cuda() else { return };
    let m = LLAMA;
    let qkv = m.hidden + 2 * m.kv_heads * m.head_dim;
    let shapes = [
        ("qkv", m.hidden, qkv, false),
        ("gate_up", m.hidden, 2 * m.ffn, false),
        ("down", m.ffn, m.hidden, false),
        ("lm_head", m.hidden, m.vocab_subset, false),
    ];
    let mut seed = 5000;
    for (label, inp, out, bias) in shapes {
        for &dt in &DTYPES {
            for n in [1usize, 8, 33] {
                seed += 10;
                matmul_case(
                    cu,
                    &format!("{} {label}", m.name),
                    n,
                    inp,
                    out,
                    dt,
                    bias,
                    seed,
                );
            }
        }
    }
}

#[test]
fn rope_matches_cpu() {
    let Some(cu) = cuda() else { return };
    for m in [SMOL, LLAMA] {
        let half = m.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / m.theta.powf(2.0 * i as f32 / m.head_dim as f32))
            .collect();
        let qw = m.heads * m.head_dim;
        let width = qw + 2 * m.kv_heads * m.head_dim;
        for (start, n, scaling) in [(0u32, 17usize, 1.0f32), (4000, 5, 1.0), (131_000, 3, 1.25)] {
            let rope = Rope {
                inv_freq: inv_freq.clone(),
                attention_scaling: scaling,
            };
            let x = vals(n * width, start as u64 + 3);
            let (mut xc, mut xg) = both(cu, n, width, &x);
            let pos: Vec<u32> = (0..n as u32).map(|i| start + 3 * i).collect();
            for (col0, heads) in [(0, m.heads), (qw, m.kv_heads)] {
                cpu()
                    .rope(&mut xc, col0, heads, m.head_dim, &pos, &rope)
                    .unwrap();
                cu.rope(&mut xg, col0, heads, m.head_dim, &pos, &rope)
                    .unwrap();
            }
            let got = cu.read_rows(&xg, 0, n).unwrap();
            check(
                "rope",
                &format!("{} pos={start}.. n={n} scale={scaling}", m.name),
                &got,
                &xc.data,
                1e-4,
            );
        }
    }
}

#[test]
fn silu_mul_and_add_match_cpu() {
    let Some(cu) = cuda() else { return };
    for m in [SMOL, LLAMA] {
        let n = 9;
        let gu: Vec<f32> = vals(n * 2 * m.ffn, 21).iter().map(|v| v * 8.0).collect();
        let (gc, gg) = both(
            cu,
            n + 1,
            2 * m.ffn,
            &[gu.clone(), vals(2 * m.ffn, 22)].concat(),
        );
        let (mut oc, mut og) = poisoned(cu, n, m.ffn);
        cpu().silu_mul(&gc, &mut oc, n).unwrap();
        cu.silu_mul(&gg, &mut og, n).unwrap();
        let got = cu.read_rows(&og, 0, n).unwrap();
        check(
            "silu_mul",
            &format!("{} n={n}", m.name),
            &got,
            &oc.data,
            1e-4,
        );

        let x = vals((n + 1) * m.hidden, 23);
        let y = vals((n + 1) * m.hidden, 24);
        let (mut xc, mut xg) = both(cu, n + 1, m.hidden, &x);
        let (yc, yg) = both(cu, n + 1, m.hidden, &y);
        cpu().add(&mut xc, &yc, n).unwrap();
        cu.add(&mut xg, &yg, n).unwrap();
        let got = cu.read_rows(&xg, 0, n + 1).unwrap(); // row n must be untouched
        check("add", &format!("{} n={n}", m.name), &got, &xc.data, 1e-6);
    }
}

#[test]
fn gather_rows_matches_cpu() {
    let Some(cu) = cuda() else { return };
    let (rows, cols) = (20, 4096);
    let (sc, sg) = both(cu, rows, cols, &vals(rows * cols, 31));
    let (mut dc, mut dg) = both(cu, 8, cols, &vals(8 * cols, 32));
    let pick = [3usize, 19, 0, 3, 7];
    cpu().gather_rows(&sc, &pick, &mut dc, 2).unwrap();
    cu.gather_rows(&sg, &pick, &mut dg, 2).unwrap();
    let got = cu.read_rows(&dg, 0, 8).unwrap();
    check(
        "gather_rows",
        "20x4096 pick 5 at row 2",
        &got,
        &dc.data,
        1e-7,
    );
    assert!(cu.gather_rows(&sg, &[20], &mut dg, 0).is_err());
}

#[test]
fn cache_write_and_grow_match_cpu() {
    let Some(cu) = cuda() else { return };
    for m in [SMOL, LLAMA] {
        let kvw = m.kv_heads * m.head_dim;
        let width = m.heads * m.head_dim + 2 * kvw;
        for &dt in &DTYPES {
            let mut cc = cpu().cache(16, kvw, dt).unwrap();
            let mut cg = cu.cache(16, kvw, dt).unwrap();
            let (sc, sg) = both(cu, 12, width, &vals(12 * width, 41));
            // K columns of rows 2..12 into cache rows 0..10, then grow and append V columns.
            let kc0 = m.heads * m.head_dim;
            cpu().cache_write(&mut cc, 0, &sc, 2, kc0, 10).unwrap();
            cu.cache_write(&mut cg, 0, &sg, 2, kc0, 10).unwrap();
            cpu().cache_grow(&mut cc, 40).unwrap();
            cu.cache_grow(&mut cg, 40).unwrap();
            assert_eq!(cu.cache_capacity(&cg), 40);
            cpu()
                .cache_write(&mut cc, 10, &sc, 0, kc0 + kvw, 12)
                .unwrap();
            cu.cache_write(&mut cg, 10, &sg, 0, kc0 + kvw, 12).unwrap();
            cpu().cache_write(&mut cc, 39, &sc, 11, 0, 1).unwrap();
            cu.cache_write(&mut cg, 39, &sg, 11, 0, 1).unwrap();
            let got = cu.read_cache(&cg).unwrap();
            // Rounding to the cache dtype is round-to-nearest-even on both sides: bit-exact.
            check(
                "cache_write",
                &format!("{} {dt} grow 16->40", m.name),
                &got,
                &cpu_cache_f32(&cc),
                1e-7,
            );
            assert!(cu.cache_write(&mut cg, 39, &sg, 0, 0, 2).is_err());
        }
    }
}

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

/// Random matrices and tensors generated on the GPU are bit-identical to the CPU backend's
/// (read back through the embedding op, which is exact for every dtype).
#[test]
fn random_fills_match_cpu() {
    let Some(cu) = cuda() else { return };
    for (rows, cols, seed) in [(300usize, 576usize, 5u64), (17, 4096, 6)] {
        for &dt in &DTYPES {
            let scale = 1.0 / (cols as f32).sqrt();
            let mc = cpu().random_matrix(rows, cols, dt, scale, seed).unwrap();
            let mg = cu.random_matrix(rows, cols, dt, scale, seed).unwrap();
            assert_eq!(cu.matrix_shape(&mg), (rows, cols));
            let ids: Vec<u32> = (0..rows as u32).collect();
            let (mut oc, mut og) = poisoned(cu, rows, cols);
            cpu().embedding(&mc, &ids, &mut oc).unwrap();
            cu.embedding(&mg, &ids, &mut og).unwrap();
            let got = cu.read_rows(&og, 0, rows).unwrap();
            let same = got
                .iter()
                .zip(&oc.data)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            check(
                "random_matrix",
                &format!("{rows}x{cols} {dt}"),
                &got,
                &oc.data,
                1e-7,
            );
            assert!(same, "random_matrix {rows}x{cols} {dt}: not bit-identical");
        }
    }
    let (mut tc, mut tg) = poisoned(cu, 9, 1000);
    cpu().fill_random(&mut tc, 3.0, 42).unwrap();
    cu.fill_random(&mut tg, 3.0, 42).unwrap();
    let got = cu.read_rows(&tg, 0, 9).unwrap();
    check("fill_random", "9x1000", &got, &tc.data, 1e-7);
    assert!(got
        .iter()
        .zip(&tc.data)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}

// ---- sampling ----------------------------------------------------------------------------------

/// Distance below which a device pick may differ from the CPU's: the device's masses differ
/// from the CPU's by ~1e-7 relative (`expf` vs the host's `exp`, the 2^-40 fixed point).
const SAMPLE_NEAR: f64 = 1e-6;

/// How far the CPU's pick on `logits` is from flipping, as a fraction of the kept mass: the
/// distance of the draw's target from the cumulative masses on either side of the picked element
/// (an end where a flip picks the same element excluded), and of the top-p threshold from its
/// crossing when a kept set one element longer or shorter would change the pick.
fn sample_margin(logits: &[f32], s: &SampleSpec) -> f64 {
    if s.is_greedy() || s.top_k == 1 {
        return f64::INFINITY;
    }
    let mut c: Vec<(f32, u32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (v / s.temperature, i as u32))
        .collect();
    let by_desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    let k = s.top_k as usize;
    if k > 0 && k < c.len() {
        c.select_nth_unstable_by(k - 1, by_desc);
        c.truncate(k);
    }
    c.sort_unstable_by(by_desc);
    let mut acc = 0.0;
    let cum: Vec<f64> = c
        .iter()
        .map(|x| {
            acc += (x.0 - c[0].0).exp() as f64;
            acc
        })
        .collect();
    let total = acc;
    // The kept lengths a perturbation could give, and how close the top-p decision is.
    let mut keeps = vec![cum.len()];
    let mut top_p_gap = f64::INFINITY;
    if s.top_p < 1.0 {
        let p = s.top_p as f64;
        let i = cum
            .iter()
            .position(|&a| a / total >= p)
            .unwrap_or(cum.len() - 1);
        keeps = vec![i + 1];
        top_p_gap = (cum[i] / total - p).abs();
        if top_p_gap < SAMPLE_NEAR && i + 2 <= cum.len() {
            keeps.push(i + 2);
        }
        if i > 0 {
            let below = (p - cum[i - 1] / total).abs();
            top_p_gap = top_p_gap.min(below);
            if below < SAMPLE_NEAR {
                keeps.push(i);
            }
        }
    }
    let (mut gap, mut picks) = (f64::INFINITY, Vec::new());
    for &keep in &keeps {
        let kept = cum[keep - 1];
        let t = s.u * kept;
        let j = cum[..keep].iter().position(|&a| a >= t).unwrap_or(keep - 1);
        picks.push(j);
        if j + 1 < keep {
            gap = gap.min((cum[j] - t).abs() / kept);
        }
        if j > 0 {
            gap = gap.min((t - cum[j - 1]).abs() / kept);
        }
    }
    if picks.iter().any(|&j| j != picks[0]) {
        gap.min(top_p_gap)
    } else {
        gap
    }
}

/// `rows` rows of logits of kind `kind`: 0 smooth (scale 8), 1 on a grid of 1/4 (heavy ties),
/// 2 smooth with the maximum planted at three ids.
fn sample_logits(rows: usize, vocab: usize, kind: usize, seed: u64) -> Vec<f32> {
    let mut v: Vec<f32> = vals(rows * vocab, seed).iter().map(|x| x * 8.0).collect();
    for (r, row) in v.chunks_mut(vocab).enumerate() {
        match (kind + r) % 3 {
            1 => row.iter_mut().for_each(|x| *x = (*x * 4.0).round() / 4.0),
            2 => {
                for id in [vocab / 3, 7, vocab - 1] {
                    row[id] = 9.5;
                }
            }
            _ => {}
        }
    }
    v
}

/// Device picks equal `sample_row`'s for greedy, T 0.7 / 1 / 1.5 x top-k 1 / 40 / 1000 / all x
/// top-p 0.5 / 0.9 / 0.99 / 1, draws at 0, 1e-9, 1 - 1e-9 and random, at the SmolLM2 and
/// Llama-3 vocabularies, batch 1 (each row kind) and 4 (a different draw per row). A pick may
/// differ only within [`SAMPLE_NEAR`] of a boundary ([`sample_margin`]), in at most 1% of the
/// cases. (At 128K tokens an element holds ~1e-5 of the mass, so many draws land that near a
/// boundary; a CPU emulation of the kernel with `expf`-sized errors differed in 0.4% of these
/// cases, all on exact ties of the cumulative mass with the top-p threshold.)
#[test]
fn sample_rows_match_cpu() {
    let Some(cu) = cuda() else { return };
    let (mut cases, mut near, mut near_diff) = (0usize, 0usize, 0usize);
    let mut scratch = Vec::new();
    let rnd = vals(64, 99);
    // FARSIGHT_TEST_SAMPLE_STRIDE=N checks every N-th spec only (for compute-sanitizer runs).
    let stride = std::env::var("FARSIGHT_TEST_SAMPLE_STRIDE")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    for (vi, vocab) in [49152usize, 128256].into_iter().enumerate() {
        let mut specs_of = vec![SampleSpec::GREEDY];
        for t in [0.7f32, 1.0, 1.5] {
            for k in [0u32, 1, 40, 1000, vocab as u32] {
                for p in [0.5f32, 0.9, 0.99, 1.0] {
                    for u in [0.0, 1e-9, 1.0 - 1e-9, 0.5, 0.5] {
                        specs_of.push(SampleSpec {
                            temperature: t,
                            top_k: k,
                            top_p: p,
                            u,
                        });
                    }
                }
            }
        }
        for (batch, kinds) in [(1usize, 0..3usize), (4, 0..1)] {
            for kind in kinds {
                let data = sample_logits(batch, vocab, kind, 40 + (vi * 3 + kind) as u64);
                let (_, t) = both(cu, batch, vocab, &data);
                for (ci, base) in specs_of.iter().enumerate().step_by(stride) {
                    let specs: Vec<SampleSpec> = (0..batch)
                        .map(|r| {
                            // Replace the two 0.5 draws by random ones, different per row.
                            let mut s = *base;
                            if s.u == 0.5 {
                                s.u = ((rnd[(ci * 7 + r * 13) % 64] as f64 + 1.0) / 2.0).min(0.999);
                            } else if batch > 1 && r % 2 == 1 {
                                s.u = ((rnd[(ci + r) % 64] as f64 + 1.0) / 2.0).min(0.999);
                            }
                            s
                        })
                        .collect();
                    let got = cu.sample_rows(&t, &specs).unwrap();
                    for (r, (s, &g)) in specs.iter().zip(&got).enumerate() {
                        let row = &data[r * vocab..(r + 1) * vocab];
                        let want = sample_row(row, s, &mut scratch);
                        let margin = sample_margin(row, s);
                        cases += 1;
                        near += usize::from(margin < SAMPLE_NEAR);
                        if g != want {
                            assert!(
                                margin < SAMPLE_NEAR,
                                "vocab {vocab} batch {batch} kind {kind} row {r} {s:?}: device \
                                 picked {g}, CPU {want} (margin {margin:.2e})"
                            );
                            near_diff += 1;
                        }
                    }
                }
            }
        }
    }
    println!(
        "parity op=sample_rows cases={cases} identical={} near_boundary={near} \
         (of which differ: {near_diff})",
        cases - near_diff
    );
    assert!(
        near_diff * 100 <= cases,
        "{near_diff} of {cases} picks differ"
    );

    // Greedy corner cases: -0 and +0 tie (the first wins), NaN (never larger; kept at index 0).
    let mut row = vec![-1.0f32; 1000];
    row[5] = -0.0;
    row[9] = 0.0;
    let mut nan_mid = vec![0.5f32; 1000];
    nan_mid[3] = f32::NAN;
    nan_mid[400] = 2.0;
    let mut nan_first = nan_mid.clone();
    nan_first[0] = f32::NAN;
    for r in [&row, &nan_mid, &nan_first] {
        let (_, t) = both(cu, 1, 1000, r);
        let got = cu.sample_rows(&t, &[SampleSpec::GREEDY]).unwrap();
        assert_eq!(got, [farsight_kernels::sample::argmax(r)]);
    }

    // Bad calls are errors, not faults.
    let (_, t) = both(cu, 2, 1000, &vals(2000, 3));
    let bad = SampleSpec {
        top_p: 0.0,
        ..SampleSpec::GREEDY
    };
    assert!(matches!(
        cu.sample_rows(&t, &[bad]),
        Err(KernelError::Invalid(_))
    ));
    assert!(matches!(
        cu.sample_rows(&t, &[SampleSpec::GREEDY; 3]),
        Err(KernelError::Shape(_))
    ));
    assert_eq!(cu.sample_rows(&t, &[]).unwrap(), Vec::<u32>::new());
}
