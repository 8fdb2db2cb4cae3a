//! Inner loops of the CPU backend: dot products and axpy between f32 activations and rows stored
//! as f32, f16 or bf16.
//!
//! On x86-64 with AVX2 + FMA + F16C (checked at run time, once) the loops convert 8 elements at a
//! time in registers; elsewhere a scalar loop computes the same sums. Weight rows are never
//! converted to memory first on the decode path: they are read once, as stored.

use half::{bf16, f16};

/// An element type of weight matrices and KV caches.
pub trait Elem: Copy + Send + Sync + Default + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// `sum_i w[i] * x[i]` (`w.len() == x.len()`).
    fn dot(w: &[Self], x: &[f32]) -> f32;
    /// Four dot products of four rows with the same `x`.
    fn dot4(w: [&[Self]; 4], x: &[f32]) -> [f32; 4];
    /// `out[i] += a * v[i]`.
    fn axpy(out: &mut [f32], a: f32, v: &[Self]);
    /// `out[c] = sum_j w[j] * v[j * stride + c]` for `c < out.len()`: a weighted sum of rows
    /// (attention's value accumulation), accumulated in registers.
    fn weighted_rows(out: &mut [f32], w: &[f32], v: &[Self], stride: usize);
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    #![allow(unsafe_op_in_unsafe_fn)]
    use std::arch::x86_64::*;

    macro_rules! load8 {
        (f32, $p:expr) => {
            _mm256_loadu_ps($p as *const f32)
        };
        (f16, $p:expr) => {
            _mm256_cvtph_ps(_mm_loadu_si128($p as *const __m128i))
        };
        (bf16, $p:expr) => {
            _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128($p as *const __m128i)),
                16,
            ))
        };
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    macro_rules! kernels {
        ($m:ident, $t:ty, $tag:ident) => {
            pub mod $m {
                use super::*;
                #[allow(unused_imports)]
                use crate::cpu::simd::Elem;

                /// # Safety
                /// 1. The CPU supports AVX2, FMA and F16C.
                /// 2. `w` and `x` are valid for `k` elements.
                #[target_feature(enable = "avx2,fma,f16c")]
                pub unsafe fn dot(w: *const $t, x: *const f32, k: usize) -> f32 {
                    let mut a0 = _mm256_setzero_ps();
                    let mut a1 = _mm256_setzero_ps();
                    let mut i = 0;
                    while i + 16 <= k {
                        a0 = _mm256_fmadd_ps(load8!($tag, w.add(i)), _mm256_loadu_ps(x.add(i)), a0);
                        a1 = _mm256_fmadd_ps(
                            load8!($tag, w.add(i + 8)),
                            _mm256_loadu_ps(x.add(i + 8)),
                            a1,
                        );
                        i += 16;
                    }
                    while i + 8 <= k {
                        a0 = _mm256_fmadd_ps(load8!($tag, w.add(i)), _mm256_loadu_ps(x.add(i)), a0);
                        i += 8;
                    }
                    let mut s = hsum(_mm256_add_ps(a0, a1));
                    while i < k {
                        s += (*w.add(i)).to_f32() * *x.add(i);
                        i += 1;
                    }
                    s
                }

                /// # Safety
                /// 1. The CPU supports AVX2, FMA and F16C.
                /// 2. Each `w[r]` and `x` are valid for `k` elements.
                #[target_feature(enable = "avx2,fma,f16c")]
                pub unsafe fn dot4(w: [*const $t; 4], x: *const f32, k: usize) -> [f32; 4] {
                    let mut a = [_mm256_setzero_ps(); 4];
                    let mut i = 0;
                    // Stream ahead: one prefetch per 64-byte line of each row.
                    const AHEAD: usize = 4096;
                    let esz = std::mem::size_of::<$t>();
                    let per_line = 64 / esz;
                    while i + per_line <= k {
                        for r in 0..4 {
                            _mm_prefetch(w[r].add(i + AHEAD / esz) as *const i8, _MM_HINT_T0);
                        }
                        let mut j = 0;
                        while j < per_line {
                            let xv = _mm256_loadu_ps(x.add(i + j));
                            a[0] = _mm256_fmadd_ps(load8!($tag, w[0].add(i + j)), xv, a[0]);
                            a[1] = _mm256_fmadd_ps(load8!($tag, w[1].add(i + j)), xv, a[1]);
                            a[2] = _mm256_fmadd_ps(load8!($tag, w[2].add(i + j)), xv, a[2]);
                            a[3] = _mm256_fmadd_ps(load8!($tag, w[3].add(i + j)), xv, a[3]);
                            j += 8;
                        }
                        i += per_line;
                    }
                    while i + 8 <= k {
                        let xv = _mm256_loadu_ps(x.add(i));
                        a[0] = _mm256_fmadd_ps(load8!($tag, w[0].add(i)), xv, a[0]);
                        a[1] = _mm256_fmadd_ps(load8!($tag, w[1].add(i)), xv, a[1]);
                        a[2] = _mm256_fmadd_ps(load8!($tag, w[2].add(i)), xv, a[2]);
                        a[3] = _mm256_fmadd_ps(load8!($tag, w[3].add(i)), xv, a[3]);
                        i += 8;
                    }
                    let mut s = [hsum(a[0]), hsum(a[1]), hsum(a[2]), hsum(a[3])];
                    while i < k {
                        let xi = *x.add(i);
                        for r in 0..4 {
                            s[r] += (*w[r].add(i)).to_f32() * xi;
                        }
                        i += 1;
                    }
                    s
                }

                /// `out[0..64] = sum_j w[j] * v[j * stride .. + 64]`, eight accumulators in registers.
                ///
                /// # Safety
                /// 1. The CPU supports AVX2, FMA and F16C.
                /// 2. `out` is valid for 64 writes, `w` for `n` reads, and `v` for rows
                ///    `j * stride .. j * stride + 64` for every `j < n`.
                #[target_feature(enable = "avx2,fma,f16c")]
                pub unsafe fn wsum64(
                    out: *mut f32,
                    w: *const f32,
                    v: *const $t,
                    stride: usize,
                    n: usize,
                ) {
                    let mut a0 = _mm256_setzero_ps();
                    let mut a1 = _mm256_setzero_ps();
                    let mut a2 = _mm256_setzero_ps();
                    let mut a3 = _mm256_setzero_ps();
                    let mut a4 = _mm256_setzero_ps();
                    let mut a5 = _mm256_setzero_ps();
                    let mut a6 = _mm256_setzero_ps();
                    let mut a7 = _mm256_setzero_ps();
                    for j in 0..n {
                        let wj = _mm256_set1_ps(*w.add(j));
                        let r = v.add(j * stride);
                        a0 = _mm256_fmadd_ps(wj, load8!($tag, r), a0);
                        a1 = _mm256_fmadd_ps(wj, load8!($tag, r.add(8)), a1);
                        a2 = _mm256_fmadd_ps(wj, load8!($tag, r.add(16)), a2);
                        a3 = _mm256_fmadd_ps(wj, load8!($tag, r.add(24)), a3);
                        a4 = _mm256_fmadd_ps(wj, load8!($tag, r.add(32)), a4);
                        a5 = _mm256_fmadd_ps(wj, load8!($tag, r.add(40)), a5);
                        a6 = _mm256_fmadd_ps(wj, load8!($tag, r.add(48)), a6);
                        a7 = _mm256_fmadd_ps(wj, load8!($tag, r.add(56)), a7);
                    }
                    _mm256_storeu_ps(out, a0);
                    _mm256_storeu_ps(out.add(8), a1);
                    _mm256_storeu_ps(out.add(16), a2);
                    _mm256_storeu_ps(out.add(24), a3);
                    _mm256_storeu_ps(out.add(32), a4);
                    _mm256_storeu_ps(out.add(40), a5);
                    _mm256_storeu_ps(out.add(48), a6);
                    _mm256_storeu_ps(out.add(56), a7);
                }

                /// # Safety
                /// 1. The CPU supports AVX2, FMA and F16C.
                /// 2. `out` and `v` are valid for `k` elements and do not overlap.
                #[target_feature(enable = "avx2,fma,f16c")]
                pub unsafe fn axpy(out: *mut f32, a: f32, v: *const $t, k: usize) {
                    let av = _mm256_set1_ps(a);
                    let mut i = 0;
                    while i + 8 <= k {
                        let o = _mm256_loadu_ps(out.add(i));
                        _mm256_storeu_ps(
                            out.add(i),
                            _mm256_fmadd_ps(av, load8!($tag, v.add(i)), o),
                        );
                        i += 8;
                    }
                    while i < k {
                        *out.add(i) += a * (*v.add(i)).to_f32();
                        i += 1;
                    }
                }
            }
        };
    }

    kernels!(k_f32, f32, f32);
    kernels!(k_f16, half::f16, f16);
    kernels!(k_bf16, half::bf16, bf16);
}

fn dot_scalar<T: Elem>(w: &[T], x: &[f32]) -> f32 {
    w.iter().zip(x).map(|(a, b)| a.to_f32() * b).sum()
}

fn axpy_scalar<T: Elem>(out: &mut [f32], a: f32, v: &[T]) {
    for (o, x) in out.iter_mut().zip(v) {
        *o += a * x.to_f32();
    }
}

macro_rules! impl_elem {
    ($t:ty, $m:ident, $to:expr, $from:expr) => {
        impl Elem for $t {
            #[inline(always)]
            fn to_f32(self) -> f32 {
                $to(self)
            }
            #[inline(always)]
            fn from_f32(v: f32) -> Self {
                $from(v)
            }
            #[inline]
            fn dot(w: &[Self], x: &[f32]) -> f32 {
                assert_eq!(w.len(), x.len());
                #[cfg(target_arch = "x86_64")]
                if has_avx2() {
                    // SAFETY: features checked; both slices hold `w.len()` elements.
                    return unsafe { x86::$m::dot(w.as_ptr(), x.as_ptr(), w.len()) };
                }
                dot_scalar(w, x)
            }
            #[inline]
            fn dot4(w: [&[Self]; 4], x: &[f32]) -> [f32; 4] {
                for r in &w {
                    assert_eq!(r.len(), x.len());
                }
                #[cfg(target_arch = "x86_64")]
                if has_avx2() {
                    let p = [w[0].as_ptr(), w[1].as_ptr(), w[2].as_ptr(), w[3].as_ptr()];
                    // SAFETY: features checked; all rows hold `x.len()` elements.
                    return unsafe { x86::$m::dot4(p, x.as_ptr(), x.len()) };
                }
                [
                    dot_scalar(w[0], x),
                    dot_scalar(w[1], x),
                    dot_scalar(w[2], x),
                    dot_scalar(w[3], x),
                ]
            }
            #[inline]
            fn axpy(out: &mut [f32], a: f32, v: &[Self]) {
                assert_eq!(out.len(), v.len());
                #[cfg(target_arch = "x86_64")]
                if has_avx2() {
                    // SAFETY: features checked; `out` is a unique borrow, so no overlap.
                    return unsafe { x86::$m::axpy(out.as_mut_ptr(), a, v.as_ptr(), v.len()) };
                }
                axpy_scalar(out, a, v)
            }
            #[inline]
            fn weighted_rows(out: &mut [f32], w: &[f32], v: &[Self], stride: usize) {
                let d = out.len();
                if let Some(last) = w.len().checked_sub(1) {
                    assert!(d <= stride && last * stride + d <= v.len());
                }
                #[cfg(target_arch = "x86_64")]
                if has_avx2() && d % 64 == 0 {
                    for b in (0..d).step_by(64) {
                        // SAFETY: features checked; rows j*stride + b .. + 64 lie inside `v`
                        // (asserted above, b + 64 <= d); out[b..b + 64] is in bounds.
                        unsafe {
                            x86::$m::wsum64(
                                out.as_mut_ptr().add(b),
                                w.as_ptr(),
                                v.as_ptr().add(b),
                                stride,
                                w.len(),
                            )
                        };
                    }
                    return;
                }
                out.fill(0.0);
                for (j, &wj) in w.iter().enumerate() {
                    axpy_scalar(out, wj, &v[j * stride..j * stride + d]);
                }
            }
        }
    };
}

impl_elem!(f32, k_f32, |v: f32| v, |v: f32| v);
impl_elem!(f16, k_f16, f16::to_f32, f16::from_f32);
impl_elem!(bf16, k_bf16, bf16::to_f32, bf16::from_f32);

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn check<T: Elem>(k: usize) {
        let x = data(k, 1);
        let rows: Vec<Vec<T>> = (0..4)
            .map(|r| data(k, 10 + r).into_iter().map(T::from_f32).collect())
            .collect();
        let want: Vec<f32> = rows.iter().map(|r| dot_scalar(r, &x)).collect();
        let tol = 1e-4 * k as f32;
        for r in 0..4 {
            assert!((T::dot(&rows[r], &x) - want[r]).abs() < tol, "dot k={k}");
        }
        let got = T::dot4([&rows[0], &rows[1], &rows[2], &rows[3]], &x);
        for r in 0..4 {
            assert!((got[r] - want[r]).abs() < tol, "dot4 k={k}");
        }
        let mut out = x.clone();
        T::axpy(&mut out, 0.5, &rows[0]);
        for i in 0..k {
            assert!((out[i] - (x[i] + 0.5 * rows[0][i].to_f32())).abs() < 1e-5);
        }
    }

    fn check_weighted<T: Elem>(d: usize, stride: usize, n: usize) {
        let v: Vec<T> = data(n * stride, 3).into_iter().map(T::from_f32).collect();
        let w = data(n, 4);
        let mut want = vec![0.0f32; d];
        for j in 0..n {
            axpy_scalar(&mut want, w[j], &v[j * stride..j * stride + d]);
        }
        let mut got = vec![f32::NAN; d];
        T::weighted_rows(&mut got, &w, &v, stride);
        for c in 0..d {
            assert!((got[c] - want[c]).abs() <= 1e-4 * n as f32, "d={d} n={n}");
        }
    }

    #[test]
    fn weighted_rows_match_scalar() {
        for (d, stride, n) in [(64, 192, 37), (128, 256, 5), (80, 80, 9), (64, 64, 0)] {
            check_weighted::<f32>(d, stride, n);
            check_weighted::<f16>(d, stride, n);
            check_weighted::<bf16>(d, stride, n);
        }
    }

    #[test]
    fn simd_matches_scalar_for_all_types_and_tails() {
        for k in [1, 7, 8, 9, 15, 16, 17, 64, 100, 576] {
            check::<f32>(k);
            check::<f16>(k);
            check::<bf16>(k);
        }
    }
}
