//! Slots for tokens: which slot of the host and disk tiers each live token owns.
//!
//! The shape of vLLM v1's block pool (as ported in mistral.rs `block_pool.rs`) and llama.cpp's
//! `llama-kv-cells.h`: per-slot bookkeeping in one `Vec`, the free slots chained through that
//! same `Vec` by index (no heap nodes), and every method asserting its preconditions.
//!
//! Cost: `alloc` and `free` are O(1) (amortised for `alloc`, which may push one entry);
//! `is_allocated`, `in_use` and `capacity` are O(1). Freed slots are reused last-freed-first
//! before the pool grows; the lowest free slot is not preferred.
//!
//! **Double free** (or freeing a slot never handed out) panics in every build: the check is one
//! load, and carrying on would put the slot on the free list twice and later hand it to two
//! tokens, which silently corrupts their KV rows.

use farsight_kernels::{KernelError, Result};

/// `next[slot]` of a slot that is owned by a token.
const ALLOCATED: u32 = u32::MAX;
/// `next[slot]` of the last free slot, and `free_head` of a pool with no free slot.
const END_OF_FREE_LIST: u32 = u32::MAX - 1;
/// Slots a pool can hand out: `0 .. MAX_SLOTS` (the two sentinels are never slot numbers).
pub const MAX_SLOTS: u32 = u32::MAX - 1;

/// Hands out slot numbers to tokens and takes them back.
#[derive(Clone, Debug)]
pub struct SlotPool {
    /// One entry per slot ever handed out (`next.len()` is the capacity): [`ALLOCATED`] when a
    /// token owns the slot, otherwise the next free slot ([`END_OF_FREE_LIST`] for the last).
    next: Vec<u32>,
    /// First free slot, or [`END_OF_FREE_LIST`]; every free slot is reachable from it exactly once.
    free_head: u32,
    /// Slots owned by a token; `in_use + (free slots) == next.len()`.
    in_use: usize,
    /// `next.len()` never exceeds this ([`MAX_SLOTS`]; smaller only in tests).
    max_slots: u32,
}

impl Default for SlotPool {
    fn default() -> Self {
        Self::new()
    }
}

impl SlotPool {
    /// An empty pool (capacity 0).
    pub fn new() -> Self {
        SlotPool {
            next: Vec::new(),
            free_head: END_OF_FREE_LIST,
            in_use: 0,
            max_slots: MAX_SLOTS,
        }
    }

    /// Takes a slot: the most recently freed one, or a new slot past the capacity when none is
    /// free. Fails (with [`KernelError::OutOfMemory`]) only when all [`MAX_SLOTS`] slots are owned.
    pub fn alloc(&mut self) -> Result<u32> {
        let slot = if self.free_head != END_OF_FREE_LIST {
            let slot = self.free_head;
            let next = self.next[slot as usize];
            debug_assert_ne!(next, ALLOCATED, "free list reaches owned slot {slot}");
            self.free_head = next;
            slot
        } else {
            let slot = self.next.len();
            if slot >= self.max_slots as usize {
                return Err(KernelError::OutOfMemory {
                    device: "slot pool".into(),
                    what: format!("all {} token slots are in use", self.max_slots),
                });
            }
            self.next.push(END_OF_FREE_LIST);
            slot as u32
        };
        self.next[slot as usize] = ALLOCATED;
        self.in_use += 1;
        Ok(slot)
    }

    /// Gives `slot` back.
    ///
    /// # Panics
    /// When `slot` is not owned (never handed out, or already freed): see the module doc.
    pub fn free(&mut self, slot: u32) {
        assert!(
            (slot as usize) < self.next.len(),
            "SlotPool::free({slot}): slot was never allocated (capacity {})",
            self.next.len()
        );
        assert_eq!(
            self.next[slot as usize], ALLOCATED,
            "SlotPool::free({slot}): double free (slot is already free)"
        );
        self.next[slot as usize] = self.free_head;
        self.free_head = slot;
        self.in_use -= 1;
    }

    /// Slots owned by tokens now.
    pub fn in_use(&self) -> usize {
        self.in_use
    }

    /// Free slots that [`SlotPool::alloc`] will hand out before growing.
    pub fn free_count(&self) -> usize {
        self.next.len() - self.in_use
    }

    /// Highest slot ever handed out + 1: the slots the tiers must be able to address.
    pub fn capacity(&self) -> usize {
        self.next.len()
    }

    /// True when a token owns `slot` (false for a free slot or one past the capacity).
    pub fn is_allocated(&self, slot: u32) -> bool {
        self.next.get(slot as usize) == Some(&ALLOCATED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn new_pool_is_empty() {
        let pool = SlotPool::new();
        assert_eq!(
            (pool.in_use(), pool.capacity(), pool.free_count()),
            (0, 0, 0)
        );
        assert!(!pool.is_allocated(0));
    }

    #[test]
    fn alloc_grows_with_consecutive_slots() {
        let mut pool = SlotPool::new();
        let slots: Vec<u32> = (0..5).map(|_| pool.alloc().unwrap()).collect();
        assert_eq!(slots, [0, 1, 2, 3, 4]);
        assert_eq!((pool.in_use(), pool.capacity()), (5, 5));
    }

    #[test]
    fn freed_slot_is_reused_before_growing() {
        let mut pool = SlotPool::new();
        for _ in 0..4 {
            pool.alloc().unwrap();
        }
        pool.free(2);
        assert!(!pool.is_allocated(2));
        assert_eq!(pool.alloc().unwrap(), 2);
        assert_eq!(pool.capacity(), 4);
        assert_eq!(pool.alloc().unwrap(), 4);
    }

    #[test]
    fn reuse_is_last_freed_first() {
        let mut pool = SlotPool::new();
        for _ in 0..4 {
            pool.alloc().unwrap();
        }
        pool.free(0);
        pool.free(3);
        assert_eq!(pool.alloc().unwrap(), 3);
        assert_eq!(pool.alloc().unwrap(), 0);
    }

    #[test]
    fn is_allocated_tracks_ownership() {
        let mut pool = SlotPool::new();
        let s = pool.alloc().unwrap();
        assert!(pool.is_allocated(s));
        pool.free(s);
        assert!(!pool.is_allocated(s));
        assert!(!pool.is_allocated(99));
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_panics() {
        let mut pool = SlotPool::new();
        let s = pool.alloc().unwrap();
        pool.free(s);
        pool.free(s);
    }

    #[test]
    #[should_panic(expected = "never allocated")]
    fn freeing_unknown_slot_panics() {
        let mut pool = SlotPool::new();
        pool.free(0);
    }

    #[test]
    fn alloc_fails_when_every_slot_is_owned() {
        let mut pool = SlotPool {
            max_slots: 2,
            ..SlotPool::new()
        };
        pool.alloc().unwrap();
        pool.alloc().unwrap();
        let err = pool.alloc().unwrap_err().to_string();
        assert!(err.contains("all 2 token slots are in use"), "{err}");
        pool.free(1);
        assert_eq!(pool.alloc().unwrap(), 1);
    }

    /// Walks the free list, checking that it only reaches free slots, each once.
    fn check_invariants(pool: &SlotPool, owned: &HashSet<u32>) {
        let mut free = HashSet::new();
        let mut at = pool.free_head;
        while at != END_OF_FREE_LIST {
            assert!(free.insert(at), "slot {at} twice on the free list");
            assert!(!owned.contains(&at), "owned slot {at} on the free list");
            at = pool.next[at as usize];
        }
        assert_eq!(pool.in_use(), owned.len());
        assert_eq!(pool.in_use() + free.len(), pool.capacity());
        for s in 0..pool.capacity() as u32 {
            assert_eq!(pool.is_allocated(s), owned.contains(&s), "slot {s}");
        }
    }

    proptest! {
        /// Random alloc/free sequences: no slot owned twice, in_use + free == capacity, and
        /// the pool grows only when no freed slot is waiting.
        #[test]
        fn random_alloc_free_keeps_invariants(ops in prop::collection::vec((any::<bool>(), any::<prop::sample::Index>()), 1..400)) {
            let mut pool = SlotPool::new();
            let mut owned: Vec<u32> = Vec::new();
            let mut owned_set = HashSet::new();
            for (is_alloc, pick) in ops {
                if is_alloc || owned.is_empty() {
                    let free_before = pool.free_count();
                    let cap_before = pool.capacity();
                    let s = pool.alloc().unwrap();
                    prop_assert!(owned_set.insert(s), "slot {} handed out twice", s);
                    owned.push(s);
                    if free_before > 0 {
                        prop_assert!((s as usize) < cap_before, "grew while slots were free");
                        prop_assert_eq!(pool.capacity(), cap_before);
                    } else {
                        prop_assert_eq!(s as usize, cap_before);
                    }
                } else {
                    let s = owned.swap_remove(pick.index(owned.len()));
                    owned_set.remove(&s);
                    pool.free(s);
                    // A freed slot comes back on the next alloc.
                    let again = pool.alloc().unwrap();
                    prop_assert_eq!(again, s);
                    pool.free(again);
                }
                check_invariants(&pool, &owned_set);
            }
        }
    }
}
