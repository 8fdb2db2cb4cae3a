//! Causal attention of the CUDA backend: the choice between the general and the GQA kernel, the
//! split-K of long key ranges, its partials scratch and the combine pass (`attention.cu`).

use std::sync::atomic::Ordering;

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{int, shape_err, CudaBackend, CudaCache, CudaTensor};
use crate::backend::{CausalAttn, DType, Result};

/// Largest head dimension the attention kernel handles (`ATTN_MAX_T * 32` in attention.cu).
pub const ATTN_MAX_HEAD_DIM: usize = 256;

/// Limit of the GQA key-per-lane attention kernel (`GQA_MAX_GROUP`): groups of up to 8 query
/// heads per KV head; head dims 64 and 128 (the kernels are instantiated per head dim).
pub const GQA_MAX_GROUP: usize = 8;

/// Whether the GQA kernels (dense and sparse) are instantiated for this head dimension.
pub(super) fn gqa_head_dim(head_dim: usize) -> bool {
    head_dim == 64 || head_dim == 128
}

/// The instantiation of a GQA kernel (attention.cu's `GQA_KERNEL`, sparse.cu's
/// `SPARSE_KERNEL`) for a checked head dim (64 or 128) and group <= 8: `<prefix>_<dtype>_d<D>_g<4|8>`.
/// `sparse` picks `sparse_attn_*` (16-bit only) over `attention_gqa_*`. A table, not `format!`:
/// it runs once per layer and token.
pub(super) fn gqa_kernel_name(
    sparse: bool,
    dtype: DType,
    head_dim: usize,
    group: usize,
) -> &'static str {
    const DENSE: [[[&str; 2]; 2]; 3] = [
        [
            ["attention_gqa_f32_d64_g4", "attention_gqa_f32_d64_g8"],
            ["attention_gqa_f32_d128_g4", "attention_gqa_f32_d128_g8"],
        ],
        [
            ["attention_gqa_f16_d64_g4", "attention_gqa_f16_d64_g8"],
            ["attention_gqa_f16_d128_g4", "attention_gqa_f16_d128_g8"],
        ],
        [
            ["attention_gqa_bf16_d64_g4", "attention_gqa_bf16_d64_g8"],
            ["attention_gqa_bf16_d128_g4", "attention_gqa_bf16_d128_g8"],
        ],
    ];
    const SPARSE: [[[&str; 2]; 2]; 3] = [
        [["", ""], ["", ""]],
        [
            ["sparse_attn_f16_d64_g4", "sparse_attn_f16_d64_g8"],
            ["sparse_attn_f16_d128_g4", "sparse_attn_f16_d128_g8"],
        ],
        [
            ["sparse_attn_bf16_d64_g4", "sparse_attn_bf16_d64_g8"],
            ["sparse_attn_bf16_d128_g4", "sparse_attn_bf16_d128_g8"],
        ],
    ];
    let dt = match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    };
    let (d, g) = (usize::from(head_dim == 128), usize::from(group > 4));
    if sparse {
        SPARSE[dt][d][g]
    } else {
        DENSE[dt][d][g]
    }
}

/// Queries per call from which the tensor-core flash kernel runs (16-bit KV, head dim 64 or 128).
pub const FLASH_MIN_QUERIES: usize = 16;
/// Query rows and keys per tile of the flash kernel (`FA_BM`, `FA_BN` in flash.cu).
const FLASH_BM: usize = 64;
const FLASH_BN: usize = 64;

/// Dynamic shared memory of a flash kernel: two stages of a K and a V tile, rows padded by 8.
fn flash_smem_bytes(head_dim: usize) -> usize {
    2 * 2 * FLASH_BN * (head_dim + 8) * 2
}

/// The dynamic shared memory a kernel of `KERNELS` needs beyond the default, if any.
pub(super) fn flash_smem_bytes_of(name: &str) -> Option<usize> {
    if !name.starts_with("flash_attn_") {
        return None;
    }
    Some(flash_smem_bytes(if name.ends_with("_d64") {
        64
    } else {
        128
    }))
}

/// Which kernel an attention call runs (see `NOTES.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnKernel {
    /// Tensor-core flash attention (tiles of 64 queries x 64 keys, online softmax): prefill
    /// chunks of at least [`FLASH_MIN_QUERIES`] queries over an f16/bf16 cache, head dim 64 or
    /// 128. Q and P are rounded to the KV dtype for the products.
    Flash,
    /// One block per (query, KV head, key split) serving the query group; f32 math.
    Gqa,
    /// One block per (query, head, key split); f32 math; any group and head dim <= 256.
    PerHead,
}

impl CudaBackend {
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

    /// Chooses whether prefill chunks run the tensor-core flash kernel (the default) or the
    /// f32 kernels. A testing knob.
    pub fn set_attention_flash(&self, on: bool) {
        self.attn_flash.store(on, Ordering::Relaxed);
    }

    /// The kernel an attention call of this shape over a `kv` cache runs.
    pub fn attention_kernel(&self, a: &CausalAttn, kv: DType) -> AttnKernel {
        let s = a.shape;
        if self.attn_flash.load(Ordering::Relaxed)
            && kv != DType::F32
            && a.n_q >= FLASH_MIN_QUERIES
            && (s.head_dim == 64 || s.head_dim == 128)
        {
            AttnKernel::Flash
        } else if self.attn_gqa.load(Ordering::Relaxed)
            && s.group() <= GQA_MAX_GROUP
            && gqa_head_dim(s.head_dim)
        {
            AttnKernel::Gqa
        } else {
            AttnKernel::PerHead
        }
    }

    /// Launches the flash kernel (the caller checked [`AttnKernel::Flash`]).
    fn flash_attention(
        &self,
        a: &CausalAttn,
        q: &CudaTensor,
        k: &CudaCache,
        v: &CudaCache,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let s = a.shape;
        let name = match (k.dtype, s.head_dim) {
            (DType::F16, 64) => "flash_attn_f16_d64",
            (DType::F16, _) => "flash_attn_f16_d128",
            (DType::BF16, 64) => "flash_attn_bf16_d64",
            _ => "flash_attn_bf16_d128",
        };
        let args = [
            int(q.cols, "q cols")?,
            int(a.q_row0, "q_row0")?,
            int(a.q_col0, "q_col0")?,
            int(k.cols, "kv cols")?,
            int(out.cols, "out cols")?,
            int(a.out_row0, "out_row0")?,
            int(a.n_q, "n_q")?,
            int(a.n_past, "n_past")?,
            int(s.group(), "group")?,
            int(s.window.unwrap_or(0), "window")?,
        ];
        let scale_log2 = a.scale * std::f32::consts::LOG2_E;
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&q.data).arg(&args[0]).arg(&args[1]).arg(&args[2]);
        b.arg(&k.data).arg(&v.data).arg(&args[3]);
        b.arg(&mut out.data).arg(&args[4]).arg(&args[5]);
        b.arg(&args[6]).arg(&args[7]).arg(&args[8]).arg(&args[9]);
        b.arg(&scale_log2);
        let cfg = LaunchConfig {
            grid_dim: (a.n_q.div_ceil(FLASH_BM) as u32, s.n_heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: flash_smem_bytes(s.head_dim) as u32,
        };
        unsafe { b.launch(cfg) }.map_err(Self::launch_err(name))?;
        Ok(())
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
            let want =
                (self.attn_blocks_per_sm * self.sm_count).div_ceil((n_q * n_blocks_heads).max(1));
            want.min(max_keys.div_ceil(256)).max(1)
        }
        .min(65_535);
        (n_split, max_keys.div_ceil(n_split))
    }

    pub(super) fn attention_impl(
        &self,
        a: &CausalAttn,
        q: &CudaTensor,
        k: &CudaCache,
        v: &CudaCache,
        out: &mut CudaTensor,
    ) -> Result<()> {
        a.validate(
            (q.rows, q.cols),
            (k.capacity, k.cols, k.dtype),
            (v.capacity, v.cols, v.dtype),
            (out.rows, out.cols),
        )?;
        let s = a.shape;
        let total = a.n_past + a.n_q;
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
        let kernel = self.attention_kernel(a, k.dtype);
        if kernel == AttnKernel::Flash {
            if s.n_heads > 65_535 {
                return Err(shape_err(format!("attention: {} heads", s.n_heads)));
            }
            return self.flash_attention(a, q, k, v, out);
        }
        let gqa = kernel == AttnKernel::Gqa;
        let name = match (gqa, k.dtype) {
            (false, DType::F32) => "attention_f32",
            (false, DType::F16) => "attention_f16",
            (false, DType::BF16) => "attention_bf16",
            (true, dt) => gqa_kernel_name(false, dt, s.head_dim, s.group()),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every GQA instantiation the dispatch can name is compiled and loaded (listed in `KERNELS`).
    #[test]
    fn gqa_kernel_names_are_loaded() {
        for dt in [DType::F32, DType::F16, DType::BF16] {
            for d in [64, 128] {
                for g in 1..=GQA_MAX_GROUP {
                    let dense = gqa_kernel_name(false, dt, d, g);
                    assert!(super::super::KERNELS.contains(&dense), "{dense}");
                    if dt != DType::F32 {
                        let sparse = gqa_kernel_name(true, dt, d, g);
                        assert!(super::super::KERNELS.contains(&sparse), "{sparse}");
                    }
                }
            }
        }
        assert_eq!(
            gqa_kernel_name(true, DType::BF16, 128, 4),
            "sparse_attn_bf16_d128_g4"
        );
        assert_eq!(
            gqa_kernel_name(false, DType::F16, 64, 5),
            "attention_gqa_f16_d64_g8"
        );
    }
}
