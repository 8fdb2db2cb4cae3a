//! Settings of the offloaded store.

use farsight_kernels::DType;
use farsight_offload::sparse::{LabelBits, Predict, TokenBudget};

/// Where the full KV rows live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowHome {
    /// Pinned host memory (PORTABLE | DEVICEMAP): the offloaded configuration.
    Host,
    /// Device memory: the same store with nothing offloaded (the on-GPU sparse reference).
    Device,
    /// A file (`--kv-store disk:PATH`; the store is made by `OffloadKvStore::new_on_disk`):
    /// rows read into pinned staging, then gathered as from the host tier.
    Disk,
}

/// Double Sparsity over rows kept off the GPU.
#[derive(Clone, Debug)]
pub struct OffloadConfig {
    /// Rows attended per KV head (sinks and recent window included).
    pub budget: TokenBudget,
    /// First tokens always attended (kept on the GPU).
    pub sink: usize,
    /// Last tokens always attended (kept on the GPU; at least 1: the token being decoded).
    pub recent: usize,
    /// `channels[layer][kv_head]`: the calibrated label channels.
    pub channels: Vec<Vec<Vec<usize>>>,
    /// Label precision on the GPU: f16, or 4-bit codes with a per-row minimum and scale.
    pub label_bits: LabelBits,
    /// Same-layer selection, or layer-ahead prediction on the prefetch stream.
    pub predict: Predict,
    /// KV element type (f16 or bf16).
    pub dtype: DType,
    /// Most tokens the sequence will hold.
    pub capacity: usize,
    pub home: RowHome,
    /// Also select with the true query under layer-ahead and count the overlap (costs a
    /// second selection per layer).
    pub measure_recall: bool,
    /// GPU row cache per (layer, KV head) in multiples of the largest top-k (`--row-cache`):
    /// 1 keeps exactly the current selection; more also keep rows that recent steps selected,
    /// evicting the least recently selected, so rows that come back are not fetched again.
    pub row_cache: usize,
    /// Page-granular selection (`--page-tokens P`): the top-k is taken in aligned pages of P
    /// consecutive tokens of one KV head (a page's score is its best label score), and a page
    /// is cached and fetched as one unit of P rows (2 KiB at P = 4 for Llama-3.1-8B's 512-B
    /// rows). 1: token-level selection. See [`OffloadConfig::page`].
    pub page_tokens: usize,
}

impl OffloadConfig {
    /// Label channels per KV head.
    pub fn r(&self) -> usize {
        self.channels
            .first()
            .and_then(|l| l.first())
            .map_or(0, |c| c.len())
    }

    /// Bytes of labels per token (every layer and KV head) on the GPU.
    pub fn label_bytes_per_token(&self) -> usize {
        self.channels.len()
            * self.channels.first().map_or(0, |l| l.len())
            * crate::labels::gpu_label_bytes(self.label_bits, self.r())
    }

    /// Rows of the GPU row cache per (layer, KV head): the largest top-k a query can ask for.
    pub fn cache_rows(&self) -> usize {
        self.budget
            .tokens(self.capacity)
            .saturating_sub(self.sink + self.recent)
            .max(1)
    }

    /// Tokens per page (1: token-level selection). With pages, only whole pages of the middle
    /// tokens are candidates (the newest `< P` of them join once their page is complete), a
    /// selection is `top_k / P` pages, and the store raises `recent` so that the sinks and the
    /// ring end on a page boundary of the window.
    pub fn page(&self) -> usize {
        self.page_tokens.max(1)
    }

    /// Tokens a layer's slab has room for per KV head: the capacity, in whole pages.
    pub fn slab_tokens(&self) -> usize {
        self.capacity.max(1).next_multiple_of(self.page())
    }

    /// Selected entries (rows, or pages) of the largest top-k per (layer, KV head).
    pub fn cache_units(&self) -> usize {
        (self.cache_rows() / self.page()).max(1)
    }

    /// Entries the GPU row cache holds per (layer, KV head): `row_cache` times
    /// [`Self::cache_units`].
    pub fn resident_units(&self) -> usize {
        self.cache_units() * self.row_cache.max(1)
    }

    /// Rows the GPU row cache holds per (layer, KV head).
    pub fn resident_rows(&self) -> usize {
        self.resident_units() * self.page()
    }

    /// Top-k size for a query that sees `visible` tokens (0 when everything is in the window).
    pub fn top_k(&self, visible: usize) -> usize {
        let middle = visible.saturating_sub(self.sink + self.recent);
        middle.min(
            self.budget
                .tokens(visible)
                .saturating_sub(self.sink + self.recent),
        )
    }
}
