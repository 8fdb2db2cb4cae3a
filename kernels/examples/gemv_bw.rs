//! Quick bandwidth check of the decode matmul: `cargo run --release -p farsight-kernels --example gemv_bw`.
use farsight_kernels::cpu::CpuBackend;
use farsight_kernels::{Backend, DType, HostMatrix};
use std::time::Instant;

fn main() {
    let be = CpuBackend::new(2).unwrap();
    for (rows, cols) in [(49152usize, 576usize), (3072, 576), (576, 1536)] {
        let bytes: Vec<u8> = (0..rows * cols).flat_map(|i| half::f16::from_f32(((i % 13) as f32) * 0.01).to_le_bytes()).collect();
        let w = be.upload_matrix(HostMatrix { rows, cols, dtype: DType::F16, bytes: &bytes }).unwrap();
        let mut x = be.tensor(1, cols).unwrap();
        x.data.iter_mut().enumerate().for_each(|(i, v)| *v = (i % 7) as f32);
        let mut out = be.tensor(1, rows).unwrap();
        let reps = (200_000_000 / (rows * cols * 2)).max(3);
        be.matmul(&x, &w, None, &mut out, 1).unwrap();
        let t = Instant::now();
        for _ in 0..reps {
            be.matmul(&x, &w, None, &mut out, 1).unwrap();
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!("{rows}x{cols}: {:.3} ms, {:.2} GB/s", s * 1e3, (rows * cols * 2) as f64 / s / 1e9);
    }
}
