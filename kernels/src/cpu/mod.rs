//! The CPU backend: the reference implementation of [`Backend`], multi-threaded with rayon, SIMD
//! inner loops (`simd`), the `gemm` crate for prefill-sized matmuls.

mod attention;
mod matmul;
pub mod simd;

use std::sync::Arc;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::backend::{checks, Backend, CausalAttn, DType, HostMatrix, Result, Rope};
use crate::error::KernelError;
use simd::Elem;

/// f32 activations, row-major.
#[derive(Clone, Debug)]
pub struct CpuTensor {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

/// Typed element storage of a matrix or cache.
#[derive(Clone, Debug)]
pub enum Store {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl Store {
    fn dtype(&self) -> DType {
        match self {
            Store::F32(_) => DType::F32,
            Store::F16(_) => DType::F16,
            Store::BF16(_) => DType::BF16,
        }
    }
    fn zeros(dtype: DType, n: usize) -> Store {
        match dtype {
            DType::F32 => Store::F32(vec![0.0; n]),
            DType::F16 => Store::F16(vec![f16::ZERO; n]),
            DType::BF16 => Store::BF16(vec![bf16::ZERO; n]),
        }
    }
    fn resize(&mut self, n: usize) {
        match self {
            Store::F32(v) => v.resize(n, 0.0),
            Store::F16(v) => v.resize(n, f16::ZERO),
            Store::BF16(v) => v.resize(n, bf16::ZERO),
        }
    }
}

/// Dispatches `$body` with `$v` bound to the typed slice of a [`Store`].
macro_rules! with_store {
    ($s:expr, $v:ident => $body:expr) => {
        match $s {
            Store::F32($v) => $body,
            Store::F16($v) => $body,
            Store::BF16($v) => $body,
        }
    };
}

/// A weight matrix `rows x cols` (out x in).
#[derive(Clone, Debug)]
pub struct CpuMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Store,
}

/// KV rows `capacity x cols`.
#[derive(Clone, Debug)]
pub struct CpuCache {
    pub capacity: usize,
    pub cols: usize,
    pub data: Store,
}

/// The CPU backend; ops run on its own rayon pool.
#[derive(Clone)]
pub struct CpuBackend {
    pool: Arc<rayon::ThreadPool>,
    threads: usize,
}

impl CpuBackend {
    /// A backend with `threads` worker threads (0: one per available core).
    pub fn new(threads: usize) -> Result<CpuBackend> {
        let threads = if threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("farsight-cpu-{i}"))
            .build()
            .map_err(|e| KernelError::Device(format!("cannot start CPU threads: {e}")))?;
        Ok(CpuBackend {
            pool: Arc::new(pool),
            threads,
        })
    }

    /// Worker threads.
    pub fn threads(&self) -> usize {
        self.threads
    }
}

fn shape_err(msg: String) -> KernelError {
    KernelError::Shape(msg)
}

fn check_rows(t: &CpuTensor, n: usize, what: &str) -> Result<()> {
    if n > t.rows {
        return Err(shape_err(format!(
            "{what}: {n} rows requested, tensor has {}",
            t.rows
        )));
    }
    Ok(())
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Matrix = CpuMatrix;
    type Cache = CpuCache;

    fn name(&self) -> String {
        format!("cpu ({} threads)", self.threads)
    }

    fn tensor(&self, rows: usize, cols: usize) -> Result<CpuTensor> {
        Ok(CpuTensor {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        })
    }

    fn tensor_shape(&self, t: &CpuTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn write_tensor(&self, t: &mut CpuTensor, row0: usize, data: &[f32]) -> Result<()> {
        let start = row0 * t.cols;
        if data.len() % t.cols.max(1) != 0 || start + data.len() > t.data.len() {
            return Err(shape_err(format!(
                "write of {} values at row {row0} into {}x{}",
                data.len(),
                t.rows,
                t.cols
            )));
        }
        t.data[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn read_rows(&self, t: &CpuTensor, row0: usize, n: usize) -> Result<Vec<f32>> {
        check_rows(t, row0 + n, "read_rows")?;
        Ok(t.data[row0 * t.cols..(row0 + n) * t.cols].to_vec())
    }

    fn gather_rows(
        &self,
        src: &CpuTensor,
        src_rows: &[usize],
        dst: &mut CpuTensor,
        dst_row0: usize,
    ) -> Result<()> {
        if src.cols != dst.cols {
            return Err(shape_err(format!(
                "gather_rows: widths {} and {}",
                src.cols, dst.cols
            )));
        }
        check_rows(dst, dst_row0 + src_rows.len(), "gather_rows dst")?;
        let c = src.cols;
        for (i, &r) in src_rows.iter().enumerate() {
            check_rows(src, r + 1, "gather_rows src")?;
            let d = (dst_row0 + i) * c;
            dst.data[d..d + c].copy_from_slice(&src.data[r * c..(r + 1) * c]);
        }
        Ok(())
    }

    fn upload_matrix(&self, m: HostMatrix<'_>) -> Result<CpuMatrix> {
        m.validate()?;
        let data = match m.dtype {
            DType::F32 => Store::F32(bytemuck::pod_collect_to_vec(m.bytes)),
            DType::F16 => Store::F16(bytemuck::pod_collect_to_vec(m.bytes)),
            DType::BF16 => Store::BF16(bytemuck::pod_collect_to_vec(m.bytes)),
        };
        Ok(CpuMatrix {
            rows: m.rows,
            cols: m.cols,
            data,
        })
    }

    fn random_matrix(
        &self,
        rows: usize,
        cols: usize,
        dtype: DType,
        scale: f32,
        seed: u64,
    ) -> Result<CpuMatrix> {
        let n = rows
            .checked_mul(cols)
            .ok_or_else(|| shape_err(format!("matrix {rows}x{cols} overflows")))?;
        let f = |i: usize| crate::backend::random_value(seed, i as u64, scale);
        let data = self.pool.install(|| match dtype {
            DType::F32 => Store::F32((0..n).into_par_iter().map(f).collect()),
            DType::F16 => Store::F16(
                (0..n)
                    .into_par_iter()
                    .map(|i| f16::from_f32(f(i)))
                    .collect(),
            ),
            DType::BF16 => Store::BF16(
                (0..n)
                    .into_par_iter()
                    .map(|i| bf16::from_f32(f(i)))
                    .collect(),
            ),
        });
        Ok(CpuMatrix { rows, cols, data })
    }

    fn fill_random(&self, t: &mut CpuTensor, scale: f32, seed: u64) -> Result<()> {
        self.pool.install(|| {
            t.data
                .par_iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = crate::backend::random_value(seed, i as u64, scale))
        });
        Ok(())
    }

    fn matrix_shape(&self, m: &CpuMatrix) -> (usize, usize) {
        (m.rows, m.cols)
    }

    fn matrix_bytes(&self, m: &CpuMatrix) -> usize {
        m.rows * m.cols * m.data.dtype().size()
    }

    fn matrix_rows(&self, m: &CpuMatrix, rows: &[usize]) -> Result<CpuMatrix> {
        if let Some(&r) = rows.iter().find(|&&r| r >= m.rows) {
            return Err(KernelError::Shape(format!(
                "matrix_rows: row {r} of a {}-row matrix",
                m.rows
            )));
        }
        fn pick<T: Copy>(v: &[T], cols: usize, rows: &[usize]) -> Vec<T> {
            rows.iter()
                .flat_map(|&r| v[r * cols..(r + 1) * cols].iter().copied())
                .collect()
        }
        let data = match &m.data {
            Store::F32(v) => Store::F32(pick(v, m.cols, rows)),
            Store::F16(v) => Store::F16(pick(v, m.cols, rows)),
            Store::BF16(v) => Store::BF16(pick(v, m.cols, rows)),
        };
        Ok(CpuMatrix {
            rows: rows.len(),
            cols: m.cols,
            data,
        })
    }

    fn cache(&self, capacity: usize, cols: usize, dtype: DType) -> Result<CpuCache> {
        Ok(CpuCache {
            capacity,
            cols,
            data: Store::zeros(dtype, capacity * cols),
        })
    }

    fn cache_capacity(&self, c: &CpuCache) -> usize {
        c.capacity
    }

    fn cache_grow(&self, c: &mut CpuCache, capacity: usize) -> Result<()> {
        if capacity > c.capacity {
            c.data.resize(capacity * c.cols);
            c.capacity = capacity;
        }
        Ok(())
    }

    fn cache_write(
        &self,
        c: &mut CpuCache,
        dst_row0: usize,
        src: &CpuTensor,
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
        let cols = c.cols;
        with_store!(&mut c.data, dst => {
            for i in 0..n {
                let s = &src.data[(src_row0 + i) * src.cols + src_col0..][..cols];
                let d = &mut dst[(dst_row0 + i) * cols..][..cols];
                for (o, x) in d.iter_mut().zip(s) {
                    *o = Elem::from_f32(*x);
                }
            }
        });
        Ok(())
    }

    fn embedding(&self, table: &CpuMatrix, ids: &[u32], out: &mut CpuTensor) -> Result<()> {
        check_rows(out, ids.len(), "embedding")?;
        if out.cols != table.cols {
            return Err(shape_err(format!(
                "embedding width {} vs {}",
                table.cols, out.cols
            )));
        }
        let c = table.cols;
        for (i, &id) in ids.iter().enumerate() {
            let id = id as usize;
            if id >= table.rows {
                return Err(shape_err(format!(
                    "token id {id} outside the vocabulary ({})",
                    table.rows
                )));
            }
            let o = &mut out.data[i * c..(i + 1) * c];
            with_store!(&table.data, w => {
                for (d, s) in o.iter_mut().zip(&w[id * c..(id + 1) * c]) {
                    *d = s.to_f32();
                }
            });
        }
        Ok(())
    }

    fn rms_norm(
        &self,
        x: &CpuTensor,
        weight: &CpuTensor,
        eps: f32,
        out: &mut CpuTensor,
        n: usize,
    ) -> Result<()> {
        checks::rms_norm(n, (x.rows, x.cols), weight.data.len(), (out.rows, out.cols))?;
        let c = x.cols;
        for r in 0..n {
            let xr = &x.data[r * c..(r + 1) * c];
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / c as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            let o = &mut out.data[r * c..(r + 1) * c];
            for ((o, xv), w) in o.iter_mut().zip(xr).zip(&weight.data) {
                *o = w * (xv * inv);
            }
        }
        Ok(())
    }

    fn matmul(
        &self,
        x: &CpuTensor,
        w: &CpuMatrix,
        bias: Option<&CpuTensor>,
        out: &mut CpuTensor,
        n: usize,
    ) -> Result<()> {
        checks::matmul(
            n,
            (x.rows, x.cols),
            (w.rows, w.cols),
            (out.rows, out.cols),
            bias.map(|b| b.data.len()),
        )?;
        let (k, nn) = (w.cols, w.rows);
        let xs = &x.data[..n * k];
        let os = &mut out.data[..n * nn];
        self.pool
            .install(|| with_store!(&w.data, wv => matmul::matmul(xs, n, k, wv, nn, os)));
        if let Some(b) = bias {
            for row in os.chunks_mut(nn) {
                for (o, bv) in row.iter_mut().zip(&b.data) {
                    *o += bv;
                }
            }
        }
        Ok(())
    }

    fn rope(
        &self,
        x: &mut CpuTensor,
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
        let mut cos = vec![0.0f32; half];
        let mut sin = vec![0.0f32; half];
        let cols = x.cols;
        for (r, &p) in positions.iter().enumerate() {
            for i in 0..half {
                let a = p as f32 * rope.inv_freq[i];
                cos[i] = a.cos() * rope.attention_scaling;
                sin[i] = a.sin() * rope.attention_scaling;
            }
            let row = &mut x.data[r * cols + col0..][..n_heads * head_dim];
            for h in row.chunks_mut(head_dim) {
                let (a, b) = h.split_at_mut(half);
                for i in 0..half {
                    let (x0, x1) = (a[i], b[i]);
                    a[i] = x0 * cos[i] - x1 * sin[i];
                    b[i] = x1 * cos[i] + x0 * sin[i];
                }
            }
        }
        Ok(())
    }

    fn silu_mul(&self, gate_up: &CpuTensor, out: &mut CpuTensor, n: usize) -> Result<()> {
        check_rows(gate_up, n, "silu_mul")?;
        check_rows(out, n, "silu_mul out")?;
        let i = out.cols;
        if gate_up.cols != 2 * i {
            return Err(shape_err(format!(
                "silu_mul: {} columns for {i} outputs",
                gate_up.cols
            )));
        }
        let gu = &gate_up.data[..n * 2 * i];
        let os = &mut out.data[..n * i];
        self.pool.install(|| {
            os.par_chunks_mut(i)
                .zip(gu.par_chunks(2 * i))
                .for_each(|(o, gu)| {
                    let (g, u) = gu.split_at(i);
                    for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
                        *o = g / (1.0 + (-g).exp()) * u;
                    }
                })
        });
        Ok(())
    }

    fn add(&self, x: &mut CpuTensor, y: &CpuTensor, n: usize) -> Result<()> {
        check_rows(x, n, "add")?;
        check_rows(y, n, "add")?;
        if x.cols != y.cols {
            return Err(shape_err(format!("add: widths {} and {}", x.cols, y.cols)));
        }
        let c = x.cols;
        for (a, b) in x.data[..n * c].iter_mut().zip(&y.data[..n * c]) {
            *a += b;
        }
        Ok(())
    }

    fn attention(
        &self,
        a: &CausalAttn,
        q: &CpuTensor,
        k: &CpuCache,
        v: &CpuCache,
        out: &mut CpuTensor,
    ) -> Result<()> {
        a.validate(
            (q.rows, q.cols),
            (k.capacity, k.cols, k.data.dtype()),
            (v.capacity, v.cols, v.data.dtype()),
            (out.rows, out.cols),
        )?;
        let (qc, oc, kc) = (q.cols, out.cols, k.cols);
        let od = &mut out.data;
        self.pool.install(|| match (&k.data, &v.data) {
            (Store::F32(kk), Store::F32(vv)) => {
                attention::causal(a, &q.data, qc, kk, vv, kc, od, oc)
            }
            (Store::F16(kk), Store::F16(vv)) => {
                attention::causal(a, &q.data, qc, kk, vv, kc, od, oc)
            }
            (Store::BF16(kk), Store::BF16(vv)) => {
                attention::causal(a, &q.data, qc, kk, vv, kc, od, oc)
            }
            _ => {} // dtypes checked equal above
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests;
