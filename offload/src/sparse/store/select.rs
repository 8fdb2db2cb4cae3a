//! Choosing the rows a decode query reads: the group's query labels (true or predicted), the
//! label top-k (or pages, `--page-tokens`) between the sinks and the recent window.

use super::{select_pages, SparseKvStore, EVICTED};

impl SparseKvStore {
    /// Sum over the group of KV head `g` of the query heads' values at `g`'s label channels
    /// (`q`: every head's full query, `head_dim` apart).
    pub(crate) fn group_label_query(&self, layer: usize, g: usize, q: &[f32]) -> Vec<f32> {
        let d = self.shape.head_dim;
        let group = self.shape.group();
        let ch = &self.channels[layer][g];
        let mut out = vec![0.0f32; ch.len()];
        for h in g * group..(g + 1) * group {
            for (o, &c) in out.iter_mut().zip(ch) {
                *o += q[h * d + c];
            }
        }
        out
    }

    /// The same sum from a layer-ahead prediction (`q_hat`: `r` values per head).
    pub(super) fn group_predicted_query(&self, g: usize, q_hat: &[f32]) -> Vec<f32> {
        let r = self.cfg.label_channels;
        let group = self.shape.group();
        let mut out = vec![0.0f32; r];
        for h in g * group..(g + 1) * group {
            for (o, &v) in out.iter_mut().zip(&q_hat[h * r..(h + 1) * r]) {
                *o += v;
            }
        }
        out
    }

    /// The positions attention reads for a query seeing `start..end`, in increasing order, and
    /// how many of them were chosen by score.
    pub(crate) fn select(
        &self,
        layer: usize,
        g: usize,
        qlab: &[f32],
        start: usize,
        end: usize,
        budget: usize,
    ) -> (Vec<usize>, usize) {
        let (sink_end, recent_start) = self.windows(start, end);
        let mut pos = self.live(start..sink_end);
        let middle = self.live(sink_end..recent_start);
        let recent = self.live(recent_start..end);
        let fixed = pos.len() + recent.len();
        let k = budget.saturating_sub(fixed).min(middle.len());
        let paged = self.cfg.page_tokens > 1;
        let mut chosen: Vec<usize> = if k == middle.len() && !paged {
            middle
        } else if k == 0 {
            Vec::new()
        } else {
            let slots: Vec<u32> = middle.iter().map(|&p| self.slot_of[p]).collect();
            let mut scores = Vec::new();
            self.labels.score(layer, g, qlab, &slots, &mut scores);
            if paged {
                let range = (sink_end, recent_start);
                select_pages(&middle, &scores, k, self.cfg.page_tokens, range)
            } else {
                let mut idx: Vec<u32> = (0..slots.len() as u32).collect();
                let by_score = |a: &u32, b: &u32| {
                    scores[*b as usize]
                        .total_cmp(&scores[*a as usize])
                        .then(a.cmp(b))
                };
                idx.select_nth_unstable_by(k - 1, by_score);
                idx.truncate(k);
                idx.iter().map(|&i| middle[i as usize]).collect()
            }
        };
        chosen.sort_unstable();
        let k = chosen.len();
        pos.extend_from_slice(&chosen);
        pos.extend_from_slice(&recent);
        (pos, k)
    }

    /// For a query seeing `start..end`: where the sinks end and the recent window starts (the
    /// top-k chooses among `sink_end..recent_start`).
    pub(super) fn windows(&self, start: usize, end: usize) -> (usize, usize) {
        let sink_end = (start + self.cfg.sink).min(end);
        let recent_start = end.saturating_sub(self.cfg.recent).max(sink_end);
        (sink_end, recent_start)
    }

    /// The positions of `range` that own a slot (not evicted), in order.
    pub(crate) fn live(&self, range: std::ops::Range<usize>) -> Vec<usize> {
        range.filter(|&p| self.slot_of[p] != EVICTED).collect()
    }
}
