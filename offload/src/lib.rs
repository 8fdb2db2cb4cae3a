//! farsight-offload: where KV rows live.
//!
//! Every KV cache goes through the [`KvStore`] interface; the forward pass appends the new
//! tokens' K and V rows layer by layer and attention reads them back. [`DenseKvCache`] keeps
//! every layer's rows contiguously in backend memory (the plain cache).

mod dense;
mod pool;
pub mod sparse;
pub mod tier;

pub use dense::DenseKvCache;
pub use pool::{SlotPool, MAX_SLOTS};
pub use sparse::{SparseConfig, SparseKvStore};
#[cfg(target_os = "linux")]
pub use tier::{DiskIo, DiskKvTier, DiskOptions};
pub use tier::{HostKvTier, KvStoreSpec, KvTier, ParseKvStoreSpecError, RowLayout};

use farsight_kernels::{Backend, CausalAttn, Result};

/// A store's footprint now.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct KvMemory {
    /// Where the rows live: `device` (the backend's memory), `host`, `disk:...`.
    pub tier: String,
    /// Bytes of KV rows allocated.
    pub row_bytes: usize,
    /// Bytes of labels allocated (host memory; a GPU build keeps them on the GPU).
    pub label_bytes: usize,
    /// Other bytes the store holds in device memory (the offloaded GPU store's recent windows,
    /// row caches and scratch; 0 for host stores).
    pub device_bytes: usize,
    /// Committed positions (evicted ones included).
    pub positions: usize,
    /// Tokens that own rows.
    pub live_tokens: usize,
    /// The byte budget on rows and labels, if any.
    pub budget_bytes: Option<usize>,
    /// Eviction batches, tokens evicted and the bytes their slots held.
    pub evictions: u64,
    pub evicted_tokens: u64,
    pub bytes_freed: u64,
    /// Sparse stores: step-to-step reuse of the top-k selection (the share of a position's
    /// chosen rows that the previous position also chose; a row cache's hit rate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selection_reuse: Option<f64>,
    /// Sparse stores over the disk with `--row-cache F`: the in-memory row cache's bytes and
    /// hit rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub row_cache_bytes: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub row_cache_hit_rate: Option<f64>,
}

/// A sequence's KV rows, for every layer.
///
/// Protocol per forward call: [`KvStore::reserve`] for the `n` new tokens, then for every layer
/// [`KvStore::write`] their rows (they become readable by that layer's attention at once), then
/// [`KvStore::commit`] once all layers have written. `len()` counts committed tokens only.
pub trait KvStore<B: Backend> {
    /// Committed tokens (rows present in every layer).
    fn len(&self) -> usize;
    /// True when no token is stored.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Makes room for `n` tokens after the committed ones.
    fn reserve(&mut self, backend: &B, n: usize) -> Result<()>;
    /// Writes layer `layer`'s K and V rows for tokens `len() .. len() + n` from rows
    /// `src_row0 ..` of `src` (K at column `k_col0`, V at `v_col0`, each `kv_width` wide).
    #[allow(clippy::too_many_arguments)]
    fn write(
        &mut self,
        backend: &B,
        layer: usize,
        src: &B::Tensor,
        src_row0: usize,
        k_col0: usize,
        v_col0: usize,
        n: usize,
    ) -> Result<()>;
    /// Marks the `n` tokens written to every layer as committed.
    fn commit(&mut self, n: usize);
    /// Forgets every token after the first `len` (keeps the memory).
    fn truncate(&mut self, len: usize);
    /// Attention of new queries over layer `layer`'s stored rows (`args.n_past` committed
    /// tokens plus the `args.n_q` just written). The store decides which rows attention reads
    /// and how they reach the backend; the dense cache reads them all.
    fn attend(
        &self,
        backend: &B,
        layer: usize,
        args: &CausalAttn,
        q: &B::Tensor,
        out: &mut B::Tensor,
    ) -> Result<()>;
    /// Bytes held (capacity, not just the used part).
    fn bytes(&self) -> usize;
    /// Where those bytes are and what eviction did (`farsight report memory`, `--report-memory`).
    fn memory(&self) -> KvMemory {
        KvMemory {
            tier: "device".into(),
            row_bytes: self.bytes(),
            label_bytes: 0,
            positions: self.len(),
            live_tokens: self.len(),
            ..KvMemory::default()
        }
    }
    /// Layer-ahead prediction: the label channels (`[layer][kv_head]`) whose query values the
    /// store wants predicted one layer early, or `None` when it wants no prediction.
    fn ahead_channels(&self) -> Option<&[Vec<Vec<usize>>]> {
        None
    }
    /// Receives layer `layer`'s predicted post-RoPE query values at its label channels for the
    /// `n` new tokens (`n x n_heads x r`, query head `h` using KV head `h / group`'s channels),
    /// made while the previous layer ran. Used by the next [`KvStore::attend`] of that layer.
    fn predict(&mut self, _layer: usize, _q_hat: &[f32], _n: usize) -> Result<()> {
        Ok(())
    }
    /// Layer-ahead on the device: rows `row0 .. row0 + n` of `raw` are this store's tokens' raw
    /// label-row outputs for layer `layer` (per query head `r` values, then their `r` RoPE
    /// partners; `engine/src/ahead.rs`), the first at position `pos0`. A store that rotates and
    /// uses them where they are returns `true` ([`KvStore::predict`] is then not called); the
    /// default returns `false` and the model rotates on the host.
    #[allow(clippy::too_many_arguments)]
    fn predict_raw(
        &mut self,
        _backend: &B,
        _layer: usize,
        _raw: &B::Tensor,
        _row0: usize,
        _n: usize,
        _pos0: u32,
        _rope: &farsight_kernels::Rope,
    ) -> Result<bool> {
        Ok(false)
    }
}
