//! Exact softmax attention of query heads over gathered KV rows (host memory).
//!
//! A gathered row is one KV head's `[K | V]` (`2 * head_dim` elements of the KV dtype), as the
//! tiers store it. The arithmetic is the CPU backend's (same dot and weighted-sum loops), so with
//! every row gathered the result equals dense attention to rounding.

use farsight_kernels::cpu::simd::Elem;

/// `out = softmax(scale * K q) V` over the `n` rows of `rows` (`n * 2d` elements).
pub fn attend_rows<E: Elem>(
    q: &[f32],
    rows: &[E],
    d: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let n = rows.len() / (2 * d);
    // Keys four at a time, as the CPU backend's dense attention scores them, so that with every
    // row selected the arithmetic is the same operation for operation.
    let key = |j: usize| &rows[j * 2 * d..j * 2 * d + d];
    scores.clear();
    let mut j = 0;
    while j + 4 <= n {
        let s = E::dot4([key(j), key(j + 1), key(j + 2), key(j + 3)], q);
        scores.extend(s.iter().map(|x| x * scale));
        j += 4;
    }
    scores.extend((j..n).map(|j| E::dot(key(j), q) * scale));
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut sum = 0.0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let inv = 1.0 / sum;
    scores.iter_mut().for_each(|p| *p *= inv);
    if n == 0 {
        out.fill(0.0);
        return;
    }
    E::weighted_rows(out, scores, &rows[d..], 2 * d);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_direct_softmax() {
        let d = 4;
        let rows: Vec<f32> = (0..3 * 2 * d)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0)
            .collect();
        let q = [0.5, -1.0, 0.25, 2.0];
        let mut out = vec![0.0; d];
        attend_rows(&q, &rows, d, 0.5, &mut Vec::new(), &mut out);
        let s: Vec<f32> = (0..3)
            .map(|j| (0..d).map(|c| rows[j * 2 * d + c] * q[c]).sum::<f32>() * 0.5)
            .collect();
        let m = s.iter().cloned().fold(f32::MIN, f32::max);
        let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f32 = e.iter().sum();
        for c in 0..d {
            let want: f32 = (0..3).map(|j| e[j] / z * rows[j * 2 * d + d + c]).sum();
            assert!((out[c] - want).abs() < 1e-5);
        }
    }
}
