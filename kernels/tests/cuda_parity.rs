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

use common::parity::*;
use common::vals;

use farsight_kernels::cuda::{CudaBackend, Gemv1, GEMV_MAX_ROWS};
use farsight_kernels::{Backend, DType, HostMatrix, KernelError, Rope};

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
            let (wc, wg) = matrices(cu, rows, m.hidden, dt, 100 + (mi * 3 + di) as u64);
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
    let (wc, wg) = matrices(cu, out, inp, dt, seed);
    assert_eq!(cu.matrix_bytes(&wg), out * inp * dt.size());
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

/// The batch-1 GEMV kernels (8 or 4 loads in flight, the persistent grid) sum in the same order,
/// so they agree bit for bit, and with the CPU to the f32 bound; shapes with whole, partial and
/// single batches per row, more rows than the persistent grid's warps, and a few rows.
#[test]
fn batch1_gemv_kernels_agree_bit_for_bit() {
    if cuda().is_none() {
        return;
    }
    // Its own backend: the kernel choice is per backend, and the shared one serves other tests.
    let cu = CudaBackend::new(0).unwrap();
    let shapes = [
        (4096, 6144),
        (14336, 4096),
        (4096, 28672),
        (576, 1536),
        (1536, 576),
        (4104, 7),
        (8, 3),
    ];
    let mut seed = 9000;
    for (inp, out) in shapes {
        for dt in [DType::F16, DType::BF16] {
            seed += 10;
            let (wc, wg) = matrices(&cu, out, inp, dt, seed);
            let x = vals(inp, seed + 1);
            let (xc, xg) = both(&cu, 1, inp, &x);
            let (mut oc, _) = poisoned(&cu, 1, out);
            cpu().matmul(&xc, &wc, None, &mut oc, 1).unwrap();
            let mut runs = Vec::new();
            for g in [Gemv1::Loads8, Gemv1::Loads4, Gemv1::Persistent] {
                cu.set_gemv1(g);
                let (_, mut og) = poisoned(&cu, 1, out);
                cu.matmul(&xg, &wg, None, &mut og, 1).unwrap();
                let got = cu.read_rows(&og, 0, 1).unwrap();
                check(
                    "matmul",
                    &format!("gemv1 {g:?} {dt} {out}x{inp}"),
                    &got,
                    &oc.data,
                    1e-4,
                );
                runs.push((g, got));
            }
            for (g, got) in &runs[1..] {
                let same = got
                    .iter()
                    .zip(&runs[0].1)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{g:?} differs from Loads8 at {dt} {out}x{inp}");
            }
        }
    }
    cu.set_gemv1(Gemv1::Loads8);
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
