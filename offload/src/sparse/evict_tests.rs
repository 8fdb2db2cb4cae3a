//! The sparse store under a byte budget: random workloads through the `KvStore` interface.

use std::collections::HashSet;

use farsight_kernels::cpu::CpuBackend;
use farsight_kernels::{AttnShape, Backend, CausalAttn, DType};
use proptest::prelude::*;

use super::store::EVICTED;
use super::*;
use crate::tier::HostKvTier;
use crate::KvStore;

const SHAPE: AttnShape = AttnShape {
    n_heads: 4,
    n_kv_heads: 2,
    head_dim: 8,
    window: None,
};
const LAYERS: usize = 2;
/// Small extents so that small budgets hold several of them.
const EXTENT: usize = 8;

fn cols() -> usize {
    SHAPE.q_width() + 2 * SHAPE.kv_width()
}

fn fill(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

fn store(cfg: SparseConfig) -> SparseKvStore {
    let mut layout = row_layout(LAYERS, &SHAPE, DType::F16);
    layout.extent_slots = EXTENT;
    let ranking = ChannelRanking::natural(LAYERS, SHAPE.n_kv_heads, SHAPE.head_dim);
    SparseKvStore::new(
        cfg,
        SHAPE,
        LAYERS,
        DType::F16,
        &ranking,
        Box::new(HostKvTier::new(layout)),
        1 << 20,
    )
    .unwrap()
}

/// Bytes of rows and labels per slot.
fn per_slot(cfg: &SparseConfig) -> usize {
    LAYERS * SHAPE.n_kv_heads * (2 * SHAPE.head_dim * 2 + 2 * cfg.label_channels)
}

/// One forward call of `n` random tokens.
fn call(be: &CpuBackend, s: &mut SparseKvStore, n: usize, seed: u64) {
    let mut src = be.tensor(n, cols()).unwrap();
    be.write_tensor(&mut src, 0, &fill(n * cols(), seed))
        .unwrap();
    let (qw, kvw) = (SHAPE.q_width(), SHAPE.kv_width());
    s.reserve(be, n).unwrap();
    for l in 0..LAYERS {
        s.write(be, l, &src, 0, qw, qw + kvw, n).unwrap();
        let a = CausalAttn {
            shape: SHAPE,
            q_row0: 0,
            q_col0: 0,
            n_q: n,
            n_past: KvStore::<CpuBackend>::len(s),
            out_row0: 0,
            scale: 0.35,
        };
        let mut out = be.tensor(n, qw).unwrap();
        s.attend(be, l, &a, &src, &mut out).unwrap();
    }
    KvStore::<CpuBackend>::commit(s, n);
}

fn check(
    s: &SparseKvStore,
    cfg: &SparseConfig,
    budget: usize,
    evicted: &mut HashSet<usize>,
    seed: u64,
) -> std::result::Result<(), TestCaseError> {
    let len = KvStore::<CpuBackend>::len(s);
    prop_assert!(
        KvStore::<CpuBackend>::bytes(s) <= budget,
        "footprint {} over budget {}",
        KvStore::<CpuBackend>::bytes(s),
        budget
    );
    let mut slots = HashSet::new();
    for p in 0..len {
        match s.slot_of(p) {
            Some(slot) => {
                prop_assert!(!evicted.contains(&p), "evicted position {} came back", p);
                prop_assert!(slots.insert(slot), "slot {} owned twice", slot);
                prop_assert!(slot != EVICTED);
            }
            None => {
                prop_assert!(
                    p >= cfg.sink && p + cfg.recent < len,
                    "protected position {} of {} evicted",
                    p,
                    len
                );
                evicted.insert(p);
            }
        }
    }
    prop_assert_eq!(slots.len(), s.live_tokens());
    // Selection never returns an evicted position.
    let q = fill(SHAPE.q_width(), seed ^ 0x55);
    for l in 0..LAYERS {
        for g in 0..SHAPE.n_kv_heads {
            let qlab = s.group_label_query(l, g, &q);
            let (pos, _) = s.select(l, g, &qlab, 0, len, len / 3 + 1);
            prop_assert!(
                pos.iter().all(|p| !evicted.contains(p)),
                "selected an evicted position"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random appends (prefill chunks and decode steps) with random keys, so random label and
    /// attention scores: the footprint never passes the budget, sinks and the recent window stay,
    /// no slot is owned twice, and an evicted token is neither kept nor selected again.
    #[test]
    fn budget_holds_under_random_workloads(
        extents in 3usize..8,
        extra in 0usize..200,
        sink in 0usize..4,
        recent in 1usize..8,
        sparse_prefill in any::<bool>(),
        budget_frac in 2usize..5,
        calls in prop::collection::vec(1usize..10, 10..60),
        seed in any::<u64>(),
    ) {
        let mut cfg = SparseConfig { budget: TokenBudget::Fraction(budget_frac), label_channels: 4, sink, recent, sparse_prefill, ..SparseConfig::default() };
        let budget = extents * EXTENT * per_slot(&cfg) + extra;
        cfg.evict = Some(EvictConfig { batch: 0.1, ..EvictConfig::new(budget) });
        let be = CpuBackend::new(1).unwrap();
        let mut s = store(cfg.clone());
        prop_assert_eq!(s.slot_cap(), extents * EXTENT);
        let mut evicted = HashSet::new();
        let mut total = 0;
        for (i, &n) in calls.iter().enumerate() {
            call(&be, &mut s, n, seed.wrapping_add(i as u64));
            total += n;
            check(&s, &cfg, budget, &mut evicted, seed.wrapping_add(i as u64))?;
        }
        let st = s.stats();
        if total > s.slot_cap() {
            prop_assert!(st.evicted_tokens > 0 && st.evictions > 0);
        }
        prop_assert_eq!(st.evicted_tokens as usize, evicted.len());
        prop_assert_eq!(st.bytes_freed as usize, evicted.len() * per_slot(&cfg));
    }
}

#[test]
fn a_call_that_cannot_fit_is_refused_with_a_clear_error() {
    let mut cfg = SparseConfig {
        label_channels: 4,
        sink: 2,
        recent: 4,
        ..SparseConfig::default()
    };
    cfg.evict = Some(EvictConfig::new(2 * EXTENT * per_slot(&cfg)));
    let be = CpuBackend::new(1).unwrap();
    let mut s = store(cfg);
    let e = KvStore::<CpuBackend>::reserve(&mut s, &be, 17)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("hold 16 tokens") && e.contains("17 new tokens"),
        "{e}"
    );
}

#[test]
fn a_budget_below_the_protected_tokens_is_refused() {
    let mut cfg = SparseConfig {
        label_channels: 4,
        sink: 4,
        recent: 32,
        ..SparseConfig::default()
    };
    cfg.evict = Some(EvictConfig::new(EXTENT * per_slot(&cfg)));
    let mut layout = row_layout(LAYERS, &SHAPE, DType::F16);
    layout.extent_slots = EXTENT;
    let ranking = ChannelRanking::natural(LAYERS, SHAPE.n_kv_heads, SHAPE.head_dim);
    let e = SparseKvStore::new(
        cfg,
        SHAPE,
        LAYERS,
        DType::F16,
        &ranking,
        Box::new(HostKvTier::new(layout)),
        100,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("holds 8 tokens"), "{e}");
}

#[test]
fn the_least_attended_tokens_go_first() {
    // Keys of tokens 10..20 point away from every query: those are the ones evicted.
    let mut cfg = SparseConfig {
        label_channels: 8,
        sink: 1,
        recent: 2,
        budget: TokenBudget::Tokens(1 << 20),
        ..SparseConfig::default()
    };
    cfg.evict = Some(EvictConfig {
        batch: 0.0,
        ..EvictConfig::new(4 * EXTENT * per_slot(&cfg))
    });
    let be = CpuBackend::new(1).unwrap();
    let mut s = store(cfg);
    let (qw, kvw, d) = (SHAPE.q_width(), SHAPE.kv_width(), SHAPE.head_dim);
    for t in 0..40 {
        let mut row = vec![0.0f32; cols()];
        row[..qw].fill(1.0);
        let key = if (10..20).contains(&t) { -3.0 } else { 1.0 };
        for c in 0..SHAPE.n_kv_heads * d {
            row[qw + c] = key;
            row[qw + kvw + c] = t as f32;
        }
        let mut src = be.tensor(1, cols()).unwrap();
        be.write_tensor(&mut src, 0, &row).unwrap();
        KvStore::<CpuBackend>::reserve(&mut s, &be, 1).unwrap();
        for l in 0..LAYERS {
            s.write(&be, l, &src, 0, qw, qw + kvw, 1).unwrap();
            let a = CausalAttn {
                shape: SHAPE,
                q_row0: 0,
                q_col0: 0,
                n_q: 1,
                n_past: t,
                out_row0: 0,
                scale: 0.35,
            };
            let mut out = be.tensor(1, qw).unwrap();
            s.attend(&be, l, &a, &src, &mut out).unwrap();
        }
        KvStore::<CpuBackend>::commit(&mut s, 1);
    }
    // 40 tokens into 32 slots: 8 evicted, all from 10..20.
    let gone: Vec<usize> = (0..40).filter(|&p| s.slot_of(p).is_none()).collect();
    assert_eq!(gone.len(), 8, "{gone:?}");
    assert!(gone.iter().all(|p| (10..20).contains(p)), "{gone:?}");
}
