//! The random fills of synthetic models (`Backend::random_matrix`, `Backend::fill_random`) on the
//! CPU backend: the documented stream, its range and moments, the rounding to the matrix dtype.
//! (`cuda_parity.rs` checks that the CUDA backend produces the same bits.)

use farsight_kernels::backend::random_value;
use farsight_kernels::cpu::{CpuBackend, Store};
use farsight_kernels::{Backend, DType};

#[test]
fn stream_is_uniform_in_range_and_deterministic() {
    let n = 200_000u64;
    let (mut sum, mut sq, mut lo, mut hi) = (0.0f64, 0.0f64, f32::MAX, f32::MIN);
    for i in 0..n {
        let v = random_value(7, i, 0.5);
        assert_eq!(v, random_value(7, i, 0.5));
        sum += v as f64;
        sq += (v as f64).powi(2);
        lo = lo.min(v);
        hi = hi.max(v);
    }
    let mean = sum / n as f64;
    let var = sq / n as f64 - mean * mean;
    // Uniform on [-0.5, 0.5): mean 0, variance 1/12.
    assert!(mean.abs() < 5e-3, "mean {mean}");
    assert!((var - 1.0 / 12.0).abs() < 2e-3, "variance {var}");
    assert!((-0.5..0.5).contains(&lo) && (-0.5..0.5).contains(&hi) && lo < -0.49 && hi > 0.49);
    // Different seeds give different streams.
    let same = (0..1000)
        .filter(|&i| random_value(7, i, 1.0) == random_value(8, i, 1.0))
        .count();
    assert!(same < 5, "{same} equal values across seeds");
}

#[test]
fn cpu_random_matrix_and_fill() {
    let be = CpuBackend::new(2).unwrap();
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let m = be.random_matrix(33, 70, dt, 0.25, 11).unwrap();
        assert_eq!(be.matrix_shape(&m), (33, 70));
        assert_eq!(be.matrix_bytes(&m), 33 * 70 * dt.size());
        let want = |i: usize| random_value(11, i as u64, 0.25);
        match &m.data {
            Store::F32(v) => assert!(v.iter().enumerate().all(|(i, &x)| x == want(i))),
            Store::F16(v) => {
                assert!(v
                    .iter()
                    .enumerate()
                    .all(|(i, &x)| x == half::f16::from_f32(want(i))))
            }
            Store::BF16(v) => {
                assert!(v
                    .iter()
                    .enumerate()
                    .all(|(i, &x)| x == half::bf16::from_f32(want(i))))
            }
        }
    }
    let mut t = be.tensor(5, 9).unwrap();
    be.fill_random(&mut t, 2.0, 3).unwrap();
    assert!(t
        .data
        .iter()
        .enumerate()
        .all(|(i, &x)| x == random_value(3, i as u64, 2.0)));
    assert!(t.data.iter().any(|&x| x != 0.0));
}
