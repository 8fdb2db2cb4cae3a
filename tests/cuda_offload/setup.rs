//! Shared setup of the offloaded-store GPU tests: a backend (or a skip), a small synthetic model,
//! store configurations, decode loops and a comparison metric.

use farsight_engine::model::{Logits, Segment};
use farsight_engine::sampler::argmax;
use farsight_engine::synthetic::shape_config;
use farsight_engine::Model;
use farsight_kernels::cuda::CudaBackend;
use farsight_kernels::DType;
use farsight_offload::sparse::{LabelBits, Predict, TokenBudget};
use farsight_offload::KvStore;
use farsight_prefetch::{OffloadConfig, OffloadKvStore, RowHome};

pub fn backend() -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(be) => Some(be),
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            None
        }
    }
}

/// A deterministic xorshift stream.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

pub fn small_model(be: CudaBackend) -> Model<CudaBackend> {
    let mut cfg = shape_config("smollm2-135m").unwrap();
    cfg.num_layers = 4;
    Model::synthetic(cfg, be, DType::BF16, 7).unwrap()
}

pub fn offload_cfg(
    m: &Model<CudaBackend>,
    budget: TokenBudget,
    recent: usize,
    predict: Predict,
    home: RowHome,
    capacity: usize,
) -> OffloadConfig {
    let c = &m.cfg;
    OffloadConfig {
        budget,
        sink: 4,
        recent,
        channels: vec![
            vec![(0..8).map(|i| i * 7 % c.head_dim).collect(); c.num_kv_heads];
            c.num_layers
        ],
        label_bits: LabelBits::B16,
        predict,
        dtype: DType::BF16,
        capacity,
        home,
        measure_recall: false,
        row_cache: 1,
        page_tokens: 1,
    }
}

/// Greedy decode of `n` steps; the logits of every step.
pub fn decode(
    m: &Model<CudaBackend>,
    kv: &mut dyn KvStore<CudaBackend>,
    first: u32,
    n: usize,
) -> Vec<Vec<f32>> {
    let mut ws = m.workspace(1, 1).unwrap();
    let mut tok = first;
    let mut out = Vec::new();
    for _ in 0..n {
        let l = step_logits(m, &mut ws, kv, tok);
        tok = argmax(&l);
        out.push(l);
    }
    out
}

/// One decode step of `tok`: the logits of its position.
pub fn step_logits(
    m: &Model<CudaBackend>,
    ws: &mut farsight_engine::model::Workspace<CudaBackend>,
    kv: &mut dyn KvStore<CudaBackend>,
    tok: u32,
) -> Vec<f32> {
    let mut segs = [Segment {
        tokens: std::slice::from_ref(&tok),
        kv,
        logits: Logits::Last,
    }];
    m.forward(ws, &mut segs)
        .unwrap()
        .swap_remove(0)
        .into_logits()
}

/// Teacher-forced decode of `toks`, one token a step (the queries change from step to step
/// whatever the model predicts; greedy decode of a random model tends to repeat one token).
pub fn decode_forced(
    m: &Model<CudaBackend>,
    kv: &mut dyn KvStore<CudaBackend>,
    toks: &[u32],
) -> Vec<Vec<f32>> {
    let mut ws = m.workspace(1, 1).unwrap();
    toks.iter()
        .map(|&tok| step_logits(m, &mut ws, kv, tok))
        .collect()
}

pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den.max(1e-300)).sqrt()
}

/// Label channels at slow RoPE frequencies (8 per KV head, `spread_channels`) in every layer:
/// a query bias's share of the query then turns slowly from step to step.
pub fn slow_channels(m: &Model<CudaBackend>) -> Vec<Vec<Vec<usize>>> {
    let c = &m.cfg;
    let ch = farsight_engine::synthetic::spread_channels(c.head_dim, 8);
    vec![vec![ch; c.num_kv_heads]; c.num_layers]
}

/// A layer-ahead store (1/16, recent 16, recall counted) with channels `ch` and a row cache of
/// `row_cache` times the top-k over 3000 random rows.
pub fn ahead_store(
    m: &Model<CudaBackend>,
    ch: &[Vec<Vec<usize>>],
    home: RowHome,
    row_cache: usize,
) -> OffloadKvStore {
    let mut cfg = offload_cfg(
        m,
        TokenBudget::Fraction(16),
        16,
        Predict::LayerAhead,
        home,
        4096,
    );
    cfg.channels = ch.to_vec();
    cfg.row_cache = row_cache;
    cfg.measure_recall = true;
    let mut s = OffloadKvStore::new(&m.backend, cfg, m.attn_shape(), m.cfg.num_layers).unwrap();
    s.fill_random(&m.backend, 3000, 1.0, 99).unwrap();
    s
}

/// `n` distinct tokens: without a query bias, consecutive queries are unrelated.
pub fn distinct_tokens(m: &Model<CudaBackend>, n: u64) -> Vec<u32> {
    let vocab = m.cfg.vocab_size as u64;
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}
