//! farsight-kernels: compute. The [`Backend`] trait (the op set the forward pass is written
//! against) and its implementations: [`cpu::CpuBackend`] (the reference, `gemm` + rayon + SIMD).

pub mod backend;
pub mod cpu;
pub mod error;

pub use backend::{AttnShape, Backend, CausalAttn, DType, HostMatrix, Result, Rope};
pub use error::KernelError;
