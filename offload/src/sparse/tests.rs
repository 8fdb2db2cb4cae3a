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
    step_data(be, stores, n, &fill(n * qkv_cols(), seed))
}

/// As [`step`], with the tokens' `[q | k | v]` rows given.
fn step_data(
    be: &CpuBackend,
    stores: &mut [&mut dyn KvStore<CpuBackend>],
    n: usize,
    data: &[f32],
) -> Vec<Vec<Vec<f32>>> {
    let mut src = be.tensor(n, qkv_cols()).unwrap();
    be.write_tensor(&mut src, 0, data).unwrap();
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
fn page_selection_takes_whole_pages_by_their_best_score() {
    use super::pages::select_pages;
    // Middle positions 5..21 (pages of 4: 4..8 and 20..24 are not wholly inside, so the
    // candidates are 8..12, 12..16 and 16..20).
    let middle: Vec<usize> = (5..21).collect();
    let mut scores = vec![0.0f32; middle.len()];
    let at = |p: usize| p - 5;
    scores[at(13)] = 9.0; // page 12..16 is best
    scores[at(9)] = 5.0; // then 8..12
    scores[at(20)] = 8.0; // in the incomplete page 20..24: not a candidate
    scores[at(6)] = 7.0; // in the partial page 4..8: not a candidate
    scores[at(17)] = 1.0; // 16..20 last
    let pick =
        |k: usize, middle: &[usize], scores: &[f32]| select_pages(middle, scores, k, 4, (5, 21));
    assert_eq!(pick(4, &middle, &scores), vec![12, 13, 14, 15]);
    assert_eq!(
        pick(3, &middle, &scores),
        Vec::<usize>::new(),
        "k / 4 pages"
    );
    assert_eq!(pick(8, &middle, &scores), (8..16).collect::<Vec<_>>());
    assert_eq!(pick(11, &middle, &scores), (8..16).collect::<Vec<_>>());
    assert_eq!(pick(12, &middle, &scores), (8..20).collect::<Vec<_>>());
    assert_eq!(pick(16, &middle, &scores), (8..20).collect::<Vec<_>>());
    // Ties go to the earlier page.
    let flat = vec![1.0f32; middle.len()];
    assert_eq!(pick(4, &middle, &flat), vec![8, 9, 10, 11]);
    // An evicted position leaves its page's other rows.
    let gone: Vec<usize> = middle.iter().copied().filter(|&p| p != 14).collect();
    let gs: Vec<f32> = gone.iter().map(|&p| scores[at(p)]).collect();
    assert_eq!(pick(4, &gone, &gs), vec![12, 13, 15]);
    // One-token pages are the plain top-k (ties: the earlier position).
    let mut one = select_pages(&middle, &scores, 5, 1, (5, 21));
    one.sort_unstable();
    assert_eq!(one, vec![6, 9, 13, 17, 20]);
}

#[test]
fn the_page_policy_widens_recent_to_a_page_boundary() {
    use super::page_recent;
    assert_eq!(page_recent(4, 32, 1), 32, "token selection keeps --recent");
    assert_eq!(page_recent(4, 32, 4), 32, "already on a boundary");
    assert_eq!(page_recent(4, 32, 8), 36);
    assert_eq!(page_recent(5, 30, 16), 43);
    assert_eq!(page_recent(0, 1, 64), 64);
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

/// Step-to-step reuse on keys whose top-k is known: with sink 2, recent 2 and a budget of 8
/// rows (top-4), a query along channel 0 (`X`) chooses {3, 4, 5, 6}, one along channels 0 + 1
/// (`Y`) chooses {3, 4, 10, 11}, one along channel 2 (`Z`) chooses {14, 15, 16, 17}.
mod reuse {
    use super::*;

    #[derive(Clone, Copy)]
    enum Q {
        X,
        Y,
        Z,
    }

    /// `[q | k | v]` of the token at `pos` queried by `q`.
    fn token(pos: usize, q: Q) -> Vec<f32> {
        let (qw, kvw, d) = (SHAPE.q_width(), SHAPE.kv_width(), SHAPE.head_dim);
        let mut row = vec![0.0f32; qkv_cols()];
        for h in 0..SHAPE.n_heads {
            let qh = &mut row[h * d..(h + 1) * d];
            match q {
                Q::X => qh[0] = 1.0,
                Q::Y => (qh[0], qh[1]) = (1.0, 1.0),
                Q::Z => qh[2] = 1.0,
            }
        }
        let (ch, val) = match pos {
            3 | 4 => (0, 10.0),
            5 | 6 => (0, 5.0),
            10 | 11 => (1, 8.0),
            14..=17 => (2, 10.0),
            _ => (0, 0.0),
        };
        for g in 0..SHAPE.n_kv_heads {
            row[qw + g * d + ch] = val;
        }
        row[qw + kvw..].iter_mut().for_each(|v| *v = 0.5);
        row
    }

    /// A store filled with 24 tokens queried by `X` (every position attending as decode
    /// would), stats reset, then `calls` (each a list of queries, one token each) run; returns
    /// the stats of those calls.
    fn run(calls: &[&[Q]], predict: bool) -> SparseStats {
        let be = CpuBackend::new(2).unwrap();
        let cfg = SparseConfig {
            budget: TokenBudget::Tokens(8),
            sink: 2,
            recent: 2,
            sparse_prefill: true,
            predict: if predict {
                Predict::LayerAhead
            } else {
                Predict::SameLayer
            },
            ..SparseConfig::default()
        };
        let mut s = sparse_store(cfg, DType::F32);
        s.simulate_row_caches(true);
        let mut pos = 0;
        let mut call = |s: &mut SparseKvStore, qs: &[Q]| {
            let data: Vec<f32> = qs
                .iter()
                .enumerate()
                .flat_map(|(i, &q)| token(pos + i, q))
                .collect();
            if predict {
                // Layer 1's guess is the query it will see: the guess selects as the truth.
                let ch = KvStore::<CpuBackend>::ahead_channels(s).unwrap().to_vec();
                let (d, group) = (SHAPE.head_dim, SHAPE.group());
                let mut q_hat = Vec::new();
                for t in 0..qs.len() {
                    for h in 0..SHAPE.n_heads {
                        let q = &data[t * qkv_cols() + h * d..][..d];
                        q_hat.extend(ch[1][h / group].iter().map(|&c| q[c]));
                    }
                }
                KvStore::<CpuBackend>::predict(s, 1, &q_hat, qs.len()).unwrap();
            }
            step_data(&be, &mut [s], qs.len(), &data);
            pos += qs.len();
        };
        call(&mut s, &[Q::X; 24]);
        s.reset_stats();
        for qs in calls {
            call(&mut s, qs);
        }
        s.stats()
    }

    /// Pairs of consecutive positions per layer in `calls` (all after 24 sparse positions).
    fn pairs(calls: &[&[Q]]) -> u64 {
        let n: usize = calls.iter().map(|c| c.len()).sum();
        (n * SHAPE.n_kv_heads) as u64
    }

    #[test]
    fn identical_selection_is_fully_reused() {
        // Single-token calls, then a call whose 10 queries run on the thread pool.
        let calls: &[&[Q]] = &[&[Q::X], &[Q::X], &[Q::X; 10], &[Q::X]];
        let st = run(calls, false);
        for l in 0..LAYERS {
            assert_eq!(st.reuse_total[l], 4 * pairs(calls), "layer {l}");
            assert_eq!(st.reuse_hits[l], st.reuse_total[l], "layer {l}");
        }
        assert_eq!(st.step_reuse(), Some(1.0));
        assert_eq!(st.ahead_step_reuse(), None);
    }

    #[test]
    fn disjoint_selection_is_never_reused() {
        // The 24 filling queries were X: the first Z already pairs with an X.
        let calls: &[&[Q]] = &[
            &[Q::Z],
            &[Q::X, Q::Z, Q::X, Q::Z, Q::X, Q::Z, Q::X, Q::Z, Q::X],
        ];
        let st = run(calls, false);
        assert_eq!(st.reuse_total, vec![4 * pairs(calls); LAYERS]);
        assert_eq!(st.reuse_hits, vec![0; LAYERS]);
        assert_eq!(st.step_reuse(), Some(0.0));
    }

    #[test]
    fn half_changed_selection_is_half_reused() {
        // X and Y share {3, 4}; X, X shares all 4: hits 2 + 2 + 4 + 2 + 2 + 2 of 6 x 4.
        let calls: &[&[Q]] = &[&[Q::Y], &[Q::X, Q::X], &[Q::Y, Q::X, Q::Y]];
        let st = run(calls, false);
        assert_eq!(st.reuse_total, vec![24 * SHAPE.n_kv_heads as u64; LAYERS]);
        assert_eq!(st.reuse_hits, vec![14 * SHAPE.n_kv_heads as u64; LAYERS]);
        assert_eq!(st.reuse_per_layer(), vec![Some(14.0 / 24.0); LAYERS]);
    }

    #[test]
    fn simulated_larger_caches_keep_alternating_selections() {
        // Y, X, X, Y, X, Y: the 1x cache is the previous selection (its hits are the reuse);
        // a 2x cache (8 rows) holds X and Y together ({3, 4, 5, 6, 10, 11}), so after the
        // first Y every selection hits in full: 2 + 4 x 5 hits of 6 x 4 (the 24 X queries
        // before the first Y left X cached).
        let calls: &[&[Q]] = &[&[Q::Y], &[Q::X, Q::X], &[Q::Y, Q::X, Q::Y]];
        let st = run(calls, false);
        let heads = SHAPE.n_kv_heads as u64;
        assert_eq!(CACHE_FACTORS[..2], [1, 2]);
        assert_eq!(st.cache_total, st.reuse_total);
        assert_eq!(st.cache_hits[0], st.reuse_hits);
        assert_eq!(st.cache_hits[1], vec![22 * heads; LAYERS]);
        assert_eq!(st.cache_hit_rate(1), Some(22.0 / 24.0));
        assert_eq!(st.cache_hits[2], st.cache_hits[1]);
    }

    #[test]
    fn layer_ahead_guess_reuse_is_counted() {
        // Layer 1's guess is its true query: guess and truth reuse agree there.
        let calls: &[&[Q]] = &[&[Q::Y], &[Q::X, Q::X], &[Q::Y, Q::X, Q::Y]];
        let st = run(calls, true);
        assert_eq!(st.reuse_hits, vec![14 * SHAPE.n_kv_heads as u64; LAYERS]);
        assert_eq!(st.ahead_reuse_per_layer()[1], Some(14.0 / 24.0));
        assert_eq!(st.recall_per_layer()[1], Some(1.0));
    }

    #[test]
    fn truncation_breaks_the_chain() {
        let be = CpuBackend::new(1).unwrap();
        let cfg = SparseConfig {
            budget: TokenBudget::Tokens(8),
            sink: 2,
            recent: 2,
            ..SparseConfig::default()
        };
        let mut s = sparse_store(cfg, DType::F32);
        let data: Vec<f32> = (0..24).flat_map(|p| token(p, Q::X)).collect();
        step_data(&be, &mut [&mut s], 24, &data);
        step_data(&be, &mut [&mut s], 1, &token(24, Q::X));
        KvStore::<CpuBackend>::truncate(&mut s, 24);
        s.reset_stats();
        // Position 24 again: the forgotten one's selection must not count as its predecessor.
        step_data(&be, &mut [&mut s], 1, &token(24, Q::Z));
        assert_eq!(s.stats().reuse_total, vec![0; LAYERS]);
        step_data(&be, &mut [&mut s], 1, &token(25, Q::Z));
        assert_eq!(s.stats().step_reuse(), Some(1.0));
    }
}
