//! Which KV store a run uses: the dense cache, or Double Sparsity over a tier.

use farsight_kernels::cuda::CudaBackend;
use farsight_kernels::{Backend, DType};
use farsight_offload::sparse::evict::EVICT_EXTENT_SLOTS;
use farsight_offload::sparse::{row_layout, ChannelRanking};
use farsight_offload::{DenseKvCache, KvStore, KvStoreSpec, SparseConfig, SparseKvStore};
use farsight_prefetch::{OffloadConfig, OffloadKvStore, RowHome};

use crate::error::{EngineError, Result};
use crate::model::Model;

/// Double Sparsity settings with the calibrated channel ranking.
#[derive(Clone, Debug)]
pub struct SparseSetup {
    pub cfg: SparseConfig,
    pub ranking: ChannelRanking,
    /// Where the rows live: host memory or a disk file.
    pub store: KvStoreSpec,
    /// Most tokens a sequence will hold, when the run knows it (prompt + new tokens); the
    /// offloaded store sizes its pinned slabs by it (default: the model's context).
    pub capacity: Option<usize>,
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
pub fn new_store<B: Backend + 'static>(
    model: &Model<B>,
    dtype: DType,
    attention: &Attention,
) -> Result<Box<dyn KvStore<B>>> {
    let c = &model.cfg;
    Ok(match attention {
        Attention::Dense => Box::new(DenseKvCache::new(
            &model.backend,
            c.num_layers,
            c.kv_width(),
            dtype,
            c.context_length(),
        )?),
        Attention::DoubleSparse(s) => {
            let any: &dyn std::any::Any = &model.backend;
            if let Some(cuda) = any.downcast_ref::<CudaBackend>() {
                // On the GPU: the offloaded store (rows in pinned host memory).
                let store: Box<dyn KvStore<CudaBackend>> =
                    Box::new(new_offload_store(model, cuda, dtype, s)?);
                let boxed: Box<dyn std::any::Any> = Box::new(store);
                return Ok(*boxed
                    .downcast::<Box<dyn KvStore<B>>>()
                    .expect("B is CudaBackend here"));
            }
            Box::new(new_sparse_store(model, dtype, s)?)
        }
    })
}

/// The offloaded Double Sparsity store (`farsight-prefetch`) for a model on the GPU: the full
/// KV in pinned host memory (or a file with `--kv-store disk:PATH`), labels and a row cache on
/// the GPU. Settings it does not implement are refused by name.
pub fn new_offload_store<B: Backend>(
    model: &Model<B>,
    cuda: &CudaBackend,
    dtype: DType,
    s: &SparseSetup,
) -> Result<OffloadKvStore> {
    let c = &model.cfg;
    let refuse = |what: &str| {
        Err(EngineError::Unsupported(format!(
            "{what} with --device cuda and --attention double-sparse (the offloaded store)"
        )))
    };
    if !s.cfg.dense_layers.is_empty() {
        return refuse("--dense-layers");
    }
    if s.cfg.evict.is_some() {
        return refuse("--host-kv-budget");
    }
    if s.cfg.page_tokens > 1 && matches!(s.store, KvStoreSpec::Disk(_)) {
        return refuse("--page-tokens with --kv-store disk");
    }
    if s.cfg.sparse_prefill {
        return refuse("per-position sparse evaluation (eval ppl/sweep)");
    }
    let channels = s.ranking.top(
        s.cfg.label_channels,
        c.num_layers,
        c.num_kv_heads,
        c.head_dim,
    )?;
    let cfg = OffloadConfig {
        budget: s.cfg.budget,
        sink: s.cfg.sink,
        recent: s.cfg.recent.max(1),
        channels,
        label_bits: s.cfg.label_bits,
        predict: s.cfg.predict,
        dtype,
        capacity: s.capacity.unwrap_or_else(|| c.context_length()),
        home: RowHome::Host,
        measure_recall: false,
        row_cache: s.cfg.row_cache.max(1),
        page_tokens: s.cfg.page_tokens.max(1),
    };
    Ok(match &s.store {
        KvStoreSpec::Host => OffloadKvStore::new(cuda, cfg, model.attn_shape(), c.num_layers)?,
        KvStoreSpec::Disk(path) => {
            OffloadKvStore::new_on_disk(cuda, cfg, model.attn_shape(), c.num_layers, path)?
        }
    })
}

/// A sparse store for one sequence of `model` (typed, for callers that read its statistics).
pub fn new_sparse_store<B: Backend>(
    model: &Model<B>,
    dtype: DType,
    s: &SparseSetup,
) -> Result<SparseKvStore> {
    let c = &model.cfg;
    let shape = model.attn_shape();
    let mut layout = row_layout(c.num_layers, &shape, dtype);
    if s.cfg.evict.is_some() {
        layout.extent_slots = EVICT_EXTENT_SLOTS;
    }
    let tier = s.store.open(layout)?;
    Ok(SparseKvStore::new(
        s.cfg.clone(),
        shape,
        c.num_layers,
        dtype,
        &s.ranking,
        tier,
        c.context_length(),
    )?)
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
