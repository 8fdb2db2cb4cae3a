//! The CUDA backend: [`Backend`] on one NVIDIA GPU through the driver API (cudarc, loaded
//! dynamically: nothing CUDA is needed to build, only to run), kernels compiled at run time by
//! NVRTC (`kernels/*.cu`, cached on disk, see [`compile`]) and cuBLAS for prefill matmuls.
//!
//! All work is queued on one stream owned by the backend, so ops run in call order; host reads
//! ([`Backend::read_rows`]) synchronize. See `NOTES.md` beside this file for the design choices,
//! the measured parity with the CPU backend, and what is not done yet.

mod compile;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError,
    LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use crate::backend::{Backend, CausalAttn, DType, HostMatrix, Result, Rope};
use crate::error::KernelError;

/// f32 activations on the device, row-major `rows x cols`.
pub struct CudaTensor {
    pub rows: usize,
    pub cols: usize,
    data: CudaSlice<f32>,
}

/// A weight matrix `rows x cols` (out x in) on the device, as raw elements of `dtype`.
pub struct CudaMatrix {
    pub rows: usize,
    pub cols: usize,
    pub dtype: DType,
    data: CudaSlice<u8>,
}

/// KV rows `capacity x cols` on the device, as raw elements of `dtype`.
pub struct CudaCache {
    pub capacity: usize,
    pub cols: usize,
    pub dtype: DType,
    data: CudaSlice<u8>,
}

/// Rows up to which a 16-bit-weight matmul runs the GEMV kernel (f32 activations, exact weights)
/// instead of cuBLAS on activations cast to the weight dtype. Must match `GEMV_ROWS` in ops.cu.
pub const GEMV_MAX_ROWS: usize = 8;

/// Largest head dimension the attention kernel handles (`ATTN_MAX_T * 32` in attention.cu).
pub const ATTN_MAX_HEAD_DIM: usize = 256;

/// Limits of the GQA key-per-lane attention kernel (`GQA_MAX_GROUP`, `GQA_MAX_D`).
pub const GQA_MAX_GROUP: usize = 8;
pub const GQA_MAX_HEAD_DIM: usize = 128;

const KERNELS: &[&str] = &[
    "embedding_f32",
    "embedding_f16",
    "embedding_bf16",
    "rms_norm",
    "add_bias",
    "add",
    "silu_mul",
    "rope",
    "gather_rows",
    "cache_write_f32",
    "cache_write_f16",
    "cache_write_bf16",
    "cast_f16",
    "cast_bf16",
    "gemv_f16",
    "gemv_bf16",
    "attention_f32",
    "attention_f16",
    "attention_bf16",
    "attention_combine",
    "attention_gqa_f32",
    "attention_gqa_f16",
    "attention_gqa_bf16",
];

/// The CUDA backend on one device.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    funcs: HashMap<&'static str, CudaFunction>,
    /// Activations cast to 16 bits for cuBLAS (grown on demand; ops are ordered on one stream).
    scratch: Mutex<Option<CudaSlice<u8>>>,
    /// Split-K partials of attention (grown on demand).
    attn_scratch: Mutex<Option<CudaSlice<f32>>>,
    /// Keys per attention split; 0 = chosen from the SM count.
    attn_chunk: AtomicUsize,
    /// Use the GQA key-per-lane attention kernel where the shape allows.
    attn_gqa: AtomicBool,
    sm_count: usize,
    name: String,
    arch: String,
    ptx_from_cache: bool,
}

fn dev_err(what: &str, e: impl std::fmt::Debug) -> KernelError {
    KernelError::Device(format!("{what}: {e:?}"))
}

fn shape_err(msg: String) -> KernelError {
    KernelError::Shape(msg)
}

/// A 1-D launch over `total` elements (grid-stride kernels).
fn flat(total: usize) -> LaunchConfig {
    let blocks = total.div_ceil(256).clamp(1, 65_536) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A launch of `rows` row-blocks (grid y), columns spread over grid x.
/// The kernels loop over rows in steps of grid y (at most 65535).
fn per_row(rows: usize, cols: usize) -> LaunchConfig {
    let bx = cols.div_ceil(256).clamp(1, 1024) as u32;
    let by = rows.clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (bx, by, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| shape_err(format!("{what} = {v} exceeds the kernels' 32-bit range")))
}

fn check_rows(t: &CudaTensor, n: usize, what: &str) -> Result<()> {
    if n > t.rows {
        return Err(shape_err(format!(
            "{what}: {n} rows requested, tensor has {}",
            t.rows
        )));
    }
    Ok(())
}

impl CudaBackend {
    /// Opens device `ordinal`. Fails with [`KernelError::Device`] (never panics) when there is no
    /// CUDA driver, no such device, or NVRTC/cuBLAS cannot be loaded.
    pub fn new(ordinal: usize) -> Result<CudaBackend> {
        // cudarc loads libcuda/libnvrtc/libcublas lazily and panics when one is missing: probe
        // first, and catch any panic of the first calls as well.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(KernelError::Device(
                "no CUDA driver found: libcuda.so could not be loaded".into(),
            ));
        }
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(KernelError::Device(
                "no CUDA driver found: NVRTC (libnvrtc.so) could not be loaded; add CUDA's lib64 \
                 to LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(KernelError::Device(
                "no CUDA driver found: cuBLAS (libcublas.so) could not be loaded; add CUDA's lib64 \
                 to LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Self::init(ordinal))) {
            Ok(r) => r,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                Err(KernelError::Device(format!("no CUDA driver found: {msg}")))
            }
        }
    }

    fn init(ordinal: usize) -> Result<CudaBackend> {
        let count = CudaContext::device_count().map_err(|e| dev_err("cuInit/device count", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(KernelError::Device(format!(
                "CUDA device {ordinal} requested, {count} present"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| dev_err("creating the CUDA context", e))?;
        // One stream, so cudarc's per-buffer event tracking is not needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| dev_err("creating a stream", e))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| dev_err("creating cuBLAS", e))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| dev_err("reading the compute capability", e))?;
        let arch = format!("sm_{major}{minor}");
        let dev_name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(|e| dev_err("reading the SM count", e))?
            .max(1) as usize;

        let src = compile::source();
        let cached = compile::read_cached(&src, &arch)
            .and_then(|ptx| ctx.load_module(Ptx::from_src(ptx)).ok());
        let ptx_from_cache = cached.is_some();
        let module = match cached {
            Some(m) => m,
            None => {
                let ptx = compile::compile(&src, &arch).map_err(KernelError::Device)?;
                ctx.load_module(Ptx::from_src(ptx))
                    .map_err(|e| dev_err("loading the kernels", e))?
            }
        };
        let mut funcs = HashMap::new();
        for &k in KERNELS {
            let f = module
                .load_function(k)
                .map_err(|e| dev_err(&format!("kernel {k}"), e))?;
            funcs.insert(k, f);
        }
        Ok(CudaBackend {
            ctx,
            stream,
            blas,
            funcs,
            scratch: Mutex::new(None),
            attn_scratch: Mutex::new(None),
            attn_chunk: AtomicUsize::new(0),
            attn_gqa: AtomicBool::new(true),
            sm_count,
            name: format!("cuda:{ordinal} ({dev_name}, {arch})"),
            arch,
            ptx_from_cache,
        })
    }

    /// The architecture the kernels were compiled for (`sm_90` on Hopper).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Whether the kernels came from the on-disk PTX cache (else NVRTC compiled them).
    pub fn ptx_from_cache(&self) -> bool {
        self.ptx_from_cache
    }

    /// Fixes the number of keys per attention split (split-K), or `None` for the automatic
    /// choice (enough splits for about 4 blocks per SM, at least 256 keys each). A tuning and
    /// testing knob: the result is the same function either way.
    pub fn set_attention_chunk(&self, keys: Option<usize>) {
        self.attn_chunk.store(keys.unwrap_or(0), Ordering::Relaxed);
    }

    /// Chooses between the GQA key-per-lane attention kernel (the default, used where
    /// `group <= 8`, `head_dim % 32 == 0` and `head_dim <= 128`) and the general one-block-per-head
    /// kernel. A testing knob: both compute the same function.
    pub fn set_attention_gqa(&self, on: bool) {
        self.attn_gqa.store(on, Ordering::Relaxed);
    }

    /// `(n_split, chunk)` for an attention call: `n_split` blocks per (query, head), each over at
    /// most `chunk` consecutive keys of that query's range (at most `max_keys` long).
    fn attention_split(
        &self,
        n_q: usize,
        n_blocks_heads: usize,
        max_keys: usize,
    ) -> (usize, usize) {
        let max_keys = max_keys.max(1);
        let forced = self.attn_chunk.load(Ordering::Relaxed);
        let n_split = if forced > 0 {
            max_keys.div_ceil(forced)
        } else {
            let want = (4 * self.sm_count).div_ceil((n_q * n_blocks_heads).max(1));
            want.min(max_keys.div_ceil(256)).max(1)
        }
        .min(65_535);
        (n_split, max_keys.div_ceil(n_split))
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| dev_err("synchronize", e))
    }

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

    fn f(&self, name: &str) -> &CudaFunction {
        &self.funcs[name]
    }

    fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
        what: &str,
    ) -> Result<CudaSlice<T>> {
        // Zero-length allocations are not allowed by the driver; keep one element.
        self.stream
            .alloc_zeros::<T>(n.max(1))
            .map_err(|e| self.alloc_err(e, what, n))
    }

    fn alloc_err(&self, e: DriverError, what: &str, n: usize) -> KernelError {
        if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            KernelError::OutOfMemory {
                device: self.name.clone(),
                what: format!("{what} ({n} elements)"),
            }
        } else {
            dev_err(what, e)
        }
    }

    fn upload<T: cudarc::driver::DeviceRepr>(
        &self,
        data: &[T],
        what: &str,
    ) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(data)
            .map_err(|e| self.alloc_err(e, what, data.len()))
    }

    fn launch_err(name: &str) -> impl Fn(DriverError) -> KernelError + '_ {
        move |e| dev_err(&format!("launch of {name}"), e)
    }

    /// cuBLAS `out[0..n] = x[0..n] W^T` (row-major), everything f32 or W and `x16` 16-bit.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
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
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Matrix = CudaMatrix;
    type Cache = CudaCache;

    fn name(&self) -> String {
        self.name.clone()
    }

    fn tensor(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        Ok(CudaTensor {
            rows,
            cols,
            data: self.alloc::<f32>(rows * cols, "tensor")?,
        })
    }

    fn tensor_shape(&self, t: &CudaTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn write_tensor(&self, t: &mut CudaTensor, row0: usize, data: &[f32]) -> Result<()> {
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

    fn read_rows(&self, t: &CudaTensor, row0: usize, n: usize) -> Result<Vec<f32>> {
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

    fn gather_rows(
        &self,
        src: &CudaTensor,
        src_rows: &[usize],
        dst: &mut CudaTensor,
        dst_row0: usize,
    ) -> Result<()> {
        if src.cols != dst.cols {
            return Err(shape_err(format!(
                "gather_rows: widths {} and {}",
                src.cols, dst.cols
            )));
        }
        check_rows(dst, dst_row0 + src_rows.len(), "gather_rows dst")?;
        let mut rows = Vec::with_capacity(src_rows.len());
        for &r in src_rows {
            check_rows(src, r + 1, "gather_rows src")?;
            rows.push(r as u32);
        }
        if rows.is_empty() || src.cols == 0 {
            return Ok(());
        }
        let c = src.cols;
        let idx = self.upload(&rows, "gather_rows indices")?;
        let mut d = dst.data.slice_mut(dst_row0 * c..);
        let (ci, ni) = (
            int(c, "gather_rows cols")?,
            int(rows.len(), "gather_rows rows")?,
        );
        let name = "gather_rows";
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&src.data).arg(&idx).arg(&mut d).arg(&ci).arg(&ni);
        unsafe { b.launch(per_row(rows.len(), c)) }.map_err(Self::launch_err(name))?;
        Ok(())
    }

    fn upload_matrix(&self, m: HostMatrix<'_>) -> Result<CudaMatrix> {
        m.validate()?;
        let data = self.upload(m.bytes, "matrix")?;
        Ok(CudaMatrix {
            rows: m.rows,
            cols: m.cols,
            dtype: m.dtype,
            data,
        })
    }

    fn matrix_shape(&self, m: &CudaMatrix) -> (usize, usize) {
        (m.rows, m.cols)
    }

    fn matrix_bytes(&self, m: &CudaMatrix) -> usize {
        m.rows * m.cols * m.dtype.size()
    }

    fn cache(&self, capacity: usize, cols: usize, dtype: DType) -> Result<CudaCache> {
        let data = self.alloc::<u8>(capacity * cols * dtype.size(), "KV cache")?;
        Ok(CudaCache {
            capacity,
            cols,
            dtype,
            data,
        })
    }

    fn cache_capacity(&self, c: &CudaCache) -> usize {
        c.capacity
    }

    fn cache_grow(&self, c: &mut CudaCache, capacity: usize) -> Result<()> {
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

    fn cache_write(
        &self,
        c: &mut CudaCache,
        dst_row0: usize,
        src: &CudaTensor,
        src_row0: usize,
        src_col0: usize,
        n: usize,
    ) -> Result<()> {
        check_rows(src, src_row0 + n, "cache_write src")?;
        if dst_row0 + n > c.capacity || src_col0 + c.cols > src.cols {
            return Err(shape_err(format!(
                "cache_write of {n} rows at {dst_row0} (capacity {}), columns {src_col0}+{} of {}",
                c.capacity, c.cols, src.cols
            )));
        }
        if n == 0 || c.cols == 0 {
            return Ok(());
        }
        let es = c.dtype.size();
        let mut d = c.data.slice_mut(dst_row0 * c.cols * es..);
        let s = src.data.slice(src_row0 * src.cols + src_col0..);
        let (cc, sc) = (int(c.cols, "cache cols")?, int(src.cols, "src cols")?);
        let ni = int(n, "cache_write rows")?;
        let name = match c.dtype {
            DType::F32 => "cache_write_f32",
            DType::F16 => "cache_write_f16",
            DType::BF16 => "cache_write_bf16",
        };
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&mut d).arg(&cc).arg(&s).arg(&sc).arg(&ni);
        unsafe { b.launch(per_row(n, c.cols)) }.map_err(Self::launch_err(name))?;
        Ok(())
    }

    fn embedding(&self, table: &CudaMatrix, ids: &[u32], out: &mut CudaTensor) -> Result<()> {
        check_rows(out, ids.len(), "embedding")?;
        if out.cols != table.cols {
            return Err(shape_err(format!(
                "embedding width {} vs {}",
                table.cols, out.cols
            )));
        }
        for &id in ids {
            if id as usize >= table.rows {
                return Err(shape_err(format!(
                    "token id {id} outside the vocabulary ({})",
                    table.rows
                )));
            }
        }
        if ids.is_empty() || table.cols == 0 {
            return Ok(());
        }
        let idx = self.upload(ids, "token ids")?;
        let c = int(table.cols, "embedding cols")?;
        let ni = int(ids.len(), "embedding rows")?;
        let name = match table.dtype {
            DType::F32 => "embedding_f32",
            DType::F16 => "embedding_f16",
            DType::BF16 => "embedding_bf16",
        };
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&table.data)
            .arg(&idx)
            .arg(&mut out.data)
            .arg(&c)
            .arg(&ni);
        unsafe { b.launch(per_row(ids.len(), table.cols)) }.map_err(Self::launch_err(name))?;
        Ok(())
    }

    fn rms_norm(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        eps: f32,
        out: &mut CudaTensor,
        n: usize,
    ) -> Result<()> {
        check_rows(x, n, "rms_norm")?;
        check_rows(out, n, "rms_norm out")?;
        let c = x.cols;
        if weight.rows * weight.cols != c || out.cols != c {
            return Err(shape_err(format!(
                "rms_norm width {c}, weight {}",
                weight.rows * weight.cols
            )));
        }
        if n == 0 || c == 0 {
            return Ok(());
        }
        let ci = int(c, "rms_norm cols")?;
        let name = "rms_norm";
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&x.data)
            .arg(&weight.data)
            .arg(&mut out.data)
            .arg(&ci)
            .arg(&eps);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.map_err(Self::launch_err(name))?;
        Ok(())
    }

    fn matmul(
        &self,
        x: &CudaTensor,
        w: &CudaMatrix,
        bias: Option<&CudaTensor>,
        out: &mut CudaTensor,
        n: usize,
    ) -> Result<()> {
        check_rows(x, n, "matmul x")?;
        check_rows(out, n, "matmul out")?;
        if x.cols != w.cols || out.cols != w.rows {
            return Err(shape_err(format!(
                "matmul: x {}x{}, W {}x{}, out {}x{}",
                n, x.cols, w.rows, w.cols, n, out.cols
            )));
        }
        let (k, nn) = (w.cols, w.rows);
        if let Some(b) = bias {
            if b.rows * b.cols != nn {
                return Err(shape_err(format!(
                    "bias of {} for {nn} outputs",
                    b.rows * b.cols
                )));
            }
        }
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

    fn rope(
        &self,
        x: &mut CudaTensor,
        col0: usize,
        n_heads: usize,
        head_dim: usize,
        positions: &[u32],
        rope: &Rope,
    ) -> Result<()> {
        check_rows(x, positions.len(), "rope")?;
        let half = head_dim / 2;
        if rope.inv_freq.len() != half || col0 + n_heads * head_dim > x.cols {
            return Err(shape_err(format!(
                "rope: {} frequencies for head_dim {head_dim}, columns {col0}+{} of {}",
                rope.inv_freq.len(),
                n_heads * head_dim,
                x.cols
            )));
        }
        if positions.is_empty() || n_heads == 0 || half == 0 {
            return Ok(());
        }
        let pos = self.upload(positions, "rope positions")?;
        let freq = self.upload(&rope.inv_freq, "rope frequencies")?;
        let (ci, c0, hd) = (
            int(x.cols, "cols")?,
            int(col0, "col0")?,
            int(head_dim, "head_dim")?,
        );
        let scaling = rope.attention_scaling;
        let name = "rope";
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&mut x.data)
            .arg(&ci)
            .arg(&c0)
            .arg(&hd)
            .arg(&pos)
            .arg(&freq)
            .arg(&scaling);
        let threads = half.div_ceil(32).clamp(1, 8) as u32 * 32;
        let cfg = LaunchConfig {
            grid_dim: (positions.len() as u32, n_heads as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.map_err(Self::launch_err(name))?;
        Ok(())
    }

    fn silu_mul(&self, gate_up: &CudaTensor, out: &mut CudaTensor, n: usize) -> Result<()> {
        check_rows(gate_up, n, "silu_mul")?;
        check_rows(out, n, "silu_mul out")?;
        let i = out.cols;
        if gate_up.cols != 2 * i {
            return Err(shape_err(format!(
                "silu_mul: {} columns for {i} outputs",
                gate_up.cols
            )));
        }
        if n * i == 0 {
            return Ok(());
        }
        let total = (n * i) as i64;
        let ii = int(i, "silu_mul cols")?;
        let name = "silu_mul";
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&gate_up.data).arg(&mut out.data).arg(&ii).arg(&total);
        unsafe { b.launch(flat(n * i)) }.map_err(Self::launch_err(name))?;
        Ok(())
    }

    fn add(&self, x: &mut CudaTensor, y: &CudaTensor, n: usize) -> Result<()> {
        check_rows(x, n, "add")?;
        check_rows(y, n, "add")?;
        if x.cols != y.cols {
            return Err(shape_err(format!("add: widths {} and {}", x.cols, y.cols)));
        }
        if n * x.cols == 0 {
            return Ok(());
        }
        let total = (n * x.cols) as i64;
        let name = "add";
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&mut x.data).arg(&y.data).arg(&total);
        unsafe { b.launch(flat(n * x.cols)) }.map_err(Self::launch_err(name))?;
        Ok(())
    }

    fn attention(
        &self,
        a: &CausalAttn,
        q: &CudaTensor,
        k: &CudaCache,
        v: &CudaCache,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let s = a.shape;
        let total = a.n_past + a.n_q;
        if s.n_kv_heads == 0 || s.n_heads % s.n_kv_heads != 0 {
            return Err(shape_err(format!(
                "{} heads over {} KV heads",
                s.n_heads, s.n_kv_heads
            )));
        }
        if total > k.capacity || total > v.capacity || k.cols != s.kv_width() || v.cols != k.cols {
            return Err(shape_err(format!(
                "attention over {total} rows: cache {}x{}",
                k.capacity, k.cols
            )));
        }
        check_rows(q, a.q_row0 + a.n_q, "attention q")?;
        check_rows(out, a.out_row0 + a.n_q, "attention out")?;
        if a.q_col0 + s.q_width() > q.cols || out.cols < s.q_width() {
            return Err(shape_err("attention: q/out columns".into()));
        }
        if k.dtype != v.dtype {
            return Err(shape_err(format!(
                "K cache {} vs V cache {}",
                k.dtype, v.dtype
            )));
        }
        if s.head_dim > ATTN_MAX_HEAD_DIM {
            return Err(shape_err(format!(
                "attention: head_dim {} above the kernel's {ATTN_MAX_HEAD_DIM}",
                s.head_dim
            )));
        }
        if s.window == Some(0) {
            return Err(shape_err("attention: sliding window of 0".into()));
        }
        if a.n_q == 0 || s.n_heads == 0 || s.head_dim == 0 {
            return Ok(());
        }
        let gqa = self.attn_gqa.load(Ordering::Relaxed)
            && s.group() <= GQA_MAX_GROUP
            && s.head_dim % 32 == 0
            && s.head_dim <= GQA_MAX_HEAD_DIM;
        let name = match (gqa, k.dtype) {
            (false, DType::F32) => "attention_f32",
            (false, DType::F16) => "attention_f16",
            (false, DType::BF16) => "attention_bf16",
            (true, DType::F32) => "attention_gqa_f32",
            (true, DType::F16) => "attention_gqa_f16",
            (true, DType::BF16) => "attention_gqa_bf16",
        };
        let heads_per_block = if gqa { s.n_kv_heads } else { s.n_heads };
        let max_keys = s.window.map_or(total, |w| w.min(total));
        let (n_split, chunk) = self.attention_split(a.n_q, heads_per_block, max_keys);
        let args = [
            int(q.cols, "q cols")?,
            int(a.q_row0, "q_row0")?,
            int(a.q_col0, "q_col0")?,
            int(k.cols, "kv cols")?,
            int(out.cols, "out cols")?,
            int(a.out_row0, "out_row0")?,
            int(a.n_past, "n_past")?,
            int(s.n_heads, "n_heads")?,
            int(s.group(), "group")?,
            int(s.head_dim, "head_dim")?,
            int(s.window.unwrap_or(0), "window")?,
            int(n_split, "n_split")?,
            int(chunk, "chunk")?,
        ];
        let mut guard = self.attn_scratch.lock().unwrap_or_else(|p| p.into_inner());
        let need = if n_split > 1 {
            a.n_q * s.n_heads * n_split * (s.head_dim + 2)
        } else {
            1
        };
        if guard.as_ref().map_or(true, |p| p.len() < need) {
            *guard = None;
            *guard = Some(self.alloc::<f32>(need, "attention partials")?);
        }
        let part = guard.as_mut().expect("allocated above");
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&q.data).arg(&args[0]).arg(&args[1]).arg(&args[2]);
        b.arg(&k.data).arg(&v.data).arg(&args[3]);
        b.arg(&mut out.data).arg(&args[4]).arg(&args[5]);
        b.arg(&args[6])
            .arg(&args[7])
            .arg(&args[8])
            .arg(&args[9])
            .arg(&args[10])
            .arg(&a.scale);
        b.arg(&args[11]).arg(&args[12]).arg(&mut *part);
        let cfg = LaunchConfig {
            grid_dim: (a.n_q as u32, heads_per_block as u32, n_split as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.map_err(Self::launch_err(name))?;
        if n_split > 1 {
            let name = "attention_combine";
            let mut b = self.stream.launch_builder(self.f(name));
            b.arg(&*part).arg(&mut out.data).arg(&args[4]).arg(&args[5]);
            b.arg(&args[7]).arg(&args[9]).arg(&args[11]);
            let cfg = LaunchConfig {
                grid_dim: (a.n_q as u32, s.n_heads as u32, 1),
                block_dim: (s.head_dim.div_ceil(32).clamp(1, 8) as u32 * 32, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { b.launch(cfg) }.map_err(Self::launch_err(name))?;
        }
        Ok(())
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // Let queued work finish before the buffers and the context go.
        let _ = self.stream.synchronize();
        let _ = &self.ctx;
    }
}
