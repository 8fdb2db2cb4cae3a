//! A simulated GPU row cache larger than one selection: per (layer, KV head), an LRU cache of
//! `factor x k` rows in front of the fetch, where `k` is the current top-k size. Factor 1 is
//! the cache the offloaded GPU store keeps (exactly the previous selection); larger factors also
//! keep rows dropped a few steps ago, so a row that comes back is not fetched again. The hit
//! rates tell what a larger cache would save before one is built (`eval ppl` prints them).

use std::collections::VecDeque;

/// Cache sizes simulated, as multiples of the top-k.
pub const CACHE_FACTORS: [usize; 3] = [1, 2, 4];

/// One LRU cache over token ids: a stamp per token (the step it was last selected, 0 when not
/// cached) and the accesses in order, from which evictions pop the oldest (entries whose token
/// was selected again later are stale and skipped).
#[derive(Clone, Debug, Default)]
struct Lru {
    stamp: Vec<u32>,
    order: VecDeque<(u32, u32)>,
    len: usize,
}

impl Lru {
    /// Selects `sel` at `step` (> every earlier step) with room for `cap` rows; returns the hits.
    fn access(&mut self, sel: &[u32], step: u32, cap: usize) -> usize {
        if let Some(&max) = sel.iter().max() {
            if self.stamp.len() <= max as usize {
                self.stamp.resize(max as usize + 1, 0);
            }
        }
        let mut hits = 0;
        for &t in sel {
            let s = &mut self.stamp[t as usize];
            if *s != 0 {
                hits += 1;
            } else {
                self.len += 1;
            }
            *s = step;
            self.order.push_back((t, step));
        }
        // The current selection holds the newest stamps, so it is never evicted while
        // cap >= |sel|.
        while self.len > cap.max(sel.len()) {
            let Some((t, s)) = self.order.pop_front() else {
                break;
            };
            if self.stamp[t as usize] == s {
                self.stamp[t as usize] = 0;
                self.len -= 1;
            }
        }
        while let Some(&(t, s)) = self.order.front() {
            if self.stamp[t as usize] == s {
                break;
            }
            self.order.pop_front();
        }
        hits
    }
}

/// The caches of one (layer, KV head), one per [`CACHE_FACTORS`] entry.
#[derive(Clone, Debug, Default)]
pub(crate) struct CacheSim {
    caches: Vec<Lru>,
    step: u32,
    /// The `end` of the last query fed (a gap resets the caches).
    end: usize,
}

impl CacheSim {
    /// Feeds the rows fetched for the query ending at `end`; returns the hits per factor when
    /// this query directly follows the last one fed (`None` after a gap, which empties the
    /// caches: another sequence or a truncation).
    pub(crate) fn feed(&mut self, end: usize, sel: &[u32]) -> Option<Vec<usize>> {
        let follows = self.step > 0 && self.end + 1 == end;
        if !follows {
            self.caches = vec![Lru::default(); CACHE_FACTORS.len()];
            self.step = 0;
        }
        self.step += 1;
        self.end = end;
        let step = self.step;
        let hits: Vec<usize> = self
            .caches
            .iter_mut()
            .zip(CACHE_FACTORS)
            .map(|(c, f)| c.access(sel, step, f * sel.len()))
            .collect();
        follows.then_some(hits)
    }

    /// Forgets everything (the query chain was broken).
    pub(crate) fn clear(&mut self) {
        *self = CacheSim::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factor_one_keeps_exactly_the_previous_selection() {
        let mut c = CacheSim::default();
        assert_eq!(c.feed(10, &[1, 2, 3, 4]), None);
        assert_eq!(c.feed(11, &[3, 4, 5, 6]).unwrap()[0], 2);
        // 1 and 2 were dropped by the 1x cache, kept by the 2x and 4x ones.
        assert_eq!(c.feed(12, &[1, 2, 5, 6]), Some(vec![2, 4, 4]));
        // 2x holds 8 rows: {1, 2, 5, 6} newest, then {3, 4}; 4x holds everything.
        assert_eq!(c.feed(13, &[3, 4, 7, 8]), Some(vec![0, 2, 2]));
        assert_eq!(c.feed(14, &[9, 10, 11, 12]), Some(vec![0, 0, 0]));
        // 2x now holds {9..12} and {3, 4, 7, 8}: 1 and 2 are gone; 4x still has them.
        assert_eq!(c.feed(15, &[1, 2, 3, 4]), Some(vec![0, 2, 4]));
    }

    #[test]
    fn a_gap_empties_the_caches() {
        let mut c = CacheSim::default();
        c.feed(10, &[1, 2]);
        assert_eq!(c.feed(11, &[1, 2]), Some(vec![2, 2, 2]));
        assert_eq!(c.feed(13, &[1, 2]), None);
        assert_eq!(c.feed(14, &[1, 2]), Some(vec![2, 2, 2]));
        c.clear();
        assert_eq!(c.feed(15, &[1, 2]), None);
    }

    #[test]
    fn the_cache_stays_bounded() {
        let mut c = CacheSim::default();
        for step in 0..1000u32 {
            let sel: Vec<u32> = (0..8).map(|i| step * 8 + i).collect();
            c.feed(100 + step as usize, &sel);
        }
        for (lru, f) in c.caches.iter().zip(CACHE_FACTORS) {
            assert_eq!(lru.len, 8 * f);
            assert!(
                lru.order.len() <= 8 * f,
                "{} entries queued",
                lru.order.len()
            );
        }
    }
}
