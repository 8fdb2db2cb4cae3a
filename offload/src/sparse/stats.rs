//! Counters of what sparse attention did: how many rows it read and how well the layer-ahead
//! prediction recalled the true selection.

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

    /// Layer-ahead recall per layer (`None` where nothing was predicted).
    pub fn recall_per_layer(&self) -> Vec<Option<f64>> {
        self.recall_hits
            .iter()
            .zip(&self.recall_total)
            .map(|(&h, &t)| (t > 0).then(|| h as f64 / t as f64))
            .collect()
    }

    /// Layer-ahead recall over every layer.
    pub fn recall(&self) -> Option<f64> {
        let t: u64 = self.recall_total.iter().sum();
        (t > 0).then(|| self.recall_hits.iter().sum::<u64>() as f64 / t as f64)
    }

    /// Fraction of the visible rows that sparse attentions read.
    pub fn read_fraction(&self) -> Option<f64> {
        (self.visible_rows > 0).then(|| self.sparse_rows as f64 / self.visible_rows as f64)
    }
}
