//! [`OffloadKvStore`]: Double Sparsity decode with the full KV off the GPU (ALGORITHMS.md
//! sections 1-2).
//!
//! Per layer the store keeps:
//! - the full rows in a slab of pinned host memory (`[token][KV head][K | V]`, 16-bit, or with
//!   page-granular selection `[KV head][token][K | V]`, so that a page of one head is
//!   contiguous; or device memory for the on-GPU reference, [`RowHome::Device`]; or a file,
//!   [`RowHome::Disk`], with only the current call's new rows in a pinned buffer,
//!   `store/disk.rs`);
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
//!
//! Files: this one holds the types and the [`KvStore`] protocol; `build.rs` construction and
//! budget changes, `select.rs` the decode selection and attention, `prefill.rs` prefill
//! attention, `disk.rs` the disk tier, `fill.rs` window loads, random contexts and timings.

use std::sync::Mutex;

use farsight_kernels::cuda::{
    CudaBackend, CudaCache, CudaTensor, DevBuf, PinnedBuf, Residency, RowSlab, StreamEvent,
    TopkScratch,
};
use farsight_kernels::{AttnShape, Backend, CausalAttn, KernelError, Result, Rope};
use farsight_offload::sparse::{whole_pages, Predict};
use farsight_offload::{KvMemory, KvStore};

use crate::config::{OffloadConfig, RowHome};
use crate::labels::GpuLabels;

mod build;
mod disk;
mod fill;
mod prefill;
mod select;

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
    /// Page-granular selection: the pages' scores (`[g][page]`).
    page_scores: DevBuf<f32>,
    sel: DevBuf<i32>,
    topk: TopkScratch,
    /// Disk tier: the misses' rows read from the file (`[g][cache row][row]`, pinned).
    stage: Option<PinnedBuf>,
}

impl Select {
    /// Scratch on `b`'s stream for `n_kv` heads of `cap` scores (pages of `page` tokens) and
    /// `kc` selected entries, and staging for the misses of a row cache of `rc` rows of
    /// `stage_row` bytes (0: none).
    fn new(
        b: &CudaBackend,
        n_kv: usize,
        (cap, page): (usize, usize),
        kc: usize,
        rc: usize,
        stage_row: usize,
    ) -> Result<Select> {
        Ok(Select {
            scores: b.dev_zeros(n_kv * cap)?,
            page_scores: b.dev_zeros(if page > 1 {
                n_kv * (cap / page).max(1)
            } else {
                1
            })?,
            sel: b.dev_zeros(n_kv * kc)?,
            topk: b.ds_topk_scratch(n_kv, cap)?,
            stage: if stage_row > 0 {
                Some(b.pinned(n_kv * rc * stage_row)?)
            } else {
                None
            },
        })
    }
}

/// What the offloaded decode did, summed over the store's life.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct OffloadStats {
    /// Selected entries (rows, or pages with page-granular selection) that had to be fetched,
    /// and those already in the row cache.
    pub misses: u64,
    pub hits: u64,
    /// Layer-ahead recall: predicted rows also in the true selection, out of the selected rows.
    pub recall_hits: u64,
    pub recall_total: u64,
    /// Bytes read over PCIe for selected rows (misses x the bytes of an entry).
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

/// Where a decode step's time went between the two streams, from timing events (see
/// [`OffloadKvStore::set_timing`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct StreamTiming {
    /// Device time the compute stream spent waiting for the prefetch stream's selections.
    pub stall_ms: f64,
    /// Device time of the layer-ahead chains on the prefetch stream (start to event), summed.
    pub chain_ms: f64,
    /// Waits and chains timed.
    pub waits: usize,
    pub chains: usize,
}

/// Timing-event pairs recorded since the last [`OffloadKvStore::take_timing`].
#[derive(Default)]
struct Timing {
    waits: Vec<(StreamEvent, StreamEvent)>,
    chains: Vec<(StreamEvent, StreamEvent)>,
}

struct State {
    res: Vec<Residency>,
    /// Timing events of the layer-ahead waits and chains, when switched on.
    timing: Option<Timing>,
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
    /// Entries (rows, or pages) of the largest selection per (layer, KV head).
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
        self.cfg.sink + self.cfg.recent + self.cfg.resident_rows()
    }

    /// Tokens per page (1: token-level selection).
    fn page(&self) -> usize {
        self.cfg.page()
    }

    /// The candidates of a query that sees `visible` tokens, in selection units (tokens, or
    /// pages): the first and how many. Tokens: the middle ones (neither sinks nor recent);
    /// pages: the whole pages among them ([`whole_pages`], the CPU store's rule too).
    fn candidates(&self, visible: usize) -> (usize, usize) {
        let (s, rr) = (self.cfg.sink, self.cfg.recent);
        let r = whole_pages(s, visible.saturating_sub(rr).max(s), self.page());
        (r.start, r.len())
    }

    /// Top-k size (entries: rows, or pages) for a query that sees `visible` tokens.
    fn top_k(&self, visible: usize) -> usize {
        let p = self.page();
        (self.cfg.top_k(visible) / p)
            .min(self.candidates(visible).1)
            .min(self.kc)
    }

    /// Bytes between consecutive tokens and between KV heads of a layer's slab: `[token][g]`,
    /// or `[g][token]` with pages (the slab then holds [`OffloadConfig::slab_tokens`] per head).
    fn slab_strides(&self) -> (usize, usize) {
        let row = self.row_bytes();
        if self.page() > 1 {
            (row, self.cfg.slab_tokens() * row)
        } else {
            (self.shape.n_kv_heads * row, row)
        }
    }

    /// Counts layer-ahead recall (a second, true selection per layer) from now on, or not.
    pub fn set_measure_recall(&mut self, on: bool) {
        self.cfg.measure_recall = on;
    }

    /// Where layer `l`'s new rows are written (token `t` at `ptr + t * tok_stride` elements):
    /// the slab, or for the disk tier the pending buffer, its first token at `pending_t0`.
    fn slab(&self, l: usize) -> RowSlab {
        let shift = self
            .disk
            .as_ref()
            .map_or(0, |t| t.pending_t0 * self.token_bytes());
        let (ts, hs) = self.slab_strides();
        let es = self.cfg.dtype.size();
        RowSlab {
            ptr: self.layers[l].slab_ptr.wrapping_sub(shift as u64),
            tok_stride: ts / es,
            head_stride: hs / es,
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

    /// Most blocks of this store's gathers from pinned host memory (its prefetch stream's).
    pub fn set_gather_blocks(&self, n: usize) {
        self.prefetch.set_gather_blocks(n);
    }

    /// Records timing events around every layer-ahead chain (prefetch stream) and every wait of
    /// the compute stream for one, from now on (`true`), or stops. Each event costs a little
    /// host time: switch it on for a few steps apart from the timed ones.
    pub fn set_timing(&mut self, on: bool) {
        let st = self.st.get_mut().unwrap_or_else(|p| p.into_inner());
        st.timing = on.then(Timing::default);
    }

    /// The stall and chain time recorded since timing was switched on or last taken (waits for
    /// the events); `None` when timing is off.
    pub fn take_timing(&mut self) -> Result<Option<StreamTiming>> {
        let st = self.st.get_mut().unwrap_or_else(|p| p.into_inner());
        let Some(t) = st.timing.as_mut() else {
            return Ok(None);
        };
        let mut out = StreamTiming {
            waits: t.waits.len(),
            chains: t.chains.len(),
            ..Default::default()
        };
        for (a, b) in t.waits.drain(..) {
            out.stall_ms += b.ms_since(&a)?;
        }
        for (a, b) in t.chains.drain(..) {
            out.chain_ms += b.ms_since(&a)?;
        }
        Ok(Some(out))
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
            fetched_bytes: r[0] * (self.page() * self.row_bytes()) as u64,
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
        gpu += st
            .res
            .iter()
            .map(|r| {
                let lru = r
                    .lru
                    .as_ref()
                    .map_or(0, |l| 4 * r.tok.len * 4 + l.idx.len * 4);
                5 * r.tok.len * 4 + lru
            })
            .sum::<usize>();
        gpu += 2
            * (st.compute.scores.len * 4 + st.compute.page_scores.len * 4 + st.compute.sel.len * 4);
        if let Some(s) = &st.staging {
            gpu += s
                .iter()
                .map(|(k, v)| (k.capacity * k.cols + v.capacity * v.cols) * 2)
                .sum::<usize>();
        }
        (gpu, host)
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
        let be = &self.prefetch;
        // A selection queued on the compute stream may still be writing a cache's count:
        // let it finish before the prefetch stream clears it.
        if let Err(e) = be.device_synchronize() {
            tracing::warn!("offloaded store: waiting for the device before truncate failed: {e}");
        }
        for (l, res) in st.res.iter_mut().enumerate() {
            if let Err(e) = be.ds_residency_clear(res) {
                tracing::warn!(
                    "offloaded store: clearing the row cache after truncate failed: {e}"
                );
            }
            st.ready[l] = None;
        }
        // The clears ran on the prefetch stream; the next selection may run on the compute one.
        if let Err(e) = be.synchronize() {
            tracing::warn!("offloaded store: clearing the row cache after truncate failed: {e}");
        }
        st.staged = None;
        let (s, rr) = (self.cfg.sink, self.cfg.recent);
        let toks: Vec<usize> = (len.saturating_sub(rr).max(s)..len).collect();
        if toks.is_empty() {
            return;
        }
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
        self.attend_rows(be, layer, args, q, out)
    }

    fn bytes(&self) -> usize {
        let (gpu, host) = self.footprint();
        gpu + host
    }

    fn memory(&self) -> KvMemory {
        let (gpu, host) = self.footprint();
        let labels: usize = self.layers.iter().map(|l| l.labels.bytes()).sum();
        let device_slabs: usize = self
            .layers
            .iter()
            .map(|l| match &l.slab {
                Slab::Device(b) => b.len,
                _ => 0,
            })
            .sum();
        KvMemory {
            tier: match (&self.disk, self.cfg.home) {
                (Some(t), _) => t.rows.describe(),
                (None, RowHome::Device) => "device".into(),
                (None, _) => "pinned host".into(),
            },
            row_bytes: match (&self.disk, self.cfg.home) {
                (Some(_), _) => self.disk_bytes(),
                (None, RowHome::Device) => device_slabs,
                (None, _) => host,
            },
            label_bytes: labels,
            device_bytes: gpu.saturating_sub(labels + device_slabs),
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
