//! Offloaded-decode kernels (`kernels/offload.cu`, ALGORITHMS.md section 2) and the stream
//! plumbing the prefetcher needs: a sibling backend on its own stream of the same context (same
//! kernels, its own cuBLAS handle and scratch), and events to order the two streams.
//!
//! Row slabs are `[token][KV head][K | V]` (or `[KV head][token][K | V]` for page-granular
//! selection) of 16-bit elements, addressed by raw 64-bit pointers and strides so that the same
//! kernels write or read pinned host memory (UVA) and device memory.
//!
//! By job: `stream` (events between streams, the prefetch-stream sibling backend, raw copies and
//! device-wide calls), `rows` (writing row slabs and unpacking them into dense caches),
//! `residency` (the selection side: layer-ahead query labels, differential residency, recall
//! counters) and `gather` (row gathers of the misses into the GPU row cache).

mod gather;
mod residency;
mod rows;
mod stream;

pub use residency::Residency;
pub use rows::RowSlab;
pub use stream::StreamEvent;
