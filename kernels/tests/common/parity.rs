//! The CPU-vs-CUDA parity harness: the two backends, NaN-poisoned outputs, the relative-L2
//! check that prints a `parity` line, and the model shapes (SmolLM2-135M, Llama-3.1-8B).
#![allow(dead_code)]

use std::sync::OnceLock;

use farsight_kernels::cpu::{CpuBackend, Store};
use farsight_kernels::cuda::CudaBackend;
use farsight_kernels::{Backend, DType, HostMatrix};
use half::{bf16, f16};

use super::{rel_l2, vals};

pub fn cuda() -> Option<&'static CudaBackend> {
    static BE: OnceLock<Option<CudaBackend>> = OnceLock::new();
    let be = BE.get_or_init(|| match CudaBackend::new(0) {
        Ok(be) => {
            eprintln!(
                "using {} (PTX from cache: {})",
                be.name(),
                be.ptx_from_cache()
            );
            Some(be)
        }
        Err(e) => {
            eprintln!("CudaBackend::new(0): {e}");
            None
        }
    });
    if be.is_none() {
        println!("skipped: no CUDA device");
    }
    be.as_ref()
}

pub fn cpu() -> &'static CpuBackend {
    static BE: OnceLock<CpuBackend> = OnceLock::new();
    BE.get_or_init(|| CpuBackend::new(0).unwrap())
}

pub fn tol(d: DType) -> f64 {
    match d {
        DType::F32 => 1e-4,
        DType::F16 | DType::BF16 => 1e-2,
    }
}

pub fn check(op: &str, case: &str, got: &[f32], want: &[f32], tol: f64) {
    let r = rel_l2(got, want);
    let norm = want.iter().map(|&w| (w as f64).powi(2)).sum::<f64>().sqrt();
    let diffs = got
        .iter()
        .zip(want)
        .filter(|(g, w)| g.to_bits() != w.to_bits())
        .count();
    println!(
        "parity op={op} case={case} rel_l2={r:.3e} tol={tol:.0e} (|ref|={norm:.3e}, {diffs}/{} differ)",
        want.len()
    );
    assert!(r < tol, "{op} {case}: rel L2 {r:.3e} >= {tol:.0e}");
}

/// `rows x cols` weights in `dtype` as little-endian bytes.
pub fn weight_bytes(rows: usize, cols: usize, dtype: DType, seed: u64) -> Vec<u8> {
    let scale = 1.0 / (cols as f32).sqrt();
    let v: Vec<f32> = vals(rows * cols, seed)
        .into_iter()
        .map(|x| x * scale)
        .collect();
    match dtype {
        DType::F32 => bytemuck::cast_slice(&v).to_vec(),
        DType::F16 => {
            let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            bytemuck::cast_slice(&h).to_vec()
        }
        DType::BF16 => {
            let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
            bytemuck::cast_slice(&h).to_vec()
        }
    }
}

/// The same `rows x cols` weights ([`weight_bytes`]) uploaded to each backend.
pub fn matrices(
    cu: &CudaBackend,
    rows: usize,
    cols: usize,
    dtype: DType,
    seed: u64,
) -> (
    farsight_kernels::cpu::CpuMatrix,
    farsight_kernels::cuda::CudaMatrix,
) {
    let bytes = weight_bytes(rows, cols, dtype, seed);
    let hm = HostMatrix {
        rows,
        cols,
        dtype,
        bytes: &bytes,
    };
    (
        cpu().upload_matrix(hm).unwrap(),
        cu.upload_matrix(hm).unwrap(),
    )
}

/// A tensor on each backend holding the same data.
pub fn both(
    cu: &CudaBackend,
    rows: usize,
    cols: usize,
    data: &[f32],
) -> (
    farsight_kernels::cpu::CpuTensor,
    farsight_kernels::cuda::CudaTensor,
) {
    let mut a = cpu().tensor(rows, cols).unwrap();
    cpu().write_tensor(&mut a, 0, data).unwrap();
    let mut b = cu.tensor(rows, cols).unwrap();
    cu.write_tensor(&mut b, 0, data).unwrap();
    (a, b)
}

/// A NaN-filled tensor on each backend.
pub fn poisoned(
    cu: &CudaBackend,
    rows: usize,
    cols: usize,
) -> (
    farsight_kernels::cpu::CpuTensor,
    farsight_kernels::cuda::CudaTensor,
) {
    both(cu, rows, cols, &vec![f32::NAN; rows * cols])
}

pub fn cpu_cache_f32(c: &farsight_kernels::cpu::CpuCache) -> Vec<f32> {
    match &c.data {
        Store::F32(v) => v.clone(),
        Store::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        Store::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
    }
}

pub const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

pub struct Model {
    pub name: &'static str,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab_subset: usize,
    pub theta: f32,
}

pub const SMOL: Model = Model {
    name: "smollm2-135m",
    hidden: 576,
    heads: 9,
    kv_heads: 3,
    head_dim: 64,
    ffn: 1536,
    vocab_subset: 49152,
    theta: 100_000.0,
};
pub const LLAMA: Model = Model {
    name: "llama-3.1-8b",
    hidden: 4096,
    heads: 32,
    kv_heads: 8,
    head_dim: 128,
    ffn: 14336,
    vocab_subset: 16384,
    theta: 500_000.0,
};
