//! Row slabs (`[token][KV head][K | V]`, 16-bit, pinned host or device memory): writing new
//! rows and their labels into a slab, unpacking a slab into dense K and V caches, and filling
//! raw memory with random values.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::backend::{DType, Result};
use crate::cuda::{int, shape_err, CudaBackend, CudaTensor, DevBuf, Labels4, LabelsOut};

/// Where [`CudaBackend::ds_put_rows`] writes: a slab of `[slot][KV head][K | V]` rows.
#[derive(Clone, Copy, Debug)]
pub struct RowSlab {
    /// Address of slot 0 (pinned host or device).
    pub ptr: u64,
    /// Elements between consecutive slots and between consecutive KV heads of one slot.
    pub tok_stride: usize,
    pub head_stride: usize,
    pub dtype: DType,
}

impl CudaBackend {
    /// Writes rows `0..n` of `src` (K at `k_col0 + g*D`, V at `v_col0 + g*D`) as tokens
    /// `t0..t0+n` into `dst`: slot = token, or with `ring > 0` sinks at their token and the rest
    /// at `n_sink + (t - n_sink) % ring`. With `labels` also writes the tokens' labels at the
    /// channels `chan` (`n_kv * r`): f16 (`labels[g][t][c] = K[g*D + chan[g][c]]`, `cap` tokens
    /// per head) or 4-bit ([`crate::cuda::Labels4`], quantised as the CPU `LabelCache`).
    #[allow(clippy::too_many_arguments)]
    pub fn ds_put_rows(
        &self,
        src: &CudaTensor,
        src_row0: usize,
        k_col0: usize,
        v_col0: usize,
        n: usize,
        n_kv: usize,
        head_dim: usize,
        dst: &RowSlab,
        t0: usize,
        n_sink: usize,
        ring: usize,
        labels: Option<(&DevBuf<i32>, LabelsOut<'_>)>,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        if src_row0 + n > src.rows
            || k_col0.max(v_col0) + n_kv * head_dim > src.cols
            || 2 * head_dim > 1024
        {
            return Err(shape_err("ds_put_rows: shapes".into()));
        }
        let name = match dst.dtype {
            DType::F16 => "ds_put_rows_f16",
            DType::BF16 => "ds_put_rows_bf16",
            DType::F32 => {
                return Err(shape_err(
                    "offloaded rows in f32: not supported (use --kv-dtype f16 or bf16)".into(),
                ))
            }
        };
        let view = src.data.slice(src_row0 * src.cols..);
        let (sc, kc, vc, nn, hd) = (
            int(src.cols, "cols")?,
            int(k_col0, "k col")?,
            int(v_col0, "v col")?,
            int(n, "n")?,
            int(head_dim, "head_dim")?,
        );
        let (ts, hs, t0_, ns, rg) = (
            dst.tok_stride as i64,
            dst.head_stride as i64,
            t0 as i64,
            int(n_sink, "sink")?,
            int(ring, "ring")?,
        );
        let null: u64 = 0;
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&view)
            .arg(&sc)
            .arg(&kc)
            .arg(&vc)
            .arg(&nn)
            .arg(&hd)
            .arg(&dst.ptr)
            .arg(&ts)
            .arg(&hs);
        b.arg(&t0_).arg(&ns).arg(&rg);
        let (r, cap, words);
        match labels {
            Some((
                chan,
                LabelsOut::F16 {
                    r: rr,
                    labels,
                    cap: c,
                },
            )) => {
                if chan.len < n_kv * rr
                    || labels.len < n_kv * c * rr
                    || t0 + n > c
                    || rr > 2 * head_dim
                {
                    return Err(shape_err("ds_put_rows: label buffers".into()));
                }
                r = int(rr, "r")?;
                cap = c as i64;
                words = 0i32;
                b.arg(&chan.data).arg(&r).arg(&mut labels.data).arg(&cap);
                b.arg(&null).arg(&null).arg(&words);
            }
            Some((chan, LabelsOut::B4(lab))) => {
                lab.check("ds_put_rows")?;
                if chan.len < n_kv * lab.r || lab.heads != n_kv || t0 + n > lab.cap {
                    return Err(shape_err("ds_put_rows: label buffers".into()));
                }
                if head_dim < 16 {
                    return Err(shape_err(format!(
                        "ds_put_rows: 4-bit labels need a head dim of at least 16, not {head_dim}"
                    )));
                }
                r = int(lab.r, "r")?;
                cap = lab.cap as i64;
                words = int(Labels4::words(lab.r), "words")?;
                b.arg(&chan.data).arg(&r).arg(&null).arg(&cap);
                b.arg(&mut lab.codes.data)
                    .arg(&mut lab.params.data)
                    .arg(&words);
            }
            None => {
                r = 0;
                cap = 0;
                words = 0;
                b.arg(&null).arg(&r).arg(&null).arg(&cap);
                b.arg(&null).arg(&null).arg(&words);
            }
        }
        let cfg = LaunchConfig {
            grid_dim: (n as u32, n_kv as u32, 1),
            block_dim: (2 * head_dim as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.map_err(Self::launch_err(name))?;
        Ok(())
    }

    /// Tokens `t0..t1` of a slab of `[K | V]` rows of 16-bit elements (`src`, host or device;
    /// token `t` of head `g` at `t * tok_stride + g * head_stride` bytes) into dense K and V
    /// caches (`n_kv * head_dim` columns, row = token).
    #[allow(clippy::too_many_arguments)]
    pub fn ds_unpack_rows(
        &self,
        src: u64,
        n_kv: usize,
        head_dim: usize,
        (tok_stride, head_stride): (usize, usize),
        t0: usize,
        t1: usize,
        k: &mut crate::cuda::CudaCache,
        v: &mut crate::cuda::CudaCache,
    ) -> Result<()> {
        if t1 <= t0 {
            return Ok(());
        }
        if head_dim % 8 != 0
            || src % 16 != 0
            || tok_stride % 16 != 0
            || head_stride % 16 != 0
            || k.dtype.size() != 2
            || v.dtype != k.dtype
            || k.cols != n_kv * head_dim
            || v.cols != k.cols
            || t1 > k.capacity.min(v.capacity)
        {
            return Err(shape_err("ds_unpack_rows: shapes".into()));
        }
        let name = "ds_unpack_rows";
        let (nk, hd, a, bb) = (
            int(n_kv, "n_kv")?,
            int(head_dim, "head_dim")?,
            t0 as i64,
            t1 as i64,
        );
        let (tu, hu) = ((tok_stride / 16) as i64, (head_stride / 16) as i64);
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&src)
            .arg(&nk)
            .arg(&hd)
            .arg(&a)
            .arg(&bb)
            .arg(&tu)
            .arg(&hu)
            .arg(&mut k.data)
            .arg(&mut v.data);
        let units = (t1 - t0) * n_kv * head_dim * 2 * 2 / 16;
        let blocks = units.div_ceil(256 * 8).clamp(1, 16 * self.sm_count);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.map_err(Self::launch_err(name))?;
        Ok(())
    }

    /// Fills `n` elements of `dtype` at `ptr` (device or pinned host memory) with
    /// `backend::random_value` of `seed` (as `random_matrix`).
    pub fn random_fill_ptr(
        &self,
        ptr: u64,
        n: usize,
        dtype: DType,
        scale: f32,
        seed: u64,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let name = match dtype {
            DType::F32 => "random_f32",
            DType::F16 => "random_f16",
            DType::BF16 => "random_bf16",
        };
        let (nn, mixed) = (n as i64, crate::backend::splitmix64(seed));
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&ptr).arg(&nn).arg(&mixed).arg(&scale);
        unsafe { b.launch(crate::cuda::ops::flat(n)) }.map_err(Self::launch_err(name))?;
        Ok(())
    }
}
