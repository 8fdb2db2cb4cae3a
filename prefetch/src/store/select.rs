//! Decode-time selection: label scores -> top-k -> differential residency -> the misses'
//! rows into the row cache (from the slab, or from the file through pinned staging), on the
//! compute stream or one layer ahead on the prefetch stream, and the sparse attention that
//! reads the window buffer.

use farsight_kernels::cuda::{CudaBackend, CudaTensor, DevBuf, KvRows, Residency, StreamEvent};
use farsight_kernels::{CausalAttn, Result};

use super::{bad, OffloadKvStore, Select, State};
use crate::config::RowHome;

impl OffloadKvStore {
    /// Selects layer `l`'s rows for a query seeing `visible` tokens on `be`'s stream, with the
    /// query `q` (row `q_row`, full width, label channels used), and brings the misses into the
    /// row cache. Returns the top-k size.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn select(
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
        let n_kv = self.shape.n_kv_heads;
        let k = self.top_k(visible).max(res.min_k()).min(self.kc);
        if k == 0 {
            return Ok(0);
        }
        self.rank(be, sel, l, q, q_row, visible, k)?;
        let kc = self.kc;
        let s = self.cfg.sink;
        let lay = &self.layers[l];
        be.ds_residency(&sel.sel, kc, n_kv, k, res, stats)?;
        if !gather {
            return Ok(k);
        }
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
        // A page of P rows is one unit of the gather (contiguous in the `[g][token]` slab and
        // in its cache slot); the window's sinks and ring end on a page boundary.
        let p = self.page();
        let (ts, hs) = self.slab_strides();
        be.ds_gather_misses(
            self.cfg.home != RowHome::Device,
            lay.slab_ptr,
            ts * p,
            hs,
            res,
            n_kv,
            rb * p,
            lay.window_ptr,
            self.window_rows() / p,
            (s + self.cfg.recent) / p,
        )?;
        Ok(k)
    }

    /// Label scores of the candidates of a query seeing `visible` tokens (`q`, row `q_row`) in
    /// layer `l`, and their top `k` into `sel.sel` (tokens, or with pages the pages of the best
    /// page scores).
    #[allow(clippy::too_many_arguments)]
    fn rank(
        &self,
        be: &CudaBackend,
        sel: &mut Select,
        l: usize,
        q: &CudaTensor,
        q_row: usize,
        visible: usize,
        k: usize,
    ) -> Result<()> {
        let (n_kv, d, p) = (self.shape.n_kv_heads, self.shape.head_dim, self.page());
        let (first, n) = self.candidates(visible);
        let lay = &self.layers[l];
        lay.labels.scores(
            be,
            q,
            q_row,
            &lay.chan,
            self.shape.group(),
            d,
            first * p,
            (first + n) * p,
            &mut sel.scores,
        )?;
        let scores = if p > 1 {
            be.ds_page_max(&sel.scores, n_kv * n, p, &mut sel.page_scores)?;
            &sel.page_scores
        } else {
            &sel.scores
        };
        be.ds_topk(
            scores,
            n_kv,
            n,
            k,
            first,
            &mut sel.sel,
            self.kc,
            0,
            &mut sel.topk,
        )
    }

    /// [`KvStore::attend`]: dense over staged rows for a prefill chunk; for a decode query, the
    /// selection (predicted on the prefetch stream, or made now) and sparse attention over the
    /// window buffer.
    pub(super) fn attend_rows(
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
                if let Some(t) = st.timing.as_mut() {
                    let t0 = be.record_timed()?;
                    be.wait(&ev)?;
                    t.waits.push((t0, be.record_timed()?));
                } else {
                    be.wait(&ev)?;
                }
                v == visible
            }
            None => false,
        };
        let k = if predicted {
            let k = st.res[layer].k;
            if self.cfg.measure_recall && k > 0 {
                // The true selection, for the recall counters only.
                let kc = self.kc;
                let n_kv = self.shape.n_kv_heads;
                self.rank(be, &mut st.compute, layer, q, args.q_row0, visible, k)?;
                be.ds_overlap(
                    st.res[layer].selected(),
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
        let n_sel = visible.min(s) + visible.saturating_sub(s).min(rr) + k * self.page();
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
        // A larger row cache: attention reads the sinks, the ring and the selected slots.
        let idx = st.res[layer]
            .lru
            .as_ref()
            .filter(|_| k > 0)
            .map(|l| (&l.idx, l.idx_stride));
        be.sparse_attention_at(
            q,
            args.q_row0,
            &kv,
            idx.map(|i| i.0),
            idx.map_or(0, |i| i.1),
            n_sel,
            self.shape.n_heads,
            self.shape.n_kv_heads,
            d,
            args.scale,
            out,
            args.out_row0,
        )
    }

    /// Queues layer `layer`'s selection and row fetch on the prefetch stream (after `after`).
    pub(super) fn launch_ahead(&mut self, layer: usize, after: Option<StreamEvent>) -> Result<()> {
        self.launch_ahead_with(layer, after, layer % 2, true)
    }

    /// [`Self::launch_ahead`] with the predicted query labels of buffer `q_buf`; without the
    /// gather of the misses when `gather` is false (for timings).
    pub(super) fn launch_ahead_with(
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
        let t0 = match st.timing {
            Some(_) => Some(pf.record_timed()?),
            None => None,
        };
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
        if let (Some(t0), Some(t)) = (t0, st.timing.as_mut()) {
            t.chains.push((t0, pf.record_timed()?));
        }
        st.ready[layer] = Some((visible, pf.record()?));
        Ok(())
    }
}
