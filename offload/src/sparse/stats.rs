//! Counters of what sparse attention did: how many rows it read, how well the layer-ahead
//! prediction recalled the true selection, and how much of one decode step's selection the next
//! step reused.

use super::cache_sim::CACHE_FACTORS;

/// Counters since the store was made (or reset).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct SparseStats {
    /// (query, KV head) attentions that selected rows.
    pub sparse_attentions: u64,
    /// (query, KV head) attentions that read every visible row.
    pub dense_attentions: u64,
    /// Rows read by sparse attentions.
    pub sparse_rows: u64,
    /// Rows those queries could see (what dense attention would have read).
    pub visible_rows: u64,
    /// Rows read by dense attentions.
    pub dense_rows: u64,
    /// Per layer: scored rows of the true selection that the layer-ahead prediction also chose.
    pub recall_hits: Vec<u64>,
    /// Per layer: scored rows of the true selection.
    pub recall_total: Vec<u64>,
    /// Per layer: rows chosen by top-k (neither sinks nor recent) for position `t` that the
    /// same KV head also chose for position `t - 1` (the hits of a row cache holding the
    /// previous step's selection). Counted over pairs of consecutive positions that both
    /// selected sparsely with a non-empty top-k.
    pub reuse_hits: Vec<u64>,
    /// Per layer: rows chosen by top-k for position `t` in those pairs.
    pub reuse_total: Vec<u64>,
    /// As `reuse_hits` / `reuse_total`, for the layer-ahead guess (the rows actually read
    /// when `--predict layer-ahead` is on).
    pub ahead_reuse_hits: Vec<u64>,
    pub ahead_reuse_total: Vec<u64>,
    /// Per [`CACHE_FACTORS`] entry and layer: hits of a simulated LRU row cache of that many
    /// times the top-k, in front of the rows read (the guess under layer-ahead prediction, else
    /// the true selection), over consecutive sparse queries (`cache_sim.rs`).
    pub cache_hits: Vec<Vec<u64>>,
    /// Per layer: rows read by the queries counted in `cache_hits`.
    pub cache_total: Vec<u64>,
    /// Eviction batches run.
    pub evictions: u64,
    /// Tokens evicted.
    pub evicted_tokens: u64,
    /// Bytes of rows and labels those tokens held (their slots went back to the pool).
    pub bytes_freed: u64,
}

impl SparseStats {
    pub fn new(layers: usize) -> SparseStats {
        SparseStats {
            recall_hits: vec![0; layers],
            recall_total: vec![0; layers],
            reuse_hits: vec![0; layers],
            reuse_total: vec![0; layers],
            ahead_reuse_hits: vec![0; layers],
            ahead_reuse_total: vec![0; layers],
            cache_hits: vec![vec![0; layers]; CACHE_FACTORS.len()],
            cache_total: vec![0; layers],
            ..Default::default()
        }
    }

    pub(crate) fn dense(&mut self, rows: usize) {
        self.dense_attentions += 1;
        self.dense_rows += rows as u64;
    }

    pub(crate) fn sparse(&mut self, rows: usize, visible: usize) {
        self.sparse_attentions += 1;
        self.sparse_rows += rows as u64;
        self.visible_rows += visible as u64;
    }

    pub(crate) fn add_recall(&mut self, layer: usize, hits: usize, total: usize) {
        self.recall_hits[layer] += hits as u64;
        self.recall_total[layer] += total as u64;
    }

    pub(crate) fn add_reuse(&mut self, layer: usize, hits: usize, total: usize) {
        self.reuse_hits[layer] += hits as u64;
        self.reuse_total[layer] += total as u64;
    }

    pub(crate) fn add_ahead_reuse(&mut self, layer: usize, hits: usize, total: usize) {
        self.ahead_reuse_hits[layer] += hits as u64;
        self.ahead_reuse_total[layer] += total as u64;
    }

    pub(crate) fn add_cache(&mut self, layer: usize, hits: &[usize], total: usize) {
        for (h, c) in hits.iter().zip(self.cache_hits.iter_mut()) {
            c[layer] += *h as u64;
        }
        self.cache_total[layer] += total as u64;
    }

    /// Hit rate of the simulated row cache of `CACHE_FACTORS[i]` times the top-k, over every
    /// layer (`None` where nothing was counted).
    pub fn cache_hit_rate(&self, i: usize) -> Option<f64> {
        ratio(&self.cache_hits[i], &self.cache_total)
    }

    /// The same per layer.
    pub fn cache_hit_rate_per_layer(&self, i: usize) -> Vec<Option<f64>> {
        ratios(&self.cache_hits[i], &self.cache_total)
    }

    /// Step-to-step reuse of the true top-k selection per layer (`None` where no pair of
    /// consecutive sparse positions was seen).
    pub fn reuse_per_layer(&self) -> Vec<Option<f64>> {
        ratios(&self.reuse_hits, &self.reuse_total)
    }

    /// Step-to-step reuse of the true top-k selection over every layer: the hit rate of a row
    /// cache that keeps the previous step's selection (bytes fetched per token scale by
    /// `1 - reuse`).
    pub fn step_reuse(&self) -> Option<f64> {
        ratio(&self.reuse_hits, &self.reuse_total)
    }

    /// Step-to-step reuse of the layer-ahead guess per layer.
    pub fn ahead_reuse_per_layer(&self) -> Vec<Option<f64>> {
        ratios(&self.ahead_reuse_hits, &self.ahead_reuse_total)
    }

    /// Step-to-step reuse of the layer-ahead guess over every layer.
    pub fn ahead_step_reuse(&self) -> Option<f64> {
        ratio(&self.ahead_reuse_hits, &self.ahead_reuse_total)
    }

    /// Layer-ahead recall per layer (`None` where nothing was predicted).
    pub fn recall_per_layer(&self) -> Vec<Option<f64>> {
        ratios(&self.recall_hits, &self.recall_total)
    }

    /// Layer-ahead recall over every layer.
    pub fn recall(&self) -> Option<f64> {
        ratio(&self.recall_hits, &self.recall_total)
    }

    /// Fraction of the visible rows that sparse attentions read.
    pub fn read_fraction(&self) -> Option<f64> {
        (self.visible_rows > 0).then(|| self.sparse_rows as f64 / self.visible_rows as f64)
    }
}

/// `hits[l] / total[l]` per layer (`None` where the total is 0).
fn ratios(hits: &[u64], total: &[u64]) -> Vec<Option<f64>> {
    hits.iter()
        .zip(total)
        .map(|(&h, &t)| (t > 0).then(|| h as f64 / t as f64))
        .collect()
}

/// Summed hits over summed totals (`None` where the total is 0).
fn ratio(hits: &[u64], total: &[u64]) -> Option<f64> {
    let t: u64 = total.iter().sum();
    (t > 0).then(|| hits.iter().sum::<u64>() as f64 / t as f64)
}
