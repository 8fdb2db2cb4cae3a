//! Page-granular selection on the GPU (`--page-tokens P`): the slab in `[KV head][token]`
//! order, pages of P rows fetched as one unit into page-sized cache slots, attention reading
//! every row of the selected pages.

use super::setup::*;

use farsight_engine::generate::{new_cache, prefill};
use farsight_kernels::DType;
use farsight_offload::sparse::{Predict, TokenBudget};
use farsight_offload::KvStore;
use farsight_prefetch::{OffloadKvStore, RowHome};

/// A paged store (P = 4) after a chunked prefill gives the dense cache's prefill logits (the
/// `[g][token]` slab unpacked for the later chunks), and its decode is the same bit for bit
/// whether the rows live in pinned host memory or on the device, with a plain and a 4x row
/// cache, before and after a truncation; the fetched bytes are whole pages.
#[test]
fn pages_offloaded_equal_device_and_prefill_matches_dense() {
    let Some(be) = backend() else { return };
    let mut m = small_model(be);
    let ch = slow_channels(&m);
    m.enable_layer_ahead(&ch).unwrap();
    m.add_query_bias(2.0, 3).unwrap();
    let prompt: Vec<u32> = (0..700u32)
        .map(|i| (i * 2_654_435_761u32) % 49_152)
        .collect();
    let toks = distinct_tokens(&m, 16);
    let mut ws = m.workspace(128, 1).unwrap();
    let mut dense = new_cache(&m, DType::BF16).unwrap();
    let dl = prefill(&m, &mut ws, &mut dense, &prompt, 128, &mut |_, _| {}).unwrap();
    let page = 4usize;
    let run = |home: RowHome, row_cache: usize, ws: &mut _| {
        let mut cfg = offload_cfg(
            &m,
            TokenBudget::Fraction(8),
            6,
            Predict::LayerAhead,
            home,
            1024,
        );
        cfg.channels = ch.clone();
        cfg.row_cache = row_cache;
        cfg.page_tokens = page;
        let mut s = OffloadKvStore::new(&m.backend, cfg, m.attn_shape(), m.cfg.num_layers).unwrap();
        // sink 4 + recent 6 rounded up to a page boundary.
        assert_eq!(s.config().recent, 8);
        let pl = prefill(&m, ws, &mut s, &prompt, 128, &mut |_, _| {}).unwrap();
        let logits = decode_forced(&m, &mut s, &toks);
        let len = s.len();
        KvStore::truncate(&mut s, len - 3);
        let after = decode_forced(&m, &mut s, &toks[..5]);
        (pl, logits, after, s.stats(&m.backend).unwrap())
    };
    let row_bytes = 2 * m.cfg.head_dim as u64 * 2;
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
        assert_eq!(hs.fetched_bytes, hs.misses * page as u64 * row_bytes);
        assert!(
            host == dev && host_after == dev_after,
            "row cache {row_cache}x: offloaded logits differ from device-resident ones"
        );
        println!(
            "pages of {page}, row cache {row_cache}x: 21 steps bit-identical host vs device, hit rate {:.3} ({} pages fetched), recall {:.3}, prefill {e:.2e} from dense",
            hs.hit_rate(),
            hs.misses,
            hs.recall()
        );
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
