//! The Backend seam: the small, explicit op set the forward pass is written against.
//!
//! The model (in `farsight-engine`) is written once over this trait; the CPU backend here is the
//! reference implementation that other backends are tested against. Buffers are typed and owned
//! by the backend:
//!
//! - [`Backend::Tensor`]: f32 activations, a row-major `rows x cols` matrix (one row per token).
//! - [`Backend::Matrix`]: a weight matrix `out x in` in its stored dtype (f32, f16 or bf16),
//!   used as `y = x W^T` (the Hugging Face `nn.Linear` layout), or as an embedding table.
//! - [`Backend::Cache`]: KV rows (`capacity x cols`) in the KV dtype, written by
//!   [`Backend::cache_write`] and read by attention.
//!
//! Every op takes explicit row/column ranges so that fused buffers (q|k|v in one row, gate|up in
//! one row) are addressed without copies.

use crate::error::KernelError;
use crate::sample::{sample_row, SampleSpec};

/// Result of a backend op.
pub type Result<T> = std::result::Result<T, KernelError>;

/// Element type of a weight matrix or a KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Lower-case name as used on the command line and in safetensors headers.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A weight matrix on the host, as little-endian bytes of `rows * cols` elements of `dtype`
/// (typically a slice of a memory-mapped safetensors file; no alignment is assumed).
#[derive(Clone, Copy, Debug)]
pub struct HostMatrix<'a> {
    pub rows: usize,
    pub cols: usize,
    pub dtype: DType,
    pub bytes: &'a [u8],
}

impl<'a> HostMatrix<'a> {
    /// Checks that the byte length matches the shape.
    pub fn validate(&self) -> Result<()> {
        let want = self
            .rows
            .checked_mul(self.cols)
            .and_then(|n| n.checked_mul(self.dtype.size()))
            .ok_or(KernelError::Shape(format!(
                "matrix {}x{} overflows",
                self.rows, self.cols
            )))?;
        if want != self.bytes.len() {
            return Err(KernelError::Shape(format!(
                "matrix {}x{} {} needs {} bytes, got {}",
                self.rows,
                self.cols,
                self.dtype,
                want,
                self.bytes.len()
            )));
        }
        Ok(())
    }
}

/// Rotary embedding parameters for one forward call: the per-pair inverse frequencies (with any
/// scaling already applied) and the factor applied to cos/sin (YaRN's attention factor; 1
/// otherwise). Rotation is the "rotate half" layout of Hugging Face Llama checkpoints: pair `i`
/// is (x[i], x[i + D/2]).
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    pub inv_freq: Vec<f32>,
    pub attention_scaling: f32,
}

/// Shape of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Sliding window (Mistral): a query at position p sees keys in (p - window, p].
    pub window: Option<usize>,
}

impl AttnShape {
    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
    pub fn q_width(&self) -> usize {
        self.n_heads * self.head_dim
    }
    pub fn kv_width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// Causal attention of `n_q` new queries against a KV cache.
///
/// The queries are rows `q_row0 .. q_row0 + n_q` of `q`, columns `q_col0 .. + n_heads*head_dim`.
/// They sit at positions `n_past .. n_past + n_q`; the cache rows `0 .. n_past + n_q` hold the
/// keys and values of positions `0 ..` (the new tokens' rows already written). Query `i` attends
/// to cache rows `0 ..= n_past + i` (minus any sliding window). The output goes to rows
/// `out_row0 ..` of `out`, `n_heads*head_dim` columns from 0.
#[derive(Clone, Copy, Debug)]
pub struct CausalAttn {
    pub shape: AttnShape,
    pub q_row0: usize,
    pub q_col0: usize,
    pub n_q: usize,
    pub n_past: usize,
    pub out_row0: usize,
    /// Softmax scale, usually `1/sqrt(head_dim)`.
    pub scale: f32,
}

/// Golden-ratio increment of the random streams ([`random_value`]).
pub const RANDOM_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 finaliser.
pub fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Element `i` of the random stream `seed`: `scale * u`, `u` uniform in [-1, 1) on a grid of
/// 2^-23 (24 random bits), counter-based (SplitMix64 of `splitmix64(seed) + (i + 1) * gamma`),
/// so any backend computes the same f32 for the same `(seed, i)` in any order. The random
/// weights of synthetic models ([`Backend::random_matrix`], [`Backend::fill_random`]).
pub fn random_value(seed: u64, i: u64, scale: f32) -> f32 {
    let z = splitmix64(splitmix64(seed).wrapping_add(i.wrapping_add(1).wrapping_mul(RANDOM_GAMMA)));
    let u = ((z >> 40) as f32 * (1.0 / 16_777_216.0)) * 2.0 - 1.0;
    u * scale
}

/// The op set. See the module docs for the buffer types.
pub trait Backend: Send + Sync {
    /// f32 activations, row-major `rows x cols`.
    type Tensor: Send;
    /// A weight matrix `out x in` in its stored dtype.
    type Matrix: Send + Sync;
    /// KV rows in the KV dtype, `capacity x cols`.
    type Cache: Send;

    /// Human-readable name ("cpu (2 threads)", "cuda:0 (H100)").
    fn name(&self) -> String;

    // ---- buffers -------------------------------------------------------------------------
    /// A zero-filled tensor.
    fn tensor(&self, rows: usize, cols: usize) -> Result<Self::Tensor>;
    /// `(rows, cols)` of a tensor.
    fn tensor_shape(&self, t: &Self::Tensor) -> (usize, usize);
    /// Copies host data (row-major) into rows `row0..` of `t`.
    fn write_tensor(&self, t: &mut Self::Tensor, row0: usize, data: &[f32]) -> Result<()>;
    /// Reads rows `row0 .. row0 + n` of `t` to the host.
    fn read_rows(&self, t: &Self::Tensor, row0: usize, n: usize) -> Result<Vec<f32>>;
    /// Copies whole rows between tensors of equal width: `dst[dst_row0 + i] = src[src_rows[i]]`.
    fn gather_rows(
        &self,
        src: &Self::Tensor,
        src_rows: &[usize],
        dst: &mut Self::Tensor,
        dst_row0: usize,
    ) -> Result<()>;
    /// Uploads a weight matrix (the backend may repack it).
    fn upload_matrix(&self, m: HostMatrix<'_>) -> Result<Self::Matrix>;
    /// A `rows x cols` matrix of `dtype` holding element `i` (row-major) =
    /// [`random_value`]`(seed, i, scale)` rounded to `dtype`, generated where the matrix lives
    /// (on the GPU for a GPU backend: no host buffer of the matrix's size). For synthetic models.
    fn random_matrix(
        &self,
        rows: usize,
        cols: usize,
        dtype: DType,
        scale: f32,
        seed: u64,
    ) -> Result<Self::Matrix>;
    /// Fills the whole tensor with `random_value(seed, i, scale)` (`i` the row-major index).
    fn fill_random(&self, t: &mut Self::Tensor, scale: f32, seed: u64) -> Result<()>;
    /// `(rows, cols)` = `(out, in)` of a matrix.
    fn matrix_shape(&self, m: &Self::Matrix) -> (usize, usize);
    /// Bytes the matrix occupies.
    fn matrix_bytes(&self, m: &Self::Matrix) -> usize;
    /// A new matrix of the given rows of `m`, in that order (same dtype).
    fn matrix_rows(&self, m: &Self::Matrix, rows: &[usize]) -> Result<Self::Matrix>;
    /// A KV cache buffer with room for `capacity` rows of `cols` elements.
    fn cache(&self, capacity: usize, cols: usize, dtype: DType) -> Result<Self::Cache>;
    /// Rows the cache can hold.
    fn cache_capacity(&self, c: &Self::Cache) -> usize;
    /// Grows a cache to at least `capacity` rows, keeping its contents.
    fn cache_grow(&self, c: &mut Self::Cache, capacity: usize) -> Result<()>;
    /// Writes rows `src_row0 .. + n` (columns `src_col0 .. + cache cols`) of `src` into cache
    /// rows `dst_row0 ..`, converting to the cache dtype.
    fn cache_write(
        &self,
        c: &mut Self::Cache,
        dst_row0: usize,
        src: &Self::Tensor,
        src_row0: usize,
        src_col0: usize,
        n: usize,
    ) -> Result<()>;

    // ---- ops -----------------------------------------------------------------------------
    /// `out[i] = table[ids[i]]` (rows of an `vocab x hidden` matrix, as f32).
    fn embedding(&self, table: &Self::Matrix, ids: &[u32], out: &mut Self::Tensor) -> Result<()>;
    /// Row-wise RMS norm: `out = x / sqrt(mean(x^2) + eps) * weight` on the first `n` rows.
    fn rms_norm(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        eps: f32,
        out: &mut Self::Tensor,
        n: usize,
    ) -> Result<()>;
    /// `out[0..n] = x[0..n] W^T (+ bias)`, f32 accumulation.
    fn matmul(
        &self,
        x: &Self::Tensor,
        w: &Self::Matrix,
        bias: Option<&Self::Tensor>,
        out: &mut Self::Tensor,
        n: usize,
    ) -> Result<()>;
    /// Rotary embedding in place on rows `0..positions.len()`, columns
    /// `col0 .. col0 + n_heads * head_dim`, row `i` at position `positions[i]`.
    fn rope(
        &self,
        x: &mut Self::Tensor,
        col0: usize,
        n_heads: usize,
        head_dim: usize,
        positions: &[u32],
        rope: &Rope,
    ) -> Result<()>;
    /// `out[r] = silu(gu[r][..I]) * gu[r][I..]` for the first `n` rows, `gu` being `n x 2I`.
    fn silu_mul(&self, gate_up: &Self::Tensor, out: &mut Self::Tensor, n: usize) -> Result<()>;
    /// `x[0..n] += y[0..n]`.
    fn add(&self, x: &mut Self::Tensor, y: &Self::Tensor, n: usize) -> Result<()>;
    /// Causal attention over a dense cache (see [`CausalAttn`]).
    fn attention(
        &self,
        args: &CausalAttn,
        q: &Self::Tensor,
        k: &Self::Cache,
        v: &Self::Cache,
        out: &mut Self::Tensor,
    ) -> Result<()>;

    /// Picks one token per row: row `r` of `logits` with `specs[r]` (the first `specs.len()`
    /// rows), exactly as [`crate::sample::sample_row`] does. The default reads the rows to the
    /// host and calls it; a GPU backend samples where the logits are and copies back the ids.
    fn sample_rows(&self, logits: &Self::Tensor, specs: &[SampleSpec]) -> Result<Vec<u32>> {
        let (rows, cols) = self.tensor_shape(logits);
        checks::sample_rows(rows, cols, specs)?;
        if specs.is_empty() {
            return Ok(Vec::new());
        }
        let data = self.read_rows(logits, 0, specs.len())?;
        let mut scratch = Vec::new();
        Ok(data
            .chunks_exact(cols)
            .zip(specs)
            .map(|(row, s)| sample_row(row, s, &mut scratch))
            .collect())
    }
}

/// Shape checks shared by every backend: each op validates its operands' dimensions here before
/// touching memory, so a caller's mistake is the same error on every device.
pub mod checks {
    use super::{CausalAttn, DType, Result, Rope, SampleSpec};
    use crate::error::KernelError;

    fn err(msg: String) -> KernelError {
        KernelError::Shape(msg)
    }

    /// `need` rows of a tensor with `rows` rows.
    pub fn rows(rows: usize, need: usize, what: &str) -> Result<()> {
        if need > rows {
            return Err(err(format!(
                "{what}: {need} rows requested, tensor has {rows}"
            )));
        }
        Ok(())
    }

    /// Sampling `specs.len()` rows of a `(rows, cols)` logits tensor: enough rows, a vocabulary
    /// of 1 to 2^30 (kernels index with i32, a little past the end), valid specs.
    pub fn sample_rows(rows_: usize, cols: usize, specs: &[SampleSpec]) -> Result<()> {
        rows(rows_, specs.len(), "sample_rows")?;
        if !specs.is_empty() && (cols == 0 || cols > 1 << 30) {
            return Err(err(format!(
                "sample_rows over a vocabulary of {cols} (must be 1 to 2^30)"
            )));
        }
        for (r, s) in specs.iter().enumerate() {
            s.validate().map_err(|e| match e {
                KernelError::Invalid(m) => KernelError::Invalid(format!("row {r}: {m}")),
                other => other,
            })?;
        }
        Ok(())
    }

    /// RMS norm of `n` rows of x `(rows, cols)` with a `weight_len` weight into out `(rows, cols)`.
    pub fn rms_norm(
        n: usize,
        x: (usize, usize),
        weight_len: usize,
        out: (usize, usize),
    ) -> Result<()> {
        rows(x.0, n, "rms_norm")?;
        rows(out.0, n, "rms_norm out")?;
        if weight_len != x.1 || out.1 != x.1 {
            return Err(err(format!(
                "rms_norm width {}, weight {weight_len}, out {}",
                x.1, out.1
            )));
        }
        Ok(())
    }

    /// `n` rows of src `(rows, cols)` from column `src_col0` into a cache `(capacity, cols)` at
    /// row `dst_row0`.
    pub fn cache_write(
        cache: (usize, usize),
        dst_row0: usize,
        src: (usize, usize),
        src_row0: usize,
        src_col0: usize,
        n: usize,
    ) -> Result<()> {
        rows(src.0, src_row0 + n, "cache_write src")?;
        if dst_row0 + n > cache.0 || src_col0 + cache.1 > src.1 {
            return Err(err(format!(
                "cache_write of {n} rows at {dst_row0} (capacity {}), columns {src_col0}+{} of {}",
                cache.0, cache.1, src.1
            )));
        }
        Ok(())
    }

    /// `out[0..n] = x[0..n] W^T + bias`: x `(rows, cols)`, W `(out, in)`, out `(rows, cols)`.
    pub fn matmul(
        n: usize,
        x: (usize, usize),
        w: (usize, usize),
        out: (usize, usize),
        bias_len: Option<usize>,
    ) -> Result<()> {
        rows(x.0, n, "matmul x")?;
        rows(out.0, n, "matmul out")?;
        if x.1 != w.1 || out.1 != w.0 {
            return Err(err(format!(
                "matmul: x {n}x{}, W {}x{}, out {n}x{}",
                x.1, w.0, w.1, out.1
            )));
        }
        match bias_len {
            Some(b) if b != w.0 => Err(err(format!("bias of {b} for {} outputs", w.0))),
            _ => Ok(()),
        }
    }

    /// Rope on `n_pos` rows of x `(rows, cols)`, columns `col0 .. + n_heads * head_dim`.
    pub fn rope(
        x: (usize, usize),
        n_pos: usize,
        col0: usize,
        n_heads: usize,
        head_dim: usize,
        r: &Rope,
    ) -> Result<()> {
        rows(x.0, n_pos, "rope")?;
        if r.inv_freq.len() != head_dim / 2 || col0 + n_heads * head_dim > x.1 {
            return Err(err(format!(
                "rope: {} frequencies for head_dim {head_dim}, columns {col0}+{} of {}",
                r.inv_freq.len(),
                n_heads * head_dim,
                x.1
            )));
        }
        Ok(())
    }

    impl CausalAttn {
        /// Checks the call against q and out `(rows, cols)` and the K and V caches
        /// `(capacity, cols, dtype)`.
        pub fn validate(
            &self,
            q: (usize, usize),
            k: (usize, usize, DType),
            v: (usize, usize, DType),
            out: (usize, usize),
        ) -> Result<()> {
            let s = self.shape;
            let total = self.n_past + self.n_q;
            if s.n_kv_heads == 0 || s.n_heads % s.n_kv_heads != 0 {
                return Err(err(format!(
                    "{} heads over {} KV heads",
                    s.n_heads, s.n_kv_heads
                )));
            }
            if total > k.0 || total > v.0 || k.1 != s.kv_width() || v.1 != k.1 {
                return Err(err(format!(
                    "attention over {total} rows: cache {}x{}",
                    k.0, k.1
                )));
            }
            rows(q.0, self.q_row0 + self.n_q, "attention q")?;
            rows(out.0, self.out_row0 + self.n_q, "attention out")?;
            if self.q_col0 + s.q_width() > q.1 || out.1 < s.q_width() {
                return Err(err("attention: q/out columns".into()));
            }
            if k.2 != v.2 {
                return Err(err(format!("K cache {} vs V cache {}", k.2, v.2)));
            }
            Ok(())
        }
    }
}
