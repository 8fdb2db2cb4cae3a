//! Launch wrappers of the elementwise and row-wise kernels (`ops.cu`): row gathers, cache writes,
//! embedding lookup, RMSNorm, RoPE, SiLU-gating and residual adds, with their launch geometry.

use crate::backend::checks;
use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{check_rows, int, shape_err, CudaBackend, CudaCache, CudaMatrix, CudaTensor};
use crate::backend::{DType, Result, Rope};

/// A 1-D launch over `total` elements (grid-stride kernels).
pub(super) fn flat(total: usize) -> LaunchConfig {
    let blocks = total.div_ceil(256).clamp(1, 65_536) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A launch of `rows` row-blocks (grid y), columns spread over grid x.
/// The kernels loop over rows in steps of grid y (at most 65535).
pub(super) fn per_row(rows: usize, cols: usize) -> LaunchConfig {
    let bx = cols.div_ceil(256).clamp(1, 1024) as u32;
    let by = rows.clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (bx, by, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaBackend {
    pub(super) fn gather_rows_impl(
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

    pub(super) fn cache_write_impl(
        &self,
        c: &mut CudaCache,
        dst_row0: usize,
        src: &CudaTensor,
        src_row0: usize,
        src_col0: usize,
        n: usize,
    ) -> Result<()> {
        checks::cache_write(
            (c.capacity, c.cols),
            dst_row0,
            (src.rows, src.cols),
            src_row0,
            src_col0,
            n,
        )?;
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

    pub(super) fn embedding_impl(
        &self,
        table: &CudaMatrix,
        ids: &[u32],
        out: &mut CudaTensor,
    ) -> Result<()> {
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

    pub(super) fn rms_norm_impl(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        eps: f32,
        out: &mut CudaTensor,
        n: usize,
    ) -> Result<()> {
        checks::rms_norm(
            n,
            (x.rows, x.cols),
            weight.rows * weight.cols,
            (out.rows, out.cols),
        )?;
        let c = x.cols;
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

    pub(super) fn rope_impl(
        &self,
        x: &mut CudaTensor,
        col0: usize,
        n_heads: usize,
        head_dim: usize,
        positions: &[u32],
        rope: &Rope,
    ) -> Result<()> {
        checks::rope(
            (x.rows, x.cols),
            positions.len(),
            col0,
            n_heads,
            head_dim,
            rope,
        )?;
        let half = head_dim / 2;
        if positions.is_empty() || n_heads == 0 || half == 0 {
            return Ok(());
        }
        // Every layer's two rope calls of one forward share positions and frequencies: upload
        // them once (a pageable upload per call stalls the host and drains the GPU's queue).
        let mut cache = self.rope_cache.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = match cache.as_ref() {
            Some(c) => c.positions != positions || c.inv_freq != rope.inv_freq,
            None => true,
        };
        if fresh {
            *cache = Some(RopeUpload {
                dev_pos: self.upload(positions, "rope positions")?,
                dev_freq: self.upload(&rope.inv_freq, "rope frequencies")?,
                positions: positions.to_vec(),
                inv_freq: rope.inv_freq.clone(),
            });
        }
        let c = cache.as_ref().expect("filled above");
        let (pos, freq) = (&c.dev_pos, &c.dev_freq);
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
            .arg(pos)
            .arg(freq)
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

    pub(super) fn silu_mul_impl(
        &self,
        gate_up: &CudaTensor,
        out: &mut CudaTensor,
        n: usize,
    ) -> Result<()> {
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

    pub(super) fn add_impl(&self, x: &mut CudaTensor, y: &CudaTensor, n: usize) -> Result<()> {
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

    /// Launches `random_<dtype>` over `n` elements of `data` (as raw `dtype` elements).
    pub(super) fn random_fill(
        &self,
        data: &mut cudarc::driver::CudaSlice<u8>,
        n: usize,
        dtype: DType,
        scale: f32,
        seed: u64,
    ) -> Result<()> {
        let name = match dtype {
            DType::F32 => "random_f32",
            DType::F16 => "random_f16",
            DType::BF16 => "random_bf16",
        };
        let (nn, mixed) = (n as i64, crate::backend::splitmix64(seed));
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(data).arg(&nn).arg(&mixed).arg(&scale);
        unsafe { b.launch(flat(n)) }.map_err(Self::launch_err(name))?;
        Ok(())
    }

    pub(super) fn random_matrix_impl(
        &self,
        rows: usize,
        cols: usize,
        dtype: DType,
        scale: f32,
        seed: u64,
    ) -> Result<CudaMatrix> {
        let n = rows
            .checked_mul(cols)
            .ok_or_else(|| shape_err(format!("matrix {rows}x{cols} overflows")))?;
        let mut data = self.alloc::<u8>(n * dtype.size(), "matrix")?;
        if n > 0 {
            self.random_fill(&mut data, n, dtype, scale, seed)?;
        }
        Ok(CudaMatrix {
            rows,
            cols,
            dtype,
            data,
        })
    }

    pub(super) fn fill_random_impl(&self, t: &mut CudaTensor, scale: f32, seed: u64) -> Result<()> {
        let n = t.rows * t.cols;
        if n == 0 {
            return Ok(());
        }
        let name = "random_f32";
        let (nn, mixed) = (n as i64, crate::backend::splitmix64(seed));
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&mut t.data).arg(&nn).arg(&mixed).arg(&scale);
        unsafe { b.launch(flat(n)) }.map_err(Self::launch_err(name))?;
        Ok(())
    }
}

/// The positions and frequencies of the last rope call, on the device.
pub(super) struct RopeUpload {
    positions: Vec<u32>,
    inv_freq: Vec<f32>,
    dev_pos: cudarc::driver::CudaSlice<u32>,
    dev_freq: cudarc::driver::CudaSlice<f32>,
}
