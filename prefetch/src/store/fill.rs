//! Filling an [`OffloadKvStore`] outside the decode path: the fixed window rows (sinks and the
//! recent ring) from the slabs, random contexts for benchmarks, and the prefetch chain timed
//! alone (the transfer-only step of `farsight bench offload`).

use farsight_kernels::cuda::{CudaBackend, KvRows};
use farsight_kernels::Result;
use farsight_offload::sparse::Predict;

use super::{bad, OffloadKvStore};
use crate::config::RowHome;

impl OffloadKvStore {
    /// Copies tokens `toks` (sinks and recent tokens, each < the store's length) of every
    /// layer from the slab into their fixed window slots (a sink at its own index, a recent
    /// token at `sink + (t - sink) % recent` in the ring), on `be`'s stream.
    pub(super) fn load_fixed_rows(&self, be: &CudaBackend, toks: &[usize]) -> Result<()> {
        if toks.is_empty() {
            return Ok(());
        }
        let (n_kv, d, s, rr) = (
            self.shape.n_kv_heads,
            self.shape.head_dim,
            self.cfg.sink,
            self.cfg.recent,
        );
        let row = 2 * d * self.cfg.dtype.size();
        let wr = self.window_rows();
        let mut res = be.ds_residency_state(n_kv, toks.len())?;
        let per_head = |f: &dyn Fn(usize, usize) -> i32| -> Vec<i32> {
            (0..n_kv)
                .flat_map(|_| toks.iter().enumerate().map(|(i, &t)| f(i, t)))
                .collect()
        };
        res.miss_slot = be.dev_upload(&per_head(&|_, t| {
            if t < s {
                t as i32
            } else {
                (s + (t - s) % rr) as i32
            }
        }))?;
        res.n_miss = be.dev_upload(&vec![toks.len() as i32; n_kv])?;
        res.k = toks.len();
        let Some(disk) = &self.disk else {
            res.miss_tok = be.dev_upload(&per_head(&|_, t| t as i32))?;
            let (ts, hs) = self.slab_strides();
            for lay in &self.layers {
                be.ds_gather_misses(
                    self.cfg.home == RowHome::Host,
                    lay.slab_ptr,
                    ts,
                    hs,
                    &res,
                    n_kv,
                    row,
                    lay.window_ptr,
                    wr,
                    0,
                )?;
            }
            return Ok(());
        };
        // Disk tier: every layer's rows of `toks` read from the file into pinned memory (in
        // the slab layout, token i at row i), then gathered from there.
        res.miss_tok = be.dev_upload(&per_head(&|i, _| i as i32))?;
        let tb = n_kv * row;
        let per_layer = toks.len() * tb;
        let mut buf = be.pinned(per_layer * self.layers.len())?;
        let t32: Vec<u32> = toks.iter().map(|&t| t as u32).collect();
        for (l, part) in buf.as_mut_slice()?.chunks_exact_mut(per_layer).enumerate() {
            disk.rows.load_tokens(l, &t32, part)?;
        }
        let ptr = buf.ptr()?;
        for (l, lay) in self.layers.iter().enumerate() {
            be.ds_gather_misses(
                true,
                ptr + (l * per_layer) as u64,
                tb,
                row,
                &res,
                n_kv,
                row,
                lay.window_ptr,
                wr,
                0,
            )?;
        }
        // The kernels read `buf`: done before it is freed.
        be.synchronize()
    }

    /// Fills the first `n` tokens of every layer with random rows (`scale`, `seed`) and their
    /// labels, and marks them committed: a context for decode benchmarks without a prefill.
    pub fn fill_random(&mut self, be: &CudaBackend, n: usize, scale: f32, seed: u64) -> Result<()> {
        if n > self.cfg.capacity {
            return Err(bad(format!(
                "{n} tokens exceed the store's capacity {}",
                self.cfg.capacity
            )));
        }
        let (n_kv, d) = (self.shape.n_kv_heads, self.shape.head_dim);
        let (s, rr) = (self.cfg.sink, self.cfg.recent);
        let es = self.cfg.dtype.size();
        // Rows are made on the device in chunks (random values, then their labels), then copied
        // to the slab: one pass over PCIe at copy speed. The chunk is laid out as the slab:
        // `[token][g]`, or with pages `[g][token]` (copied head by head).
        let paged = self.page() > 1;
        let row = 2 * d * es;
        let row_tok = n_kv * row;
        let chunk = n.clamp(1, 32_768);
        let tmp = be.dev_zeros::<u8>(chunk * row_tok)?;
        let tmp_ptr = be.dev_ptr(&tmp);
        // Element strides of the chunk between tokens and between heads.
        let (kts, khs) = if paged {
            (2 * d, chunk * 2 * d)
        } else {
            (n_kv * 2 * d, 2 * d)
        };
        let (_, slab_hs) = self.slab_strides();
        // Disk tier: through a pinned bounce buffer to the file.
        let mut bounce = match self.disk {
            Some(_) => Some(be.pinned(chunk * row_tok)?),
            None => None,
        };
        for (l, lay) in self.layers.iter_mut().enumerate() {
            for t0 in (0..n).step_by(chunk) {
                let t1 = (t0 + chunk).min(n);
                let seed_c = seed ^ ((l as u64 + 1) << 32) ^ (t0 as u64).wrapping_mul(0x9E37_79B9);
                let filled = if paged { chunk } else { t1 - t0 };
                be.random_fill_ptr(
                    tmp_ptr,
                    filled * n_kv * 2 * d,
                    self.cfg.dtype,
                    scale,
                    seed_c,
                )?;
                // The label kernel addresses token t at k + t * tok_stride: shift the base so
                // that token t0 is the chunk's first row. The label channels index into K.
                let base = tmp_ptr.wrapping_sub((t0 * kts * es) as u64);
                let k = KvRows {
                    k: base,
                    v: base,
                    tok_stride: kts,
                    head_stride: khs,
                    dtype: self.cfg.dtype,
                };
                lay.labels
                    .write_from_cache(be, &k, khs, &lay.chan, t0, t1)?;
                let bytes = (t1 - t0) * row_tok;
                match (&mut self.disk, &mut bounce) {
                    (Some(disk), Some(b)) => {
                        be.copy_ptr(b.ptr()?, tmp_ptr, bytes)?;
                        be.synchronize()?;
                        disk.rows.store_tokens(l, t0, &b.as_mut_slice()?[..bytes])?;
                    }
                    _ if paged => {
                        for g in 0..n_kv {
                            be.copy_ptr(
                                lay.slab_ptr + (g * slab_hs + t0 * row) as u64,
                                tmp_ptr + (g * chunk * row) as u64,
                                (t1 - t0) * row,
                            )?;
                        }
                    }
                    _ => be.copy_ptr(lay.slab_ptr + (t0 * row_tok) as u64, tmp_ptr, bytes)?,
                }
            }
        }
        // Sinks and the ring from the slab.
        let toks: Vec<usize> = (0..n.min(s))
            .chain(n.saturating_sub(rr).max(s)..n)
            .collect();
        self.load_fixed_rows(be, &toks)?;
        be.synchronize()?;
        let mut st = self.st.lock().unwrap_or_else(|p| p.into_inner());
        for res in st.res.iter_mut() {
            be.ds_residency_clear(res)?;
        }
        be.synchronize()?;
        self.len = n;
        Ok(())
    }

    /// The prefetch chain of every layer (label scores, top-k, residency, gather of the misses)
    /// run alone on the prefetch stream, as one decode step would queue it: its wall time in ms,
    /// a "transfer-only" step for overlap figures. The queries are the last two predicted query
    /// labels (layer parity `flip`-swapped, so that calls alternating `flip` select other rows
    /// than the caches hold, as a new decode step does). Needs layer-ahead prediction and one
    /// decode step before; the row caches change as a step would change them, and the next step
    /// selects on its own compute stream (the queued predictions are dropped).
    /// With `gather` false the misses are not fetched (the selection part of the chain alone).
    pub fn time_prefetch_chain(&mut self, flip: bool, gather: bool) -> Result<f64> {
        if self.cfg.predict != Predict::LayerAhead {
            return Err(bad(
                "time_prefetch_chain needs layer-ahead prediction".into()
            ));
        }
        self.prefetch.device_synchronize()?;
        {
            // A larger row cache would soon hold both query buffers' selections: start it empty,
            // so that every selected row is fetched.
            let st = self.st.get_mut().unwrap_or_else(|p| p.into_inner());
            for r in st.res.iter_mut().filter(|r| r.lru.is_some()) {
                self.prefetch.ds_residency_clear(r)?;
            }
        }
        let t = std::time::Instant::now();
        for l in 0..self.layers.len() {
            self.launch_ahead_with(l, None, (l + usize::from(flip)) % 2, gather)?;
        }
        self.prefetch.synchronize()?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let st = self.st.get_mut().unwrap_or_else(|p| p.into_inner());
        st.ready.iter_mut().for_each(|r| *r = None);
        if !gather {
            // The caches did not receive the rows the residency lists hold: forget them.
            for r in st.res.iter_mut() {
                self.prefetch.ds_residency_clear(r)?;
            }
            self.prefetch.synchronize()?;
        }
        Ok(ms)
    }
}
