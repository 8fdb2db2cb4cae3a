//! The CUDA backend: [`Backend`] on one NVIDIA GPU through the driver API (cudarc, loaded
//! dynamically: nothing CUDA is needed to build, only to run), kernels compiled at run time by
//! NVRTC (`kernels/*.cu`, cached on disk, see [`compile`]) and cuBLAS for prefill matmuls.
//!
//! All work is queued on one stream owned by the backend, so ops run in call order; host reads
//! ([`Backend::read_rows`]) synchronize. See `NOTES.md` beside this file for the design choices,
//! the measured parity with the CPU backend, and what is not done yet.

mod attention;
mod buffers;
mod compile;
mod green;
mod labels;
mod matmul;
mod offload;
mod ops;
mod pinned;
mod residency;
mod sample;
mod sparse;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DriverError};
use cudarc::nvrtc::Ptx;

use crate::backend::{Backend, CausalAttn, DType, HostMatrix, Result, Rope};
use crate::error::KernelError;
use crate::sample::SampleSpec;

pub use attention::{AttnKernel, ATTN_MAX_HEAD_DIM, FLASH_MIN_QUERIES, GQA_MAX_GROUP};
pub use buffers::{CudaCache, CudaMatrix, CudaTensor};
pub use labels::{Labels4, LabelsOut};
pub use matmul::{Gemv1, GEMV_MAX_ROWS};
pub use offload::{Residency, RowSlab, StreamEvent};
pub use pinned::{HostPages, PinnedBuf, PinnedKind};
pub use residency::LruResidency;
pub use sparse::{DevBuf, KvRows, TopkScratch, DS_MAX_R};

/// The CUDA C++ source NVRTC compiles (every kernel file, one translation unit): for host-side
/// checks and emulation tests.
pub fn kernel_source() -> String {
    compile::source()
}

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
    "gemv1_f16",
    "gemv1_bf16",
    "gemv1l4_f16",
    "gemv1l4_bf16",
    "gemv1p_f16",
    "gemv1p_bf16",
    "gemv_f16",
    "gemv_bf16",
    "attention_f32",
    "attention_f16",
    "attention_bf16",
    "attention_combine",
    "attention_gqa_f32_d64_g4",
    "attention_gqa_f32_d64_g8",
    "attention_gqa_f32_d128_g4",
    "attention_gqa_f32_d128_g8",
    "attention_gqa_f16_d64_g4",
    "attention_gqa_f16_d64_g8",
    "attention_gqa_f16_d128_g4",
    "attention_gqa_f16_d128_g8",
    "attention_gqa_bf16_d64_g4",
    "attention_gqa_bf16_d64_g8",
    "attention_gqa_bf16_d128_g4",
    "attention_gqa_bf16_d128_g8",
    "flash_attn_f16_d64",
    "flash_attn_f16_d128",
    "flash_attn_bf16_d64",
    "flash_attn_bf16_d128",
    "random_f32",
    "random_f16",
    "random_bf16",
    "ds_labels_from_cache_bf16",
    "ds_labels_from_cache_f16",
    "ds_label_scores",
    "ds_topk_init",
    "ds_topk_hist",
    "ds_topk_write",
    "ds_topk_cluster",
    "ds_fixed_rows",
    "sparse_attn_f16_d64_g4",
    "sparse_attn_f16_d64_g8",
    "sparse_attn_f16_d128_g4",
    "sparse_attn_f16_d128_g8",
    "sparse_attn_bf16_d64_g4",
    "sparse_attn_bf16_d64_g8",
    "sparse_attn_bf16_d128_g4",
    "sparse_attn_bf16_d128_g8",
    "ds_gather_rows",
    "ds_labels4_from_cache_bf16",
    "ds_labels4_from_cache_f16",
    "ds_label_scores4_w1",
    "ds_label_scores4_w2",
    "ds_label_scores4_w3",
    "ds_label_scores4_w4",
    "ds_label_scores4_w5",
    "ds_label_scores4_w6",
    "ds_label_scores4_w7",
    "ds_label_scores4_w8",
    "ds_put_rows_f16",
    "ds_put_rows_bf16",
    "ds_residency",
    "ds_residency_lru",
    "ds_gather_misses",
    "ds_unpack_rows",
    "ds_page_max",
    "ds_ahead_labels",
    "ds_overlap",
    "sample_rows",
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
    /// The batch-1 GEMV kernel ([`Gemv1`] as u8; `FARSIGHT_GEMV`, [`CudaBackend::set_gemv1`]).
    gemv1: std::sync::atomic::AtomicU8,
    /// Most blocks of the row gathers from host memory (`FARSIGHT_GATHER_BLOCKS`, default
    /// SMs / 4: on the H100 at 256K, 1/64, 16 blocks stalled the compute stream 1.2 ms per
    /// step, 32 none, and 64 or 132 slowed the compute stream's kernels more).
    gather_blocks: AtomicUsize,
    /// The last rope call's positions and frequencies on the device (reused while unchanged).
    rope_cache: Mutex<Option<ops::RopeUpload>>,
    /// Keys per attention split; 0 = chosen from the SM count.
    attn_chunk: AtomicUsize,
    /// Use the GQA key-per-lane attention kernel where the shape allows.
    attn_gqa: AtomicBool,
    /// Top-k in one launch with thread-block clusters (sm_90 and later).
    topk_cluster: AtomicBool,
    /// Whether the device runs the cluster top-k (sm_90).
    cluster_ok: bool,
    /// Use the tensor-core flash kernel for prefill chunks where the shape allows.
    attn_flash: AtomicBool,
    sm_count: usize,
    /// Blocks per SM the decode attention's split aims at.
    attn_blocks_per_sm: usize,
    name: String,
    arch: String,
    ptx_from_cache: bool,
    /// `FARSIGHT_GATHER_SMS`: the SM partitions (see `green.rs`) and this backend's stream on
    /// the gather partition, where row gathers from host memory run.
    split: Option<Arc<green::SmSplit>>,
    gather_stream: Option<Arc<CudaStream>>,
}

fn dev_err(what: &str, e: impl std::fmt::Debug) -> KernelError {
    KernelError::Device(format!("{what}: {e:?}"))
}

fn shape_err(msg: String) -> KernelError {
    KernelError::Shape(msg)
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
        let split = match std::env::var("FARSIGHT_GATHER_SMS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
        {
            Some(n) if n > 0 => Some(green::SmSplit::new(&ctx, n)?),
            _ => None,
        };
        let (stream, gather_stream) = match &split {
            Some(sp) => {
                let s = sp.stream(&ctx, false, 0)?;
                let (_, greatest) = cudarc::driver::result::stream::get_priority_range()
                    .map_err(|e| dev_err("stream priorities", e))?;
                (s, Some(sp.stream(&ctx, true, greatest)?))
            }
            None => (
                ctx.new_stream()
                    .map_err(|e| dev_err("creating a stream", e))?,
                None,
            ),
        };
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
        // With a partition, the kernels on this stream see only the rest of the SMs.
        let sm_count = split.as_ref().map_or(sm_count, |sp| sp.rest_sms.max(1));

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
        // The one-launch top-k's thread-block clusters (8 blocks, the portable size) need sm_90.
        let cluster_ok = major >= 9;
        for &k in KERNELS {
            let f = module
                .load_function(k)
                .map_err(|e| dev_err(&format!("kernel {k}"), e))?;
            if let Some(bytes) = attention::flash_smem_bytes_of(k) {
                // More than the default 48 KiB of dynamic shared memory.
                f.set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
                .map_err(|e| dev_err(&format!("shared memory limit of {k}"), e))?;
            }
            funcs.insert(k, f);
        }
        Ok(CudaBackend {
            ctx,
            stream,
            blas,
            funcs,
            scratch: Mutex::new(None),
            attn_scratch: Mutex::new(None),
            rope_cache: Mutex::new(None),
            gemv1: std::sync::atomic::AtomicU8::new(Gemv1::from_env() as u8),
            gather_blocks: AtomicUsize::new(
                std::env::var("FARSIGHT_GATHER_BLOCKS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or((sm_count / 4).max(1)),
            ),
            attn_chunk: AtomicUsize::new(0),
            // FARSIGHT_ATTN_BLOCKS: decode attention blocks per SM the split aims at (default 4).
            attn_blocks_per_sm: std::env::var("FARSIGHT_ATTN_BLOCKS")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&b: &usize| b > 0)
                .unwrap_or(4),
            attn_gqa: AtomicBool::new(true),
            // FARSIGHT_TOPK=radix keeps the multi-launch top-k (for comparisons).
            cluster_ok,
            topk_cluster: AtomicBool::new(
                cluster_ok && std::env::var("FARSIGHT_TOPK").map_or(true, |v| v != "radix"),
            ),
            attn_flash: AtomicBool::new(true),
            sm_count,
            name: format!("cuda:{ordinal} ({dev_name}, {arch})"),
            arch,
            ptx_from_cache,
            split,
            gather_stream,
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

    /// Free device memory in bytes (what other allocations may still take).
    pub fn free_memory(&self) -> Result<usize> {
        self.ctx
            .mem_get_info()
            .map(|(free, _)| free)
            .map_err(|e| dev_err("cuMemGetInfo", e))
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| dev_err("synchronize", e))
    }

    fn f(&self, name: &str) -> &CudaFunction {
        &self.funcs[name]
    }

    fn launch_err(name: &str) -> impl Fn(DriverError) -> KernelError + '_ {
        move |e| dev_err(&format!("launch of {name}"), e)
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
        self.tensor_impl(rows, cols)
    }

    fn tensor_shape(&self, t: &CudaTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn write_tensor(&self, t: &mut CudaTensor, row0: usize, data: &[f32]) -> Result<()> {
        self.write_tensor_impl(t, row0, data)
    }

    fn read_rows(&self, t: &CudaTensor, row0: usize, n: usize) -> Result<Vec<f32>> {
        self.read_rows_impl(t, row0, n)
    }

    fn gather_rows(
        &self,
        src: &CudaTensor,
        src_rows: &[usize],
        dst: &mut CudaTensor,
        dst_row0: usize,
    ) -> Result<()> {
        self.gather_rows_impl(src, src_rows, dst, dst_row0)
    }

    fn upload_matrix(&self, m: HostMatrix<'_>) -> Result<CudaMatrix> {
        self.upload_matrix_impl(m)
    }

    fn random_matrix(
        &self,
        rows: usize,
        cols: usize,
        dtype: DType,
        scale: f32,
        seed: u64,
    ) -> Result<CudaMatrix> {
        self.random_matrix_impl(rows, cols, dtype, scale, seed)
    }

    fn fill_random(&self, t: &mut CudaTensor, scale: f32, seed: u64) -> Result<()> {
        self.fill_random_impl(t, scale, seed)
    }

    fn matrix_shape(&self, m: &CudaMatrix) -> (usize, usize) {
        (m.rows, m.cols)
    }

    fn matrix_bytes(&self, m: &CudaMatrix) -> usize {
        m.rows * m.cols * m.dtype.size()
    }

    fn matrix_rows(&self, m: &CudaMatrix, rows: &[usize]) -> Result<CudaMatrix> {
        if let Some(&r) = rows.iter().find(|&&r| r >= m.rows) {
            return Err(shape_err(format!(
                "matrix_rows: row {r} of a {}-row matrix",
                m.rows
            )));
        }
        let rb = m.cols * m.dtype.size();
        let mut data = self.alloc::<u8>(rows.len() * rb, "matrix rows")?;
        for (i, &r) in rows.iter().enumerate() {
            self.stream
                .memcpy_dtod(
                    &m.data.slice(r * rb..(r + 1) * rb),
                    &mut data.slice_mut(i * rb..(i + 1) * rb),
                )
                .map_err(|e| dev_err("matrix_rows", e))?;
        }
        Ok(CudaMatrix {
            rows: rows.len(),
            cols: m.cols,
            dtype: m.dtype,
            data,
        })
    }

    fn cache(&self, capacity: usize, cols: usize, dtype: DType) -> Result<CudaCache> {
        self.cache_impl(capacity, cols, dtype)
    }

    fn cache_capacity(&self, c: &CudaCache) -> usize {
        c.capacity
    }

    fn cache_grow(&self, c: &mut CudaCache, capacity: usize) -> Result<()> {
        self.cache_grow_impl(c, capacity)
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
        self.cache_write_impl(c, dst_row0, src, src_row0, src_col0, n)
    }

    fn embedding(&self, table: &CudaMatrix, ids: &[u32], out: &mut CudaTensor) -> Result<()> {
        self.embedding_impl(table, ids, out)
    }

    fn rms_norm(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        eps: f32,
        out: &mut CudaTensor,
        n: usize,
    ) -> Result<()> {
        self.rms_norm_impl(x, weight, eps, out, n)
    }

    fn matmul(
        &self,
        x: &CudaTensor,
        w: &CudaMatrix,
        bias: Option<&CudaTensor>,
        out: &mut CudaTensor,
        n: usize,
    ) -> Result<()> {
        self.matmul_impl(x, w, bias, out, n)
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
        self.rope_impl(x, col0, n_heads, head_dim, positions, rope)
    }

    fn silu_mul(&self, gate_up: &CudaTensor, out: &mut CudaTensor, n: usize) -> Result<()> {
        self.silu_mul_impl(gate_up, out, n)
    }

    fn add(&self, x: &mut CudaTensor, y: &CudaTensor, n: usize) -> Result<()> {
        self.add_impl(x, y, n)
    }

    fn attention(
        &self,
        a: &CausalAttn,
        q: &CudaTensor,
        k: &CudaCache,
        v: &CudaCache,
        out: &mut CudaTensor,
    ) -> Result<()> {
        self.attention_impl(a, q, k, v, out)
    }

    fn sample_rows(&self, logits: &CudaTensor, specs: &[SampleSpec]) -> Result<Vec<u32>> {
        self.sample_rows_impl(logits, specs)
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // Let queued work finish before the buffers and the context go.
        let _ = self.stream.synchronize();
        let _ = &self.ctx;
    }
}
