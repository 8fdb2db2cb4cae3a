//! Double Sparsity decode kernels on the GPU (`kernels/sparse.cu`, ALGORITHMS.md section 1):
//! label extraction, label scoring of every token for one decode query (GQA: the group's query
//! labels summed), an exact top-k per KV head (radix select + ordered compaction: the CPU store's
//! order, score descending then lower index first, written in increasing index order), sparse
//! decode attention over rows chosen by index, and a row gather that reads device memory or pinned
//! host memory (UVA zero-copy).
//!
//! KV rows are addressed by raw 64-bit pointers ([`KvRows`]), so the same kernels read a device
//! [`CudaCache`] or a [`super::PinnedBuf`] (pinned.rs).

use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use super::{dev_err, int, shape_err, CudaBackend, CudaCache, CudaTensor};
use crate::backend::{DType, Result};

/// Bins of the first two radix passes of the top-k (`TK_BINS` in sparse.cu).
const TK_BINS: usize = 2048;
/// Blocks per cluster and threads per block of the one-launch top-k (`TKC`, `TKC_THREADS`).
const TKC: usize = 8;
const TKC_THREADS: usize = 1024;
/// Threads per block of the top-k compaction kernel (`TK_THREADS`).
const TK_THREADS: usize = 512;
/// State words per head of the top-k (`TK_STATE`).
const TK_STATE: usize = 4;
/// Largest label width (`DS_MAX_R`).
pub const DS_MAX_R: usize = 64;

/// A device buffer of plain values (indices, scores, labels as raw u16).
pub struct DevBuf<T> {
    pub len: usize,
    pub(super) data: CudaSlice<T>,
}

/// Where a kernel finds KV rows: row `t` of KV head `g` has its K at `k + (t * tok_stride + g *
/// head_stride) * elem` bytes and its V likewise from `v`.
#[derive(Clone, Copy, Debug)]
pub struct KvRows {
    pub k: u64,
    pub v: u64,
    pub tok_stride: usize,
    pub head_stride: usize,
    pub dtype: DType,
}

/// Scratch of the top-k (radix state, histograms, per-block counts), grown on demand.
pub struct TopkScratch {
    /// `TK_STATE` words per head (sparse.cu).
    state: CudaSlice<u32>,
    hist: CudaSlice<u32>,
    /// Look-back status of the compaction, one word per (head, block).
    status: CudaSlice<u64>,
}

impl CudaBackend {
    /// A zeroed device buffer of `n` values.
    pub fn dev_zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<DevBuf<T>> {
        Ok(DevBuf {
            len: n,
            data: self.alloc::<T>(n, "device buffer")?,
        })
    }

    /// A device copy of `v`.
    pub fn dev_upload<T: cudarc::driver::DeviceRepr>(&self, v: &[T]) -> Result<DevBuf<T>> {
        if v.is_empty() {
            return Err(shape_err("dev_upload of nothing".into()));
        }
        Ok(DevBuf {
            len: v.len(),
            data: self.upload(v, "device buffer")?,
        })
    }

    /// Reads a device buffer back (synchronizes).
    pub fn dev_read<T: cudarc::driver::DeviceRepr + Default + Clone>(
        &self,
        b: &DevBuf<T>,
    ) -> Result<Vec<T>> {
        let v = self
            .stream
            .clone_dtoh(&b.data.slice(..b.len))
            .map_err(|e| dev_err("dev_read", e))?;
        self.synchronize()?;
        Ok(v)
    }

    /// The device address of a buffer.
    pub fn dev_ptr<T>(&self, b: &DevBuf<T>) -> u64 {
        let (p, _sync) = b.data.device_ptr(&self.stream);
        p
    }

    /// The device address of a KV cache's rows.
    pub fn cache_ptr(&self, c: &CudaCache) -> u64 {
        let (p, _sync) = c.data.device_ptr(&self.stream);
        p
    }

    /// Fills a KV cache with `backend::random_value` of `seed` (as `random_matrix`).
    pub fn fill_cache_random(&self, c: &mut CudaCache, scale: f32, seed: u64) -> Result<()> {
        let n = c.capacity * c.cols;
        if n == 0 {
            return Ok(());
        }
        self.random_fill(&mut c.data, n, c.dtype, scale, seed)
    }

    /// Writes f16 labels `labels[g][t][c] = K[t][g * head_dim + chan[g][c]]` for tokens
    /// `t0..t1` of `k` (rows of `n_kv * head_dim` or wider, f16/bf16), into a label buffer of
    /// `cap` tokens per KV head (raw f16 bits).
    #[allow(clippy::too_many_arguments)]
    pub fn ds_labels_from_cache(
        &self,
        k: &KvRows,
        n_kv: usize,
        head_dim: usize,
        chan: &DevBuf<i32>,
        r: usize,
        t0: usize,
        t1: usize,
        labels: &mut DevBuf<u16>,
        cap: usize,
    ) -> Result<()> {
        if chan.len < n_kv * r || labels.len < n_kv * cap * r || t1 > cap || t0 > t1 {
            return Err(shape_err("ds_labels_from_cache: buffer sizes".into()));
        }
        if t1 == t0 {
            return Ok(());
        }
        let name = match k.dtype {
            DType::BF16 => "ds_labels_from_cache_bf16",
            DType::F16 => "ds_labels_from_cache_f16",
            DType::F32 => {
                return Err(shape_err(
                    "labels from an f32 cache: not implemented".into(),
                ))
            }
        };
        let (ts, hd, rr) = (
            k.tok_stride as i64,
            int(head_dim, "head_dim")?,
            int(r, "r")?,
        );
        let (a, b_, c) = (t0 as i64, t1 as i64, cap as i64);
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&k.k)
            .arg(&ts)
            .arg(&hd)
            .arg(&chan.data)
            .arg(&rr)
            .arg(&a)
            .arg(&b_)
            .arg(&c);
        b.arg(&mut labels.data);
        let cfg = LaunchConfig {
            grid_dim: ((t1 - t0).div_ceil(256) as u32, n_kv as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.map_err(Self::launch_err(name))?;
        Ok(())
    }

    /// Label scores of one decode query `q` (row 0, `n_kv * group * head_dim` values) for the
    /// tokens `t0..t1`: `scores[g][t - t0] = sum_c (sum_{h in group g} q[h][chan[g][c]]) *
    /// labels[g][t][c]`.
    #[allow(clippy::too_many_arguments)]
    pub fn ds_label_scores(
        &self,
        q: &CudaTensor,
        chan: &DevBuf<i32>,
        n_kv: usize,
        group: usize,
        head_dim: usize,
        r: usize,
        labels: &DevBuf<u16>,
        cap: usize,
        t0: usize,
        t1: usize,
        scores: &mut DevBuf<f32>,
    ) -> Result<()> {
        self.ds_label_scores_at(
            q, 0, chan, n_kv, group, head_dim, r, labels, cap, t0, t1, scores,
        )
    }

    /// [`Self::ds_label_scores`] for the query in row `q_row` of `q`.
    #[allow(clippy::too_many_arguments)]
    pub fn ds_label_scores_at(
        &self,
        q: &CudaTensor,
        q_row: usize,
        chan: &DevBuf<i32>,
        n_kv: usize,
        group: usize,
        head_dim: usize,
        r: usize,
        labels: &DevBuf<u16>,
        cap: usize,
        t0: usize,
        t1: usize,
        scores: &mut DevBuf<f32>,
    ) -> Result<()> {
        let n = t1.saturating_sub(t0);
        if r == 0
            || r > DS_MAX_R
            || q.cols < n_kv * group * head_dim
            || q_row >= q.rows
            || chan.len < n_kv * r
            || labels.len < n_kv * cap * r
            || t1 > cap
            || scores.len < n_kv * n
        {
            return Err(shape_err("ds_label_scores: shapes".into()));
        }
        if n == 0 {
            return Ok(());
        }
        let name = "ds_label_scores";
        let (gr, hd, rr) = (
            int(group, "group")?,
            int(head_dim, "head_dim")?,
            int(r, "r")?,
        );
        let (c, a, b_) = (cap as i64, t0 as i64, t1 as i64);
        let qv = q.data.slice(q_row * q.cols..);
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&qv)
            .arg(&chan.data)
            .arg(&gr)
            .arg(&hd)
            .arg(&rr)
            .arg(&labels.data);
        b.arg(&c).arg(&a).arg(&b_).arg(&mut scores.data);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256) as u32, n_kv as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.map_err(Self::launch_err(name))?;
        Ok(())
    }

    /// Scratch for [`Self::ds_topk`] over `heads` rows of up to `n` scores.
    pub fn ds_topk_scratch(&self, heads: usize, n: usize) -> Result<TopkScratch> {
        let blocks = Self::topk_blocks(n).0;
        Ok(TopkScratch {
            state: self.alloc::<u32>(TK_STATE * heads, "top-k state")?,
            hist: self.alloc::<u32>(TK_BINS * heads, "top-k histograms")?,
            status: self.alloc::<u64>(blocks * heads, "top-k look-back status")?,
        })
    }

    /// (blocks, chunk) of the compaction pass over `n` scores.
    fn topk_blocks(n: usize) -> (usize, usize) {
        let chunk = (TK_THREADS * 16).max(n.div_ceil(1024));
        (n.div_ceil(chunk).max(1), chunk)
    }

    /// Chooses the one-launch cluster top-k (`on`, the default on sm_90 and later) or the
    /// multi-launch radix top-k; returns the choice in effect (the cluster kernel needs sm_90).
    pub fn set_topk_cluster(&self, on: bool) -> bool {
        let on = on && self.cluster_ok;
        self.topk_cluster
            .store(on, std::sync::atomic::Ordering::Relaxed);
        on
    }

    /// The `k` largest of each of the `heads` rows of `scores` (`n` per row; score descending,
    /// ties to the lower index), as indices + `base` in increasing order, written to
    /// `out[h * out_stride + out_off ..][..k]`. Exact (radix select on the f32 total order).
    #[allow(clippy::too_many_arguments)]
    pub fn ds_topk(
        &self,
        scores: &DevBuf<f32>,
        heads: usize,
        n: usize,
        k: usize,
        base: usize,
        out: &mut DevBuf<i32>,
        out_stride: usize,
        out_off: usize,
        scratch: &mut TopkScratch,
    ) -> Result<()> {
        if k == 0 || heads == 0 {
            return Ok(());
        }
        if k > n || scores.len < heads * n || out.len < (heads - 1) * out_stride + out_off + k {
            return Err(shape_err(format!(
                "ds_topk: k {k} of {n}, buffers too small"
            )));
        }
        if self.topk_cluster.load(std::sync::atomic::Ordering::Relaxed) {
            // One cluster of TKC blocks per head (kernels/sparse.cu), no scratch.
            let (nn, kk) = (n as i64, k as u32);
            let (os, oo, bs) = (out_stride as i64, out_off as i64, int(base, "base")?);
            let name = "ds_topk_cluster";
            let mut b = self.stream.launch_builder(self.f(name));
            b.arg(&scores.data).arg(&nn).arg(&kk);
            b.arg(&mut out.data).arg(&os).arg(&oo).arg(&bs);
            let cfg = LaunchConfig {
                grid_dim: (TKC as u32, int(heads, "heads")? as u32, 1),
                block_dim: (TKC_THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { b.launch(cfg) }.map_err(Self::launch_err(name))?;
            return Ok(());
        }
        let (blocks, chunk) = Self::topk_blocks(n);
        if scratch.state.len() < TK_STATE * heads
            || scratch.hist.len() < TK_BINS * heads
            || scratch.status.len() < blocks * heads
        {
            *scratch = self.ds_topk_scratch(heads, n)?;
        }
        let (nn, kk, hh) = (n as i64, k as u32, int(heads, "heads")?);
        let n_status = (blocks * heads) as i64;
        let name = "ds_topk_init";
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&mut scratch.state)
            .arg(&kk)
            .arg(&hh)
            .arg(&mut scratch.status)
            .arg(&n_status);
        let cfg = LaunchConfig {
            grid_dim: (heads.max(blocks * heads).div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.map_err(Self::launch_err(name))?;
        // Histogram blocks: about 4 per SM over all heads, at least 4096 scores each. The last
        // block of each head to finish a pass picks that pass's digit.
        let hblocks = (4 * self.sm_count)
            .div_ceil(heads)
            .min(n.div_ceil(4096))
            .max(1);
        for pass in 0..3i32 {
            let name = "ds_topk_hist";
            let mut b = self.stream.launch_builder(self.f(name));
            b.arg(&scores.data)
                .arg(&nn)
                .arg(&mut scratch.state)
                .arg(&mut scratch.hist)
                .arg(&pass);
            let cfg = LaunchConfig {
                grid_dim: (hblocks as u32, heads as u32, 1),
                block_dim: (512, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { b.launch(cfg) }.map_err(Self::launch_err(name))?;
        }
        let (ch, nb) = (chunk as i64, int(blocks, "top-k blocks")?);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, heads as u32, 1),
            block_dim: (TK_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (os, oo, bs) = (out_stride as i64, out_off as i64, int(base, "base")?);
        let name = "ds_topk_write";
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&scores.data)
            .arg(&nn)
            .arg(&ch)
            .arg(&nb)
            .arg(&mut scratch.state)
            .arg(&mut scratch.status);
        b.arg(&mut out.data).arg(&os).arg(&oo).arg(&bs);
        unsafe { b.launch(cfg) }.map_err(Self::launch_err(name))?;
        Ok(())
    }

    /// The fixed rows of a selection laid out `[sinks | k chosen | recent]` per head:
    /// `out[h * stride + j] = j` for `j < n_sink`, `out[h * stride + n_sink + k + j] = recent0 + j`.
    pub fn ds_fixed_rows(
        &self,
        out: &mut DevBuf<i32>,
        heads: usize,
        stride: usize,
        n_sink: usize,
        k: usize,
        recent0: usize,
        n_recent: usize,
    ) -> Result<()> {
        let m = n_sink.max(n_recent);
        if m == 0 {
            return Ok(());
        }
        if out.len < (heads - 1) * stride + n_sink + k + n_recent || n_sink + k + n_recent > stride
        {
            return Err(shape_err("ds_fixed_rows: buffer too small".into()));
        }
        let name = "ds_fixed_rows";
        let (s, a, kk, r0, b_) = (
            stride as i64,
            int(n_sink, "sink")?,
            int(k, "k")?,
            int(recent0, "recent0")?,
            int(n_recent, "recent")?,
        );
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&mut out.data)
            .arg(&s)
            .arg(&a)
            .arg(&kk)
            .arg(&r0)
            .arg(&b_);
        let cfg = LaunchConfig {
            grid_dim: (m.div_ceil(256) as u32, heads as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.map_err(Self::launch_err(name))?;
        Ok(())
    }

    /// Decode attention of one query (`q` row 0, `n_heads * head_dim`) over `n_sel` rows per KV
    /// head: rows `idx[g * idx_stride + j]` (or `j` without `idx`) of `kv`. Exact softmax with
    /// `scale`; GQA group per block, split over the rows when they are many. Writes `out` row 0.
    #[allow(clippy::too_many_arguments)]
    pub fn sparse_attention(
        &self,
        q: &CudaTensor,
        kv: &KvRows,
        idx: Option<&DevBuf<i32>>,
        idx_stride: usize,
        n_sel: usize,
        n_heads: usize,
        n_kv: usize,
        head_dim: usize,
        scale: f32,
        out: &mut CudaTensor,
    ) -> Result<()> {
        self.sparse_attention_at(
            q, 0, kv, idx, idx_stride, n_sel, n_heads, n_kv, head_dim, scale, out, 0,
        )
    }

    /// [`Self::sparse_attention`] for the query in row `q_row` of `q`, output to row `out_row`.
    #[allow(clippy::too_many_arguments)]
    pub fn sparse_attention_at(
        &self,
        q: &CudaTensor,
        q_row: usize,
        kv: &KvRows,
        idx: Option<&DevBuf<i32>>,
        idx_stride: usize,
        n_sel: usize,
        n_heads: usize,
        n_kv: usize,
        head_dim: usize,
        scale: f32,
        out: &mut CudaTensor,
        out_row: usize,
    ) -> Result<()> {
        let group = n_heads / n_kv.max(1);
        if n_kv == 0
            || n_heads % n_kv != 0
            || group > super::GQA_MAX_GROUP
            || !super::attention::gqa_head_dim(head_dim)
        {
            return Err(shape_err(format!(
                "sparse_attention: {n_heads} heads / {n_kv} KV heads / D {head_dim} not supported"
            )));
        }
        if q.cols < n_heads * head_dim
            || out.cols < n_heads * head_dim
            || n_sel == 0
            || q_row >= q.rows
            || out_row >= out.rows
        {
            return Err(shape_err("sparse_attention: shapes".into()));
        }
        if let Some(ix) = idx {
            if ix.len < (n_kv - 1) * idx_stride + n_sel {
                return Err(shape_err("sparse_attention: index buffer too small".into()));
            }
        }
        if kv.dtype == DType::F32 {
            return Err(shape_err(
                "sparse attention over f32 rows: not implemented".into(),
            ));
        }
        let name = super::attention::gqa_kernel_name(true, kv.dtype, head_dim, group);
        let want = (4 * self.sm_count).div_ceil(n_kv);
        let n_split = want.min(n_sel.div_ceil(256)).clamp(1, 65_535);
        let chunk = n_sel.div_ceil(n_split);
        let need = n_heads * n_split * (head_dim + 2);
        let mut guard = self.attn_scratch.lock().unwrap_or_else(|p| p.into_inner());
        if guard.as_ref().map_or(true, |p| p.len() < need) {
            *guard = None;
            *guard = Some(self.alloc::<f32>(need, "attention partials")?);
        }
        let part = guard.as_mut().expect("allocated above");
        let (ts, hs, is) = (
            kv.tok_stride as i64,
            kv.head_stride as i64,
            idx_stride as i64,
        );
        let (ns, nh, gr, hd) = (
            int(n_sel, "n_sel")?,
            int(n_heads, "heads")?,
            int(group, "group")?,
            int(head_dim, "head_dim")?,
        );
        let (sp, chk) = (n_split as i32, chunk as i32);
        let null: u64 = 0;
        let qv = q.data.slice(q_row * q.cols..);
        let out_cols = out.cols;
        let mut ov = out.data.slice_mut(out_row * out_cols..);
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&qv).arg(&kv.k).arg(&kv.v).arg(&ts).arg(&hs);
        match idx {
            Some(ix) => b.arg(&ix.data),
            None => b.arg(&null),
        };
        b.arg(&is)
            .arg(&ns)
            .arg(&mut ov)
            .arg(&nh)
            .arg(&gr)
            .arg(&hd)
            .arg(&scale);
        b.arg(&sp).arg(&chk).arg(&mut *part);
        let cfg = LaunchConfig {
            grid_dim: (n_kv as u32, n_split as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.map_err(Self::launch_err(name))?;
        if n_split > 1 {
            let name = "attention_combine";
            let (oc, zero) = (int(out_cols, "out cols")?, 0i32);
            let mut b = self.stream.launch_builder(self.f(name));
            b.arg(&*part).arg(&mut ov).arg(&oc).arg(&zero);
            b.arg(&nh).arg(&hd).arg(&sp);
            let cfg = LaunchConfig {
                grid_dim: (1, n_heads as u32, 1),
                block_dim: (head_dim.div_ceil(32).clamp(1, 8) as u32 * 32, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { b.launch(cfg) }.map_err(Self::launch_err(name))?;
        }
        Ok(())
    }

    /// Gathers rows: destination row `(g, j)` (`row_bytes`, contiguous, head-major) is read at
    /// `src + idx[g * idx_stride + j] * tok_stride + g * head_stride` (bytes). `src` may be a
    /// pinned host buffer (zero-copy over PCIe) or device memory. 16-byte aligned rows.
    #[allow(clippy::too_many_arguments)]
    pub fn ds_gather_rows(
        &self,
        src: u64,
        tok_stride: usize,
        head_stride: usize,
        idx: &DevBuf<i32>,
        idx_stride: usize,
        n_sel: usize,
        heads: usize,
        row_bytes: usize,
        dst: &mut DevBuf<u8>,
    ) -> Result<()> {
        if row_bytes % 16 != 0 || tok_stride % 16 != 0 || head_stride % 16 != 0 || src % 16 != 0 {
            return Err(shape_err(
                "ds_gather_rows: rows must be 16-byte aligned".into(),
            ));
        }
        if dst.len < heads * n_sel * row_bytes || idx.len < (heads.max(1) - 1) * idx_stride + n_sel
        {
            return Err(shape_err("ds_gather_rows: buffers too small".into()));
        }
        let units = heads * n_sel * row_bytes / 16;
        if units == 0 {
            return Ok(());
        }
        let name = "ds_gather_rows";
        let (ts, hs, is) = (tok_stride as i64, head_stride as i64, idx_stride as i64);
        let (ns, hh, ru) = (
            int(n_sel, "n_sel")?,
            int(heads, "heads")?,
            int(row_bytes / 16, "row")?,
        );
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&src)
            .arg(&ts)
            .arg(&hs)
            .arg(&idx.data)
            .arg(&is)
            .arg(&ns)
            .arg(&hh)
            .arg(&ru);
        b.arg(&mut dst.data);
        let threads = 256usize;
        let blocks = units.div_ceil(threads * 8).clamp(1, 16 * self.sm_count);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.map_err(Self::launch_err(name))?;
        Ok(())
    }

    /// The device address of a tensor (f32 rows).
    pub fn tensor_ptr(&self, t: &CudaTensor) -> u64 {
        let (p, _sync) = t.data.device_ptr(&self.stream);
        p
    }
}
