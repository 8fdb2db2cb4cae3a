//! A row cache in memory in front of a slow tier (the disk): per (layer, KV head) an LRU cache
//! of `factor` times the rows a sparse query reads (`--row-cache F`, the CPU counterpart of the
//! offloaded GPU store's row cache). Consecutive decode steps select mostly the same rows, and
//! rows dropped from one step's selection often come back a few steps later
//! (`cache_sim.rs`: 0.93 of the rows read hit a 4x cache at 1/64 on the default model), so
//! only the misses are read from the tier.
//!
//! Rows are cached by slot. A slot's rows change only through [`RowCache::invalidate`], which
//! the store calls for every slot it writes (a new token, or a slot reused after eviction).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use farsight_kernels::Result;

use crate::tier::KvTier;

/// The cache of one (layer, KV head).
#[derive(Default)]
struct HeadCache {
    /// Slot -> (row index in `rows`, stamp of its last read).
    at: HashMap<u32, (usize, u64)>,
    rows: Vec<u8>,
    free: Vec<usize>,
    /// Reads in order (slot, stamp); an entry whose slot was read again later is stale.
    order: VecDeque<(u32, u64)>,
    now: u64,
    /// Rows it may hold: `factor` x the largest sparse read so far.
    cap: usize,
}

impl HeadCache {
    fn touch(&mut self, slot: u32, ix: usize) {
        self.at.insert(slot, (ix, self.now));
        self.order.push_back((slot, self.now));
    }

    /// A row index for a new entry, evicting the least recently read entry when full.
    fn room(&mut self, row_bytes: usize) -> usize {
        while self.at.len() >= self.cap {
            let Some((slot, stamp)) = self.order.pop_front() else {
                break;
            };
            if self.at.get(&slot).is_some_and(|&(_, s)| s == stamp) {
                let (ix, _) = self.at.remove(&slot).expect("present");
                self.free.push(ix);
            }
        }
        self.free.pop().unwrap_or_else(|| {
            self.rows.resize(self.rows.len() + row_bytes, 0);
            self.rows.len() / row_bytes - 1
        })
    }

    /// Drops stale entries at the front of `order`, and rebuilds it when stale entries behind a
    /// long-lived one pile up.
    fn tidy(&mut self) {
        while let Some(&(slot, stamp)) = self.order.front() {
            if self.at.get(&slot).is_some_and(|&(_, s)| s == stamp) {
                break;
            }
            self.order.pop_front();
        }
        if self.order.len() > 4 * self.cap.max(self.at.len()) + 1024 {
            let mut live: Vec<(u32, u64)> = self.at.iter().map(|(&s, &(_, t))| (s, t)).collect();
            live.sort_by_key(|&(s, t)| (t, s));
            self.order = live.into();
        }
    }
}

/// Rows read through the cache: hits and misses so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RowCacheStats {
    pub hits: u64,
    pub misses: u64,
}

impl RowCacheStats {
    pub fn hit_rate(&self) -> Option<f64> {
        let n = self.hits + self.misses;
        (n > 0).then(|| self.hits as f64 / n as f64)
    }
}

pub(crate) struct RowCache {
    factor: usize,
    heads: usize,
    row_bytes: usize,
    caches: Vec<Mutex<HeadCache>>,
    stats: Mutex<RowCacheStats>,
}

impl RowCache {
    pub(crate) fn new(layers: usize, heads: usize, row_bytes: usize, factor: usize) -> RowCache {
        RowCache {
            factor: factor.max(1),
            heads,
            row_bytes,
            caches: (0..layers * heads)
                .map(|_| Mutex::new(HeadCache::default()))
                .collect(),
            stats: Mutex::new(RowCacheStats::default()),
        }
    }

    /// Reads the rows of `slots` of (`layer`, KV head `g`) into `out` (`slots.len()` rows),
    /// the cached ones from memory and the others from `tier` in one read, then cached.
    pub(crate) fn read(
        &self,
        tier: &dyn KvTier,
        layer: usize,
        g: usize,
        slots: &[u32],
        out: &mut [u8],
    ) -> Result<()> {
        let rb = self.row_bytes;
        let mut c = self.caches[layer * self.heads + g]
            .lock()
            .expect("row cache lock");
        c.now += 1;
        c.cap = c.cap.max(self.factor * slots.len());
        let mut missed = Vec::new();
        for (i, &slot) in slots.iter().enumerate() {
            match c.at.get(&slot) {
                Some(&(ix, _)) => {
                    out[i * rb..][..rb].copy_from_slice(&c.rows[ix * rb..][..rb]);
                    c.touch(slot, ix);
                }
                None => missed.push(i),
            }
        }
        if !missed.is_empty() {
            let want: Vec<u32> = missed.iter().map(|&i| slots[i]).collect();
            let mut buf = vec![0u8; want.len() * rb];
            tier.read(layer, g, &want, &mut buf)?;
            for (j, &i) in missed.iter().enumerate() {
                let row = &buf[j * rb..][..rb];
                out[i * rb..][..rb].copy_from_slice(row);
                let ix = c.room(rb);
                c.rows[ix * rb..][..rb].copy_from_slice(row);
                c.touch(slots[i], ix);
            }
        }
        c.tidy();
        drop(c);
        let mut st = self.stats.lock().expect("row cache stats lock");
        st.misses += missed.len() as u64;
        st.hits += (slots.len() - missed.len()) as u64;
        Ok(())
    }

    /// Forgets `slot`'s rows in every KV head of `layer` (they are being rewritten).
    pub(crate) fn invalidate(&self, layer: usize, slot: u32) {
        for g in 0..self.heads {
            let mut c = self.caches[layer * self.heads + g]
                .lock()
                .expect("row cache lock");
            if let Some((ix, _)) = c.at.remove(&slot) {
                c.free.push(ix);
            }
        }
    }

    /// Bytes of cached rows allocated.
    pub(crate) fn bytes(&self) -> usize {
        self.caches
            .iter()
            .map(|c| c.lock().expect("row cache lock").rows.len())
            .sum()
    }

    pub(crate) fn stats(&self) -> RowCacheStats {
        *self.stats.lock().expect("row cache stats lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tier::{HostKvTier, RowLayout};

    /// A host tier of 1 layer, 2 heads, 8-byte rows where slot `s` of head `g` holds bytes
    /// `[s, g, 0..]`, behind a cache; a counting wrapper would need the trait, so misses are
    /// read from the stats.
    fn setup(factor: usize) -> (HostKvTier, RowCache) {
        let layout = RowLayout {
            layers: 1,
            kv_heads: 2,
            row_bytes: 8,
            extent_slots: 64,
        };
        let mut tier = HostKvTier::new(layout);
        tier.grow(64).unwrap();
        for s in 0..64u32 {
            let mut both = vec![0u8; 16];
            both[0] = s as u8;
            both[8] = s as u8;
            both[9] = 1;
            tier.write(0, s, &both).unwrap();
        }
        (tier, RowCache::new(1, 2, 8, factor))
    }

    fn read(t: &HostKvTier, c: &RowCache, g: usize, slots: &[u32]) -> Vec<u8> {
        let mut out = vec![0u8; slots.len() * 8];
        c.read(t, 0, g, slots, &mut out).unwrap();
        out
    }

    #[test]
    fn reads_are_exact_and_recent_rows_hit() {
        let (t, c) = setup(2);
        let a = read(&t, &c, 1, &[3, 4, 5]);
        assert_eq!(
            a.chunks(8).map(|r| (r[0], r[1])).collect::<Vec<_>>(),
            [(3, 1), (4, 1), (5, 1)]
        );
        read(&t, &c, 1, &[6, 7, 8]);
        // Room for 6 rows: 3..8 all cached.
        let b = read(&t, &c, 1, &[5, 3, 8]);
        assert_eq!(b.chunks(8).map(|r| r[0]).collect::<Vec<_>>(), [5, 3, 8]);
        assert_eq!(c.stats(), RowCacheStats { hits: 3, misses: 6 });
        // Head 0 is its own cache.
        read(&t, &c, 0, &[3]);
        assert_eq!(c.stats().misses, 7);
    }

    #[test]
    fn the_least_recently_read_go_first_and_writes_invalidate() {
        let (mut t, c) = setup(2);
        read(&t, &c, 0, &[1, 2]);
        read(&t, &c, 0, &[3, 4]);
        read(&t, &c, 0, &[1, 2]); // 1, 2 now newer than 3, 4
        read(&t, &c, 0, &[5, 6]); // evicts 3, 4
        let before = c.stats().misses;
        read(&t, &c, 0, &[1, 2, 5, 6]);
        assert_eq!(c.stats().misses, before, "1, 2, 5, 6 stayed");
        read(&t, &c, 0, &[3]);
        assert_eq!(c.stats().misses, before + 1, "3 was evicted");
        // Slot 5 rewritten: the cache must not serve the old row.
        t.write(0, 5, &[99u8; 16]).unwrap();
        c.invalidate(0, 5);
        assert_eq!(read(&t, &c, 0, &[5])[0], 99);
        assert!(
            c.bytes() <= 8 * 8,
            "at most 2 x 4 rows of 8 bytes: {}",
            c.bytes()
        );
    }
}
