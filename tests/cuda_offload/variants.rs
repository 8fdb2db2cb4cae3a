//! The offloaded store's variants against its plain form: the disk tier, 4-bit labels, a row
//! cache larger than one selection.

use crate::setup::*;

use farsight_engine::generate::{new_cache, prefill};
use farsight_engine::sampler::argmax;
use farsight_kernels::DType;
use farsight_offload::sparse::{LabelBits, Predict, TokenBudget};
use farsight_offload::KvStore;
use farsight_prefetch::{OffloadKvStore, RowHome};

/// The disk tier selects, fetches and attends exactly as the host tier: after a chunked prefill
/// of a prompt (past rows read back from the file per layer), decode steps with a 1/16 budget
/// give bit-identical logits and the same hits and misses, same-layer and layer-ahead;
/// a truncate (the recent ring refilled from the file) and more steps still agree; the file
/// is removed with the store.
#[test]
fn disk_tier_equals_host_tier() {
    let Some(be) = backend() else { return };
    let mut m = small_model(be);
    let prompt: Vec<u32> = (0..900u32)
        .map(|i| (i * 2_654_435_761u32) % 49_152)
        .collect();
    let ch = offload_cfg(
        &m,
        TokenBudget::Fraction(16),
        8,
        Predict::LayerAhead,
        RowHome::Host,
        1,
    )
    .channels;
    m.enable_layer_ahead(&ch).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // With a recent window of one token the previous token's row is selectable at the very
    // next step: it must be in the file by then.
    for (predict, recent) in [(Predict::SameLayer, 8), (Predict::LayerAhead, 1)] {
        let run = |disk: bool| {
            let cfg = offload_cfg(
                &m,
                TokenBudget::Fraction(16),
                recent,
                predict,
                RowHome::Host,
                2048,
            );
            let (be, shape, layers) = (&m.backend, m.attn_shape(), m.cfg.num_layers);
            let mut s = if disk {
                OffloadKvStore::new_on_disk(be, cfg, shape, layers, dir.path()).unwrap()
            } else {
                OffloadKvStore::new(be, cfg, shape, layers).unwrap()
            };
            if disk {
                assert!(s.memory().tier.starts_with("disk:"), "{}", s.memory().tier);
                assert!(s.disk_bytes() >= 2048 * layers * m.cfg.kv_width() * 2 * 2);
            }
            let mut ws = m.workspace(256, 1).unwrap();
            let pl = prefill(&m, &mut ws, &mut s, &prompt, 256, &mut |_, _| {}).unwrap();
            let mut logits = vec![pl];
            logits.extend(decode(&m, &mut s, 5, 10));
            s.truncate(prompt.len() + 4);
            logits.extend(decode(&m, &mut s, 9, 6));
            // A random context written through the fill path, then decode.
            s.truncate(0);
            s.fill_random(&m.backend, 1500, 1.0, 42).unwrap();
            logits.extend(decode(&m, &mut s, 3, 6));
            (logits, s.stats(&m.backend).unwrap())
        };
        let (host, hs) = run(false);
        let (disk, ds) = run(true);
        assert_eq!(
            (hs.misses, hs.hits),
            (ds.misses, ds.hits),
            "{predict}: same rows fetched"
        );
        assert!(ds.misses > 0 && ds.hits > 0, "{predict}: {ds:?}");
        assert_eq!(host.len(), disk.len());
        for (i, (a, b)) in host.iter().zip(&disk).enumerate() {
            assert!(
                a == b,
                "{predict} call {i}: disk-tier logits differ from host-tier ones"
            );
        }
        println!(
            "disk tier {predict}: {} calls bit-identical to the host tier, {} misses",
            host.len(),
            ds.misses
        );
    }
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(
        left.is_empty(),
        "the store's file is removed with it: {left:?}"
    );
}

/// 4-bit labels (`--label-bits 4`): the offloaded store selects the same rows and gives the same
/// logits, bit for bit, as the same store with its rows in device memory, same-layer and
/// layer-ahead, over a random context (labels from `fill_random`) and after a chunked prefill
/// (labels written by `ds_put_rows`); the label cache holds 4-bit rows (8 channels: 4 bytes of
/// codes + 4 of minimum and scale per token and KV head, half the f16 bytes).
#[test]
fn offloaded_rows_equal_device_rows_4bit_labels() {
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
    let base = |predict, home, capacity| {
        let mut c = offload_cfg(&m, TokenBudget::Fraction(16), 16, predict, home, capacity);
        c.label_bits = LabelBits::B4;
        c
    };
    let (layers, n_kv) = (m.cfg.num_layers, m.cfg.num_kv_heads);
    let prompt: Vec<u32> = (0..700u32)
        .map(|i| (i * 2_654_435_761u32) % 49_152)
        .collect();
    let mut ws = m.workspace(128, 1).unwrap();
    for predict in [Predict::SameLayer, Predict::LayerAhead] {
        for prefilled in [false, true] {
            let mut run = |home: RowHome| {
                let cap = 4096;
                let mut s = OffloadKvStore::new(
                    &m.backend,
                    base(predict, home, cap),
                    m.attn_shape(),
                    layers,
                )
                .unwrap();
                assert_eq!(
                    s.memory().label_bytes,
                    layers * n_kv * cap * 8,
                    "4-bit label bytes"
                );
                let first = if prefilled {
                    let l = prefill(&m, &mut ws, &mut s, &prompt, 128, &mut |_, _| {}).unwrap();
                    argmax(&l)
                } else {
                    s.fill_random(&m.backend, 3000, 1.0, 99).unwrap();
                    5
                };
                let logits = decode(&m, &mut s, first, 12);
                (logits, s.stats(&m.backend).unwrap())
            };
            let (host, hs) = run(RowHome::Host);
            let (dev, ds) = run(RowHome::Device);
            let what = format!(
                "4-bit labels, {predict}, {}",
                if prefilled {
                    "prefilled"
                } else {
                    "random context"
                }
            );
            assert_eq!(
                (hs.misses, hs.hits),
                (ds.misses, ds.hits),
                "{what}: same rows fetched and kept"
            );
            assert!(
                hs.misses > 0 && hs.hits > 0,
                "{what}: the row cache both missed and hit ({hs:?})"
            );
            for (i, (a, b)) in host.iter().zip(&dev).enumerate() {
                assert!(a.iter().all(|x| x.is_finite()), "{what} step {i}: logits");
                assert!(
                    a == b,
                    "{what} step {i}: offloaded logits differ from device-resident ones"
                );
            }
            println!(
                "offload {what}: 12 steps bit-identical, hit rate {:.3} ({} misses)",
                hs.hit_rate(),
                hs.misses
            );
        }
    }
}

/// 4-bit labels with a full budget: every token is selected whatever the labels say, so decode
/// matches dense attention (the 4-bit paths run end to end through prefill and decode).
#[test]
fn full_budget_4bit_labels_matches_dense() {
    let Some(be) = backend() else { return };
    let mut m = small_model(be);
    let prompt: Vec<u32> = (0..300u32)
        .map(|i| (i * 2_654_435_761u32) % 49_152)
        .collect();
    let mut cfg = offload_cfg(
        &m,
        TokenBudget::Tokens(1 << 20),
        8,
        Predict::LayerAhead,
        RowHome::Host,
        1024,
    );
    cfg.label_bits = LabelBits::B4;
    m.enable_layer_ahead(&cfg.channels).unwrap();
    let mut ws = m.workspace(128, 1).unwrap();
    let mut dense = new_cache(&m, DType::BF16).unwrap();
    let dl = prefill(&m, &mut ws, &mut dense, &prompt, 128, &mut |_, _| {}).unwrap();
    let first = argmax(&dl);
    let want = decode(&m, &mut dense, first, 8);
    let mut s = OffloadKvStore::new(&m.backend, cfg, m.attn_shape(), m.cfg.num_layers).unwrap();
    let ol = prefill(&m, &mut ws, &mut s, &prompt, 128, &mut |_, _| {}).unwrap();
    assert!(rel_l2(&ol, &dl) < 1e-5, "prefill logits");
    let got = decode(&m, &mut s, first, 8);
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        let e = rel_l2(a, b);
        assert!(
            e < 2e-3,
            "4-bit full budget step {i}: logits {e:.2e} from dense"
        );
        assert_eq!(argmax(a), argmax(b), "step {i}: greedy token differs");
    }
    println!("full budget, 4-bit labels: 8 steps match dense");
}

/// A row cache of 4x the top-k (`--row-cache 4`): offloaded and device-resident rows still give
/// identical logits; against the plain cache (1x) the same decode fetches fewer rows, and its
/// logits agree to the rounding of attention reading the same rows in another order.
#[test]
fn larger_row_cache_fetches_less_and_keeps_the_logits() {
    let Some(be) = backend() else { return };
    let mut m = small_model(be);
    let ch = slow_channels(&m);
    m.enable_layer_ahead(&ch).unwrap();
    m.add_query_bias(2.0, 3).unwrap();
    let toks = distinct_tokens(&m, 16);
    let run = |home: RowHome, row_cache: usize| {
        let mut s = ahead_store(&m, &ch, home, row_cache);
        let logits = decode_forced(&m, &mut s, &toks);
        // A truncation empties the cache; decoding goes on.
        let len = s.len();
        KvStore::truncate(&mut s, len - 2);
        let after = decode_forced(&m, &mut s, &toks[..4]);
        (logits, after, s.stats(&m.backend).unwrap())
    };
    let (host, host_after, hs) = run(RowHome::Host, 4);
    let (dev, dev_after, ds) = run(RowHome::Device, 4);
    let (plain, plain_after, ps) = run(RowHome::Host, 1);
    assert_eq!((hs.misses, hs.hits), (ds.misses, ds.hits));
    assert!(
        host == dev && host_after == dev_after,
        "offloaded logits differ from device-resident ones"
    );
    assert_eq!(
        hs.misses + hs.hits,
        ps.misses + ps.hits,
        "the same selections' sizes"
    );
    assert!(
        hs.misses < ps.misses,
        "4x cache fetched {} rows, the 1x cache {}",
        hs.misses,
        ps.misses
    );
    for (i, (a, b)) in host
        .iter()
        .chain(&host_after)
        .zip(plain.iter().chain(&plain_after))
        .enumerate()
    {
        let e = rel_l2(a, b);
        assert!(e < 1e-2, "step {i}: 4x vs 1x cache logits rel L2 {e:.2e}");
    }
    assert!(
        (hs.recall() - ps.recall()).abs() < 0.05,
        "recall {:.3} vs {:.3}",
        hs.recall(),
        ps.recall()
    );
    println!(
        "row cache 1x -> 4x: hit rate {:.3} -> {:.3} ({} -> {} rows fetched), logits bit-identical host vs device",
        ps.hit_rate(),
        hs.hit_rate(),
        ps.misses,
        hs.misses
    );
}
