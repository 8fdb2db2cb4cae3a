//! Rough timings of the first CUDA kernels (not the benchmarks of issue 4): host clock around
//! `reps` launches after a warm-up, synchronized, median of 5 such batches. Prints `timing`
//! lines; skipped without a CUDA device. Run with `--ignored` (it is slow on the CPU-less path
//! only in that it allocates large buffers).

use std::time::Instant;

mod common;

use common::vals;
use farsight_kernels::cuda::CudaBackend;
use farsight_kernels::{sample_row, AttnShape, Backend, CausalAttn, DType, HostMatrix, SampleSpec};

/// Median over 5 batches of the per-call seconds of `f`, after 3 warm-up calls.
fn time(be: &CudaBackend, reps: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    be.synchronize().unwrap();
    let mut t: Vec<f64> = (0..5)
        .map(|_| {
            let s = Instant::now();
            for _ in 0..reps {
                f();
            }
            be.synchronize().unwrap();
            s.elapsed().as_secs_f64() / reps as f64
        })
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t[2]
}

fn bf16_weights(rows: usize, cols: usize) -> Vec<u8> {
    let v: Vec<half::bf16> = vals(rows * cols, 3)
        .iter()
        .map(|&x| half::bf16::from_f32(x * 0.02))
        .collect();
    bytemuck::cast_slice(&v).to_vec()
}

#[test]
#[ignore]
fn timings() {
    let be = match CudaBackend::new(0) {
        Ok(be) => be,
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            return;
        }
    };
    println!(
        "using {} (PTX from cache: {})",
        be.name(),
        be.ptx_from_cache()
    );
    // Matmul, Llama-3.1-8B gate_up and down, bf16 weights.
    for (out, inp) in [(28672usize, 4096usize), (4096, 14336)] {
        let bytes = bf16_weights(out, inp);
        let w = be
            .upload_matrix(HostMatrix {
                rows: out,
                cols: inp,
                dtype: DType::BF16,
                bytes: &bytes,
            })
            .unwrap();
        for n in [1usize, 8, 512] {
            let mut x = be.tensor(n, inp).unwrap();
            be.write_tensor(&mut x, 0, &vals(n * inp, 5)).unwrap();
            let mut o = be.tensor(n, out).unwrap();
            let s = time(&be, if n > 8 { 10 } else { 50 }, || {
                be.matmul(&x, &w, None, &mut o, n).unwrap()
            });
            let gbs = bytes.len() as f64 / s / 1e9;
            let tflops = 2.0 * (n * out * inp) as f64 / s / 1e12;
            println!(
                "timing op=matmul bf16 {out}x{inp} n={n}: {:.1} us, {gbs:.0} GB/s of weights, {tflops:.1} TFLOP/s",
                s * 1e6
            );
        }
    }
    // Sampling Llama-3 logits rows (vocab 128256) on the device, against the host path it
    // replaces (copy the rows, `sample_row` on the CPU).
    let vocab = 128256;
    for batch in [1usize, 4] {
        let data: Vec<f32> = vals(batch * vocab, 21).iter().map(|x| x * 8.0).collect();
        let mut t = be.tensor(batch, vocab).unwrap();
        be.write_tensor(&mut t, 0, &data).unwrap();
        let top_p = SampleSpec {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.9,
            u: 0.6,
        };
        let top_k = SampleSpec {
            top_k: 40,
            top_p: 1.0,
            ..top_p
        };
        for (what, spec) in [
            ("greedy", SampleSpec::GREEDY),
            ("T=1 top-p 0.9", top_p),
            ("T=1 top-k 40", top_k),
        ] {
            let specs = vec![spec; batch];
            let dev = time(&be, 20, || {
                be.sample_rows(&t, &specs).unwrap();
            });
            let mut scratch = Vec::new();
            let host = time(&be, 3, || {
                let rows = be.read_rows(&t, 0, batch).unwrap();
                for r in rows.chunks(vocab) {
                    sample_row(r, &spec, &mut scratch);
                }
            });
            println!(
                "timing op=sample_rows vocab={vocab} batch={batch} {what}: {:.1} us on the device (call to ids on the host), {:.1} us copy + CPU",
                dev * 1e6,
                host * 1e6
            );
        }
    }
    // Decode attention, Llama-3.1-8B one layer (32/8 heads, D 128), bf16 KV.
    let shape = AttnShape {
        n_heads: 32,
        n_kv_heads: 8,
        head_dim: 128,
        window: None,
    };
    for ctx in [4096usize, 32768, 131072] {
        let kvw = shape.kv_width();
        let mut src = be.tensor(1024, kvw).unwrap();
        be.write_tensor(&mut src, 0, &vals(1024 * kvw, 9)).unwrap();
        let mut k = be.cache(ctx, kvw, DType::BF16).unwrap();
        let mut v = be.cache(ctx, kvw, DType::BF16).unwrap();
        for r in (0..ctx).step_by(1024) {
            be.cache_write(&mut k, r, &src, 0, 0, 1024).unwrap();
            be.cache_write(&mut v, r, &src, 0, 0, 1024).unwrap();
        }
        for n_q in [1usize, 512, 2048, ctx.min(32768)] {
            let mut q = be.tensor(n_q, shape.q_width()).unwrap();
            be.write_tensor(&mut q, 0, &vals(n_q * shape.q_width(), 10))
                .unwrap();
            let mut o = be.tensor(n_q, shape.q_width()).unwrap();
            let a = CausalAttn {
                shape,
                q_row0: 0,
                q_col0: 0,
                n_q,
                n_past: ctx - n_q,
                out_row0: 0,
                scale: 1.0 / (128f32).sqrt(),
            };
            for (flash, gqa) in [(true, true), (false, true), (false, false)] {
                if (n_q == 1 && flash) || ((n_q > 2048 || ctx > 32768) && n_q > 1 && !flash) {
                    continue;
                }
                be.set_attention_flash(flash);
                be.set_attention_gqa(gqa);
                let kernel = be.attention_kernel(&a, DType::BF16);
                let s = time(&be, if n_q > 1 { 3 } else { 20 }, || {
                    be.attention(&a, &q, &k, &v, &mut o).unwrap()
                });
                let kv_bytes = (2 * ctx * kvw * 2) as f64;
                // Causal FLOPs of the chunk: QK^T and PV over the keys each query sees.
                let keys: f64 = (0..n_q).map(|i| (ctx - n_q + i + 1) as f64).sum();
                let flops = 4.0 * keys * (shape.n_heads * shape.head_dim) as f64;
                println!(
                    "timing op=attention llama bf16 ctx={ctx} n_q={n_q} {kernel:?}: {:.1} us ({:.0} GB/s of KV read once, {:.1} TFLOP/s)",
                    s * 1e6,
                    kv_bytes / s / 1e9,
                    flops / s / 1e12
                );
            }
            be.set_attention_flash(true);
            be.set_attention_gqa(true);
            if n_q == 1 {
                for chunk in [128usize, 256, 512, 1024] {
                    be.set_attention_chunk(Some(chunk));
                    let s = time(&be, 20, || be.attention(&a, &q, &k, &v, &mut o).unwrap());
                    println!(
                        "timing op=attention llama bf16 ctx={ctx} n_q=1 Gqa chunk={chunk}: {:.1} us ({:.0} GB/s of KV)",
                        s * 1e6,
                        (2 * ctx * kvw * 2) as f64 / s / 1e9
                    );
                }
                be.set_attention_chunk(None);
            }
        }
    }
}
