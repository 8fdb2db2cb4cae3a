//! farsight-prefetch: what KV rows move when. Layer-ahead selection prediction, the GPU row
//! cache with differential residency, and the transfer engine live here (see
//! `docs/architecture.md`); the dense path of the foundation does not use them yet.
