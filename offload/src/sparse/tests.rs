//! Sparse store against the dense cache, through the `KvStore` interface with the CPU backend.

use farsight_kernels::cpu::CpuBackend;
use farsight_kernels::{AttnShape, Backend, CausalAttn, DType};

use super::*;
use crate::tier::HostKvTier;
use crate::{DenseKvCache, KvStore};

const SHAPE: AttnShape = AttnShape {
    n_heads: 6,
    n_kv_heads: 2,
    head_dim: 16,
    window: None,
};
const LAYERS: usize = 2;

fn qkv_cols() -> usize {
    SHAPE.q_width() + 2 * SHAPE.kv_width()
}

/// Deterministic pseudo-random values in [-1, 1).
fn fill(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn sparse_store(cfg: SparseConfig, dtype: DType) -> SparseKvStore {
    let tier = Box::new(HostKvTier::new(row_layout(LAYERS, &SHAPE, dtype)));
    let ranking = ChannelRanking::natural(LAYERS, SHAPE.n_kv_heads, SHAPE.head_dim);
    SparseKvStore::new(cfg, SHAPE, LAYERS, dtype, &ranking, tier, 1 << 20).unwrap()
}

/// Appends `n` tokens of random q/k/v to every store (one call), returning each store's
/// attention output per layer.
fn step(
    be: &CpuBackend,
    stores: &mut [&mut dyn KvStore<CpuBackend>],
    n: usize,
    seed: u64,
) -> Vec<Vec<Vec<f32>>> {
    let mut src = be.tensor(n, qkv_cols()).unwrap();
    let data = fill(n * qkv_cols(), seed);
    be.write_tensor(&mut src, 0, &data).unwrap();
    let (qw, kvw) = (SHAPE.q_width(), SHAPE.kv_width());
    let mut outs = Vec::new();
    for s in stores.iter_mut() {
        s.reserve(be, n).unwrap();
        let mut per_layer = Vec::new();
        for l in 0..LAYERS {
            s.write(be, l, &src, 0, qw, qw + kvw, n).unwrap();
            let a = CausalAttn {
                shape: SHAPE,
                q_row0: 0,
                q_col0: 0,
                n_q: n,
                n_past: s.len(),
                out_row0: 0,
                scale: 0.25,
            };
            let mut out = be.tensor(n, qw).unwrap();
            s.attend(be, l, &a, &src, &mut out).unwrap();
            per_layer.push(be.read_rows(&out, 0, n).unwrap());
        }
        s.commit(n);
        outs.push(per_layer);
    }
    outs
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn full_budget_and_all_channels_equals_dense() {
    let be = CpuBackend::new(2).unwrap();
    for dtype in [DType::F32, DType::F16] {
        for sparse_prefill in [false, true] {
            let cfg = SparseConfig {
                budget: TokenBudget::Tokens(1 << 20),
                label_channels: SHAPE.head_dim,
                sparse_prefill,
                ..SparseConfig::default()
            };
            let mut sparse = sparse_store(cfg, dtype);
            let mut dense =
                DenseKvCache::new(&be, LAYERS, SHAPE.kv_width(), dtype, 1 << 20).unwrap();
            for (i, n) in [37usize, 1, 1, 20, 1].into_iter().enumerate() {
                let outs = step(&be, &mut [&mut sparse, &mut dense], n, i as u64);
                for l in 0..LAYERS {
                    let d = max_diff(&outs[0][l], &outs[1][l]);
                    assert!(
                        d < 1e-5,
                        "{dtype} prefill {sparse_prefill} step {i} layer {l}: {d}"
                    );
                }
            }
        }
    }
}

#[test]
fn budget_reads_exactly_budget_rows_with_sinks_and_recent() {
    let be = CpuBackend::new(2).unwrap();
    let cfg = SparseConfig {
        budget: TokenBudget::Tokens(24),
        sink: 3,
        recent: 5,
        ..SparseConfig::default()
    };
    let mut s = sparse_store(cfg, DType::F16);
    step(&be, &mut [&mut s], 100, 1);
    s.reset_stats();
    step(&be, &mut [&mut s], 1, 2);
    let st = s.stats();
    assert_eq!(st.sparse_attentions, (LAYERS * SHAPE.n_kv_heads) as u64);
    assert_eq!(st.sparse_rows, 24 * st.sparse_attentions);
    assert_eq!(st.visible_rows, 101 * st.sparse_attentions);
    // Positions chosen: sinks first, recent last, 16 scored in between.
    let q = fill(SHAPE.q_width(), 9);
    let qlab = s.group_label_query(0, 1, &q);
    let (pos, k) = s.select(0, 1, &qlab, 0, 101, 24);
    assert_eq!(k, 16);
    assert_eq!(&pos[..3], &[0, 1, 2]);
    assert_eq!(&pos[19..], &[96, 97, 98, 99, 100]);
    assert!(pos.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn selection_with_all_channels_is_the_true_top_k() {
    // With r = head_dim and f32 labels rounded to f16, label scores are the true q.k up to
    // rounding: the chosen tokens must be the true top-k (checked where the gap is clear).
    let be = CpuBackend::new(1).unwrap();
    let cfg = SparseConfig {
        budget: TokenBudget::Tokens(10),
        sink: 0,
        recent: 0,
        label_channels: 16,
        ..SparseConfig::default()
    };
    let mut s = sparse_store(cfg, DType::F32);
    step(&be, &mut [&mut s], 64, 5);
    let q = fill(SHAPE.q_width(), 11);
    let g = 0;
    let qlab = s.group_label_query(0, g, &q);
    let (pos, _) = s.select(0, g, &qlab, 0, 64, 10);
    // True scores from the written keys.
    let data = fill(64 * qkv_cols(), 5);
    let d = SHAPE.head_dim;
    let mut scores: Vec<(f32, usize)> = (0..64)
        .map(|t| {
            let k = &data[t * qkv_cols() + SHAPE.q_width() + g * d..][..d];
            ((0..d).map(|c| qlab[c] * k[c]).sum(), t)
        })
        .collect();
    scores.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut want: Vec<usize> = scores[..10].iter().map(|s| s.1).collect();
    want.sort_unstable();
    assert!(
        (scores[9].0 - scores[10].0).abs() > 1e-2,
        "test data has a tie at the cut"
    );
    assert_eq!(pos, want);
}

#[test]
fn layer_ahead_with_the_true_query_has_full_recall() {
    let be = CpuBackend::new(1).unwrap();
    let cfg = SparseConfig {
        budget: TokenBudget::Tokens(48),
        predict: Predict::LayerAhead,
        ..SparseConfig::default()
    };
    let mut s = sparse_store(cfg, DType::F16);
    step(&be, &mut [&mut s], 80, 3);
    s.reset_stats();
    // Predict layer 1 from the very query it will see: recall must be 1.
    let n = 1;
    let data = fill(n * qkv_cols(), 4);
    let ch = KvStore::<CpuBackend>::ahead_channels(&s).unwrap().to_vec();
    let (d, group, r) = (SHAPE.head_dim, SHAPE.group(), 8);
    let mut q_hat = Vec::new();
    for h in 0..SHAPE.n_heads {
        q_hat.extend(ch[1][h / group].iter().map(|&c| data[h * d + c]));
    }
    assert_eq!(q_hat.len(), SHAPE.n_heads * r);
    KvStore::<CpuBackend>::predict(&mut s, 1, &q_hat, n).unwrap();
    step(&be, &mut [&mut s], n, 4);
    let st = s.stats();
    assert_eq!(st.recall_per_layer()[0], None);
    assert_eq!(st.recall_per_layer()[1], Some(1.0));
}

#[test]
fn bad_settings_are_refused() {
    let ranking = ChannelRanking::natural(LAYERS, SHAPE.n_kv_heads, SHAPE.head_dim);
    let mk = |cfg: SparseConfig| {
        let tier = Box::new(HostKvTier::new(row_layout(LAYERS, &SHAPE, DType::F16)));
        SparseKvStore::new(cfg, SHAPE, LAYERS, DType::F16, &ranking, tier, 100)
            .err()
            .map(|e| e.to_string())
    };
    let e = mk(SparseConfig {
        label_channels: 17,
        ..SparseConfig::default()
    })
    .unwrap();
    assert!(e.contains("head dimension 16"), "{e}");
    let e = mk(SparseConfig {
        dense_layers: vec![2],
        ..SparseConfig::default()
    })
    .unwrap();
    assert!(e.contains("layer 2"), "{e}");
    let other = ChannelRanking::natural(LAYERS + 1, SHAPE.n_kv_heads, SHAPE.head_dim);
    assert!(other
        .top(8, LAYERS, SHAPE.n_kv_heads, SHAPE.head_dim)
        .is_err());
    let mut broken = ranking.clone();
    broken.order[1][0][3] = 0;
    assert!(broken
        .top(8, LAYERS, SHAPE.n_kv_heads, SHAPE.head_dim)
        .is_err());
}
