//! Differential residency with a row cache larger than one selection (`kernels/residency.cu`,
//! `--row-cache F`): the cache keeps rows that recent steps selected, evicting the least
//! recently selected, so a row that comes back a few steps later is not fetched again.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{dev_err, int, shape_err, CudaBackend, DevBuf, Residency};
use crate::backend::Result;

/// Threads of the residency kernels (`DS_RES_THREADS`).
const RES_THREADS: u32 = 1024;

/// Dynamic shared memory the kernel may take for the selection (the default limit is 48 KiB,
/// 4 KiB of which hold its age histogram); larger selections are searched in global memory.
const SMEM_LIMIT: usize = 43 * 1024;

/// The state a [`Residency`] of more rows than one selection keeps besides its lists: the
/// residents are in no particular order, with the step each was last selected.
pub struct LruResidency {
    /// Residents per head.
    n: DevBuf<i32>,
    age: DevBuf<u32>,
    kept_tok: DevBuf<i32>,
    kept_slot: DevBuf<i32>,
    kept_age: DevBuf<u32>,
    /// Attention's rows per head, `idx[g * idx_stride + j]`: for `j < idx0` the fixed window
    /// rows `j` (sinks and the recent ring), then for each selected entry its `unit` rows,
    /// `idx0 + slot * unit + 0..unit` (written by [`CudaBackend::ds_residency_lru`]).
    pub idx: DevBuf<i32>,
    pub idx_stride: usize,
    pub idx0: usize,
    /// Window rows per cache slot: 1, or a page's tokens with page-granular selection.
    pub unit: usize,
    /// The last selection (`[g][k_max]`, sorted), written by the kernel.
    sel: DevBuf<i32>,
    /// The ages' clock: selections made so far.
    now: u32,
}

impl Residency {
    /// The current selection, `[g][stride]` sorted with `k` entries per head, where the stride
    /// is the selection buffer's (the plain cache's resident list is the selection itself).
    pub fn selected(&self) -> &DevBuf<i32> {
        self.lru.as_ref().map_or(&self.tok, |l| &l.sel)
    }

    /// The smallest selection the next [`CudaBackend::ds_residency`] takes: the plain cache
    /// keeps its slots `0..k` in use, so its selections never shrink; a larger cache takes any.
    pub fn min_k(&self) -> usize {
        if self.lru.is_some() {
            0
        } else {
            self.k
        }
    }
}

impl CudaBackend {
    /// Residency state for `heads` KV heads of up to `cap` cached entries each, of which the
    /// selections (up to `k_max` entries) are attended after `idx0` fixed window rows; an entry
    /// (a row, or a page of `unit` rows) fills `unit` window rows.
    pub fn ds_residency_lru_state(
        &self,
        heads: usize,
        cap: usize,
        k_max: usize,
        idx0: usize,
        unit: usize,
    ) -> Result<Residency> {
        if unit == 0 {
            return Err(shape_err("ds_residency_lru: entries of 0 rows".into()));
        }
        if k_max > cap.max(1) {
            return Err(shape_err(format!(
                "ds_residency_lru: selections of {k_max} rows in a cache of {cap}"
            )));
        }
        let mut res = self.ds_residency_state(heads, cap)?;
        let n = heads * res.cap;
        let stride = idx0 + k_max.max(1) * unit;
        let idx: Vec<i32> = (0..heads).flat_map(|_| 0..stride as i32).collect();
        res.lru = Some(LruResidency {
            n: self.dev_zeros(heads)?,
            age: self.dev_zeros(n)?,
            kept_tok: self.dev_zeros(n)?,
            kept_slot: self.dev_zeros(n)?,
            kept_age: self.dev_zeros(n)?,
            idx: self.dev_upload(&idx)?,
            idx_stride: stride,
            idx0,
            unit,
            sel: self.dev_zeros(heads * k_max.max(1))?,
            now: 0,
        });
        Ok(res)
    }

    /// [`Self::ds_residency`] of a state made by [`Self::ds_residency_lru_state`]: the
    /// selection `sel[g * sel_stride ..][..k_new]` (sorted) is made resident, misses listed for
    /// [`Self::ds_gather_misses`] (at most `k_new` per head), rows not selected stay cached
    /// until the least recently selected ones must make room; the attention index list and
    /// [`Residency::selected`] are updated. `stats[0] += misses`, `stats[1] += hits`.
    pub(super) fn ds_residency_lru(
        &self,
        sel: &DevBuf<i32>,
        sel_stride: usize,
        heads: usize,
        k_new: usize,
        res: &mut Residency,
        stats: &mut DevBuf<u64>,
    ) -> Result<()> {
        let cap = res.cap;
        let lru = res
            .lru
            .as_mut()
            .ok_or_else(|| shape_err("ds_residency_lru: not an LRU residency state".into()))?;
        if k_new == 0
            || sel_stride * heads > lru.sel.len
            || k_new > cap
            || lru.idx0 + k_new * lru.unit > lru.idx_stride
            || heads * cap > res.tok.len
            || sel.len < (heads - 1) * sel_stride + k_new
            || stats.len < 2
        {
            return Err(shape_err(format!(
                "ds_residency_lru: {k_new} rows for a cache of {cap} ({heads} heads)"
            )));
        }
        lru.now = lru.now.wrapping_add(1);
        let name = "ds_residency_lru";
        let smem = k_new * 4;
        let use_smem = i32::from(smem <= SMEM_LIMIT);
        let (ss, kn, st, cp, now) = (
            sel_stride as i64,
            int(k_new, "k")?,
            cap as i64,
            int(cap, "cap")?,
            lru.now,
        );
        let (is, i0, un) = (
            lru.idx_stride as i64,
            int(lru.idx0, "idx0")?,
            int(lru.unit, "unit")?,
        );
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&sel.data)
            .arg(&ss)
            .arg(&kn)
            .arg(&mut res.tok.data)
            .arg(&mut res.slot.data)
            .arg(&mut lru.age.data)
            .arg(&mut lru.n.data)
            .arg(&st)
            .arg(&cp)
            .arg(&now);
        b.arg(&mut res.new_slot.data)
            .arg(&mut lru.kept_tok.data)
            .arg(&mut lru.kept_slot.data)
            .arg(&mut lru.kept_age.data)
            .arg(&mut res.miss_tok.data)
            .arg(&mut res.miss_slot.data)
            .arg(&mut res.n_miss.data);
        b.arg(&mut lru.idx.data)
            .arg(&is)
            .arg(&i0)
            .arg(&un)
            .arg(&mut lru.sel.data)
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

    /// Empties a residency state (after a truncation): nothing cached, nothing selected.
    pub fn ds_residency_clear(&self, res: &mut Residency) -> Result<()> {
        res.k = 0;
        if let Some(lru) = res.lru.as_mut() {
            self.stream
                .memset_zeros(&mut lru.n.data)
                .map_err(|e| dev_err("clearing the row cache", e))?;
        }
        Ok(())
    }

    /// Residents per head of an LRU state (for tests; synchronizes the stream).
    pub fn ds_residents(&self, res: &Residency) -> Result<Option<Vec<i32>>> {
        match &res.lru {
            Some(l) => self.dev_read(&l.n).map(Some),
            None => Ok(None),
        }
    }
}
