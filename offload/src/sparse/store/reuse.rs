//! Step-to-step reuse of the selections, and the simulated larger row caches
//! (`cache_sim.rs`), counted per call.

use super::{overlap, Chosen, SparseKvStore};

impl SparseKvStore {
    /// Step-to-step reuse of one call's selections: per KV head, the top-k rows of each query
    /// against those of the query one position earlier (the previous call's last query for the
    /// first), counted where both selected sparsely. `chosen` is in task order (query-major).
    pub(super) fn count_reuse(&self, layer: usize, chosen: Vec<Option<Chosen>>) {
        let kv = self.shape.n_kv_heads;
        let mut last = self.last_chosen.lock().expect("reuse lock");
        let mut sims = self.cache_sim.lock().expect("reuse lock");
        let mut st = self.stats.lock().expect("stats lock");
        for (t, c) in chosen.into_iter().enumerate() {
            if let Some(sim) = sims.as_mut().map(|s| &mut s[layer * kv + t % kv]) {
                match c
                    .as_ref()
                    .map(|c| (c.end, c.guess.as_ref().unwrap_or(&c.truth)))
                {
                    Some((end, read)) if !read.is_empty() => {
                        if let Some(hits) = sim.feed(end, read) {
                            st.add_cache(layer, &hits, read.len());
                        }
                    }
                    _ => sim.clear(),
                }
            }
            let prev = &mut last[layer * kv + t % kv];
            if let (Some(p), Some(c)) = (prev.as_ref(), c.as_ref()) {
                if p.end + 1 == c.end && !p.truth.is_empty() && !c.truth.is_empty() {
                    st.add_reuse(layer, overlap(&c.truth, &p.truth), c.truth.len());
                    if let (Some(pg), Some(cg)) = (&p.guess, &c.guess) {
                        if !pg.is_empty() && !cg.is_empty() {
                            st.add_ahead_reuse(layer, overlap(cg, pg), cg.len());
                        }
                    }
                }
            }
            *prev = c;
        }
    }
}
