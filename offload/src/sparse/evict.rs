//! Scissorhands eviction for the sparse store (ALGORITHMS.md section 3): a hard byte budget on
//! the rows and labels a [`super::SparseKvStore`] holds.
//!
//! **Signal.** Every (layer, KV head) attention of a tallied query observes every live visible
//! token once: a token the labels did not select is *unimportant* (the cheap signal, from the
//! label scores every token gets anyway); a selected (or densely attended) token is unimportant
//! when its exact attention weight is below `threshold / t` for every query head of the group
//! (`t`: live tokens the query sees; `threshold` 1 gives Scissorhands' `1/t`). Decode steps tally
//! their one query; a multi-token call (a prefill chunk) tallies its last [`TALLY_QUERIES`]
//! queries, which see the whole chunk.
//!
//! **Counter: a decayed count, not a ring.** Per token `c <- c * (1 - 1/w) + u` at the end of
//! every forward call, `u` the fraction of its observations in that call that were unimportant.
//! This is the exponentially weighted version of "unimportant steps among the last `w`": one
//! `f32` per position instead of a `w`-bit ring, and it takes fractional observations (90
//! (layer, head) pairs vote per step). Young tokens have had fewer steps to accumulate, as in
//! Scissorhands' window.
//!
//! **Budget.** The footprint is what the store has allocated: the tier's extents plus the label
//! tables. Both grow in whole units of [`EVICT_EXTENT_SLOTS`] slots up to a slot cap computed from
//! the budget, and slots are reused before the pool grows, so keeping the live (plus reserved)
//! tokens at or under the cap keeps the footprint under the budget at every step.
//! When a reservation would pass the cap, the store evicts (between forward calls, in
//! `reserve`) at least [`EvictConfig::batch`] of the cap, highest counts first (older first on
//! ties), never a sink nor one of the last `recent` committed tokens.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};

/// Queries of a multi-token call that feed the counters (the call's last ones).
pub const TALLY_QUERIES: usize = 8;

/// Slots per tier extent (and label growth unit) of a store with a budget: small enough that
/// allocation granularity is a few percent of a small budget.
pub const EVICT_EXTENT_SLOTS: usize = 64;

/// `--host-kv-budget`: bytes, or a fraction of the full KV.
///
/// A fraction is of the *full KV of the run's planned tokens* (prompt + `max_new_tokens` for
/// `generate`, the evaluated tokens for `eval ppl`/`agreement`, each length + the answer for
/// `eval passkey`, each context + `--new-tokens` for `bench`, `--context` for `report memory`), where the full KV of `T` tokens is `T * layers * kv_heads * 2 * head_dim *
/// dtype size` (what a dense cache holds). The resolved bytes cover rows *and* labels, and are
/// printed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum HostKvBudget {
    Bytes(usize),
    Ratio(f64),
}

impl HostKvBudget {
    /// The budget in bytes, given the full KV of the planned tokens.
    pub fn resolve(self, full_kv_bytes: usize) -> usize {
        match self {
            HostKvBudget::Bytes(b) => b,
            HostKvBudget::Ratio(r) => (full_kv_bytes as f64 * r) as usize,
        }
    }
}

impl FromStr for HostKvBudget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let bad = || {
            format!("--host-kv-budget {s:?}: expected bytes (2GiB, 512MiB, 100000) or a fraction (0.25, 1/4)")
        };
        if let Some(den) = t.strip_prefix("1/") {
            let n: f64 = den.parse().map_err(|_| bad())?;
            if n.is_nan() || n < 1.0 {
                return Err(bad());
            }
            return Ok(HostKvBudget::Ratio(1.0 / n));
        }
        if t.contains('.') {
            let r: f64 = t.parse().map_err(|_| bad())?;
            if r.is_nan() || r <= 0.0 || r > 1.0 {
                return Err(format!(
                    "--host-kv-budget {s:?}: a fraction must be in (0, 1]"
                ));
            }
            return Ok(HostKvBudget::Ratio(r));
        }
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: usize = num.parse().map_err(|_| bad())?;
        let mul: usize = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "m" | "mib" => 1 << 20,
            "g" | "gib" => 1 << 30,
            "kb" => 1000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            _ => return Err(bad()),
        };
        let b = n.checked_mul(mul).ok_or_else(bad)?;
        if b == 0 {
            return Err(format!("--host-kv-budget {s:?}: must be more than 0 bytes"));
        }
        Ok(HostKvBudget::Bytes(b))
    }
}

impl fmt::Display for HostKvBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostKvBudget::Bytes(b) => write!(f, "{b}"),
            HostKvBudget::Ratio(r) => write!(f, "{r}"),
        }
    }
}

/// Eviction settings of a store.
#[derive(Clone, Debug, PartialEq)]
pub struct EvictConfig {
    /// Most bytes of rows (tier) and labels the store may hold.
    pub budget_bytes: usize,
    /// History window `w` of the decayed counters (forward calls).
    pub window: usize,
    /// A weight below `threshold / t` is unimportant (`t`: live tokens the query sees).
    pub threshold: f32,
    /// Fraction of the slot cap evicted per batch (at least what the reservation needs).
    pub batch: f64,
}

impl EvictConfig {
    pub fn new(budget_bytes: usize) -> EvictConfig {
        EvictConfig {
            budget_bytes,
            window: 32,
            threshold: 1.0,
            batch: 0.05,
        }
    }

    /// Most token slots (live plus reserved) under the budget for `bytes_per_slot` (rows and
    /// labels of one token), in whole extents of `extent` slots (the tier's growth unit).
    pub fn slot_cap(&self, bytes_per_slot: usize, extent: usize) -> usize {
        let unit = extent.max(1) * bytes_per_slot.max(1);
        (self.budget_bytes / unit) * extent.max(1)
    }
}

impl fmt::Display for EvictConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "host-kv-budget {} B (window {} threshold {}/t batch {})",
            self.budget_bytes, self.window, self.threshold, self.batch
        )
    }
}

/// Per-position unimportance: the decayed counts and the current call's tallies.
#[derive(Default)]
pub struct Unimportance {
    /// Decayed count per position (meaningless for evicted ones).
    counts: Vec<f32>,
    /// Observations in the current call.
    seen: Vec<AtomicU32>,
    /// Unimportant observations in the current call (`<= seen`).
    unimportant: Vec<AtomicU32>,
}

impl Unimportance {
    /// Makes room for positions `0 .. n`.
    pub fn grow(&mut self, n: usize) {
        if n > self.counts.len() {
            self.counts.resize(n, 0.0);
            self.seen.resize_with(n, AtomicU32::default);
            self.unimportant.resize_with(n, AtomicU32::default);
        }
    }

    /// Forgets positions `n ..`.
    pub fn truncate(&mut self, n: usize) {
        self.counts.truncate(n);
        self.seen.truncate(n);
        self.unimportant.truncate(n);
    }

    /// One observation of `pos` (callable from many threads).
    pub fn observe(&self, pos: usize, unimportant: bool) {
        self.seen[pos].fetch_add(1, Ordering::Relaxed);
        if unimportant {
            self.unimportant[pos].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Ends a forward call: folds the tallies of positions `0 .. len` into the counts.
    pub fn end_call(&mut self, len: usize, window: usize) {
        let keep = 1.0 - 1.0 / window.max(1) as f32;
        for p in 0..len.min(self.counts.len()) {
            let seen = std::mem::take(self.seen[p].get_mut());
            let un = std::mem::take(self.unimportant[p].get_mut());
            let u = if seen > 0 {
                un as f32 / seen as f32
            } else {
                0.0
            };
            self.counts[p] = self.counts[p] * keep + u;
        }
    }

    /// The decayed count of `pos`.
    pub fn count(&self, pos: usize) -> f32 {
        self.counts[pos]
    }
}

/// The `m` positions of `candidates` with the highest counts (older first on ties).
pub fn victims(u: &Unimportance, candidates: &mut [usize], m: usize) -> Vec<usize> {
    let m = m.min(candidates.len());
    if m == 0 {
        return Vec::new();
    }
    let order = |a: &usize, b: &usize| u.count(*b).total_cmp(&u.count(*a)).then(a.cmp(b));
    if m < candidates.len() {
        candidates.select_nth_unstable_by(m - 1, order);
    }
    let mut out = candidates[..m].to_vec();
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse() {
        assert_eq!(
            "2GiB".parse::<HostKvBudget>().unwrap(),
            HostKvBudget::Bytes(2 << 30)
        );
        assert_eq!(
            "512MiB".parse::<HostKvBudget>().unwrap(),
            HostKvBudget::Bytes(512 << 20)
        );
        assert_eq!(
            "1000".parse::<HostKvBudget>().unwrap(),
            HostKvBudget::Bytes(1000)
        );
        assert_eq!(
            "0.25".parse::<HostKvBudget>().unwrap(),
            HostKvBudget::Ratio(0.25)
        );
        assert_eq!(
            "1/8".parse::<HostKvBudget>().unwrap(),
            HostKvBudget::Ratio(0.125)
        );
        assert_eq!(HostKvBudget::Ratio(0.25).resolve(1000), 250);
        for bad in ["0", "1.5", "0.0", "x", "3TB", "1/0", "-1", ""] {
            assert!(bad.parse::<HostKvBudget>().is_err(), "{bad}");
        }
    }

    #[test]
    fn slot_cap_is_whole_extents_under_the_budget() {
        let c = EvictConfig::new(1000 * EVICT_EXTENT_SLOTS + 5);
        assert_eq!(c.slot_cap(100, EVICT_EXTENT_SLOTS), 10 * EVICT_EXTENT_SLOTS);
        assert_eq!(c.slot_cap(2000, EVICT_EXTENT_SLOTS), 0);
    }

    #[test]
    fn counts_decay_and_victims_are_the_most_unimportant() {
        let mut u = Unimportance::default();
        u.grow(4);
        for _ in 0..3 {
            u.observe(1, true);
            u.observe(2, true);
            u.observe(2, false);
            u.observe(3, false);
            u.end_call(4, 2);
        }
        assert!(u.count(1) > u.count(2) && u.count(2) > u.count(3));
        assert_eq!(u.count(0), 0.0);
        assert_eq!(victims(&u, &mut [0, 1, 2, 3], 2), vec![1, 2]);
        assert_eq!(victims(&u, &mut [0, 3], 1), vec![0]);
    }
}
