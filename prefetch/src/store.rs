//! [`OffloadKvStore`]: Double Sparsity decode with the full KV off the GPU (ALGORITHMS.md
//! sections 1-2).
//!
//! Per layer the store keeps:
//! - the full rows in a slab of pinned host memory (`[token][KV head][K | V]`, 16-bit; or device
//!   memory for the on-GPU reference, [`RowHome::Device`]);
//! - on the GPU, the label cache (f16 `[KV head][token][r]` or 4-bit, [`crate::GpuLabels`]) and
//!   a window buffer per KV head of `sink + recent + cache_rows` rows: the sinks, a ring of the
//!   recent tokens, and the row cache that holds the current top-k selection.
//!
//! New rows (every forward call, every layer) are written by one kernel straight into the host
//! slab (zero-copy stores over PCIe), the ring and the label cache. A decode query selects the
//! top-k of the middle tokens (neither sinks nor recent) by label score; differential residency
//! (`ds_residency`) keeps the rows already cached and lists the misses, and only the misses cross
//! PCIe (`ds_gather_misses`); attention reads the window buffer. With layer-ahead prediction the
//! selection of layer `l + 1` runs on the prefetch stream while layer `l` computes, from query
//! labels predicted from layer `l`'s input; the compute stream waits on its event, never the host.
//!
//! Ordering between the streams: every forward call records an event on the compute stream in
//! `reserve` and the prefetch stream waits on it before any prediction of that call, so rows and
//! labels written by earlier calls (the newest token's included) are visible to the prediction;
//! the token being decoded is always in the recent ring (`recent >= 1`), never predicted.
//! Prefill (multi-token calls) attends densely: the layer's past rows are unpacked from the slab
//! into a device staging buffer (on the prefetch stream for layer `l + 1` while layer `l` runs).

use std::path::Path;
use std::sync::Mutex;

use farsight_kernels::cuda::{
    CudaBackend, CudaCache, CudaTensor, DevBuf, KvRows, PinnedBuf, Residency, RowSlab, StreamEvent,
    TopkScratch,
};
use farsight_kernels::{AttnShape, Backend, CausalAttn, DType, KernelError, Result, Rope};
use farsight_offload::sparse::{LabelBits, Predict};
use farsight_offload::{KvMemory, KvStore};

use crate::config::{OffloadConfig, RowHome};
use crate::labels::GpuLabels;

mod disk;
mod fill;

use disk::DiskRows;

/// A layer's full rows; for the disk tier, the pinned buffer the current call's new rows are
/// written to before they go to the file.
enum Slab {
    Host(PinnedBuf),
    Device(DevBuf<u8>),
    Pending(PinnedBuf),
}

/// The disk tier's state (see `store/disk.rs`).
struct DiskTier {
    rows: DiskRows,
    /// Tokens each layer's pending buffer has room for, and the first token it holds.
    pending_cap: usize,
    pending_t0: usize,
    /// `[g][m] = m`: the gather's source index into a selection's staging.
    ordinal: DevBuf<i32>,
    /// A write-out that failed in `commit` (which cannot return it), for the next call.
    failed: Option<KernelError>,
}

struct LayerRows {
    slab: Slab,
    slab_ptr: u64,
    labels: GpuLabels,
    chan: DevBuf<i32>,
    window: DevBuf<u8>,
    window_ptr: u64,
}

/// Selection scratch of one stream.
struct Select {
    scores: DevBuf<f32>,
    sel: DevBuf<i32>,
    topk: TopkScratch,
    /// Disk tier: the misses' rows read from the file (`[g][cache row][row]`, pinned).
    stage: Option<PinnedBuf>,
}

impl Select {
    /// Scratch on `b`'s stream for `n_kv` heads of `cap` scores and `kc` selected rows of
    /// `stage_row` bytes staged (0: no staging).
    fn new(
        b: &CudaBackend,
        n_kv: usize,
        cap: usize,
        kc: usize,
        stage_row: usize,
    ) -> Result<Select> {
        Ok(Select {
            scores: b.dev_zeros(n_kv * cap)?,
            sel: b.dev_zeros(n_kv * kc)?,
            topk: b.ds_topk_scratch(n_kv, cap)?,
            stage: if stage_row > 0 {
                Some(b.pinned(n_kv * kc * stage_row)?)
            } else {
                None
            },
        })
    }
}

/// What the offloaded decode did, summed over the store's life.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct OffloadStats {
    /// Selected rows that had to be fetched, and those already in the row cache.
    pub misses: u64,
    pub hits: u64,
    /// Layer-ahead recall: predicted rows also in the true selection, out of the selected rows.
    pub recall_hits: u64,
    pub recall_total: u64,
    /// Bytes read over PCIe for selected rows (misses x row bytes).
    pub fetched_bytes: u64,
    /// Bytes of new rows written to the host slabs.
    pub written_bytes: u64,
    /// Bytes unpacked from the slabs into the prefill staging buffers.
    pub staged_bytes: u64,
}

impl OffloadStats {
    /// Hit rate of the row cache.
    pub fn hit_rate(&self) -> f64 {
        self.hits as f64 / (self.hits + self.misses).max(1) as f64
    }
    /// Layer-ahead recall (1 when not measured).
    pub fn recall(&self) -> f64 {
        if self.recall_total == 0 {
            1.0
        } else {
            self.recall_hits as f64 / self.recall_total as f64
        }
    }
}

struct State {
    res: Vec<Residency>,
    /// Layer-ahead: the selection for layer `l` was made for `visible` tokens; attention waits on
    /// the event.
    ready: Vec<Option<(usize, StreamEvent)>>,
    compute: Select,
    ahead: Select,
    /// Predicted query labels (full query width, label channels filled), by layer parity.
    q_hat: [CudaTensor; 2],
    inv_freq: Option<(Vec<f32>, DevBuf<f32>)>,
    res_stats: DevBuf<u64>,
    recall_stats: DevBuf<u64>,
    /// Prefill staging (K, V caches) by layer parity, and the layer staged ahead.
    staging: Option<Vec<(CudaCache, CudaCache)>>,
    /// Disk tier: a layer's past rows read from the file for prefill (slab layout, pinned).
    past_rows: Option<PinnedBuf>,
    staged: Option<(usize, usize, StreamEvent)>,
    written: u64,
    staged_bytes: u64,
}

/// Double Sparsity decode over rows in pinned host memory, with a GPU row cache (see the module
/// documentation).
pub struct OffloadKvStore {
    cfg: OffloadConfig,
    shape: AttnShape,
    layers: Vec<LayerRows>,
    /// The prefetch stream (a sibling backend of the model's).
    prefetch: CudaBackend,
    /// Rows of the row cache per (layer, KV head), as allocated.
    kc: usize,
    len: usize,
    st: Mutex<State>,
    disk: Option<DiskTier>,
}

fn bad(msg: String) -> KernelError {
    KernelError::Shape(msg)
}

/// `[g][m] = m` for `n_kv` heads of `k` entries.
fn ordinals(n_kv: usize, k: usize) -> Vec<i32> {
    (0..n_kv).flat_map(|_| 0..k.max(1) as i32).collect()
}

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
        cfg: OffloadConfig,
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
        let cache_rows = cfg.cache_rows();
        let w = cfg.sink + cfg.recent + cache_rows;
        let slab_bytes = cap * n_kv * 2 * d * es;
        let row = 2 * d * es;
        // The file first: a disk too small fails before any large allocation.
        let disk = match disk_path {
            Some(p) => Some(DiskTier {
                rows: DiskRows::create(p, layers, n_kv, row, cap)?,
                pending_cap: 1,
                pending_t0: 0,
                ordinal: be.dev_upload(&ordinals(n_kv, cache_rows))?,
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
        let select = |b: &CudaBackend| Select::new(b, n_kv, cap, cache_rows, stage_row);
        // The compute stream waits on the prefetch chain (scores, top-k, residency, gather) of
        // the next layer, so its stream gets the higher priority (`FARSIGHT_PREFETCH_PRIORITY=
        // normal` for comparisons).
        let high = std::env::var("FARSIGHT_PREFETCH_PRIORITY").map_or(true, |v| v != "normal");
        let prefetch = be.sibling_with_priority(high)?;
        let st = State {
            res: (0..layers)
                .map(|_| be.ds_residency_state(n_kv, cache_rows))
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
            written: 0,
            staged_bytes: 0,
        };
        be.synchronize()?;
        Ok(OffloadKvStore {
            cfg,
            shape,
            layers: rows,
            prefetch,
            kc: cache_rows,
            len: 0,
            st: Mutex::new(st),
            disk,
        })
    }

    pub fn config(&self) -> &OffloadConfig {
        &self.cfg
    }

    fn row_bytes(&self) -> usize {
        2 * self.shape.head_dim * self.cfg.dtype.size()
    }

    /// Bytes of one token's rows in one layer (every KV head).
    fn token_bytes(&self) -> usize {
        self.shape.n_kv_heads * self.row_bytes()
    }

    fn window_rows(&self) -> usize {
        self.cfg.sink + self.cfg.recent + self.kc
    }

    /// Top-k size for a query that sees `visible` tokens.
    fn top_k(&self, visible: usize) -> usize {
        self.cfg.top_k(visible).min(self.kc)
    }

    /// Another token budget (benchmarks sweep budgets over one filled context): the row caches
    /// are resized for it and start empty; the sinks and recent ring are kept.
    pub fn set_budget(
        &mut self,
        be: &CudaBackend,
        budget: farsight_offload::sparse::TokenBudget,
    ) -> Result<()> {
        self.prefetch.synchronize()?;
        be.synchronize()?;
        self.cfg.budget = budget;
        let kc = self.cfg.cache_rows();
        let (n_kv, d, es) = (
            self.shape.n_kv_heads,
            self.shape.head_dim,
            self.cfg.dtype.size(),
        );
        let fixed = self.cfg.sink + self.cfg.recent;
        let (old_w, new_w) = (fixed + self.kc, fixed + kc);
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
            *res = be.ds_residency_state(n_kv, kc)?;
        }
        for r in st.ready.iter_mut() {
            *r = None;
        }
        let cap = self.cfg.capacity.max(1);
        let stage_row = if self.disk.is_some() { row } else { 0 };
        st.compute = Select::new(be, n_kv, cap, kc, stage_row)?;
        st.ahead = Select::new(&self.prefetch, n_kv, cap, kc, stage_row)?;
        if let Some(disk) = &mut self.disk {
            disk.ordinal = be.dev_upload(&ordinals(n_kv, kc))?;
        }
        self.kc = kc;
        be.synchronize()?;
        self.prefetch.synchronize()
    }

    /// Counts layer-ahead recall (a second, true selection per layer) from now on, or not.
    pub fn set_measure_recall(&mut self, on: bool) {
        self.cfg.measure_recall = on;
    }

    /// Where layer `l`'s new rows are written (token `t` at `ptr + t * tok_stride` elements):
    /// the slab, or for the disk tier the pending buffer, its first token at `pending_t0`.
    fn slab(&self, l: usize) -> RowSlab {
        let (n_kv, d) = (self.shape.n_kv_heads, self.shape.head_dim);
        let shift = self
            .disk
            .as_ref()
            .map_or(0, |t| t.pending_t0 * self.token_bytes());
        RowSlab {
            ptr: self.layers[l].slab_ptr.wrapping_sub(shift as u64),
            tok_stride: n_kv * 2 * d,
            head_stride: 2 * d,
            dtype: self.cfg.dtype,
        }
    }

    fn window(&self, l: usize) -> RowSlab {
        let d = self.shape.head_dim;
        RowSlab {
            ptr: self.layers[l].window_ptr,
            tok_stride: 2 * d,
            head_stride: self.window_rows() * 2 * d,
            dtype: self.cfg.dtype,
        }
    }

    /// Counters so far (synchronizes both streams).
    pub fn stats(&self, be: &CudaBackend) -> Result<OffloadStats> {
        self.prefetch.synchronize()?;
        let st = self.st.lock().unwrap_or_else(|p| p.into_inner());
        let r = be.dev_read(&st.res_stats)?;
        let c = be.dev_read(&st.recall_stats)?;
        Ok(OffloadStats {
            misses: r[0],
            hits: r[1],
            recall_hits: c[0],
            recall_total: c[1],
            fetched_bytes: r[0] * self.row_bytes() as u64,
            written_bytes: st.written,
            staged_bytes: st.staged_bytes,
        })
    }

    /// What backs the host slabs (`None` with the rows on the device).
    pub fn host_pages(&self) -> Option<farsight_kernels::cuda::PinnedKind> {
        self.layers.iter().find_map(|l| match &l.slab {
            Slab::Host(p) => Some(p.kind()),
            Slab::Device(_) | Slab::Pending(_) => None,
        })
    }

    /// Bytes of the disk tier's file (0 for the other homes).
    pub fn disk_bytes(&self) -> usize {
        self.disk.as_ref().map_or(0, |t| t.rows.bytes())
    }

    /// Bytes on the GPU (labels, windows and row caches, residency, scratch, staging) and in
    /// pinned host memory (the slabs; for the disk tier its pending and staging buffers).
    pub fn footprint(&self) -> (usize, usize) {
        let st = self.st.lock().unwrap_or_else(|p| p.into_inner());
        let mut gpu = 0;
        let mut host = 0;
        for l in &self.layers {
            gpu += l.labels.bytes() + l.chan.len * 4 + l.window.len;
            match &l.slab {
                Slab::Host(p) | Slab::Pending(p) => host += p.len(),
                Slab::Device(b) => gpu += b.len,
            }
        }
        for sel in [&st.compute, &st.ahead] {
            host += sel.stage.as_ref().map_or(0, |p| p.len());
        }
        host += st.past_rows.as_ref().map_or(0, |p| p.len());
        gpu += st.res.iter().map(|r| 5 * r.tok.len * 4).sum::<usize>();
        gpu += 2 * (st.compute.scores.len * 4 + st.compute.sel.len * 4);
        if let Some(s) = &st.staging {
            gpu += s
                .iter()
                .map(|(k, v)| (k.capacity * k.cols + v.capacity * v.cols) * 2)
                .sum::<usize>();
        }
        (gpu, host)
    }

    /// Selects layer `l`'s rows for a query seeing `visible` tokens on `be`'s stream, with the
    /// query `q` (row `q_row`, full width, label channels used), and brings the misses into the
    /// row cache. Returns the top-k size.
    #[allow(clippy::too_many_arguments)]
    fn select(
        &self,
        be: &CudaBackend,
        sel: &mut Select,
        res: &mut Residency,
        stats: &mut DevBuf<u64>,
        l: usize,
        q: &CudaTensor,
        q_row: usize,
        visible: usize,
        gather: bool,
    ) -> Result<usize> {
        let (n_kv, d) = (self.shape.n_kv_heads, self.shape.head_dim);
        let k = self.top_k(visible).max(res.k).min(self.kc);
        if k == 0 {
            return Ok(0);
        }
        let (s, middle) = (self.cfg.sink, visible - self.cfg.sink - self.cfg.recent);
        let lay = &self.layers[l];
        lay.labels.scores(
            be,
            q,
            q_row,
            &lay.chan,
            self.shape.group(),
            d,
            s,
            s + middle,
            &mut sel.scores,
        )?;
        let kc = self.kc;
        be.ds_topk(
            &sel.scores,
            n_kv,
            middle,
            k,
            s,
            &mut sel.sel,
            kc,
            0,
            &mut sel.topk,
        )?;
        be.ds_residency(&sel.sel, kc, n_kv, k, res, stats)?;
        if !gather {
            return Ok(k);
        }
        let es = self.cfg.dtype.size();
        let rb = self.row_bytes();
        if let Some(disk) = &self.disk {
            // The host reads the misses' rows from the file into this stream's staging (its
            // last gather from there finished: `dev_read` waits for the stream).
            let n_miss = be.dev_read(&res.n_miss)?;
            let miss_tok = be.dev_read(&res.miss_tok)?;
            let stage = sel
                .stage
                .as_mut()
                .ok_or_else(|| bad("disk tier without staging".into()))?;
            disk.rows
                .load_misses(l, &miss_tok, &n_miss, res.cap, stage.as_mut_slice()?)?;
            return be
                .ds_gather_misses_at(
                    true,
                    stage.ptr()?,
                    rb,
                    res.cap * rb,
                    res,
                    &disk.ordinal,
                    n_kv,
                    rb,
                    lay.window_ptr,
                    self.window_rows(),
                    s + self.cfg.recent,
                )
                .map(|_| k);
        }
        be.ds_gather_misses(
            self.cfg.home != RowHome::Device,
            lay.slab_ptr,
            n_kv * 2 * d * es,
            2 * d * es,
            res,
            n_kv,
            rb,
            lay.window_ptr,
            self.window_rows(),
            s + self.cfg.recent,
        )?;
        Ok(k)
    }

    /// Dense attention of a prefill chunk over layer `l`'s rows, staged on the device.
    fn attend_prefill(
        &self,
        be: &CudaBackend,
        st: &mut State,
        l: usize,
        args: &CausalAttn,
        q: &CudaTensor,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let (n_kv, d) = (self.shape.n_kv_heads, self.shape.head_dim);
        let total = args.n_past + args.n_q;
        if st
            .staging
            .as_ref()
            .map_or(true, |s| s[0].0.capacity < total)
        {
            st.staged = None;
            st.staging = None;
            let cap = self.cfg.capacity.max(total);
            let mut v = Vec::with_capacity(2);
            for _ in 0..2 {
                v.push((
                    be.cache(cap, n_kv * d, self.cfg.dtype)?,
                    be.cache(cap, n_kv * d, self.cfg.dtype)?,
                ));
            }
            st.staging = Some(v);
        }
        let parity = l % 2;
        if let Some(disk) = &self.disk {
            // Past rows from the file (through pinned memory whose last reader, the previous
            // layer's unpack, must be done first), this call's rows from the pending buffer.
            let tb = self.token_bytes();
            be.synchronize()?;
            let need = (args.n_past * tb).max(1);
            if st.past_rows.as_ref().is_none_or(|p| p.len() < need) {
                st.past_rows = None;
                st.past_rows = Some(be.pinned(need)?);
            }
            let past = st.past_rows.as_mut().expect("allocated above");
            let toks: Vec<u32> = (0..args.n_past as u32).collect();
            disk.rows
                .load_tokens(l, &toks, &mut past.as_mut_slice()?[..args.n_past * tb])?;
            let past_ptr = past.ptr()?;
            let pending = self.layers[l]
                .slab_ptr
                .wrapping_sub((args.n_past * tb) as u64);
            let (k, v) = &mut st.staging.as_mut().expect("allocated above")[parity];
            be.ds_unpack_rows(past_ptr, n_kv, d, 0, args.n_past, k, v)?;
            be.ds_unpack_rows(pending, n_kv, d, args.n_past, total, k, v)?;
            st.staged_bytes += (total * tb) as u64;
            let (k, v) = &st.staging.as_ref().expect("allocated above")[parity];
            return be.attention(args, q, k, v, out);
        }
        // The past rows: staged ahead on the prefetch stream, or now.
        let ahead = st.staged.take();
        let from = match ahead {
            Some((sl, upto, ev)) if sl == l && upto <= args.n_past => {
                be.wait(&ev)?;
                upto
            }
            _ => 0,
        };
        let ptr = self.layers[l].slab_ptr;
        {
            let (k, v) = &mut st.staging.as_mut().expect("allocated above")[parity];
            be.ds_unpack_rows(ptr, n_kv, d, from, total, k, v)?;
        }
        st.staged_bytes += ((total - from) * n_kv * 2 * d * self.cfg.dtype.size()) as u64;
        // Stage layer l + 1's past rows on the prefetch stream while this layer runs: its
        // buffer was last read by layer l - 1's attention, queued before this point.
        if l + 1 < self.layers.len() && args.n_past > 0 {
            let before = be.record()?;
            self.prefetch.wait(&before)?;
            let (k, v) = &mut st.staging.as_mut().expect("allocated above")[1 - parity];
            self.prefetch.ds_unpack_rows(
                self.layers[l + 1].slab_ptr,
                n_kv,
                d,
                0,
                args.n_past,
                k,
                v,
            )?;
            st.staged_bytes += (args.n_past * n_kv * 2 * d * self.cfg.dtype.size()) as u64;
            st.staged = Some((l + 1, args.n_past, self.prefetch.record()?));
        }
        let (k, v) = &st.staging.as_ref().expect("allocated above")[parity];
        be.attention(args, q, k, v, out)
    }
}

impl KvStore<CudaBackend> for OffloadKvStore {
    fn len(&self) -> usize {
        self.len
    }

    fn reserve(&mut self, be: &CudaBackend, n: usize) -> Result<()> {
        if self.len + n > self.cfg.capacity {
            return Err(bad(format!(
                "{} tokens exceed the offloaded store's capacity {}",
                self.len + n,
                self.cfg.capacity
            )));
        }
        if let Some(disk) = &mut self.disk {
            if let Some(e) = disk.failed.take() {
                return Err(e);
            }
            if n > disk.pending_cap {
                // The previous call's rows went out in its commit (after a synchronisation).
                let bytes =
                    n * self.shape.n_kv_heads * 2 * self.shape.head_dim * self.cfg.dtype.size();
                for lay in self.layers.iter_mut() {
                    let p = be.pinned(bytes)?;
                    lay.slab_ptr = p.ptr()?;
                    lay.slab = Slab::Pending(p);
                }
                disk.pending_cap = n;
            }
            disk.pending_t0 = self.len;
        }
        // Everything queued before this call (rows, labels, attention reads of the row caches)
        // happens before any prediction of this call.
        if self.cfg.predict == Predict::LayerAhead {
            let ev = be.record()?;
            self.prefetch.wait(&ev)?;
        }
        if n == 1 {
            // Decode: the prefill staging is no longer needed.
            let st = self.st.get_mut().unwrap_or_else(|p| p.into_inner());
            if st.staging.is_some() {
                self.prefetch.synchronize()?;
                st.staging = None;
                st.staged = None;
            }
        }
        Ok(())
    }

    fn write(
        &mut self,
        be: &CudaBackend,
        layer: usize,
        src: &CudaTensor,
        src_row0: usize,
        k_col0: usize,
        v_col0: usize,
        n: usize,
    ) -> Result<()> {
        let (n_kv, d) = (self.shape.n_kv_heads, self.shape.head_dim);
        let t0 = self.len;
        let slab = self.slab(layer);
        let window = self.window(layer);
        let lay = &mut self.layers[layer];
        be.ds_put_rows(
            src,
            src_row0,
            k_col0,
            v_col0,
            n,
            n_kv,
            d,
            &slab,
            t0,
            0,
            0,
            Some((&lay.chan, lay.labels.out())),
        )?;
        be.ds_put_rows(
            src,
            src_row0,
            k_col0,
            v_col0,
            n,
            n_kv,
            d,
            &window,
            t0,
            self.cfg.sink,
            self.cfg.recent,
            None,
        )?;
        let st = self.st.get_mut().unwrap_or_else(|p| p.into_inner());
        st.written += (n * n_kv * 2 * d * self.cfg.dtype.size()) as u64;
        Ok(())
    }

    fn commit(&mut self, n: usize) {
        if let Err(e) = self.write_out(n) {
            // commit cannot fail by signature: the next call reports it.
            tracing::warn!("offloaded store: writing new rows to disk failed: {e}");
            if let Some(disk) = &mut self.disk {
                disk.failed = Some(e);
            }
        }
        self.len += n;
    }

    fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        self.len = len;
        // The ring may hold later tokens: refill it from the slabs; forget the row caches.
        let st = self.st.get_mut().unwrap_or_else(|p| p.into_inner());
        for (l, res) in st.res.iter_mut().enumerate() {
            res.k = 0;
            st.ready[l] = None;
        }
        st.staged = None;
        let (s, rr) = (self.cfg.sink, self.cfg.recent);
        let toks: Vec<usize> = (len.saturating_sub(rr).max(s)..len).collect();
        if toks.is_empty() {
            return;
        }
        let be = &self.prefetch;
        let refill = || -> Result<()> {
            // The rows were written on the compute stream: wait for the whole device.
            be.device_synchronize()?;
            self.load_fixed_rows(be, &toks)?;
            be.synchronize()
        };
        if let Err(e) = refill() {
            // truncate cannot fail by signature; a device error here will surface on the next call.
            tracing::warn!(
                "offloaded store: refilling the recent window after truncate failed: {e}"
            );
        }
    }

    fn attend(
        &self,
        be: &CudaBackend,
        layer: usize,
        args: &CausalAttn,
        q: &CudaTensor,
        out: &mut CudaTensor,
    ) -> Result<()> {
        if args.n_past != self.len {
            return Err(bad(format!(
                "attention after {} tokens, store holds {}",
                args.n_past, self.len
            )));
        }
        let mut guard = self.st.lock().unwrap_or_else(|p| p.into_inner());
        let st = &mut *guard;
        if args.n_q > 1 {
            return self.attend_prefill(be, st, layer, args, q, out);
        }
        if args.q_col0 != 0 {
            return Err(bad(
                "offloaded attention: the query must start at column 0".into()
            ));
        }
        let visible = args.n_past + 1;
        let (s, rr) = (self.cfg.sink, self.cfg.recent);
        // A prediction queued for this layer: wait for it (a stale one too, since it wrote the
        // row cache), and use it if it was made for this query.
        let predicted = match st.ready[layer].take() {
            Some((v, ev)) => {
                be.wait(&ev)?;
                v == visible
            }
            None => false,
        };
        let k = if predicted {
            let k = st.res[layer].k;
            if self.cfg.measure_recall && k > 0 {
                // The true selection, for the recall counters only.
                let kc = self.kc;
                let (n_kv, d) = (self.shape.n_kv_heads, self.shape.head_dim);
                let middle = visible - s - rr;
                let lay = &self.layers[layer];
                lay.labels.scores(
                    be,
                    q,
                    args.q_row0,
                    &lay.chan,
                    self.shape.group(),
                    d,
                    s,
                    s + middle,
                    &mut st.compute.scores,
                )?;
                be.ds_topk(
                    &st.compute.scores,
                    n_kv,
                    middle,
                    k,
                    s,
                    &mut st.compute.sel,
                    kc,
                    0,
                    &mut st.compute.topk,
                )?;
                be.ds_overlap(
                    &st.res[layer].tok,
                    &st.compute.sel,
                    kc,
                    n_kv,
                    k,
                    &mut st.recall_stats,
                )?;
            }
            k
        } else {
            let State {
                compute,
                res,
                res_stats,
                ..
            } = st;
            self.select(
                be,
                compute,
                &mut res[layer],
                res_stats,
                layer,
                q,
                args.q_row0,
                visible,
                true,
            )?
        };
        let n_sel = visible.min(s) + visible.saturating_sub(s).min(rr) + k;
        let d = self.shape.head_dim;
        let es = self.cfg.dtype.size() as u64;
        let w = self.window(layer);
        let kv = KvRows {
            k: w.ptr,
            v: w.ptr + d as u64 * es,
            tok_stride: w.tok_stride,
            head_stride: w.head_stride,
            dtype: self.cfg.dtype,
        };
        be.sparse_attention_at(
            q,
            args.q_row0,
            &kv,
            None,
            0,
            n_sel,
            self.shape.n_heads,
            self.shape.n_kv_heads,
            d,
            args.scale,
            out,
            args.out_row0,
        )
    }

    fn bytes(&self) -> usize {
        let (gpu, host) = self.footprint();
        gpu + host
    }

    fn memory(&self) -> KvMemory {
        let (_gpu, host) = self.footprint();
        let labels: usize = self.layers.iter().map(|l| l.labels.bytes()).sum();
        KvMemory {
            tier: match (&self.disk, self.cfg.home) {
                (Some(t), _) => t.rows.describe(),
                (None, RowHome::Device) => "device".into(),
                (None, _) => "pinned host".into(),
            },
            row_bytes: if self.disk.is_some() {
                self.disk_bytes()
            } else {
                host
            },
            label_bytes: labels,
            positions: self.len,
            live_tokens: self.len,
            ..KvMemory::default()
        }
    }

    fn ahead_channels(&self) -> Option<&[Vec<Vec<usize>>]> {
        (self.cfg.predict == Predict::LayerAhead).then_some(&self.cfg.channels[..])
    }

    fn predict(&mut self, layer: usize, q_hat: &[f32], n: usize) -> Result<()> {
        // Host-rotated predictions (models with a query bias): only decode calls select.
        if n != 1 {
            return Ok(());
        }
        let (h, d, r, group) = (
            self.shape.n_heads,
            self.shape.head_dim,
            self.cfg.r(),
            self.shape.group(),
        );
        let mut full = vec![0.0f32; h * d];
        for hh in 0..h {
            for (j, &c) in self.cfg.channels[layer][hh / group].iter().enumerate() {
                full[hh * d + c] = q_hat[hh * r + j];
            }
        }
        let st = self.st.get_mut().unwrap_or_else(|p| p.into_inner());
        self.prefetch
            .write_tensor(&mut st.q_hat[layer % 2], 0, &full)?;
        self.launch_ahead(layer, None)
    }

    fn predict_raw(
        &mut self,
        be: &CudaBackend,
        layer: usize,
        raw: &CudaTensor,
        row0: usize,
        n: usize,
        pos0: u32,
        rope: &Rope,
    ) -> Result<bool> {
        if n != 1 {
            return Ok(true);
        }
        let visible = self.len + 1;
        if self.top_k(visible) == 0 {
            return Ok(true);
        }
        let (h, d, r, group) = (
            self.shape.n_heads,
            self.shape.head_dim,
            self.cfg.r(),
            self.shape.group(),
        );
        let st = self.st.get_mut().unwrap_or_else(|p| p.into_inner());
        if st
            .inv_freq
            .as_ref()
            .map_or(true, |(f, _)| f != &rope.inv_freq)
        {
            let dev = be.dev_upload(&rope.inv_freq)?;
            st.inv_freq = Some((rope.inv_freq.clone(), dev));
        }
        let inv = &st.inv_freq.as_ref().expect("uploaded above").1;
        be.ds_ahead_labels(
            raw,
            row0,
            &self.layers[layer].chan,
            h,
            group,
            d,
            r,
            inv,
            rope.attention_scaling,
            pos0 as usize,
            &mut st.q_hat[layer % 2],
        )?;
        let ev = be.record()?;
        self.launch_ahead(layer, Some(ev))?;
        Ok(true)
    }
}

impl OffloadKvStore {
    /// Disk tier: writes the `n` new rows of every layer from the pending buffers to the file,
    /// once the device has written them.
    fn write_out(&mut self, n: usize) -> Result<()> {
        let Some(disk) = &mut self.disk else {
            return Ok(());
        };
        if n == 0 {
            return Ok(());
        }
        if n > disk.pending_cap {
            return Err(bad(format!(
                "commit of {n} tokens after a reserve of {}",
                disk.pending_cap
            )));
        }
        self.prefetch.device_synchronize()?;
        let bytes = n * disk.rows.token_bytes();
        for (l, lay) in self.layers.iter_mut().enumerate() {
            if let Slab::Pending(p) = &mut lay.slab {
                disk.rows
                    .store_tokens(l, disk.pending_t0, &p.as_mut_slice()?[..bytes])?;
            }
        }
        Ok(())
    }

    /// Queues layer `layer`'s selection and row fetch on the prefetch stream (after `after`).
    fn launch_ahead(&mut self, layer: usize, after: Option<StreamEvent>) -> Result<()> {
        self.launch_ahead_with(layer, after, layer % 2, true)
    }

    /// [`Self::launch_ahead`] with the predicted query labels of buffer `q_buf`; without the
    /// gather of the misses when `gather` is false (for timings).
    fn launch_ahead_with(
        &mut self,
        layer: usize,
        after: Option<StreamEvent>,
        q_buf: usize,
        gather: bool,
    ) -> Result<()> {
        let visible = self.len + 1;
        if self.top_k(visible) == 0 {
            return Ok(());
        }
        let pf = &self.prefetch;
        if let Some(ev) = &after {
            pf.wait(ev)?;
        }
        let mut guard = self.st.lock().unwrap_or_else(|p| p.into_inner());
        let st = &mut *guard;
        let State {
            ahead,
            res,
            res_stats,
            q_hat,
            ..
        } = st;
        self.select(
            pf,
            ahead,
            &mut res[layer],
            res_stats,
            layer,
            &q_hat[q_buf],
            0,
            visible,
            gather,
        )?;
        st.ready[layer] = Some((visible, pf.record()?));
        Ok(())
    }
}
