//! Page-granular selection on the GPU (`--page-tokens P`): the slab in `[KV head][token]`
//! order, pages of P rows fetched as one unit into page-sized cache slots, attention reading
//! every row of the selected pages.

use super::setup::*;

use farsight_engine::generate::{new_cache, prefill};
use farsight_engine::sampler::argmax;
use farsight_kernels::DType;
use farsight_offload::sparse::{page_recent, Predict, TokenBudget};
use farsight_offload::KvStore;
use farsight_prefetch::{OffloadKvStore, RowHome};

/// A paged store (P = 4, sink 4; P = 8, sink 5) after a chunked prefill gives the dense
/// cache's prefill logits (the `[g][token]` slab unpacked for the later chunks), and its decode
/// is the same bit for bit whether the rows live in pinned host memory or on the device, with a
/// plain and a 4x row cache, before and after a truncation. The prompt (701), the capacity
/// (1023) and, for P = 8, the sinks are not multiples of a page.
#[test]
fn pages_offloaded_equal_device_and_prefill_matches_dense() {
    for (page, sink, recent) in [(4usize, 4usize, 8usize), (8, 5, 11)] {
        let Some(be) = backend() else { return };
        pages_match(be, page, sink, recent);
    }
}

fn pages_match(be: farsight_kernels::cuda::CudaBackend, page: usize, sink: usize, recent: usize) {
    let mut m = small_model(be);
    let ch = slow_channels(&m);
    m.enable_layer_ahead(&ch).unwrap();
    m.add_query_bias(2.0, 3).unwrap();
    let prompt: Vec<u32> = (0..701u32)
        .map(|i| (i * 2_654_435_761u32) % 49_152)
        .collect();
    let toks = distinct_tokens(&m, 16);
    let mut ws = m.workspace(128, 1).unwrap();
    let mut dense = new_cache(&m, DType::BF16).unwrap();
    let dl = prefill(&m, &mut ws, &mut dense, &prompt, 128, &mut |_, _| {}).unwrap();
    let run = |home: RowHome, row_cache: usize, ws: &mut _| {
        let mut cfg = offload_cfg(
            &m,
            TokenBudget::Fraction(8),
            6,
            Predict::LayerAhead,
            home,
            1023,
        );
        cfg.sink = sink;
        cfg.channels = ch.clone();
        cfg.row_cache = row_cache;
        cfg.page_tokens = page;
        let mut s = OffloadKvStore::new(&m.backend, cfg, m.attn_shape(), m.cfg.num_layers).unwrap();
        // The sinks + recent 6 rounded up to a page boundary.
        assert_eq!(s.config().recent, recent);
        assert_eq!(page_recent(sink, 6, page), recent);
        let pl = prefill(&m, ws, &mut s, &prompt, 128, &mut |_, _| {}).unwrap();
        let logits = decode_forced(&m, &mut s, &toks);
        let len = s.len();
        KvStore::truncate(&mut s, len - 3);
        let after = decode_forced(&m, &mut s, &toks[..5]);
        (pl, logits, after, s.stats(&m.backend).unwrap())
    };
    for row_cache in [1usize, 4] {
        let (hp, host, host_after, hs) = run(RowHome::Host, row_cache, &mut ws);
        let (dp, dev, dev_after, ds) = run(RowHome::Device, row_cache, &mut ws);
        let e = rel_l2(&hp, &dl);
        assert!(
            e < 1e-5,
            "row cache {row_cache}x: prefill logits {e:.2e} from dense"
        );
        assert!(
            hp == dp,
            "row cache {row_cache}x: prefill logits host vs device"
        );
        assert_eq!(
            (hs.misses, hs.hits),
            (ds.misses, ds.hits),
            "row cache {row_cache}x: the same pages fetched and kept"
        );
        assert!(
            hs.misses > 0 && hs.hits > 0,
            "row cache {row_cache}x: {hs:?}"
        );
        assert!(
            host == dev && host_after == dev_after,
            "row cache {row_cache}x: offloaded logits differ from device-resident ones"
        );
        println!(
            "pages of {page}, sink {sink}, row cache {row_cache}x: 21 steps bit-identical host vs device, hit rate {:.3} ({} pages fetched), recall {:.3}, prefill {e:.2e} from dense",
            hs.hit_rate(),
            hs.misses,
            hs.recall()
        );
    }
}

/// An independent check of the paged decode's addressing: with a budget of every page, sinks
/// on a page boundary and a first decode step whose middle ends on one, the paged store attends
/// every token exactly once (sinks, every whole page gathered from the `[g][token]` slab, the
/// recent ring), so its logits are dense attention's to rounding. Capacity 1023 is not a
/// multiple of a page.
#[test]
fn full_budget_pages_match_dense() {
    let Some(be) = backend() else { return };
    let mut m = small_model(be);
    let ch = slow_channels(&m);
    m.enable_layer_ahead(&ch).unwrap();
    // 703 prompt tokens: the first decode step sees 704, its middle is 8..696.
    let prompt: Vec<u32> = (0..703u32)
        .map(|i| (i * 2_654_435_761u32) % 49_152)
        .collect();
    let mut ws = m.workspace(128, 1).unwrap();
    let mut dense = new_cache(&m, DType::BF16).unwrap();
    let dl = prefill(&m, &mut ws, &mut dense, &prompt, 128, &mut |_, _| {}).unwrap();
    let first = argmax(&dl);
    let want = decode_forced(&m, &mut dense, &[first]).swap_remove(0);
    for page in [4usize, 8] {
        for home in [RowHome::Host, RowHome::Device] {
            let mut cfg = offload_cfg(
                &m,
                TokenBudget::Tokens(1 << 20),
                8,
                Predict::LayerAhead,
                home,
                1023,
            );
            cfg.sink = 8;
            cfg.channels = ch.clone();
            cfg.page_tokens = page;
            let mut s =
                OffloadKvStore::new(&m.backend, cfg, m.attn_shape(), m.cfg.num_layers).unwrap();
            assert_eq!(s.config().recent, 8);
            let pl = prefill(&m, &mut ws, &mut s, &prompt, 128, &mut |_, _| {}).unwrap();
            assert!(rel_l2(&pl, &dl) < 1e-5, "pages of {page}: prefill logits");
            let got = decode_forced(&m, &mut s, &[first]).swap_remove(0);
            let e = rel_l2(&got, &want);
            assert!(
                e < 2e-3,
                "pages of {page}, {home:?}: every page selected, logits {e:.2e} from dense"
            );
            assert_eq!(argmax(&got), argmax(&want), "pages of {page}: greedy token");
            let st = s.stats(&m.backend).unwrap();
            // 172 whole pages of 4 (86 of 8) per layer and KV head, each fetched once.
            let per = (696 - 8) / page;
            assert_eq!(
                st.misses,
                (per * m.cfg.num_layers * m.cfg.num_kv_heads) as u64,
                "pages of {page}: every candidate page fetched once: {st:?}"
            );
            println!("pages of {page}, {home:?}, full budget: {e:.2e} from dense");
        }
    }
}

/// The paged store is refused on the disk tier, and pages above 64 tokens, with clear errors.
#[test]
fn pages_refuse_the_disk_tier() {
    let Some(be) = backend() else { return };
    let m = small_model(be);
    let mut cfg = offload_cfg(
        &m,
        TokenBudget::Fraction(8),
        8,
        Predict::SameLayer,
        RowHome::Host,
        256,
    );
    cfg.page_tokens = 4;
    let dir = std::env::temp_dir();
    let e = OffloadKvStore::new_on_disk(&m.backend, cfg.clone(), m.attn_shape(), 4, &dir)
        .err()
        .expect("refused");
    assert!(e.to_string().contains("disk tier"), "{e}");
    cfg.page_tokens = 128;
    let e = OffloadKvStore::new(&m.backend, cfg, m.attn_shape(), 4)
        .err()
        .expect("refused");
    assert!(e.to_string().contains("pages of 128"), "{e}");
}
