//! Offloaded-decode kernels (`kernels/offload.cu`, ALGORITHMS.md section 2) and the stream
//! plumbing the prefetcher needs: a sibling backend on its own stream of the same context (same
//! kernels, its own cuBLAS handle and scratch), and events to order the two streams.
//!
//! Row slabs are `[token][KV head][K | V]` of 16-bit elements, addressed by raw 64-bit pointers
//! so that the same kernels write or read pinned host memory (UVA) and device memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, LaunchConfig, PushKernelArg};

use super::{dev_err, int, shape_err, CudaBackend, CudaTensor, DevBuf, Labels4, LabelsOut};
use crate::backend::{DType, Result};

/// Threads of the residency kernel (`DS_RES_THREADS`).
const RES_THREADS: u32 = 1024;

/// An event recorded on one backend's stream, for another to wait on.
pub struct StreamEvent(CudaEvent);

impl StreamEvent {
    /// Milliseconds of device time from `start` to this event (both made by
    /// [`CudaBackend::record_timed`]; waits for both to complete).
    pub fn ms_since(&self, start: &StreamEvent) -> Result<f64> {
        start
            .0
            .elapsed_ms(&self.0)
            .map(f64::from)
            .map_err(|e| dev_err("timing events", e))
    }
}

/// Where [`CudaBackend::ds_put_rows`] writes: a slab of `[slot][KV head][K | V]` rows.
#[derive(Clone, Copy, Debug)]
pub struct RowSlab {
    /// Address of slot 0 (pinned host or device).
    pub ptr: u64,
    /// Elements between consecutive slots and between consecutive KV heads of one slot.
    pub tok_stride: usize,
    pub head_stride: usize,
    pub dtype: DType,
}

/// The residency state of one layer's GPU row cache (per KV head, `cap` entries each).
pub struct Residency {
    pub cap: usize,
    /// Resident tokens (sorted) and their cache slots; valid for `[0, k)`.
    pub tok: DevBuf<i32>,
    pub slot: DevBuf<i32>,
    /// Scratch: the new slots, the misses (token, slot) and their count per head.
    pub(crate) new_slot: DevBuf<i32>,
    pub miss_tok: DevBuf<i32>,
    pub miss_slot: DevBuf<i32>,
    pub n_miss: DevBuf<i32>,
    /// Rows of the current selection per head (with `lru` none, also the resident rows).
    pub k: usize,
    /// A cache of more rows than one selection (`ds_residency_lru_state`), or none: the cache
    /// holds exactly the current selection, sorted, in slots `0..k`.
    pub lru: Option<super::residency::LruResidency>,
}

impl CudaBackend {
    /// A backend on a new stream of the same context: pointers, kernels and events are shared,
    /// work on the two streams runs concurrently unless ordered by [`StreamEvent`]s. With `high`,
    /// its stream has the device's greatest priority: the block
    /// scheduler starts its kernels' blocks before pending blocks of normal-priority streams (for
    /// short, latency-critical work such as the prefetch chain that the compute stream waits on).
    pub fn sibling_with_priority(&self, high: bool) -> Result<CudaBackend> {
        let mut gather_stream = None;
        let stream = if let Some(sp) = &self.split {
            let (least, greatest) = cudarc::driver::result::stream::get_priority_range()
                .map_err(|e| dev_err("stream priorities", e))?;
            let s = sp.stream(&self.ctx, false, if high { greatest } else { least })?;
            s.join(&self.stream)
                .map_err(|e| dev_err("ordering a new stream", e))?;
            gather_stream = Some(sp.stream(&self.ctx, true, greatest)?);
            s
        } else if high {
            let (_, greatest) = cudarc::driver::result::stream::get_priority_range()
                .map_err(|e| dev_err("stream priorities", e))?;
            let s = self
                .ctx
                .new_stream_with_priority(greatest)
                .map_err(|e| dev_err("creating a stream", e))?;
            s.join(&self.stream)
                .map_err(|e| dev_err("ordering a new stream", e))?;
            s
        } else {
            self.stream
                .fork()
                .map_err(|e| dev_err("creating a stream", e))?
        };
        let blas = CudaBlas::new(stream.clone()).map_err(|e| dev_err("creating cuBLAS", e))?;
        let funcs: HashMap<_, _> = self.funcs.clone();
        Ok(CudaBackend {
            ctx: Arc::clone(&self.ctx),
            stream,
            blas,
            funcs,
            scratch: Mutex::new(None),
            attn_scratch: Mutex::new(None),
            rope_cache: Mutex::new(None),
            gemv1: std::sync::atomic::AtomicU8::new(self.gemv1()),
            gather_blocks: AtomicUsize::new(self.gather_blocks()),
            attn_chunk: AtomicUsize::new(
                self.attn_chunk.load(std::sync::atomic::Ordering::Relaxed),
            ),
            attn_gqa: AtomicBool::new(self.attn_gqa.load(std::sync::atomic::Ordering::Relaxed)),
            cluster_ok: self.cluster_ok,
            topk_cluster: AtomicBool::new(
                self.topk_cluster.load(std::sync::atomic::Ordering::Relaxed),
            ),
            attn_flash: AtomicBool::new(self.attn_flash.load(std::sync::atomic::Ordering::Relaxed)),
            sm_count: self.sm_count,
            attn_blocks_per_sm: self.attn_blocks_per_sm,
            name: format!("{} (prefetch stream)", self.name),
            arch: self.arch.clone(),
            ptx_from_cache: self.ptx_from_cache,
            split: self.split.clone(),
            gather_stream,
        })
    }

    /// Most blocks of a row gather from pinned host memory.
    pub fn gather_blocks(&self) -> usize {
        self.gather_blocks.load(Ordering::Relaxed)
    }

    /// Sets [`Self::gather_blocks`] (at least 1) for this backend's later launches.
    pub fn set_gather_blocks(&self, n: usize) {
        self.gather_blocks.store(n.max(1), Ordering::Relaxed);
    }

    /// Records the work queued so far with an event that can be timed ([`StreamEvent::ms_since`]).
    pub fn record_timed(&self) -> Result<StreamEvent> {
        self.stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map(StreamEvent)
            .map_err(|e| dev_err("recording an event", e))
    }

    /// Records the work queued so far on this backend's stream.
    pub fn record(&self) -> Result<StreamEvent> {
        self.stream
            .record_event(None)
            .map(StreamEvent)
            .map_err(|e| dev_err("recording an event", e))
    }

    /// Makes this backend's stream wait (on the device) for `e`.
    pub fn wait(&self, e: &StreamEvent) -> Result<()> {
        self.stream
            .wait(&e.0)
            .map_err(|e| dev_err("waiting on an event", e))
    }

    /// Writes rows `0..n` of `src` (K at `k_col0 + g*D`, V at `v_col0 + g*D`) as tokens
    /// `t0..t0+n` into `dst`: slot = token, or with `ring > 0` sinks at their token and the rest
    /// at `n_sink + (t - n_sink) % ring`. With `labels` also writes the tokens' labels at the
    /// channels `chan` (`n_kv * r`): f16 (`labels[g][t][c] = K[g*D + chan[g][c]]`, `cap` tokens
    /// per head) or 4-bit ([`super::Labels4`], quantised as the CPU `LabelCache`).
    #[allow(clippy::too_many_arguments)]
    pub fn ds_put_rows(
        &self,
        src: &CudaTensor,
        src_row0: usize,
        k_col0: usize,
        v_col0: usize,
        n: usize,
        n_kv: usize,
        head_dim: usize,
        dst: &RowSlab,
        t0: usize,
        n_sink: usize,
        ring: usize,
        labels: Option<(&DevBuf<i32>, LabelsOut<'_>)>,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        if src_row0 + n > src.rows
            || k_col0.max(v_col0) + n_kv * head_dim > src.cols
            || 2 * head_dim > 1024
        {
            return Err(shape_err("ds_put_rows: shapes".into()));
        }
        let name = match dst.dtype {
            DType::F16 => "ds_put_rows_f16",
            DType::BF16 => "ds_put_rows_bf16",
            DType::F32 => {
                return Err(shape_err(
                    "offloaded rows in f32: not supported (use --kv-dtype f16 or bf16)".into(),
                ))
            }
        };
        let view = src.data.slice(src_row0 * src.cols..);
        let (sc, kc, vc, nn, hd) = (
            int(src.cols, "cols")?,
            int(k_col0, "k col")?,
            int(v_col0, "v col")?,
            int(n, "n")?,
            int(head_dim, "head_dim")?,
        );
        let (ts, hs, t0_, ns, rg) = (
            dst.tok_stride as i64,
            dst.head_stride as i64,
            t0 as i64,
            int(n_sink, "sink")?,
            int(ring, "ring")?,
        );
        let null: u64 = 0;
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&view)
            .arg(&sc)
            .arg(&kc)
            .arg(&vc)
            .arg(&nn)
            .arg(&hd)
            .arg(&dst.ptr)
            .arg(&ts)
            .arg(&hs);
        b.arg(&t0_).arg(&ns).arg(&rg);
        let (r, cap, words);
        match labels {
            Some((
                chan,
                LabelsOut::F16 {
                    r: rr,
                    labels,
                    cap: c,
                },
            )) => {
                if chan.len < n_kv * rr
                    || labels.len < n_kv * c * rr
                    || t0 + n > c
                    || rr > 2 * head_dim
                {
                    return Err(shape_err("ds_put_rows: label buffers".into()));
                }
                r = int(rr, "r")?;
                cap = c as i64;
                words = 0i32;
                b.arg(&chan.data).arg(&r).arg(&mut labels.data).arg(&cap);
                b.arg(&null).arg(&null).arg(&words);
            }
            Some((chan, LabelsOut::B4(lab))) => {
                lab.check("ds_put_rows")?;
                if chan.len < n_kv * lab.r || lab.heads != n_kv || t0 + n > lab.cap {
                    return Err(shape_err("ds_put_rows: label buffers".into()));
                }
                if head_dim < 16 {
                    return Err(shape_err(format!(
                        "ds_put_rows: 4-bit labels need a head dim of at least 16, not {head_dim}"
                    )));
                }
                r = int(lab.r, "r")?;
                cap = lab.cap as i64;
                words = int(Labels4::words(lab.r), "words")?;
                b.arg(&chan.data).arg(&r).arg(&null).arg(&cap);
                b.arg(&mut lab.codes.data)
                    .arg(&mut lab.params.data)
                    .arg(&words);
            }
            None => {
                r = 0;
                cap = 0;
                words = 0;
                b.arg(&null).arg(&r).arg(&null).arg(&cap);
                b.arg(&null).arg(&null).arg(&words);
            }
        }
        let cfg = LaunchConfig {
            grid_dim: (n as u32, n_kv as u32, 1),
            block_dim: (2 * head_dim as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.map_err(Self::launch_err(name))?;
        Ok(())
    }

    /// Residency state for `heads` KV heads of up to `cap` cached rows each.
    pub fn ds_residency_state(&self, heads: usize, cap: usize) -> Result<Residency> {
        let n = heads * cap.max(1);
        Ok(Residency {
            cap: cap.max(1),
            tok: self.dev_zeros(n)?,
            slot: self.dev_zeros(n)?,
            new_slot: self.dev_zeros(n)?,
            miss_tok: self.dev_zeros(n)?,
            miss_slot: self.dev_zeros(n)?,
            n_miss: self.dev_zeros(heads)?,
            k: 0,
            lru: None,
        })
    }

    /// Differential residency: `sel[g * sel_stride ..][..k_new]` (sorted) becomes the resident
    /// set; selected tokens already resident keep their slot, the misses get free slots and are
    /// listed for [`Self::ds_gather_misses`]. `stats[0] += misses`, `stats[1] += hits`. A state
    /// with a larger cache (`res.lru`) goes to `ds_residency_lru` (`residency.rs`); see
    /// [`Residency::min_k`] for the selection sizes each takes.
    pub fn ds_residency(
        &self,
        sel: &DevBuf<i32>,
        sel_stride: usize,
        heads: usize,
        k_new: usize,
        res: &mut Residency,
        stats: &mut DevBuf<u64>,
    ) -> Result<()> {
        if res.lru.is_some() {
            return self.ds_residency_lru(sel, sel_stride, heads, k_new, res, stats);
        }
        if k_new < res.k
            || k_new > res.cap
            || sel.len < (heads - 1) * sel_stride + k_new
            || stats.len < 2
        {
            return Err(shape_err(format!(
                "ds_residency: {k_new} rows (had {}, room for {})",
                res.k, res.cap
            )));
        }
        let name = "ds_residency";
        let (ss, kn, rs, kp) = (
            sel_stride as i64,
            int(k_new, "k")?,
            res.cap as i64,
            int(res.k, "k")?,
        );
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&sel.data)
            .arg(&ss)
            .arg(&kn)
            .arg(&mut res.tok.data)
            .arg(&mut res.slot.data);
        b.arg(&mut res.new_slot.data)
            .arg(&rs)
            .arg(&kp)
            .arg(&mut res.miss_tok.data);
        // The searches run in shared memory when the two lists fit the default 48 KiB.
        let smem = (k_new + res.k) * 4;
        let use_smem = i32::from(smem <= 48 * 1024);
        b.arg(&mut res.miss_slot.data)
            .arg(&mut res.n_miss.data)
            .arg(&mut stats.data)
            .arg(&use_smem);
        let cfg = LaunchConfig {
            grid_dim: (heads as u32, 1, 1),
            block_dim: (RES_THREADS, 1, 1),
            shared_mem_bytes: if use_smem == 1 { smem as u32 } else { 0 },
        };
        unsafe { b.launch(cfg) }.map_err(Self::launch_err(name))?;
        res.k = k_new;
        Ok(())
    }

    /// Copies the rows of the misses of the last [`Self::ds_residency`] from `src` (a slab of
    /// `[token][g][row_bytes]`: `tok_stride`/`head_stride` in bytes) into the cache slots
    /// `slot0 + slot` of `dst` (`[g][dst_head_rows][row_bytes]`, device). `from_host`: `src` is
    /// pinned host memory (the gather then runs on few blocks, see below).
    #[allow(clippy::too_many_arguments)]
    pub fn ds_gather_misses(
        &self,
        from_host: bool,
        src: u64,
        tok_stride: usize,
        head_stride: usize,
        res: &Residency,
        heads: usize,
        row_bytes: usize,
        dst: u64,
        dst_head_rows: usize,
        slot0: usize,
    ) -> Result<()> {
        self.ds_gather_misses_at(
            from_host,
            src,
            tok_stride,
            head_stride,
            res,
            &res.miss_tok,
            heads,
            row_bytes,
            dst,
            dst_head_rows,
            slot0,
        )
    }

    /// [`Self::ds_gather_misses`] with the source index of miss `m` of head `g` taken from
    /// `src_idx[g * res.cap + m]` instead of the miss's token (the disk tier stages the misses'
    /// rows in order, so it passes `m` itself).
    #[allow(clippy::too_many_arguments)]
    pub fn ds_gather_misses_at(
        &self,
        from_host: bool,
        src: u64,
        tok_stride: usize,
        head_stride: usize,
        res: &Residency,
        src_idx: &DevBuf<i32>,
        heads: usize,
        row_bytes: usize,
        dst: u64,
        dst_head_rows: usize,
        slot0: usize,
    ) -> Result<()> {
        if src_idx.len < heads * res.cap {
            return Err(shape_err("ds_gather_misses: index list too short".into()));
        }
        if row_bytes % 16 != 0
            || tok_stride % 16 != 0
            || head_stride % 16 != 0
            || src % 16 != 0
            || dst % 16 != 0
        {
            return Err(shape_err(
                "ds_gather_misses: rows must be 16-byte aligned".into(),
            ));
        }
        if slot0 + res.cap > dst_head_rows {
            return Err(shape_err("ds_gather_misses: cache too small".into()));
        }
        let units = heads * res.k * row_bytes / 16;
        if units == 0 {
            return Ok(());
        }
        let name = "ds_gather_misses";
        let (ts, hs, rs, hh, ru) = (
            tok_stride as i64,
            head_stride as i64,
            res.cap as i64,
            int(heads, "heads")?,
            int(row_bytes / 16, "row")?,
        );
        let (dh, s0) = (dst_head_rows as i64, int(slot0, "slot0")?);
        // From host memory with an SM partition: on the gather partition's stream, ordered
        // after this stream's work so far and before its later work.
        let on = match (&self.gather_stream, from_host) {
            (Some(g), true) => {
                let ev = self
                    .stream
                    .record_event(None)
                    .map_err(|e| dev_err("recording an event", e))?;
                g.wait(&ev).map_err(|e| dev_err("waiting on an event", e))?;
                g
            }
            _ => &self.stream,
        };
        let mut b = on.launch_builder(self.f(name));
        b.arg(&src)
            .arg(&ts)
            .arg(&hs)
            .arg(&src_idx.data)
            .arg(&res.miss_slot.data);
        let walk = int(res.k, "k")?;
        b.arg(&res.n_miss.data)
            .arg(&rs)
            .arg(&walk)
            .arg(&hh)
            .arg(&ru)
            .arg(&dst)
            .arg(&dh)
            .arg(&s0);
        // The kernel walks heads x k x row units (no more misses than selected rows); rows
        // past n_miss are skipped.
        let threads = 256usize;
        // Few blocks: 8 x 16 B in flight per thread is 32 KB per block, and PCIe needs only
        // ~100 KB outstanding (54.8 GB/s x ~2 us); loads held for microseconds on every SM
        // would starve the compute stream's kernels running beside the gather. From device
        // memory the loads are short: up to 4 blocks per SM.
        let cap = if from_host {
            self.gather_blocks()
        } else {
            4 * self.sm_count
        };
        let blocks = units.div_ceil(threads * 8).clamp(1, cap.max(1));
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.map_err(Self::launch_err(name))?;
        if !Arc::ptr_eq(on, &self.stream) {
            let ev = on
                .record_event(None)
                .map_err(|e| dev_err("recording an event", e))?;
            self.stream
                .wait(&ev)
                .map_err(|e| dev_err("waiting on an event", e))?;
        }
        Ok(())
    }

    /// Whether row gathers from host memory run on an SM partition of their own
    /// (`FARSIGHT_GATHER_SMS`), and its size.
    pub fn gather_partition(&self) -> Option<(usize, usize)> {
        self.split.as_ref().map(|s| (s.gather_sms, s.rest_sms))
    }

    /// Tokens `t0..t1` of a `[token][g][K | V]` slab of 16-bit elements (`src`, host or device)
    /// into dense K and V caches (`n_kv * head_dim` columns, row = token).
    #[allow(clippy::too_many_arguments)]
    pub fn ds_unpack_rows(
        &self,
        src: u64,
        n_kv: usize,
        head_dim: usize,
        t0: usize,
        t1: usize,
        k: &mut super::CudaCache,
        v: &mut super::CudaCache,
    ) -> Result<()> {
        if t1 <= t0 {
            return Ok(());
        }
        if head_dim % 8 != 0
            || src % 16 != 0
            || k.dtype.size() != 2
            || v.dtype != k.dtype
            || k.cols != n_kv * head_dim
            || v.cols != k.cols
            || t1 > k.capacity.min(v.capacity)
        {
            return Err(shape_err("ds_unpack_rows: shapes".into()));
        }
        let name = "ds_unpack_rows";
        let (nk, hd, a, bb) = (
            int(n_kv, "n_kv")?,
            int(head_dim, "head_dim")?,
            t0 as i64,
            t1 as i64,
        );
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&src)
            .arg(&nk)
            .arg(&hd)
            .arg(&a)
            .arg(&bb)
            .arg(&mut k.data)
            .arg(&mut v.data);
        let units = (t1 - t0) * n_kv * head_dim * 2 * 2 / 16;
        let blocks = units.div_ceil(256 * 8).clamp(1, 16 * self.sm_count);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.map_err(Self::launch_err(name))?;
        Ok(())
    }

    /// Layer-ahead query labels: row `row` of `raw` (per query head `r` label-row outputs then
    /// their `r` RoPE partners) rotated at `pos` into `q_hat` row 0 at the label channels.
    #[allow(clippy::too_many_arguments)]
    pub fn ds_ahead_labels(
        &self,
        raw: &CudaTensor,
        row: usize,
        chan: &DevBuf<i32>,
        n_heads: usize,
        group: usize,
        head_dim: usize,
        r: usize,
        inv_freq: &DevBuf<f32>,
        att_scale: f32,
        pos: usize,
        q_hat: &mut CudaTensor,
    ) -> Result<()> {
        if row >= raw.rows
            || raw.cols < n_heads * 2 * r
            || q_hat.cols < n_heads * head_dim
            || inv_freq.len < head_dim / 2
            || chan.len < n_heads / group.max(1) * r
        {
            return Err(shape_err("ds_ahead_labels: shapes".into()));
        }
        let name = "ds_ahead_labels";
        let view = raw.data.slice(row * raw.cols..);
        let (nh, gr, hd, rr, p) = (
            int(n_heads, "heads")?,
            int(group, "group")?,
            int(head_dim, "head_dim")?,
            int(r, "r")?,
            pos as i64,
        );
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&view)
            .arg(&chan.data)
            .arg(&nh)
            .arg(&gr)
            .arg(&hd)
            .arg(&rr)
            .arg(&inv_freq.data);
        b.arg(&att_scale).arg(&p).arg(&mut q_hat.data);
        let n = (n_heads * r) as u32;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(128), 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.map_err(Self::launch_err(name))?;
        Ok(())
    }

    /// Recall counters: `stats[0] += |a[g] & b[g]|`, `stats[1] += k` per head (sorted lists).
    pub fn ds_overlap(
        &self,
        a: &DevBuf<i32>,
        b_: &DevBuf<i32>,
        stride: usize,
        heads: usize,
        k: usize,
        stats: &mut DevBuf<u64>,
    ) -> Result<()> {
        if k == 0 {
            return Ok(());
        }
        if a.len < (heads - 1) * stride + k || b_.len < (heads - 1) * stride + k || stats.len < 2 {
            return Err(shape_err("ds_overlap: shapes".into()));
        }
        let name = "ds_overlap";
        let (s, kk) = (stride as i64, int(k, "k")?);
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&a.data)
            .arg(&b_.data)
            .arg(&s)
            .arg(&kk)
            .arg(&mut stats.data);
        let cfg = LaunchConfig {
            grid_dim: (heads as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.map_err(Self::launch_err(name))?;
        Ok(())
    }

    /// Copies `bytes` from `src` to `dst` on this stream (raw addresses: device memory or pinned
    /// host memory, the direction inferred under UVA).
    pub fn copy_ptr(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| dev_err("binding the context", e))?;
        let r =
            unsafe { cudarc::driver::sys::cuMemcpyAsync(dst, src, bytes, self.stream.cu_stream()) };
        r.result().map_err(|e| dev_err("cuMemcpyAsync", e))
    }

    /// Waits for all work on every stream of the device's context.
    pub fn device_synchronize(&self) -> Result<()> {
        self.ctx
            .synchronize()
            .map_err(|e| dev_err("synchronize", e))
    }

    /// Sets a device buffer to zeros.
    pub fn dev_clear<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        b: &mut DevBuf<T>,
    ) -> Result<()> {
        self.stream
            .memset_zeros(&mut b.data)
            .map_err(|e| dev_err("memset", e))
    }

    /// Device memory in use and total (bytes), from the driver.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        let (free, total) =
            cudarc::driver::result::mem_get_info().map_err(|e| dev_err("cuMemGetInfo", e))?;
        Ok((total - free, total))
    }
}

impl CudaBackend {
    /// Fills `n` elements of `dtype` at `ptr` (device or pinned host memory) with
    /// `backend::random_value` of `seed` (as `random_matrix`).
    pub fn random_fill_ptr(
        &self,
        ptr: u64,
        n: usize,
        dtype: DType,
        scale: f32,
        seed: u64,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let name = match dtype {
            DType::F32 => "random_f32",
            DType::F16 => "random_f16",
            DType::BF16 => "random_bf16",
        };
        let (nn, mixed) = (n as i64, crate::backend::splitmix64(seed));
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&ptr).arg(&nn).arg(&mixed).arg(&scale);
        unsafe { b.launch(super::ops::flat(n)) }.map_err(Self::launch_err(name))?;
        Ok(())
    }
}
