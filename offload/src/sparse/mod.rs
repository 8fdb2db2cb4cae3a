//! Double Sparsity: token sparsity chosen by channel sparsity (ALGORITHMS.md section 1).
//!
//! - [`config`]: the settings (`--token-budget`, `--label-channels`, ...).
//! - [`labels`]: the label cache (post-RoPE keys at the calibrated channels, f16 or 4-bit).
//! - [`store`]: [`SparseKvStore`], the KV store whose attention reads only selected rows.
//! - [`evict`]: Scissorhands eviction under a byte budget (`--host-kv-budget`).
//! - [`attend`]: exact attention over gathered rows.

pub mod attend;
mod cache_sim;
pub mod config;
pub mod evict;
pub mod labels;
mod pages;
pub mod row_cache;
pub mod stats;
pub mod store;

#[cfg(test)]
mod evict_tests;
#[cfg(test)]
mod tests;

pub use cache_sim::CACHE_FACTORS;
pub use config::{LabelBits, Predict, SparseConfig, TokenBudget};
pub use evict::{EvictConfig, HostKvBudget};
pub use pages::{page_recent, whole_pages, MAX_PAGE_TOKENS};
pub use stats::SparseStats;
pub use store::{row_layout, SparseKvStore};

use farsight_kernels::{KernelError, Result};

/// Per layer and KV head, every channel of the head ranked most important first (what
/// calibration produces; `r` is chosen at load time by taking a prefix).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelRanking {
    /// `order[layer][kv_head]`: a permutation of `0 .. head_dim`.
    pub order: Vec<Vec<Vec<usize>>>,
}

impl ChannelRanking {
    /// Channels in their natural order (for tests and for `r = head_dim`).
    pub fn natural(layers: usize, kv_heads: usize, head_dim: usize) -> ChannelRanking {
        ChannelRanking {
            order: vec![vec![(0..head_dim).collect(); kv_heads]; layers],
        }
    }

    /// The first `r` channels of every (layer, KV head), checked against the model's shape.
    pub fn top(
        &self,
        r: usize,
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<Vec<Vec<Vec<usize>>>> {
        let bad = |m: String| Err(KernelError::Shape(m));
        if self.order.len() != layers {
            return bad(format!(
                "channel ranking has {} layers, the model {layers}",
                self.order.len()
            ));
        }
        for (l, heads) in self.order.iter().enumerate() {
            if heads.len() != kv_heads {
                return bad(format!(
                    "channel ranking layer {l} has {} KV heads, the model {kv_heads}",
                    heads.len()
                ));
            }
            for ch in heads {
                let mut seen = vec![false; head_dim];
                if ch.len() != head_dim
                    || !ch
                        .iter()
                        .all(|&c| c < head_dim && !std::mem::replace(&mut seen[c], true))
                {
                    return bad(format!(
                        "channel ranking layer {l} is not a permutation of 0..{head_dim}"
                    ));
                }
            }
        }
        if r == 0 || r > head_dim {
            return bad(format!(
                "--label-channels {r}: must be between 1 and the head dimension {head_dim}"
            ));
        }
        Ok(self
            .order
            .iter()
            .map(|heads| heads.iter().map(|ch| ch[..r].to_vec()).collect())
            .collect())
    }
}
