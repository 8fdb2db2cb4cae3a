//! The offloaded store on the GPU (`farsight-prefetch`): the residency kernel's invariants, the
//! offloaded store against the same store with its rows in device memory (same rows selected,
//! same logits bit for bit), and a full budget against dense attention (which also checks that
//! the newest tokens' rows and labels are visible to the layer-ahead prediction on the prefetch
//! stream: with a recent window of one token, the previous token is read from host memory by
//! the very next step). Skipped without a CUDA device.

use farsight_engine::generate::{new_cache, prefill};
use farsight_engine::model::{Logits, Segment};
use farsight_engine::sampler::argmax;
use farsight_engine::synthetic::shape_config;
use farsight_engine::Model;
use farsight_kernels::cuda::CudaBackend;
use farsight_kernels::DType;
use farsight_offload::sparse::{LabelBits, Predict, TokenBudget};
use farsight_offload::KvStore;
use farsight_prefetch::{OffloadConfig, OffloadKvStore, RowHome};

fn backend() -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(be) => Some(be),
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            None
        }
    }
}

/// A deterministic xorshift stream.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

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

fn small_model(be: CudaBackend) -> Model<CudaBackend> {
    let mut cfg = shape_config("smollm2-135m").unwrap();
    cfg.num_layers = 4;
    Model::synthetic(cfg, be, DType::BF16, 7).unwrap()
}

fn offload_cfg(
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
    }
}

/// Greedy decode of `n` steps; the logits of every step.
fn decode(
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
fn step_logits(
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
fn decode_forced(
    m: &Model<CudaBackend>,
    kv: &mut dyn KvStore<CudaBackend>,
    toks: &[u32],
) -> Vec<Vec<f32>> {
    let mut ws = m.workspace(1, 1).unwrap();
    toks.iter()
        .map(|&tok| step_logits(m, &mut ws, kv, tok))
        .collect()
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den.max(1e-300)).sqrt()
}

/// Label channels at slow RoPE frequencies (8 per KV head, `spread_channels`) in every layer:
/// a query bias's share of the query then turns slowly from step to step.
fn slow_channels(m: &Model<CudaBackend>) -> Vec<Vec<Vec<usize>>> {
    let c = &m.cfg;
    let ch = farsight_engine::synthetic::spread_channels(c.head_dim, 8);
    vec![vec![ch; c.num_kv_heads]; c.num_layers]
}

/// A layer-ahead store (1/16, recent 16, recall counted) with channels `ch` and a row cache of
/// `row_cache` times the top-k over 3000 random rows.
fn ahead_store(
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
fn distinct_tokens(m: &Model<CudaBackend>, n: u64) -> Vec<u32> {
    let vocab = m.cfg.vocab_size as u64;
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
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
