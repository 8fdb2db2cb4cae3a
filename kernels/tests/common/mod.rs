//! Helpers shared by the CUDA test binaries.
#![allow(dead_code)]

pub mod parity;

/// Deterministic pseudo-random values in [-1, 1) (never all zeros: they hide unwritten outputs).
pub fn vals(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(0x2545_F491_4F6C_DD1D);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Relative L2 distance of `got` from `want`; NaN/inf anywhere fails loudly.
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.is_finite(),
            "CUDA output [{i}] = {g} (unwritten or overflow)"
        );
        assert!(w.is_finite(), "CPU output [{i}] = {w}");
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    // Never compare against zeros: they hide unwritten outputs.
    assert!(den > 0.0, "reference output is all zeros");
    (num / den).sqrt()
}
