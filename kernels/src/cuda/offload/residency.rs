//! The selection side of an offloaded step: layer-ahead query labels, the differential
//! residency of the selected rows in one layer's GPU row cache ([`Residency`]; the variant with
//! a larger, LRU cache is `cuda/residency.rs`) and recall counters.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::backend::Result;
use crate::cuda::{int, shape_err, CudaBackend, CudaTensor, DevBuf};

/// Threads of the residency kernel (`DS_RES_THREADS`).
const RES_THREADS: u32 = 1024;

/// Dynamic shared memory `ds_residency` may take for its two token lists: the default 48 KiB
/// less room for its static shared memory (the block scan's partial sums); larger lists are
/// searched in global memory.
const RES_SMEM_LIMIT: usize = 48 * 1024 - 256;

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
    pub lru: Option<crate::cuda::residency::LruResidency>,
}

impl CudaBackend {
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
        let smem = (k_new + res.k) * 4;
        let use_smem = i32::from(smem <= RES_SMEM_LIMIT);
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

    /// Page scores for page-granular selection: `out[i]` = the largest of `scores[i * page ..
    /// (i + 1) * page]` for `i < n` (label scores of whole pages, every head's in a row, so
    /// `[g][page]` out of `[g][page][token]`).
    pub fn ds_page_max(
        &self,
        scores: &DevBuf<f32>,
        n: usize,
        page: usize,
        out: &mut DevBuf<f32>,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        if page == 0 || scores.len < n * page || out.len < n {
            return Err(shape_err(format!(
                "ds_page_max: {n} pages of {page} tokens, buffers too small"
            )));
        }
        let name = "ds_page_max";
        let (nn, pp) = (n as i64, int(page, "page")?);
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&scores.data).arg(&nn).arg(&pp).arg(&mut out.data);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.map_err(Self::launch_err(name))?;
        Ok(())
    }
}
