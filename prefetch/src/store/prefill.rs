//! Prefill attention over the offloaded rows: a chunk attends densely to every earlier token,
//! whose rows are unpacked from the slab (or read from the file) into device staging; the next
//! layer's past rows are staged on the prefetch stream while this layer runs.

use farsight_kernels::cuda::{CudaBackend, CudaTensor};
use farsight_kernels::{Backend, CausalAttn, Result};

use super::{OffloadKvStore, State};

impl OffloadKvStore {
    /// Dense attention of a prefill chunk over layer `l`'s rows, staged on the device.
    pub(super) fn attend_prefill(
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
            let strides = (tb, tb / n_kv);
            be.ds_unpack_rows(past_ptr, n_kv, d, strides, 0, args.n_past, k, v)?;
            be.ds_unpack_rows(pending, n_kv, d, strides, args.n_past, total, k, v)?;
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
            be.ds_unpack_rows(ptr, n_kv, d, self.slab_strides(), from, total, k, v)?;
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
                self.slab_strides(),
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
