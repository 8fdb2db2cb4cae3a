//! farsight-kernels: compute. The [`Backend`] trait (the op set the forward pass is written
//! against) and its implementations: [`cpu::CpuBackend`] (the reference, `gemm` + rayon + SIMD)
//! and [`cuda::CudaBackend`] (one NVIDIA GPU; CUDA is loaded at run time, not needed to build).

pub mod backend;
pub mod cpu;
pub mod cuda;
pub mod error;
pub mod sample;

pub use backend::{AttnShape, Backend, CausalAttn, DType, HostMatrix, Result, Rope};
pub use error::KernelError;
pub use sample::{sample_row, SampleSpec};
