//! Device buffers of the CUDA backend: activations ([`CudaTensor`]), weights ([`CudaMatrix`]) and
//! KV caches ([`CudaCache`]), their allocation, uploads, copies and host reads.

use cudarc::driver::{CudaSlice, DriverError};

use super::{check_rows, dev_err, shape_err, CudaBackend};
use crate::backend::{DType, HostMatrix, Result};
use crate::error::KernelError;

/// f32 activations on the device, row-major `rows x cols`.
pub struct CudaTensor {
    pub rows: usize,
    pub cols: usize,
    pub(super) data: CudaSlice<f32>,
}

/// A weight matrix `rows x cols` (out x in) on the device, as raw elements of `dtype`.
pub struct CudaMatrix {
    pub rows: usize,
    pub cols: usize,
    pub dtype: DType,
    pub(super) data: CudaSlice<u8>,
}

/// KV rows `capacity x cols` on the device, as raw elements of `dtype`.
pub struct CudaCache {
    pub capacity: usize,
    pub cols: usize,
    pub dtype: DType,
    pub(super) data: CudaSlice<u8>,
}

impl CudaBackend {
    /// Reads a whole KV cache to the host as f32 (for tests and debugging).
    pub fn read_cache(&self, c: &CudaCache) -> Result<Vec<f32>> {
        let n = c.capacity * c.cols;
        if n == 0 {
            return Ok(Vec::new());
        }
        let bytes = self
            .stream
            .clone_dtoh(&c.data.slice(..n * c.dtype.size()))
            .map_err(|e| dev_err("read_cache", e))?;
        self.synchronize()?;
        Ok(match c.dtype {
            DType::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(&bytes),
            DType::F16 => bytemuck::pod_collect_to_vec::<u8, half::f16>(&bytes)
                .into_iter()
                .map(|v| v.to_f32())
                .collect(),
            DType::BF16 => bytemuck::pod_collect_to_vec::<u8, half::bf16>(&bytes)
                .into_iter()
                .map(|v| v.to_f32())
                .collect(),
        })
    }

    pub(super) fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
        what: &str,
    ) -> Result<CudaSlice<T>> {
        // Zero-length allocations are not allowed by the driver; keep one element.
        self.stream
            .alloc_zeros::<T>(n.max(1))
            .map_err(|e| self.alloc_err(e, what, n))
    }

    pub(super) fn alloc_err(&self, e: DriverError, what: &str, n: usize) -> KernelError {
        if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            KernelError::OutOfMemory {
                device: self.name.clone(),
                what: format!("{what} ({n} elements)"),
            }
        } else {
            dev_err(what, e)
        }
    }

    pub(super) fn upload<T: cudarc::driver::DeviceRepr>(
        &self,
        data: &[T],
        what: &str,
    ) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(data)
            .map_err(|e| self.alloc_err(e, what, data.len()))
    }

    pub(super) fn tensor_impl(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        Ok(CudaTensor {
            rows,
            cols,
            data: self.alloc::<f32>(rows * cols, "tensor")?,
        })
    }

    pub(super) fn write_tensor_impl(
        &self,
        t: &mut CudaTensor,
        row0: usize,
        data: &[f32],
    ) -> Result<()> {
        let start = row0 * t.cols;
        if data.len() % t.cols.max(1) != 0 || start + data.len() > t.rows * t.cols {
            return Err(shape_err(format!(
                "write of {} values at row {row0} into {}x{}",
                data.len(),
                t.rows,
                t.cols
            )));
        }
        if data.is_empty() {
            return Ok(());
        }
        let mut dst = t.data.slice_mut(start..start + data.len());
        self.stream
            .memcpy_htod(data, &mut dst)
            .map_err(|e| dev_err("write_tensor", e))
    }

    pub(super) fn read_rows_impl(&self, t: &CudaTensor, row0: usize, n: usize) -> Result<Vec<f32>> {
        check_rows(t, row0 + n, "read_rows")?;
        if n * t.cols == 0 {
            return Ok(Vec::new());
        }
        let v = self
            .stream
            .clone_dtoh(&t.data.slice(row0 * t.cols..(row0 + n) * t.cols))
            .map_err(|e| dev_err("read_rows", e))?;
        self.synchronize()?;
        Ok(v)
    }

    pub(super) fn upload_matrix_impl(&self, m: HostMatrix<'_>) -> Result<CudaMatrix> {
        m.validate()?;
        let data = self.upload(m.bytes, "matrix")?;
        Ok(CudaMatrix {
            rows: m.rows,
            cols: m.cols,
            dtype: m.dtype,
            data,
        })
    }

    pub(super) fn cache_impl(
        &self,
        capacity: usize,
        cols: usize,
        dtype: DType,
    ) -> Result<CudaCache> {
        let data = self.alloc::<u8>(capacity * cols * dtype.size(), "KV cache")?;
        Ok(CudaCache {
            capacity,
            cols,
            dtype,
            data,
        })
    }

    pub(super) fn cache_grow_impl(&self, c: &mut CudaCache, capacity: usize) -> Result<()> {
        if capacity <= c.capacity {
            return Ok(());
        }
        let mut data = self.alloc::<u8>(capacity * c.cols * c.dtype.size(), "KV cache")?;
        let old = c.capacity * c.cols * c.dtype.size();
        if old > 0 {
            self.stream
                .memcpy_dtod(&c.data.slice(..old), &mut data.slice_mut(..old))
                .map_err(|e| dev_err("cache_grow copy", e))?;
        }
        c.data = data;
        c.capacity = capacity;
        Ok(())
    }
}
