//! Matmuls of the CUDA backend: the GEMV kernel for few rows of 16-bit weights, else cuBLAS
//! (`cublasGemmEx`, f32 accumulation) on f32 activations or on activations cast to 16 bits.

use crate::backend::checks;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::ops::flat;
use super::{dev_err, int, CudaBackend, CudaMatrix, CudaTensor};
use crate::backend::{DType, Result};

/// Rows up to which a 16-bit-weight matmul runs the GEMV kernel (f32 activations, exact weights)
/// instead of cuBLAS on activations cast to the weight dtype. Must match `GEMV_ROWS` in ops.cu.
pub const GEMV_MAX_ROWS: usize = 8;

/// Batch-1 GEMV kernels [`CudaBackend::set_gemv1`] chooses among (`FARSIGHT_GEMV` at start).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Gemv1 {
    /// The few-rows kernel for batch 1 too (`rows`).
    Rows,
    /// One warp per output, 4 weight loads in flight per lane (`l4`).
    Loads4,
    /// One warp per output, 8 weight loads in flight per lane (the default).
    Loads8,
    /// A persistent grid whose warps walk outputs, 8 loads in flight across rows (`persist`).
    /// Measured 13% slower than `Loads8` in dense 8K decode on an H200 (BENCHMARKS.md, sixth
    /// offload run): kept selectable for comparison, never the default.
    Persistent,
}

impl Gemv1 {
    /// The kernel `FARSIGHT_GEMV` names (`rows`, `l4`, `persist`; anything else the default).
    pub(super) fn from_env() -> Gemv1 {
        match std::env::var("FARSIGHT_GEMV").as_deref() {
            Ok("rows") => Gemv1::Rows,
            Ok("l4") => Gemv1::Loads4,
            Ok("persist") => Gemv1::Persistent,
            _ => Gemv1::Loads8,
        }
    }

    const ALL: [Gemv1; 4] = [Gemv1::Rows, Gemv1::Loads4, Gemv1::Loads8, Gemv1::Persistent];
}

impl CudaBackend {
    /// The batch-1 GEMV kernel in use.
    pub(super) fn gemv1(&self) -> Gemv1 {
        Gemv1::ALL[self.gemv1.load(std::sync::atomic::Ordering::Relaxed) as usize]
    }

    /// Chooses the batch-1 GEMV kernel (all give the same sums, bit for bit, except `Rows`
    /// whose lanes split the row differently). For comparisons and tests.
    pub fn set_gemv1(&self, g: Gemv1) {
        self.gemv1
            .store(g as u8, std::sync::atomic::Ordering::Relaxed);
    }

    /// cuBLAS `out[0..n] = x[0..n] W^T` (row-major), everything f32 or W and `x16` 16-bit.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm(
        &self,
        w_ptr: u64,
        w_type: cudaDataType,
        x_ptr: u64,
        x_type: cudaDataType,
        out_ptr: u64,
        n: usize,
        k: usize,
        nn: usize,
    ) -> Result<()> {
        // Column-major view: out^T (nn x n) = W^T' (W is k x nn col-major, transposed) * x^T.
        let (alpha, beta) = (1.0f32, 0.0f32);
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                int(nn, "matmul out")?,
                int(n, "matmul rows")?,
                int(k, "matmul in")?,
                (&alpha) as *const f32 as *const _,
                w_ptr as *const _,
                w_type,
                int(k, "lda")?,
                x_ptr as *const _,
                x_type,
                int(k, "ldb")?,
                (&beta) as *const f32 as *const _,
                out_ptr as *mut _,
                cudaDataType::CUDA_R_32F,
                int(nn, "ldc")?,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| dev_err("cublasGemmEx", e))
    }

    pub(super) fn matmul_impl(
        &self,
        x: &CudaTensor,
        w: &CudaMatrix,
        bias: Option<&CudaTensor>,
        out: &mut CudaTensor,
        n: usize,
    ) -> Result<()> {
        checks::matmul(
            n,
            (x.rows, x.cols),
            (w.rows, w.cols),
            (out.rows, out.cols),
            bias.map(|b| b.rows * b.cols),
        )?;
        let (k, nn) = (w.cols, w.rows);
        if n == 0 || nn == 0 {
            return Ok(());
        }
        if k == 0 {
            // Empty sum: zeros (then the bias).
            self.stream
                .memset_zeros(&mut out.data.slice_mut(..n * nn))
                .map_err(|e| dev_err("matmul memset", e))?;
        } else {
            match w.dtype {
                DType::F32 => {
                    let (wp, _g1) = w.data.device_ptr(&self.stream);
                    let (xp, _g2) = x.data.device_ptr(&self.stream);
                    let (op, _g3) = out.data.device_ptr_mut(&self.stream);
                    self.gemm(
                        wp,
                        cudaDataType::CUDA_R_32F,
                        xp,
                        cudaDataType::CUDA_R_32F,
                        op,
                        n,
                        k,
                        nn,
                    )?;
                }
                DType::F16 | DType::BF16 if n == 1 && k % 8 == 0 && self.gemv1() != Gemv1::Rows => {
                    let mode = self.gemv1();
                    let name = match (w.dtype == DType::F16, mode) {
                        (true, Gemv1::Persistent) => "gemv1p_f16",
                        (false, Gemv1::Persistent) => "gemv1p_bf16",
                        (true, Gemv1::Loads4) => "gemv1l4_f16",
                        (false, Gemv1::Loads4) => "gemv1l4_bf16",
                        (true, _) => "gemv1_f16",
                        (false, _) => "gemv1_bf16",
                    };
                    let (ki, mi) = (int(k, "in")?, int(nn, "out")?);
                    let mut b = self.stream.launch_builder(self.f(name));
                    b.arg(&x.data)
                        .arg(&w.data)
                        .arg(&mut out.data)
                        .arg(&ki)
                        .arg(&mi);
                    // 8 warps per block, one output column per warp (the persistent kernel: two
                    // blocks per SM, each warp walking columns a grid apart).
                    let blocks = if mode == Gemv1::Persistent {
                        nn.div_ceil(8).min(2 * self.sm_count)
                    } else {
                        nn.div_ceil(8)
                    };
                    let cfg = LaunchConfig {
                        grid_dim: (blocks as u32, 1, 1),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    unsafe { b.launch(cfg) }.map_err(Self::launch_err(name))?;
                }
                DType::F16 | DType::BF16 if n <= GEMV_MAX_ROWS => {
                    let name = if w.dtype == DType::F16 {
                        "gemv_f16"
                    } else {
                        "gemv_bf16"
                    };
                    let (ni, ki, mi) = (int(n, "rows")?, int(k, "in")?, int(nn, "out")?);
                    let mut b = self.stream.launch_builder(self.f(name));
                    b.arg(&x.data)
                        .arg(&w.data)
                        .arg(&mut out.data)
                        .arg(&ni)
                        .arg(&ki)
                        .arg(&mi);
                    // 8 warps per block, one output column per warp.
                    let cfg = LaunchConfig {
                        grid_dim: (nn.div_ceil(8) as u32, 1, 1),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    unsafe { b.launch(cfg) }.map_err(Self::launch_err(name))?;
                }
                DType::F16 | DType::BF16 => {
                    // Cast the activations to the weight dtype, then cuBLAS with f32 accumulation
                    // and f32 output.
                    let (cast, ty) = if w.dtype == DType::F16 {
                        ("cast_f16", cudaDataType::CUDA_R_16F)
                    } else {
                        ("cast_bf16", cudaDataType::CUDA_R_16BF)
                    };
                    let mut guard = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
                    let need = n * k * 2;
                    if guard.as_ref().map_or(true, |s| s.len() < need) {
                        *guard = None;
                        *guard = Some(self.alloc::<u8>(need, "matmul scratch")?);
                    }
                    let scratch = guard.as_mut().expect("scratch allocated above");
                    let total = (n * k) as i64;
                    let ki = int(k, "in")?;
                    let mut b = self.stream.launch_builder(self.f(cast));
                    b.arg(&x.data).arg(&mut *scratch).arg(&ki).arg(&total);
                    unsafe { b.launch(flat(n * k)) }.map_err(Self::launch_err(cast))?;
                    let (wp, _g1) = w.data.device_ptr(&self.stream);
                    let (xp, _g2) = scratch.device_ptr(&self.stream);
                    let (op, _g3) = out.data.device_ptr_mut(&self.stream);
                    self.gemm(wp, ty, xp, ty, op, n, k, nn)?;
                }
            }
        }
        if let Some(bias) = bias {
            let total = (n * nn) as i64;
            let ci = int(nn, "bias cols")?;
            let name = "add_bias";
            let mut b = self.stream.launch_builder(self.f(name));
            b.arg(&mut out.data).arg(&bias.data).arg(&ci).arg(&total);
            unsafe { b.launch(flat(n * nn)) }.map_err(Self::launch_err(name))?;
        }
        Ok(())
    }
}
