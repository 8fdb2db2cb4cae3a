//! [`SparseKvStore`]: a [`KvStore`] whose rows live in a [`KvTier`] (host memory or disk) and
//! whose attention reads only the rows Double Sparsity selects.
//!
//! Per new token and layer, `write` stores every KV head's `[K | V]` row in the token's slot and
//! its label (the post-RoPE key at the head's label channels). Per query, layer and KV head,
//! `attend` scores every visible token's label against the group's summed query labels, keeps
//! the sinks, the recent window and the top-scoring tokens up to the budget, gathers those rows
//! from the tier and runs exact softmax attention over them. A query that sees no more tokens
//! than its budget, a layer listed as dense, and (unless `sparse_prefill`) a multi-token call
//! attend over every visible row.
//!
//! With a byte budget ([`super::evict`]) the store evicts tokens between forward calls: an
//! evicted position keeps its place (positions, and so RoPE, never change) but owns no slot
//! (`slot_of[p] == EVICTED`), and selection and attention skip it.
//!
//! Files: this one holds the store and the [`KvStore`] protocol; `store/select.rs` the choice
//! of rows (query labels, top-k or pages), `store/reuse.rs` the step-to-step reuse counters.

use std::sync::Mutex;

use farsight_kernels::cpu::simd::Elem;
use farsight_kernels::{AttnShape, Backend, CausalAttn, DType, KernelError, Result};
use half::{bf16, f16};
use rayon::prelude::*;

use super::attend::attend_rows;
use super::cache_sim::CacheSim;
use super::config::{Predict, SparseConfig};
use super::evict::{victims, Unimportance, TALLY_QUERIES};
use super::labels::LabelCache;
use super::pages::{page_recent, select_pages};
use super::row_cache::{RowCache, RowCacheStats};
use super::stats::SparseStats;
use super::ChannelRanking;
use crate::tier::{KvTier, RowLayout};
use crate::{KvStore, SlotPool};

mod reuse;
mod select;

/// Double Sparsity KV store over a tier.
pub struct SparseKvStore {
    cfg: SparseConfig,
    shape: AttnShape,
    layers: usize,
    dtype: DType,
    tier: Box<dyn KvTier>,
    labels: LabelCache,
    /// `channels[layer][kv_head]`: the `r` label channels, most important first.
    channels: Vec<Vec<Vec<usize>>>,
    /// Slot of every position (committed tokens, then the reserved ones), or [`EVICTED`].
    slot_of: Vec<u32>,
    /// Committed tokens.
    len: usize,
    /// Owner bookkeeping of the tier's slots: a slot is allocated iff a position maps to it.
    pool: SlotPool,
    max_tokens: usize,
    /// Layer-ahead predictions for the pending queries: `ahead[layer]` holds
    /// `n_q x n_heads x r` post-RoPE query values at that layer's label channels.
    ahead: Vec<Option<Vec<f32>>>,
    stats: Mutex<SparseStats>,
    /// Unimportance counters per position (fed only when `cfg.evict` is set).
    unimp: Unimportance,
    /// Most slots (live plus reserved) the budget allows; `usize::MAX` without a budget.
    slot_cap: usize,
    /// Per `layer * n_kv_heads + g`: the top-k rows of the last query attended (for
    /// step-to-step reuse), or `None` when it attended densely.
    last_chosen: Mutex<Vec<Option<Chosen>>>,
    /// Per `layer * n_kv_heads + g`: simulated larger row caches (`cache_sim.rs`), when
    /// switched on ([`SparseKvStore::simulate_row_caches`]; they cost decode time and memory
    /// that grows with the context).
    cache_sim: Mutex<Option<Vec<CacheSim>>>,
    /// Rows of sparse reads cached in memory in front of a tier that is not (`row_cache.rs`).
    row_cache: Option<RowCache>,
}

/// The rows one (query, KV head) chose by top-k (neither sinks nor recent), in increasing
/// order: the true selection and, with layer-ahead prediction, the guess that was read.
#[derive(Clone, Debug)]
struct Chosen {
    /// The query's `end` (its position + 1).
    end: usize,
    truth: Vec<u32>,
    guess: Option<Vec<u32>>,
}

/// `slot_of` of an evicted position (never a slot number: see [`crate::MAX_SLOTS`]).
pub const EVICTED: u32 = u32::MAX;

/// The row layout a [`SparseKvStore`] of this shape needs from its tier.
pub fn row_layout(layers: usize, shape: &AttnShape, dtype: DType) -> RowLayout {
    RowLayout {
        layers,
        kv_heads: shape.n_kv_heads,
        row_bytes: 2 * shape.head_dim * dtype.size(),
        extent_slots: 1024,
    }
}

fn invalid(msg: String) -> KernelError {
    KernelError::Shape(msg)
}

impl SparseKvStore {
    /// A store for `layers` layers of `shape`, rows in `dtype`, in `tier`, choosing each
    /// (layer, KV head)'s `cfg.label_channels` best channels from `ranking`.
    pub fn new(
        mut cfg: SparseConfig,
        shape: AttnShape,
        layers: usize,
        dtype: DType,
        ranking: &ChannelRanking,
        tier: Box<dyn KvTier>,
        max_tokens: usize,
    ) -> Result<SparseKvStore> {
        cfg.recent = page_recent(cfg.sink, cfg.recent, cfg.page_tokens);
        let r = cfg.label_channels;
        if r == 0 || r > shape.head_dim {
            return Err(invalid(format!(
                "--label-channels {r}: must be between 1 and the head dimension {}",
                shape.head_dim
            )));
        }
        if let Some(&l) = cfg.dense_layers.iter().find(|&&l| l >= layers) {
            return Err(invalid(format!(
                "--dense-layers: layer {l} does not exist (the model has {layers})"
            )));
        }
        let channels = ranking.top(r, layers, shape.n_kv_heads, shape.head_dim)?;
        let want = row_layout(layers, &shape, dtype);
        let got = *tier.layout();
        if (got.layers, got.kv_heads, got.row_bytes) != (want.layers, want.kv_heads, want.row_bytes)
        {
            return Err(invalid(format!(
                "tier layout {got:?} does not fit rows {want:?}"
            )));
        }
        let labels = LabelCache::new(layers, shape.n_kv_heads, r, cfg.label_bits);
        let slot_cap = match &cfg.evict {
            None => usize::MAX,
            Some(e) => {
                let cap = e.slot_cap(
                    got.layers * got.kv_heads * got.row_bytes + labels.bytes_per_token(),
                    got.extent_slots,
                );
                if cap < cfg.sink + cfg.recent + 1 {
                    return Err(invalid(format!(
                        "--host-kv-budget {} bytes holds {cap} tokens; sink {} + recent {} + 1 need more",
                        e.budget_bytes, cfg.sink, cfg.recent
                    )));
                }
                cap
            }
        };
        Ok(SparseKvStore {
            labels,
            unimp: Unimportance::default(),
            slot_cap,
            stats: Mutex::new(SparseStats::new(layers)),
            last_chosen: Mutex::new(vec![None; layers * shape.n_kv_heads]),
            cache_sim: Mutex::new(None),
            row_cache: (cfg.row_cache > 1 && !tier.in_memory())
                .then(|| RowCache::new(layers, shape.n_kv_heads, got.row_bytes, cfg.row_cache)),
            ahead: vec![None; layers],
            cfg,
            shape,
            layers,
            dtype,
            tier,
            channels,
            slot_of: Vec::new(),
            len: 0,
            pool: SlotPool::new(),
            max_tokens,
        })
    }

    /// The settings.
    pub fn config(&self) -> &SparseConfig {
        &self.cfg
    }

    /// Counters since creation (or the last [`SparseKvStore::reset_stats`]).
    pub fn stats(&self) -> SparseStats {
        self.stats.lock().expect("stats lock").clone()
    }

    /// Zeroes the counters.
    pub fn reset_stats(&self) {
        *self.stats.lock().expect("stats lock") = SparseStats::new(self.layers);
    }

    /// The tier's description.
    pub fn tier_name(&self) -> String {
        self.tier.describe()
    }

    /// Bytes of labels (the per-token state a GPU would keep).
    pub fn label_bytes(&self) -> usize {
        self.labels.bytes()
    }

    /// Attention of query `i` (all heads of KV head `g`'s group) over `positions`.
    #[allow(clippy::too_many_arguments)]
    fn attend_positions<E: Elem + bytemuck::Pod>(
        &self,
        layer: usize,
        g: usize,
        (positions, sparse): (&[usize], bool),
        q: &[f32],
        scale: f32,
        out: &mut [f32],
        tally: Option<usize>,
    ) -> Result<()> {
        let d = self.shape.head_dim;
        let slots: Vec<u32> = positions.iter().map(|&p| self.slot_of[p]).collect();
        debug_assert!(
            !slots.contains(&EVICTED),
            "attention over an evicted position"
        );
        let mut rows = vec![E::default(); slots.len() * 2 * d];
        let bytes = bytemuck::cast_slice_mut(&mut rows);
        // Sparse reads go through the row cache (dense ones would flush it).
        match (&self.row_cache, sparse) {
            (Some(c), true) => c.read(self.tier.as_ref(), layer, g, &slots, bytes)?,
            _ => self.tier.read(layer, g, &slots, bytes)?,
        }
        let mut scores = Vec::new();
        let group = self.shape.group();
        // Tallied queries: `tally` is the live tokens seen; a row is important when some head of
        // the group gives it at least `threshold / t`.
        let threshold = match (tally, &self.cfg.evict) {
            (Some(t), Some(e)) => e.threshold / t.max(1) as f32,
            _ => 0.0,
        };
        let mut important = tally
            .filter(|_| self.cfg.evict.is_some())
            .map(|_| vec![false; positions.len()]);
        for j in 0..group {
            let h = g * group + j;
            attend_rows(
                &q[h * d..(h + 1) * d],
                &rows,
                d,
                scale,
                &mut scores,
                &mut out[j * d..(j + 1) * d],
            );
            if let (Some(_), Some(imp)) = (tally, important.as_mut()) {
                imp.iter_mut()
                    .zip(&scores)
                    .for_each(|(i, &w)| *i |= w >= threshold);
            }
        }
        if let Some(imp) = important {
            for (&p, &i) in positions.iter().zip(&imp) {
                self.unimp.observe(p, !i);
            }
        }
        Ok(())
    }

    /// Attention for one (query, KV head) task: chooses the rows and attends over them.
    /// Returns the rows the top-k chose (`None` when it attended densely).
    #[allow(clippy::too_many_arguments)]
    fn attend_one<E: Elem + bytemuck::Pod>(
        &self,
        layer: usize,
        a: &CausalAttn,
        i: usize,
        g: usize,
        q: &[f32],
        sparse: bool,
        out: &mut [f32],
    ) -> Result<Option<Chosen>> {
        let end = a.n_past + i + 1;
        let start = a.shape.window.map_or(0, |w| end.saturating_sub(w));
        let budget = self.cfg.budget.tokens(end - start);
        let tallied = self.cfg.evict.is_some() && i + TALLY_QUERIES >= a.n_q;
        if !sparse || end - start <= budget {
            let pos = self.live(start..end);
            self.stats.lock().expect("stats lock").dense(pos.len());
            let tally = tallied.then_some(pos.len());
            self.attend_positions::<E>(layer, g, (&pos, false), q, a.scale, out, tally)?;
            return Ok(None);
        }
        let qlab = self.group_label_query(layer, g, q);
        let (truth, k) = self.select(layer, g, &qlab, start, end, budget);
        let (lo, hi) = self.windows(start, end);
        let middle = |sel: &[usize]| -> Vec<u32> {
            sel.iter()
                .filter(|&&p| (lo..hi).contains(&p))
                .map(|&p| p as u32)
                .collect()
        };
        let mut chosen = Chosen {
            end,
            truth: middle(&truth),
            guess: None,
        };
        let pos = match (&self.cfg.predict, &self.ahead[layer]) {
            (Predict::LayerAhead, Some(pred)) => {
                let r = self.cfg.label_channels;
                let stride = self.shape.n_heads * r;
                let qhat = self.group_predicted_query(g, &pred[i * stride..(i + 1) * stride]);
                let (guess, _) = self.select(layer, g, &qhat, start, end, budget);
                let hits = overlap(&truth, &guess);
                let fixed = truth.len() - k;
                self.stats
                    .lock()
                    .expect("stats lock")
                    .add_recall(layer, hits - fixed, k);
                chosen.guess = Some(middle(&guess));
                guess
            }
            _ => truth,
        };
        self.stats
            .lock()
            .expect("stats lock")
            .sparse(pos.len(), end - start);
        let tally = if tallied {
            // Live tokens the labels did not select are unimportant.
            let visible = self.live(start..end);
            let mut chosen = pos.iter().peekable();
            for &p in &visible {
                if chosen.next_if_eq(&&p).is_none() {
                    self.unimp.observe(p, true);
                }
            }
            Some(visible.len())
        } else {
            None
        };
        self.attend_positions::<E>(layer, g, (&pos, true), q, a.scale, out, tally)?;
        Ok(Some(chosen))
    }

    fn attend_typed<E: Elem + bytemuck::Pod>(
        &self,
        layer: usize,
        a: &CausalAttn,
        q: &[f32],
        q_cols: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let s = self.shape;
        let (d, group, qw) = (s.head_dim, s.group(), s.q_width());
        let sparse =
            !self.cfg.dense_layers.contains(&layer) && (a.n_q == 1 || self.cfg.sparse_prefill);
        let tasks: Vec<(usize, usize)> = (0..a.n_q)
            .flat_map(|i| (0..s.n_kv_heads).map(move |g| (i, g)))
            .collect();
        let task = |&(i, g): &(usize, usize)| -> Result<(Vec<f32>, Option<Chosen>)> {
            let qrow = &q[i * q_cols + a.q_col0..][..qw];
            let mut o = vec![0.0f32; group * d];
            let c = self.attend_one::<E>(layer, a, i, g, qrow, sparse, &mut o)?;
            Ok((o, c))
        };
        // A decode step's few (query, KV head) tasks are cheaper than waking a thread pool.
        type TaskOut = Result<(Vec<f32>, Option<Chosen>)>;
        let results: Vec<TaskOut> = if tasks.len() >= 16 {
            tasks.par_iter().map(task).collect()
        } else {
            tasks.iter().map(task).collect()
        };
        let mut chosen = Vec::with_capacity(tasks.len());
        for (&(i, g), r) in tasks.iter().zip(results) {
            let (o, c) = r?;
            out[i * qw + g * group * d..][..group * d].copy_from_slice(&o);
            chosen.push(c);
        }
        self.count_reuse(layer, chosen);
        Ok(())
    }
}

impl SparseKvStore {
    /// Frees the slots of positions `from ..` and forgets them.
    fn release_from(&mut self, from: usize) {
        for &slot in &self.slot_of[from.min(self.slot_of.len())..] {
            if slot != EVICTED {
                self.pool.free(slot);
            }
        }
        self.slot_of.truncate(from);
        self.unimp.truncate(from);
        // A kept selection of a forgotten position must not pair with the next query.
        for c in self.last_chosen.get_mut().expect("reuse lock").iter_mut() {
            if c.as_ref().is_some_and(|c| c.end > from) {
                *c = None;
            }
        }
    }

    /// Evicts committed tokens until `n` more slots fit under the budget's slot cap: at least a
    /// batch, highest unimportance first, never a sink nor one of the last `recent` tokens.
    fn make_room(&mut self, n: usize) -> Result<()> {
        let Some(e) = &self.cfg.evict else {
            return Ok(());
        };
        let live = self.pool.in_use();
        if live + n <= self.slot_cap {
            return Ok(());
        }
        let need = live + n - self.slot_cap;
        let batch = ((self.slot_cap as f64 * e.batch) as usize).max(need);
        let protect_to = self.len.saturating_sub(self.cfg.recent);
        let mut candidates = self.live(self.cfg.sink.min(protect_to)..protect_to);
        if candidates.len() < need {
            return Err(KernelError::OutOfMemory {
                device: "host KV budget".into(),
                what: format!(
                    "{} bytes hold {} tokens; {n} new tokens with sink {} and recent {} do not fit (lower the chunk or raise --host-kv-budget)",
                    e.budget_bytes, self.slot_cap, self.cfg.sink, self.cfg.recent
                ),
            });
        }
        let gone = victims(&self.unimp, &mut candidates, batch);
        for &p in &gone {
            self.pool
                .free(std::mem::replace(&mut self.slot_of[p], EVICTED));
        }
        let per_token =
            self.tier.layout().token_layer_bytes() * self.layers + self.labels.bytes_per_token();
        let mut st = self.stats.lock().expect("stats lock");
        st.evictions += 1;
        st.evicted_tokens += gone.len() as u64;
        st.bytes_freed += (gone.len() * per_token) as u64;
        Ok(())
    }

    /// Tokens that own a slot (committed and reserved).
    pub fn live_tokens(&self) -> usize {
        self.pool.in_use()
    }

    /// The slot of `pos`, or `None` when it was evicted (or is past the store).
    pub fn slot_of(&self, pos: usize) -> Option<u32> {
        self.slot_of.get(pos).copied().filter(|&s| s != EVICTED)
    }

    /// The budget's cap on slots (`usize::MAX` without a budget).
    pub fn slot_cap(&self) -> usize {
        self.slot_cap
    }

    /// Bytes of rows held by the tier.
    pub fn row_bytes(&self) -> usize {
        self.tier.bytes()
    }

    /// Counts from now on the hits that row caches of [`super::CACHE_FACTORS`] times the top-k
    /// would have (`SparseStats::cache_hits`; `eval ppl` switches it on), or stops.
    pub fn simulate_row_caches(&mut self, on: bool) {
        let n = self.layers * self.shape.n_kv_heads;
        *self.cache_sim.get_mut().expect("reuse lock") = on.then(|| vec![CacheSim::default(); n]);
    }

    /// Hits and misses of the in-memory row cache (`None` without one).
    pub fn row_cache_stats(&self) -> Option<RowCacheStats> {
        self.row_cache.as_ref().map(|c| c.stats())
    }

    /// Slots owned now (tokens stored, committed or reserved).
    pub fn slots_in_use(&self) -> usize {
        self.pool.in_use()
    }
}

/// Common elements of two increasing lists.
fn overlap<T: Ord>(a: &[T], b: &[T]) -> usize {
    let (mut i, mut j, mut n) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                n += 1;
                i += 1;
                j += 1;
            }
        }
    }
    n
}

fn encode(dtype: DType, src: &[f32], dst: &mut [u8]) {
    match dtype {
        DType::F32 => dst.copy_from_slice(bytemuck::cast_slice(src)),
        DType::F16 => {
            for (c, &v) in src.iter().enumerate() {
                dst[2 * c..2 * c + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
            }
        }
        DType::BF16 => {
            for (c, &v) in src.iter().enumerate() {
                dst[2 * c..2 * c + 2].copy_from_slice(&bf16::from_f32(v).to_le_bytes());
            }
        }
    }
}

impl<B: Backend> KvStore<B> for SparseKvStore {
    fn len(&self) -> usize {
        self.len
    }

    fn reserve(&mut self, _backend: &B, n: usize) -> Result<()> {
        let need = self.len + n;
        if need > self.max_tokens {
            return Err(invalid(format!(
                "KV store holds at most {} tokens; {need} requested",
                self.max_tokens
            )));
        }
        self.release_from(self.len);
        self.make_room(n)?;
        for _ in 0..n {
            let slot = self.pool.alloc()?;
            self.slot_of.push(slot);
        }
        self.tier.grow(self.pool.capacity())?;
        self.labels.grow_capped(self.pool.capacity(), self.slot_cap);
        if self.cfg.evict.is_some() {
            self.unimp.grow(self.slot_of.len());
        }
        Ok(())
    }

    fn write(
        &mut self,
        backend: &B,
        layer: usize,
        src: &B::Tensor,
        src_row0: usize,
        k_col0: usize,
        v_col0: usize,
        n: usize,
    ) -> Result<()> {
        if self.len + n > self.slot_of.len() {
            return Err(invalid(format!(
                "write of {n} rows after {} without reserve",
                self.len
            )));
        }
        let cols = backend.tensor_shape(src).1;
        let rows = backend.read_rows(src, src_row0, n)?;
        let (d, g) = (self.shape.head_dim, self.shape.n_kv_heads);
        let es = self.dtype.size();
        let rb = 2 * d * es;
        let mut buf = vec![0u8; g * rb];
        let mut lab = Vec::with_capacity(self.cfg.label_channels);
        for i in 0..n {
            let slot = self.slot_of[self.len + i];
            let row = &rows[i * cols..(i + 1) * cols];
            for h in 0..g {
                let k = &row[k_col0 + h * d..][..d];
                encode(self.dtype, k, &mut buf[h * rb..][..d * es]);
                encode(
                    self.dtype,
                    &row[v_col0 + h * d..][..d],
                    &mut buf[h * rb + d * es..][..d * es],
                );
                lab.clear();
                lab.extend(self.channels[layer][h].iter().map(|&c| k[c]));
                self.labels.write(layer, h, slot, &lab);
            }
            self.tier.write(layer, slot, &buf)?;
            if let Some(c) = &self.row_cache {
                c.invalidate(layer, slot);
            }
        }
        Ok(())
    }

    fn commit(&mut self, n: usize) {
        assert!(
            self.len + n <= self.slot_of.len(),
            "commit past the reserved rows"
        );
        self.len += n;
        self.ahead.iter_mut().for_each(|a| *a = None);
        if let Some(e) = &self.cfg.evict {
            self.unimp.end_call(self.len, e.window);
        }
    }

    fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        self.release_from(self.len);
    }

    fn attend(
        &self,
        backend: &B,
        layer: usize,
        args: &CausalAttn,
        q: &B::Tensor,
        out: &mut B::Tensor,
    ) -> Result<()> {
        if args.n_past != self.len || args.n_past + args.n_q > self.slot_of.len() {
            return Err(invalid(format!(
                "attention after {} tokens (+{}), store holds {} (+{} reserved)",
                args.n_past,
                args.n_q,
                self.len,
                self.slot_of.len() - self.len
            )));
        }
        let q_cols = backend.tensor_shape(q).1;
        let qrows = backend.read_rows(q, args.q_row0, args.n_q)?;
        let mut o = vec![0.0f32; args.n_q * self.shape.q_width()];
        match self.dtype {
            DType::F32 => self.attend_typed::<f32>(layer, args, &qrows, q_cols, &mut o)?,
            DType::F16 => self.attend_typed::<f16>(layer, args, &qrows, q_cols, &mut o)?,
            DType::BF16 => self.attend_typed::<bf16>(layer, args, &qrows, q_cols, &mut o)?,
        }
        backend.write_tensor(out, args.out_row0, &o)
    }

    fn bytes(&self) -> usize {
        self.tier.bytes() + self.labels.bytes() + self.row_cache.as_ref().map_or(0, |c| c.bytes())
    }

    fn memory(&self) -> crate::KvMemory {
        let st = self.stats();
        crate::KvMemory {
            tier: self.tier.describe(),
            row_bytes: self.tier.bytes(),
            label_bytes: self.labels.bytes(),
            device_bytes: 0,
            positions: self.len,
            live_tokens: self.pool.in_use(),
            budget_bytes: self.cfg.evict.as_ref().map(|e| e.budget_bytes),
            evictions: st.evictions,
            evicted_tokens: st.evicted_tokens,
            bytes_freed: st.bytes_freed,
            selection_reuse: st.step_reuse(),
            row_cache_bytes: self.row_cache.as_ref().map(|c| c.bytes()),
            row_cache_hit_rate: self.row_cache.as_ref().and_then(|c| c.stats().hit_rate()),
        }
    }

    fn ahead_channels(&self) -> Option<&[Vec<Vec<usize>>]> {
        (self.cfg.predict == Predict::LayerAhead).then_some(&self.channels[..])
    }

    fn predict(&mut self, layer: usize, q_hat: &[f32], n: usize) -> Result<()> {
        let want = n * self.shape.n_heads * self.cfg.label_channels;
        if q_hat.len() != want || layer >= self.layers {
            return Err(invalid(format!(
                "layer-ahead prediction of {} values for layer {layer}, want {want}",
                q_hat.len()
            )));
        }
        self.ahead[layer] = Some(q_hat.to_vec());
        Ok(())
    }
}
