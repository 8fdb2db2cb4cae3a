//! Making an [`OffloadKvStore`] (host, device or disk rows) and resizing its row caches for
//! another token budget.

use std::path::Path;
use std::sync::Mutex;

use farsight_kernels::cuda::{CudaBackend, Residency};
use farsight_kernels::{AttnShape, Backend, DType, Result};
use farsight_offload::sparse::{page_recent, LabelBits, MAX_PAGE_TOKENS};

use super::{bad, ordinals, DiskRows, DiskTier, LayerRows, OffloadKvStore, Select, Slab, State};
use crate::config::{OffloadConfig, RowHome};
use crate::labels::GpuLabels;

impl OffloadKvStore {
    /// A store for one sequence of up to `cfg.capacity` tokens of a model of `layers` layers,
    /// its rows in host or device memory (`cfg.home`).
    pub fn new(
        be: &CudaBackend,
        cfg: OffloadConfig,
        shape: AttnShape,
        layers: usize,
    ) -> Result<OffloadKvStore> {
        if cfg.home == RowHome::Disk {
            return Err(bad(
                "a disk-tier store needs its file: OffloadKvStore::new_on_disk".into(),
            ));
        }
        Self::build(be, cfg, shape, layers, None)
    }

    /// A store whose full rows live in a file at `path` (or a new file in the directory
    /// `path`; removed when the store is dropped), allocated for `cfg.capacity` tokens now.
    pub fn new_on_disk(
        be: &CudaBackend,
        mut cfg: OffloadConfig,
        shape: AttnShape,
        layers: usize,
        path: &Path,
    ) -> Result<OffloadKvStore> {
        cfg.home = RowHome::Disk;
        Self::build(be, cfg, shape, layers, Some(path))
    }

    fn build(
        be: &CudaBackend,
        mut cfg: OffloadConfig,
        shape: AttnShape,
        layers: usize,
        disk_path: Option<&Path>,
    ) -> Result<OffloadKvStore> {
        let (n_kv, d) = (shape.n_kv_heads, shape.head_dim);
        let r = cfg.r();
        if cfg.channels.len() != layers
            || cfg.channels.iter().any(|l| {
                l.len() != n_kv || l.iter().any(|c| c.len() != r || c.iter().any(|&x| x >= d))
            })
        {
            return Err(bad(format!(
                "label channels do not fit {layers} layers x {n_kv} KV heads x D {d}"
            )));
        }
        if r == 0 || r > farsight_kernels::cuda::DS_MAX_R {
            return Err(bad(format!(
                "{r} label channels: 1 to {} supported",
                farsight_kernels::cuda::DS_MAX_R
            )));
        }
        if cfg.label_bits == LabelBits::B4 && d < 16 {
            return Err(bad(format!(
                "4-bit labels on the GPU need a head dim of at least 16, not {d}"
            )));
        }
        if cfg.recent == 0 {
            return Err(bad("the offloaded store needs a recent window of at least 1 token (the token being decoded)".into()));
        }
        let page = cfg.page();
        if page > 1 {
            if disk_path.is_some() {
                return Err(bad(
                    "page-granular selection (--page-tokens) with the disk tier is not supported"
                        .into(),
                ));
            }
            if page > MAX_PAGE_TOKENS {
                return Err(bad(format!(
                    "pages of {page} tokens: 1 to {MAX_PAGE_TOKENS} supported"
                )));
            }
            // The cache starts on a page boundary of the window: a few more recent tokens.
            cfg.recent = page_recent(cfg.sink, cfg.recent, page);
        }
        if !matches!(cfg.dtype, DType::F16 | DType::BF16) {
            return Err(bad(
                "the offloaded store keeps f16 or bf16 rows (--kv-dtype f16|bf16)".into(),
            ));
        }
        if shape.window.is_some() {
            return Err(bad(
                "sliding-window attention is not supported by the offloaded store".into(),
            ));
        }
        let es = cfg.dtype.size();
        let cap = cfg.capacity.max(1);
        let cache_units = cfg.cache_units();
        let rc = cfg.resident_rows();
        let w = cfg.sink + cfg.recent + rc;
        // With pages the slab is `[g][token]`, whole pages per head.
        let slab_bytes = cfg.slab_tokens() * n_kv * 2 * d * es;
        let row = 2 * d * es;
        // The file first: a disk too small fails before any large allocation.
        let disk = match disk_path {
            Some(p) => Some(DiskTier {
                rows: DiskRows::create(p, layers, n_kv, row, cap)?,
                pending_cap: 1,
                pending_t0: 0,
                ordinal: be.dev_upload(&ordinals(n_kv, rc))?,
                failed: None,
            }),
            None => None,
        };
        let mut rows = Vec::with_capacity(layers);
        for l in 0..layers {
            let (slab, slab_ptr) = match cfg.home {
                RowHome::Host => {
                    let p = be.pinned(slab_bytes)?;
                    let ptr = p.ptr()?;
                    (Slab::Host(p), ptr)
                }
                RowHome::Device => {
                    let b = be.dev_zeros::<u8>(slab_bytes)?;
                    let ptr = be.dev_ptr(&b);
                    (Slab::Device(b), ptr)
                }
                RowHome::Disk => {
                    let p = be.pinned(n_kv * row)?;
                    let ptr = p.ptr()?;
                    (Slab::Pending(p), ptr)
                }
            };
            let chan: Vec<i32> = cfg.channels[l]
                .iter()
                .flatten()
                .map(|&c| c as i32)
                .collect();
            let window = be.dev_zeros::<u8>(n_kv * w * 2 * d * es)?;
            let window_ptr = be.dev_ptr(&window);
            rows.push(LayerRows {
                slab,
                slab_ptr,
                labels: GpuLabels::new(be, cfg.label_bits, n_kv, cap, r)?,
                chan: be.dev_upload(&chan)?,
                window,
                window_ptr,
            });
        }
        let stage_row = if disk.is_some() { row } else { 0 };
        let select =
            |b: &CudaBackend| Select::new(b, n_kv, (cap, page), cache_units, rc, stage_row);
        // The compute stream waits on the prefetch chain (scores, top-k, residency, gather) of
        // the next layer, so its stream gets the higher priority (`FARSIGHT_PREFETCH_PRIORITY=
        // normal` for comparisons).
        let high = std::env::var("FARSIGHT_PREFETCH_PRIORITY").map_or(true, |v| v != "normal");
        let prefetch = be.sibling_with_priority(high)?;
        let st = State {
            res: (0..layers)
                .map(|_| residency(be, &cfg, n_kv))
                .collect::<Result<_>>()?,
            ready: (0..layers).map(|_| None).collect(),
            compute: select(be)?,
            ahead: select(&prefetch)?,
            q_hat: [
                be.tensor(1, shape.q_width())?,
                be.tensor(1, shape.q_width())?,
            ],
            inv_freq: None,
            res_stats: be.dev_zeros(2)?,
            recall_stats: be.dev_zeros(2)?,
            staging: None,
            past_rows: None,
            staged: None,
            timing: None,
            written: 0,
            staged_bytes: 0,
        };
        be.synchronize()?;
        Ok(OffloadKvStore {
            cfg,
            shape,
            layers: rows,
            prefetch,
            kc: cache_units,
            len: 0,
            st: Mutex::new(st),
            disk,
        })
    }

    /// Another token budget (benchmarks sweep budgets over one filled context): the row caches
    /// are resized for it and start empty; the sinks and recent ring are kept.
    pub fn set_budget(
        &mut self,
        be: &CudaBackend,
        budget: farsight_offload::sparse::TokenBudget,
    ) -> Result<()> {
        self.set_budget_and_cache(be, budget, self.cfg.row_cache)
    }

    /// [`Self::set_budget`] with a row cache of `row_cache` times the largest top-k
    /// ([`OffloadConfig::row_cache`]).
    pub fn set_budget_and_cache(
        &mut self,
        be: &CudaBackend,
        budget: farsight_offload::sparse::TokenBudget,
        row_cache: usize,
    ) -> Result<()> {
        if row_cache == 0 {
            return Err(bad("a row cache of 0 times the top-k".into()));
        }
        self.prefetch.synchronize()?;
        be.synchronize()?;
        let old_w = self.window_rows();
        self.cfg.budget = budget;
        self.cfg.row_cache = row_cache;
        let kc = self.cfg.cache_units();
        let rc = self.cfg.resident_rows();
        let (n_kv, d, es) = (
            self.shape.n_kv_heads,
            self.shape.head_dim,
            self.cfg.dtype.size(),
        );
        let fixed = self.cfg.sink + self.cfg.recent;
        let new_w = fixed + rc;
        let row = 2 * d * es;
        for lay in self.layers.iter_mut() {
            let window = be.dev_zeros::<u8>(n_kv * new_w * row)?;
            let ptr = be.dev_ptr(&window);
            for g in 0..n_kv {
                be.copy_ptr(
                    ptr + (g * new_w * row) as u64,
                    lay.window_ptr + (g * old_w * row) as u64,
                    fixed * row,
                )?;
            }
            be.synchronize()?;
            lay.window = window;
            lay.window_ptr = ptr;
        }
        let st = self.st.get_mut().unwrap_or_else(|p| p.into_inner());
        for res in st.res.iter_mut() {
            *res = residency(be, &self.cfg, n_kv)?;
        }
        for r in st.ready.iter_mut() {
            *r = None;
        }
        let cap = self.cfg.capacity.max(1);
        let stage_row = if self.disk.is_some() { row } else { 0 };
        let page = self.cfg.page();
        st.compute = Select::new(be, n_kv, (cap, page), kc, rc, stage_row)?;
        st.ahead = Select::new(&self.prefetch, n_kv, (cap, page), kc, rc, stage_row)?;
        if let Some(disk) = &mut self.disk {
            disk.ordinal = be.dev_upload(&ordinals(n_kv, rc))?;
        }
        self.kc = kc;
        be.synchronize()?;
        self.prefetch.synchronize()
    }
}

/// One layer's residency state: the row cache holds exactly the current selection
/// (`row_cache` 1), or `row_cache` times as many entries (rows, or pages), least recently
/// selected evicted first.
fn residency(be: &CudaBackend, cfg: &OffloadConfig, n_kv: usize) -> Result<Residency> {
    if cfg.row_cache <= 1 {
        be.ds_residency_state(n_kv, cfg.cache_units())
    } else {
        be.ds_residency_lru_state(
            n_kv,
            cfg.resident_units(),
            cfg.cache_units(),
            cfg.sink + cfg.recent,
            cfg.page(),
        )
    }
}
