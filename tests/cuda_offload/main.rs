//! The offloaded store on the GPU (`farsight-prefetch`): the residency kernel's invariants, the
//! offloaded store against the same store with its rows in device memory (same rows selected,
//! same logits bit for bit), and a full budget against dense attention (which also checks that
//! the newest tokens' rows and labels are visible to the layer-ahead prediction on the prefetch
//! stream: with a recent window of one token, the previous token is read from host memory by
//! the very next step). Skipped without a CUDA device.
//!
//! Files: this one (residency, offloaded vs device rows, full budget), `variants.rs` (the disk
//! tier, 4-bit labels, a larger row cache), `pages.rs` (page-granular selection), `setup.rs`
//! (shared setup).

mod pages;
mod setup;
mod variants;

use setup::*;

use farsight_engine::generate::{new_cache, prefill};
use farsight_engine::sampler::argmax;
use farsight_engine::Model;
use farsight_kernels::cuda::CudaBackend;
use farsight_kernels::DType;
use farsight_offload::sparse::{Predict, TokenBudget};
use farsight_prefetch::{OffloadKvStore, RowHome};

#[test]
fn residency_keeps_hits_and_fills_misses() {
    let Some(be) = backend() else { return };
    let (heads, cap) = (3usize, 96usize);
    let mut res = be.ds_residency_state(heads, cap).unwrap();
    let mut stats = be.dev_zeros::<u64>(2).unwrap();
    let mut rng = Rng(0x1234_5678);
    let mut prev: Vec<Vec<(i32, i32)>> = vec![Vec::new(); heads];
    let (mut want_miss, mut want_hit) = (0u64, 0u64);
    let mut k = 0usize;
    for round in 0..60 {
        k = (k + (rng.next() % 4) as usize).min(cap).max(1);
        // Selections drawn from a window that drifts, so some tokens stay and some change.
        let lo = round * 7;
        let mut sel = vec![0i32; heads * cap];
        let mut sels = Vec::new();
        for g in 0..heads {
            let mut s: Vec<i32> = Vec::new();
            while s.len() < k {
                let t = (lo + (rng.next() % 300) as usize) as i32;
                if !s.contains(&t) {
                    s.push(t);
                }
            }
            s.sort();
            sel[g * cap..g * cap + k].copy_from_slice(&s);
            sels.push(s);
        }
        let sel_dev = be.dev_upload(&sel).unwrap();
        be.ds_residency(&sel_dev, cap, heads, k, &mut res, &mut stats)
            .unwrap();
        let tok = be.dev_read(&res.tok).unwrap();
        let slot = be.dev_read(&res.slot).unwrap();
        let mtok = be.dev_read(&res.miss_tok).unwrap();
        let mslot = be.dev_read(&res.miss_slot).unwrap();
        let nmiss = be.dev_read(&res.n_miss).unwrap();
        for g in 0..heads {
            let s = &sels[g];
            assert_eq!(
                &tok[g * cap..g * cap + k],
                &s[..],
                "round {round} head {g}: resident = selection"
            );
            let slots: Vec<i32> = slot[g * cap..g * cap + k].to_vec();
            let mut sorted = slots.clone();
            sorted.sort();
            assert_eq!(
                sorted,
                (0..k as i32).collect::<Vec<_>>(),
                "round {round} head {g}: slots are 0..k, each once"
            );
            let mut misses = Vec::new();
            for (i, &t) in s.iter().enumerate() {
                match prev[g].iter().find(|&&(pt, _)| pt == t) {
                    Some(&(_, ps)) => {
                        assert_eq!(slots[i], ps, "round {round} head {g}: a hit keeps its slot");
                        want_hit += 1;
                    }
                    None => {
                        misses.push((t, slots[i]));
                        want_miss += 1;
                    }
                }
            }
            let n = nmiss[g] as usize;
            let got: Vec<(i32, i32)> = (0..n)
                .map(|m| (mtok[g * cap + m], mslot[g * cap + m]))
                .collect();
            assert_eq!(
                got, misses,
                "round {round} head {g}: the misses, in order, with their slots"
            );
            prev[g] = s.iter().copied().zip(slots).collect();
        }
    }
    let st = be.dev_read(&stats).unwrap();
    assert_eq!((st[0], st[1]), (want_miss, want_hit));
    println!("residency: {want_miss} misses, {want_hit} hits over 60 rounds");
}

#[test]
fn offloaded_rows_equal_device_rows() {
    let Some(be) = backend() else { return };
    let m = small_model(be);
    let run = |home: RowHome| {
        let cfg = offload_cfg(
            &m,
            TokenBudget::Fraction(16),
            16,
            Predict::SameLayer,
            home,
            4096,
        );
        let mut s = OffloadKvStore::new(&m.backend, cfg, m.attn_shape(), m.cfg.num_layers).unwrap();
        s.fill_random(&m.backend, 3000, 1.0, 99).unwrap();
        let logits = decode(&m, &mut s, 5, 12);
        (logits, s.stats(&m.backend).unwrap())
    };
    let (host, hs) = run(RowHome::Host);
    let (dev, ds) = run(RowHome::Device);
    assert_eq!(
        (hs.misses, hs.hits),
        (ds.misses, ds.hits),
        "same rows fetched and kept"
    );
    assert!(
        hs.misses > 0 && hs.hits > 0,
        "the row cache both missed and hit ({hs:?})"
    );
    for (i, (a, b)) in host.iter().zip(&dev).enumerate() {
        assert!(
            a == b,
            "step {i}: offloaded logits differ from device-resident ones"
        );
    }
    println!(
        "offload same-layer: 12 steps bit-identical, hit rate {:.3} ({} misses)",
        hs.hit_rate(),
        hs.misses
    );
}

#[test]
fn offloaded_rows_equal_device_rows_layer_ahead() {
    let Some(be) = backend() else { return };
    let mut m = small_model(be);
    let ch = offload_cfg(
        &m,
        TokenBudget::Fraction(16),
        16,
        Predict::LayerAhead,
        RowHome::Host,
        1,
    )
    .channels;
    m.enable_layer_ahead(&ch).unwrap();
    let run = |home: RowHome, recall: bool| {
        let mut cfg = offload_cfg(
            &m,
            TokenBudget::Fraction(16),
            16,
            Predict::LayerAhead,
            home,
            4096,
        );
        cfg.measure_recall = recall;
        let mut s = OffloadKvStore::new(&m.backend, cfg, m.attn_shape(), m.cfg.num_layers).unwrap();
        s.fill_random(&m.backend, 3000, 1.0, 99).unwrap();
        let logits = decode(&m, &mut s, 5, 12);
        (logits, s.stats(&m.backend).unwrap())
    };
    let (host, hs) = run(RowHome::Host, false);
    let (dev, ds) = run(RowHome::Device, false);
    assert_eq!(
        (hs.misses, hs.hits),
        (ds.misses, ds.hits),
        "same rows fetched and kept"
    );
    for (i, (a, b)) in host.iter().zip(&dev).enumerate() {
        assert!(
            a == b,
            "step {i}: offloaded logits differ from device-resident ones"
        );
    }
    let (_, rs) = run(RowHome::Host, true);
    let recall = rs.recall();
    assert!(
        rs.recall_total > 0 && (0.0..=1.0).contains(&recall),
        "recall counted: {rs:?}"
    );
    println!(
        "offload layer-ahead: 12 steps bit-identical, hit rate {:.3}, recall {recall:.3}",
        hs.hit_rate()
    );
}

/// A persistent query component (a query bias, as `bench offload --query-bias` adds) makes
/// consecutive steps select overlapping rows: the row cache hits more, and the layer-ahead guess
/// (the label rows' matmul on the device, bias included) still recalls the true selection;
/// offloaded and device-resident rows still give identical logits.
#[test]
fn query_bias_raises_reuse_and_layer_ahead_keeps_it() {
    let Some(be) = backend() else { return };
    let mut m = small_model(be);
    let ch = slow_channels(&m);
    m.enable_layer_ahead(&ch).unwrap();
    let run = |m: &Model<CudaBackend>, home: RowHome| {
        let mut s = ahead_store(m, &ch, home, 1);
        let logits = decode_forced(m, &mut s, &distinct_tokens(m, 12));
        (logits, s.stats(&m.backend).unwrap())
    };
    let (_, plain) = run(&m, RowHome::Host);
    m.add_query_bias(6.0, 3).unwrap();
    let (host, hs) = run(&m, RowHome::Host);
    let (dev, ds) = run(&m, RowHome::Device);
    assert_eq!((hs.misses, hs.hits), (ds.misses, ds.hits));
    assert!(
        host == dev,
        "offloaded logits differ from device-resident ones"
    );
    println!(
        "query bias 0 -> 6: hit rate {:.3} -> {:.3}, recall {:.3} -> {:.3}",
        plain.hit_rate(),
        hs.hit_rate(),
        plain.recall(),
        hs.recall()
    );
    assert!(
        hs.hit_rate() > plain.hit_rate() + 0.2,
        "hit rate {:.3} with the bias vs {:.3}",
        hs.hit_rate(),
        plain.hit_rate()
    );
    assert!(
        hs.recall() > 0.8,
        "layer-ahead recall {:.3} with the bias",
        hs.recall()
    );
}

/// A full budget selects every token, so decode must match dense attention (to the rounding
/// of a different attention kernel). Prefill runs in chunks through the staging path.
#[test]
fn full_budget_matches_dense_and_sees_the_newest_token() {
    let Some(be) = backend() else { return };
    let mut m = small_model(be);
    let prompt: Vec<u32> = (0..700u32)
        .map(|i| (i * 2_654_435_761u32) % 49_152)
        .collect();
    let ch = offload_cfg(
        &m,
        TokenBudget::Tokens(1 << 20),
        1,
        Predict::LayerAhead,
        RowHome::Host,
        1,
    )
    .channels;
    m.enable_layer_ahead(&ch).unwrap();
    let mut ws = m.workspace(128, 1).unwrap();
    let mut dense = new_cache(&m, DType::BF16).unwrap();
    let dl = prefill(&m, &mut ws, &mut dense, &prompt, 128, &mut |_, _| {}).unwrap();
    let first = argmax(&dl);
    let want = decode(&m, &mut dense, first, 16);
    for predict in [Predict::SameLayer, Predict::LayerAhead] {
        for recent in [1usize, 8] {
            let cfg = offload_cfg(
                &m,
                TokenBudget::Tokens(1 << 20),
                recent,
                predict,
                RowHome::Host,
                1024,
            );
            let mut s =
                OffloadKvStore::new(&m.backend, cfg, m.attn_shape(), m.cfg.num_layers).unwrap();
            let ol = prefill(&m, &mut ws, &mut s, &prompt, 128, &mut |_, _| {}).unwrap();
            assert!(
                rel_l2(&ol, &dl) < 1e-5,
                "{predict} recent {recent}: prefill logits {:.2e} from dense",
                rel_l2(&ol, &dl)
            );
            assert_eq!(argmax(&ol), first);
            let got = decode(&m, &mut s, first, 16);
            let mut worst = 0.0f64;
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                let e = rel_l2(a, b);
                worst = worst.max(e);
                assert!(
                    e < 2e-3,
                    "{predict} recent {recent} step {i}: logits {e:.2e} from dense"
                );
                assert_eq!(
                    argmax(a),
                    argmax(b),
                    "{predict} recent {recent} step {i}: greedy token differs"
                );
            }
            let st = s.stats(&m.backend).unwrap();
            assert!(st.staged_bytes > 0, "prefill staged rows from host");
            println!("full budget {predict} recent {recent}: 16 steps, worst rel-L2 {worst:.2e} vs dense, {} rows fetched", st.misses);
        }
    }
}
