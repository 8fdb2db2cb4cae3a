//! Which KV store a run uses: the dense cache, or Double Sparsity over a tier.

use farsight_kernels::{Backend, DType};
use farsight_offload::sparse::evict::EVICT_EXTENT_SLOTS;
use farsight_offload::sparse::{row_layout, ChannelRanking};
use farsight_offload::{DenseKvCache, KvStore, KvStoreSpec, SparseConfig, SparseKvStore};

use crate::error::Result;
use crate::model::Model;

/// Double Sparsity settings with the calibrated channel ranking.
#[derive(Clone, Debug)]
pub struct SparseSetup {
    pub cfg: SparseConfig,
    pub ranking: ChannelRanking,
    /// Where the rows live: host memory or a disk file.
    pub store: KvStoreSpec,
}

/// The attention a run uses.
#[derive(Clone, Debug, Default)]
pub enum Attention {
    /// Every row, from a dense cache in backend memory.
    #[default]
    Dense,
    /// Double Sparsity decode over a KV tier.
    DoubleSparse(Box<SparseSetup>),
}

impl Attention {
    /// Short description for the settings line of a report.
    pub fn describe(&self) -> String {
        match self {
            Attention::Dense => "dense".into(),
            Attention::DoubleSparse(s) => format!("{} store {}", s.cfg, s.store),
        }
    }

    /// The same attention with multi-token calls selecting rows per query (teacher-forced
    /// evaluation: every position attends as decode would).
    pub fn per_position(&self) -> Attention {
        match self {
            Attention::Dense => Attention::Dense,
            Attention::DoubleSparse(s) => {
                let mut s = s.clone();
                s.cfg.sparse_prefill = true;
                Attention::DoubleSparse(s)
            }
        }
    }
}

/// A store for one sequence of `model`.
pub fn new_store<B: Backend + 'static>(model: &Model<B>, dtype: DType, attention: &Attention) -> Result<Box<dyn KvStore<B>>> {
    let c = &model.cfg;
    Ok(match attention {
        Attention::Dense => {
            Box::new(DenseKvCache::new(&model.backend, c.num_layers, c.kv_width(), dtype, c.context_length())?)
        }
        Attention::DoubleSparse(s) => Box::new(new_sparse_store(model, dtype, s)?),
    })
}

/// A sparse store for one sequence of `model` (typed, for callers that read its statistics).
pub fn new_sparse_store<B: Backend>(model: &Model<B>, dtype: DType, s: &SparseSetup) -> Result<SparseKvStore> {
    let c = &model.cfg;
    let shape = model.attn_shape();
    let mut layout = row_layout(c.num_layers, &shape, dtype);
    if s.cfg.evict.is_some() {
        layout.extent_slots = EVICT_EXTENT_SLOTS;
    }
    let tier = s.store.open(layout)?;
    Ok(SparseKvStore::new(s.cfg.clone(), shape, c.num_layers, dtype, &s.ranking, tier, c.context_length())?)
}

/// Bytes a dense cache holds for `tokens` tokens of `cfg` in `dtype` (the "full KV" that budget
/// ratios and compression ratios refer to).
pub fn full_kv_bytes(cfg: &crate::ModelConfig, dtype: DType, tokens: usize) -> usize {
    tokens * cfg.num_layers * 2 * cfg.kv_width() * dtype.size()
}

/// Bytes of labels per token of a sparse store with these settings.
pub fn label_bytes_per_token(cfg: &crate::ModelConfig, s: &SparseConfig) -> usize {
    let per_head = match s.label_bits {
        farsight_offload::sparse::LabelBits::B16 => 2 * s.label_channels,
        farsight_offload::sparse::LabelBits::B4 => 4 + s.label_channels.div_ceil(2),
    };
    cfg.num_layers * cfg.num_kv_heads * per_head
}
