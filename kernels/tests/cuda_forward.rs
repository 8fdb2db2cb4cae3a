//! Composition parity: a small decoder (the same op sequence as `engine/src/model.rs`: embedding,
//! per layer rms_norm -> fused qkv matmul (+bias) -> rope on q and k -> cache_write -> attention
//! -> o matmul -> add -> rms_norm -> gate_up matmul -> silu_mul -> down matmul -> add; then
//! gather_rows -> final norm -> lm_head) with random weights at SmolLM2-135M widths, run on the
//! CPU and the CUDA backend: chunked prefill then decode steps, logits compared by relative L2
//! after every step. Skipped without a CUDA device.

mod common;

use common::parity::weight_bytes;
use common::{rel_l2, vals};
use farsight_kernels::cuda::CudaBackend;
use farsight_kernels::{cpu::CpuBackend, AttnShape, Backend, CausalAttn, DType, HostMatrix, Rope};

#[derive(Clone, Copy)]
struct Cfg {
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ffn: usize,
    vocab: usize,
    layers: usize,
    window: Option<usize>,
}

impl Cfg {
    fn qw(&self) -> usize {
        self.heads * self.head_dim
    }
    fn kvw(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// Host weights (as bytes of `dtype`), shared by both backends.
struct HostWeights {
    dtype: DType,
    embed: Vec<u8>,
    lm_head: Vec<u8>,
    norm: Vec<f32>,
    layers: Vec<HostLayer>,
}

struct HostLayer {
    attn_norm: Vec<f32>,
    mlp_norm: Vec<f32>,
    qkv: Vec<u8>,
    qkv_bias: Vec<f32>,
    o: Vec<u8>,
    gate_up: Vec<u8>,
    down: Vec<u8>,
}

fn host_weights(c: &Cfg, dtype: DType) -> HostWeights {
    let norm = |seed| {
        vals(c.hidden, seed)
            .iter()
            .map(|v| 1.0 + 0.2 * v)
            .collect::<Vec<f32>>()
    };
    let layers = (0..c.layers as u64)
        .map(|l| HostLayer {
            attn_norm: norm(100 * l + 1),
            mlp_norm: norm(100 * l + 2),
            qkv: weight_bytes(c.qw() + 2 * c.kvw(), c.hidden, dtype, 100 * l + 3),
            qkv_bias: vals(c.qw() + 2 * c.kvw(), 100 * l + 4)
                .iter()
                .map(|v| 0.1 * v)
                .collect(),
            o: weight_bytes(c.hidden, c.qw(), dtype, 100 * l + 5),
            gate_up: weight_bytes(2 * c.ffn, c.hidden, dtype, 100 * l + 6),
            down: weight_bytes(c.hidden, c.ffn, dtype, 100 * l + 7),
        })
        .collect();
    HostWeights {
        dtype,
        embed: weight_bytes(c.vocab, c.hidden, dtype, 7001),
        lm_head: weight_bytes(c.vocab, c.hidden, dtype, 7002),
        norm: norm(7003),
        layers,
    }
}

struct Layer<B: Backend> {
    attn_norm: B::Tensor,
    mlp_norm: B::Tensor,
    qkv: B::Matrix,
    qkv_bias: B::Tensor,
    o: B::Matrix,
    gate_up: B::Matrix,
    down: B::Matrix,
    k: B::Cache,
    v: B::Cache,
}

struct Model<'a, B: Backend> {
    be: &'a B,
    c: Cfg,
    embed: B::Matrix,
    lm_head: B::Matrix,
    norm: B::Tensor,
    layers: Vec<Layer<B>>,
    rope: Rope,
    len: usize,
}

fn vec_tensor<B: Backend>(be: &B, v: &[f32]) -> B::Tensor {
    let mut t = be.tensor(1, v.len()).unwrap();
    be.write_tensor(&mut t, 0, v).unwrap();
    t
}

impl<'a, B: Backend> Model<'a, B> {
    fn new(be: &'a B, c: Cfg, w: &HostWeights, kv_dtype: DType) -> Self {
        let m = |rows, cols, bytes: &Vec<u8>| {
            be.upload_matrix(HostMatrix {
                rows,
                cols,
                dtype: w.dtype,
                bytes,
            })
            .unwrap()
        };
        let layers = w
            .layers
            .iter()
            .map(|l| Layer {
                attn_norm: vec_tensor(be, &l.attn_norm),
                mlp_norm: vec_tensor(be, &l.mlp_norm),
                qkv: m(c.qw() + 2 * c.kvw(), c.hidden, &l.qkv),
                qkv_bias: vec_tensor(be, &l.qkv_bias),
                o: m(c.hidden, c.qw(), &l.o),
                gate_up: m(2 * c.ffn, c.hidden, &l.gate_up),
                down: m(c.hidden, c.ffn, &l.down),
                // Small on purpose: the forward pass grows them.
                k: be.cache(4, c.kvw(), kv_dtype).unwrap(),
                v: be.cache(4, c.kvw(), kv_dtype).unwrap(),
            })
            .collect();
        let half = c.head_dim / 2;
        let rope = Rope {
            inv_freq: (0..half)
                .map(|i| 1.0 / 100_000f32.powf(2.0 * i as f32 / c.head_dim as f32))
                .collect(),
            attention_scaling: 1.0,
        };
        Model {
            be,
            c,
            embed: m(c.vocab, c.hidden, &w.embed),
            lm_head: m(c.vocab, c.hidden, &w.lm_head),
            norm: vec_tensor(be, &w.norm),
            layers,
            rope,
            len: 0,
        }
    }

    /// Runs `ids` at the next positions; returns the logits of the last token.
    fn step(&mut self, ids: &[u32]) -> Vec<f32> {
        let (be, c) = (self.be, self.c);
        let n = ids.len();
        let (qw, kvw) = (c.qw(), c.kvw());
        let t = |cols| be.tensor(n, cols).unwrap();
        let (mut h, mut xn, mut qkv, mut attn, mut proj) = (
            t(c.hidden),
            t(c.hidden),
            t(qw + 2 * kvw),
            t(qw),
            t(c.hidden),
        );
        let (mut gu, mut act) = (t(2 * c.ffn), t(c.ffn));
        let positions: Vec<u32> = (self.len as u32..(self.len + n) as u32).collect();
        let shape = AttnShape {
            n_heads: c.heads,
            n_kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            window: c.window,
        };
        be.embedding(&self.embed, ids, &mut h).unwrap();
        for l in self.layers.iter_mut() {
            be.rms_norm(&h, &l.attn_norm, 1e-5, &mut xn, n).unwrap();
            be.matmul(&xn, &l.qkv, Some(&l.qkv_bias), &mut qkv, n)
                .unwrap();
            be.rope(&mut qkv, 0, c.heads, c.head_dim, &positions, &self.rope)
                .unwrap();
            be.rope(&mut qkv, qw, c.kv_heads, c.head_dim, &positions, &self.rope)
                .unwrap();
            let need = self.len + n;
            if be.cache_capacity(&l.k) < need {
                let cap = need.next_power_of_two();
                be.cache_grow(&mut l.k, cap).unwrap();
                be.cache_grow(&mut l.v, cap).unwrap();
            }
            be.cache_write(&mut l.k, self.len, &qkv, 0, qw, n).unwrap();
            be.cache_write(&mut l.v, self.len, &qkv, 0, qw + kvw, n)
                .unwrap();
            let args = CausalAttn {
                shape,
                q_row0: 0,
                q_col0: 0,
                n_q: n,
                n_past: self.len,
                out_row0: 0,
                scale: 1.0 / (c.head_dim as f32).sqrt(),
            };
            be.attention(&args, &qkv, &l.k, &l.v, &mut attn).unwrap();
            be.matmul(&attn, &l.o, None, &mut proj, n).unwrap();
            be.add(&mut h, &proj, n).unwrap();
            be.rms_norm(&h, &l.mlp_norm, 1e-5, &mut xn, n).unwrap();
            be.matmul(&xn, &l.gate_up, None, &mut gu, n).unwrap();
            be.silu_mul(&gu, &mut act, n).unwrap();
            be.matmul(&act, &l.down, None, &mut proj, n).unwrap();
            be.add(&mut h, &proj, n).unwrap();
        }
        self.len += n;
        let mut sel = be.tensor(1, c.hidden).unwrap();
        let mut seln = be.tensor(1, c.hidden).unwrap();
        let mut logits = be.tensor(1, c.vocab).unwrap();
        be.gather_rows(&h, &[n - 1], &mut sel, 0).unwrap();
        be.rms_norm(&sel, &self.norm, 1e-5, &mut seln, 1).unwrap();
        be.matmul(&seln, &self.lm_head, None, &mut logits, 1)
            .unwrap();
        be.read_rows(&logits, 0, 1).unwrap()
    }
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold(0, |b, (i, &x)| if x > v[b] { i } else { b })
}

#[test]
fn small_decoder_matches_cpu() {
    let cu = match CudaBackend::new(0) {
        Ok(b) => b,
        Err(_) => {
            println!("skipped: no CUDA device");
            return;
        }
    };
    let cpu = CpuBackend::new(0).unwrap();
    let base = Cfg {
        hidden: 576,
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        ffn: 1536,
        vocab: 8192,
        layers: 4,
        window: None,
    };
    for (wdt, kvdt, window, tol) in [
        (DType::F32, DType::F32, None, 1e-4),
        (DType::BF16, DType::BF16, None, 1e-2),
        (DType::F16, DType::F16, Some(100), 1e-2),
    ] {
        let c = Cfg { window, ..base };
        let w = host_weights(&c, wdt);
        let mut mc = Model::new(&cpu, c, &w, kvdt);
        let mut mg = Model::new(&cu, c, &w, kvdt);
        let prompt: Vec<u32> = (0..300u32)
            .map(|i| (i * 2654435761u32) % c.vocab as u32)
            .collect();
        // Chunked prefill (three chunks), then greedy decode driven by the CPU's choices.
        let mut worst = 0.0f64;
        let mut agree = 0;
        let mut next = 0u32;
        for chunk in [&prompt[..128], &prompt[128..257], &prompt[257..]] {
            let (lc, lg) = (mc.step(chunk), mg.step(chunk));
            worst = worst.max(rel_l2(&lg, &lc));
            next = argmax(&lc) as u32;
        }
        let steps = 16;
        for _ in 0..steps {
            let (lc, lg) = (mc.step(&[next]), mg.step(&[next]));
            let r = rel_l2(&lg, &lc);
            worst = worst.max(r);
            agree += (argmax(&lg) == argmax(&lc)) as usize;
            next = argmax(&lc) as u32;
        }
        let label = format!(
            "weights {wdt} kv {kvdt}{}",
            window.map_or(String::new(), |w| format!(" window {w}"))
        );
        println!(
            "parity op=forward case=4-layer smollm2-width {label}, 300-token prefill in 3 chunks + {steps} decode steps rel_l2={worst:.3e} tol={tol:.0e} (argmax agreed {agree}/{steps})"
        );
        assert!(worst < tol, "{label}: logits rel L2 {worst:.3e}");
    }
}
