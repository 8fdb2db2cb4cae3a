//! farsight-prefetch: what KV rows move when, on the GPU.
//!
//! [`OffloadKvStore`] is Double Sparsity decode with the full KV off the GPU: rows in pinned host
//! memory, labels and a row cache on the GPU, differential residency (only rows not already
//! cached cross PCIe), and layer-ahead selection on a prefetch stream that overlaps the previous
//! layer's compute. See `docs/architecture.md` and ALGORITHMS.md sections 1-2.

mod config;
mod labels;
mod store;

pub use config::{OffloadConfig, RowHome};
pub use labels::{gpu_label_bytes, GpuLabels};
pub use store::{OffloadKvStore, OffloadStats, StreamTiming};
