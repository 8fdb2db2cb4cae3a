//! Row gathers of the residency misses into the GPU row cache, from pinned host memory (on few
//! blocks, or on an SM partition of their own) or from device memory.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::backend::Result;
use crate::cuda::{dev_err, int, shape_err, CudaBackend, DevBuf, Residency};

impl CudaBackend {
    /// Most blocks of a row gather from pinned host memory.
    pub fn gather_blocks(&self) -> usize {
        self.gather_blocks.load(Ordering::Relaxed)
    }

    /// Sets [`Self::gather_blocks`] (at least 1) for this backend's later launches.
    pub fn set_gather_blocks(&self, n: usize) {
        self.gather_blocks.store(n.max(1), Ordering::Relaxed);
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
}
