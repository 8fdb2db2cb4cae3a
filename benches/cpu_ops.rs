//! Criterion benches of the CPU backend's hot paths at SmolLM2-135M shapes:
//! `cargo bench --bench cpu_ops`.
//!
//! - decode matmul (one activation row against an f16 weight), reported as weight bytes/s;
//! - prefill matmul (512 rows);
//! - decode attention over 4096 cached tokens (f16 KV, 9 heads over 3 KV heads, D = 64).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use farsight_kernels::cpu::CpuBackend;
use farsight_kernels::{AttnShape, Backend, CausalAttn, DType, HostMatrix};

fn f16_bytes(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| half::f16::from_f32(((i * 7919) % 255) as f32 / 255.0 - 0.5).to_le_bytes())
        .collect()
}

fn matmul(c: &mut Criterion) {
    let be = CpuBackend::new(0).unwrap();
    let mut g = c.benchmark_group("matmul_f16");
    for (name, rows, cols, m) in [
        ("lm_head_decode", 49152, 576, 1),
        ("gate_up_decode", 3072, 576, 1),
        ("down_decode", 576, 1536, 1),
        ("gate_up_prefill512", 3072, 576, 512),
    ] {
        let bytes = f16_bytes(rows * cols);
        let w = be
            .upload_matrix(HostMatrix {
                rows,
                cols,
                dtype: DType::F16,
                bytes: &bytes,
            })
            .unwrap();
        let mut x = be.tensor(m, cols).unwrap();
        x.data
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = ((i % 17) as f32 - 8.0) / 8.0);
        let mut out = be.tensor(m, rows).unwrap();
        g.throughput(Throughput::Bytes((rows * cols * 2) as u64));
        g.bench_function(BenchmarkId::new(name, format!("{rows}x{cols}x{m}")), |b| {
            b.iter(|| be.matmul(&x, &w, None, &mut out, m).unwrap())
        });
    }
    g.finish();
}

fn attention(c: &mut Criterion) {
    let be = CpuBackend::new(0).unwrap();
    let shape = AttnShape {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
        window: None,
    };
    let ctx = 4096;
    let mut src = be.tensor(ctx, shape.kv_width()).unwrap();
    src.data
        .iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v = ((i * 31) % 97) as f32 / 97.0 - 0.5);
    let mut k = be.cache(ctx, shape.kv_width(), DType::F16).unwrap();
    let mut v = be.cache(ctx, shape.kv_width(), DType::F16).unwrap();
    be.cache_write(&mut k, 0, &src, 0, 0, ctx).unwrap();
    be.cache_write(&mut v, 0, &src, 0, 0, ctx).unwrap();
    let mut q = be.tensor(1, shape.q_width()).unwrap();
    q.data
        .iter_mut()
        .enumerate()
        .for_each(|(i, x)| *x = (i % 5) as f32 / 5.0);
    let mut out = be.tensor(1, shape.q_width()).unwrap();
    let args = CausalAttn {
        shape,
        q_row0: 0,
        q_col0: 0,
        n_q: 1,
        n_past: ctx - 1,
        out_row0: 0,
        scale: 0.125,
    };
    c.bench_function("attention_decode_f16_4096", |b| {
        b.iter(|| be.attention(&args, &q, &k, &v, &mut out).unwrap())
    });
}

criterion_group!(benches, matmul, attention);
criterion_main!(benches);
