//! The larger row cache's residency kernel (`ds_residency_lru`, `--row-cache F`) against a
//! host model of the same policy: per step and KV head the same misses (tokens and slots), the
//! same residents, and attention's index list pointing at rows that hold the selected tokens
//! (misses gathered from a device slab whose row `t` holds `t`). Also: rows dropped from the
//! selection stay cached and hit when they come back, and a full cache evicts the least recently
//! selected first. Skipped without a CUDA device.

use std::collections::{HashMap, HashSet};

use farsight_kernels::cuda::CudaBackend;

fn backend() -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(be) => Some(be),
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            None
        }
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `DS_LRU_AGES`: ages are bucketed up to this many steps.
const AGES: u32 = 1024;

/// One head's cache as the kernel keeps it: residents (token, slot, step last selected) in
/// order.
#[derive(Default)]
struct Model {
    res: Vec<(i32, i32, u32)>,
}

struct Step {
    misses: Vec<(i32, i32)>,
    /// The slot of each selected token.
    slots: Vec<i32>,
}

impl Model {
    /// The kernel's policy, step `now`, selection `sel` (sorted), `cap` slots.
    fn step(&mut self, sel: &[i32], now: u32, cap: usize) -> Step {
        let bucket = |age: u32| (now - age).min(AGES - 1);
        let selected = |t: i32| sel.binary_search(&t).is_ok();
        let mut hist = vec![0usize; AGES as usize];
        for &(t, _, a) in &self.res {
            if !selected(t) {
                hist[bucket(a) as usize] += 1;
            }
        }
        let resident: HashSet<i32> = self.res.iter().map(|r| r.0).collect();
        let miss_tok: Vec<i32> = sel
            .iter()
            .copied()
            .filter(|t| !resident.contains(t))
            .collect();
        let n = self.res.len();
        let fresh = miss_tok.len().min(cap - n);
        let evict = miss_tok.len() - fresh;
        let (mut cut, mut take) = (AGES, 0);
        if evict > 0 {
            let mut seen = 0;
            cut = AGES - 1;
            while cut > 0 && seen + hist[cut as usize] < evict {
                seen += hist[cut as usize];
                cut -= 1;
            }
            take = evict - seen;
        }
        let (mut free, mut kept, mut at_cut) = (Vec::new(), Vec::new(), 0);
        for &(t, s, a) in &self.res {
            let sel_now = selected(t);
            let b = if sel_now { None } else { Some(bucket(a)) };
            let gone = match b {
                Some(b) if b > cut => true,
                Some(b) if b == cut => {
                    at_cut += 1;
                    at_cut <= take
                }
                _ => false,
            };
            if gone {
                free.push(s);
            } else {
                kept.push((t, s, if sel_now { now } else { a }));
            }
        }
        let misses: Vec<(i32, i32)> = miss_tok
            .iter()
            .enumerate()
            .map(|(m, &t)| {
                let slot = if m < free.len() {
                    free[m]
                } else {
                    (n + m - free.len()) as i32
                };
                (t, slot)
            })
            .collect();
        kept.extend(misses.iter().map(|&(t, s)| (t, s, now)));
        self.res = kept;
        let slot_of: HashMap<i32, i32> = self.res.iter().map(|r| (r.0, r.1)).collect();
        let slots = sel
            .iter()
            .map(|t| *slot_of.get(t).expect("selected is resident"))
            .collect();
        Step { misses, slots }
    }
}

#[test]
fn lru_residency_matches_the_host_model_and_rows_land_where_attention_reads() {
    let Some(be) = backend() else { return };
    lru_matches_the_model(&be, 1, 5, &SMALL);
}

/// The same at a 256K-context size (about 11K selected rows a head): the selections straddle
/// the largest that the kernel searches in shared memory, so the multi-block scans and the
/// global-memory search run too.
#[test]
fn lru_residency_matches_the_host_model_at_full_size() {
    let Some(be) = backend() else { return };
    lru_matches_the_model(&be, 1, 36, &LARGE);
}

/// The same with page-granular selection: entries are pages of 4 rows, a cache slot holds a
/// page, and attention's index list names each of its rows.
#[test]
fn lru_residency_of_pages_lists_every_row_of_a_selected_page() {
    let Some(be) = backend() else { return };
    lru_matches_the_model(&be, 4, 8, &SMALL);
}

/// A test's sizes: selections of `k_min..=k_max` entries a head drawn from a span of `span`
/// tokens, alternating between two groups `gap` apart and drifting by `drift` every 3 rounds.
struct Case {
    heads: usize,
    k_min: usize,
    k_max: usize,
    cap: usize,
    rounds: u32,
    span: usize,
    gap: usize,
    drift: usize,
}

const SMALL: Case = Case {
    heads: 3,
    k_min: 20,
    k_max: 40,
    cap: 100,
    rounds: 120,
    span: 90,
    gap: 500,
    drift: 11,
};

/// 11,008 entries is the kernel's shared-memory search limit (43 KiB of `i32`).
const LARGE: Case = Case {
    heads: 2,
    k_min: 10_400,
    k_max: 11_600,
    cap: 46_000,
    rounds: 24,
    span: 16_000,
    gap: 30_000,
    drift: 1_500,
};

/// Selections of entries (rows, or pages of `unit` rows) over `c.rounds` rounds against
/// [`Model`]; `idx0` fixed window rows (a multiple of `unit`).
fn lru_matches_the_model(be: &CudaBackend, unit: usize, idx0: usize, c: &Case) {
    let (heads, k_max, cap) = (c.heads, c.k_max, c.cap);
    let mut res = be
        .ds_residency_lru_state(heads, cap, k_max, idx0, unit)
        .unwrap();
    let mut stats = be.dev_zeros::<u64>(2).unwrap();
    // The slab: entry t's rows j (16 bytes each) hold [t * unit + j; 4]; the window: idx0 fixed
    // rows, then the cache's slots of `unit` rows.
    let tokens = (c.rounds as usize / 3 + 1) * c.drift + c.gap + c.span;
    let slab: Vec<i32> = (0..(tokens * unit) as i32).flat_map(|t| [t; 4]).collect();
    let slab = be.dev_upload(&slab).unwrap();
    let rows = idx0 + cap * unit;
    let window = be.dev_zeros::<i32>(heads * rows * 4).unwrap();
    let mut models: Vec<Model> = (0..heads).map(|_| Model::default()).collect();
    let mut rng = Rng(0x9e37_79b9);
    let (mut want_miss, mut want_hit) = (0u64, 0u64);
    for round in 0..c.rounds {
        let k = c.k_min + (rng.next() % (k_max - c.k_min + 1) as u64) as usize;
        // Two groups of tokens that alternate, plus drift: rows come back after a few steps.
        let lo = (round / 3) as usize * c.drift + if round % 2 == 0 { 0 } else { c.gap };
        let mut sel = vec![0i32; heads * k_max];
        let mut sels = Vec::new();
        for g in 0..heads {
            let mut seen = HashSet::new();
            while seen.len() < k {
                seen.insert((lo + (rng.next() % c.span as u64) as usize) as i32);
            }
            let mut s: Vec<i32> = seen.into_iter().collect();
            s.sort();
            sel[g * k_max..g * k_max + k].copy_from_slice(&s);
            sels.push(s);
        }
        let sel_dev = be.dev_upload(&sel).unwrap();
        be.ds_residency(&sel_dev, k_max, heads, k, &mut res, &mut stats)
            .unwrap();
        be.ds_gather_misses(
            false,
            be.dev_ptr(&slab),
            16 * unit,
            0,
            &res,
            heads,
            16 * unit,
            be.dev_ptr(&window),
            rows / unit,
            idx0 / unit,
        )
        .unwrap();
        let n_res = be.ds_residents(&res).unwrap().unwrap();
        let tok = be.dev_read(&res.tok).unwrap();
        let slot = be.dev_read(&res.slot).unwrap();
        let mtok = be.dev_read(&res.miss_tok).unwrap();
        let mslot = be.dev_read(&res.miss_slot).unwrap();
        let nmiss = be.dev_read(&res.n_miss).unwrap();
        let lru = res.lru.as_ref().unwrap();
        let idx = be.dev_read(&lru.idx).unwrap();
        let win = be.dev_read(&window).unwrap();
        for g in 0..heads {
            let s = &sels[g];
            let want = models[g].step(s, round + 1, cap);
            let n = nmiss[g] as usize;
            let got: Vec<(i32, i32)> = (0..n)
                .map(|m| (mtok[g * cap + m], mslot[g * cap + m]))
                .collect();
            assert_eq!(
                got, want.misses,
                "round {round} head {g}: misses and their slots"
            );
            want_miss += n as u64;
            want_hit += (k - n) as u64;
            let m = &models[g];
            assert_eq!(
                n_res[g] as usize,
                m.res.len(),
                "round {round} head {g}: residents"
            );
            let res_got: Vec<(i32, i32)> = (0..m.res.len())
                .map(|j| (tok[g * cap + j], slot[g * cap + j]))
                .collect();
            let res_want: Vec<(i32, i32)> = m.res.iter().map(|r| (r.0, r.1)).collect();
            assert_eq!(res_got, res_want, "round {round} head {g}: resident list");
            assert!(m.res.len() <= cap);
            let stride = lru.idx_stride;
            for j in 0..idx0 {
                assert_eq!(idx[g * stride + j], j as i32, "fixed window rows");
            }
            for (i, &t) in s.iter().enumerate() {
                for j in 0..unit {
                    let row = idx[g * stride + idx0 + i * unit + j];
                    assert_eq!(
                        row,
                        (idx0 + want.slots[i] as usize * unit + j) as i32,
                        "round {round} head {g}: index"
                    );
                    let at = (g * rows + row as usize) * 4;
                    let tok = t * unit as i32 + j as i32;
                    assert_eq!(
                        win[at..at + 4],
                        [tok; 4],
                        "round {round} head {g}: window row {row} holds token {tok}"
                    );
                }
            }
        }
    }
    let st = be.dev_read(&stats).unwrap();
    assert_eq!((st[0], st[1]), (want_miss, want_hit));
    // The small case's two groups (180 tokens) overflow its 100 slots: evictions every round,
    // yet rows that come back within a few rounds hit.
    assert!(
        want_hit > 0 && want_miss > (heads * cap) as u64,
        "hits and evictions both happen: {want_hit} hits, {want_miss} misses"
    );
    println!(
        "lru residency: {want_miss} misses, {want_hit} hits over {} rounds",
        c.rounds
    );
}

#[test]
fn dropped_rows_stay_cached_and_the_oldest_go_first() {
    let Some(be) = backend() else { return };
    let (heads, k, cap) = (1usize, 4usize, 8usize);
    let mut res = be.ds_residency_lru_state(heads, cap, k, 2, 1).unwrap();
    let mut stats = be.dev_zeros::<u64>(2).unwrap();
    let mut step = |sel: [i32; 4]| -> u64 {
        let before = be.dev_read(&stats).unwrap()[0];
        let d = be.dev_upload(&sel).unwrap();
        be.ds_residency(&d, k, heads, k, &mut res, &mut stats)
            .unwrap();
        be.dev_read(&stats).unwrap()[0] - before
    };
    assert_eq!(step([1, 2, 3, 4]), 4);
    assert_eq!(step([5, 6, 7, 8]), 4);
    // Both sets fit in 8 rows: all hits.
    assert_eq!(step([1, 2, 3, 4]), 0);
    assert_eq!(step([5, 6, 7, 8]), 0);
    // Full: 9..12 evict the least recently selected, 1..4.
    assert_eq!(step([9, 10, 11, 12]), 4);
    assert_eq!(step([5, 6, 7, 8]), 0);
    assert_eq!(step([1, 2, 3, 4]), 4);
}
