//! `out = x W^T` on the CPU for weights stored as f32, f16 or bf16.
//!
//! Two regimes:
//! - few rows (decode, small batches): each weight row is streamed from memory once and dotted
//!   with every activation row while it is in L1 (`dot4` on four weight rows at a time). Batch-1
//!   decode is bound by reading the weights, so this path reads them as stored (2 bytes each).
//! - many rows (prefill): the weight matrix is converted to f32 into a per-thread scratch buffer
//!   and the `gemm` crate multiplies the whole activation block by it, parallel over the whole
//!   problem. The conversion is amortised over every activation row.

use rayon::prelude::*;

use super::simd::Elem;

/// At most this many activation rows take the streaming path.
pub const STREAM_MAX_ROWS: usize = 8;
/// Output columns (weight rows) per parallel task on the streaming path.
const STREAM_BLOCK: usize = 32;
/// Weight rows per parallel conversion task on the gemm path.
const TILE: usize = 64;

/// A raw output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of elements (see the callers).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `out[r * n + j] = sum_c x[r * k + c] * w[j * k + c]` for `r < m`, `j < n`.
pub fn matmul<E: Elem>(x: &[f32], m: usize, k: usize, w: &[E], n: usize, out: &mut [f32]) {
    assert!(x.len() >= m * k && w.len() == n * k && out.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if m <= STREAM_MAX_ROWS {
        stream(x, m, k, w, n, out);
    } else {
        tiled(x, m, k, w, n, out);
    }
}

fn stream<E: Elem>(x: &[f32], m: usize, k: usize, w: &[E], n: usize, out: &mut [f32]) {
    let optr = OutPtr(out.as_mut_ptr());
    let blocks = n.div_ceil(STREAM_BLOCK);
    (0..blocks).into_par_iter().for_each(|b| {
        let optr = optr;
        let j0 = b * STREAM_BLOCK;
        let j1 = (j0 + STREAM_BLOCK).min(n);
        let row = |j: usize| &w[j * k..(j + 1) * k];
        let mut j = j0;
        while j + 4 <= j1 {
            let rows = [row(j), row(j + 1), row(j + 2), row(j + 3)];
            for r in 0..m {
                let s = E::dot4(rows, &x[r * k..(r + 1) * k]);
                for (t, v) in s.into_iter().enumerate() {
                    // SAFETY: column j+t belongs to this block only; r*n + j + t < m*n.
                    unsafe { *optr.0.add(r * n + j + t) = v };
                }
            }
            j += 4;
        }
        while j < j1 {
            for r in 0..m {
                let s = E::dot(row(j), &x[r * k..(r + 1) * k]);
                // SAFETY: as above.
                unsafe { *optr.0.add(r * n + j) = s };
            }
            j += 1;
        }
    });
}

fn tiled<E: Elem>(x: &[f32], m: usize, k: usize, w: &[E], n: usize, out: &mut [f32]) {
    // Whole-matrix conversion to f32 (in parallel), then one gemm call that parallelises over the
    // whole problem: the conversion reads each weight once per call, amortised over m >= 9 rows.
    // The scratch is taken out of the thread-local for the call (and put back after): while this
    // thread waits inside rayon it may run another matmul (work stealing), which then finds the
    // cell empty and allocates its own, instead of a second borrow of the same buffer.
    let mut buf = SCRATCH.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
    {
        let w32: &[f32] = match as_f32(w) {
            Some(w32) => w32,
            None => {
                buf.resize(n * k, 0.0);
                buf.par_chunks_mut(TILE * k)
                    .zip(w.par_chunks(TILE * k))
                    .for_each(|(d, s)| {
                        for (d, s) in d.iter_mut().zip(s) {
                            *d = s.to_f32();
                        }
                    });
                &buf[..n * k]
            }
        };
        let threads = rayon::current_num_threads();
        // SAFETY: dst is `out` (m x n, row-major), lhs is x (m x k, row-major),
        // rhs(i, j) = w32[j * k + i] (k x n); all in bounds by the assert in `matmul`.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.as_mut_ptr(),
                1,
                n as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                w32.as_ptr(),
                k as isize,
                1,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                if threads > 1 {
                    gemm::Parallelism::Rayon(threads)
                } else {
                    gemm::Parallelism::None
                },
            );
        }
    }
    SCRATCH.with(|cell| {
        let mut kept = cell.borrow_mut();
        if kept.capacity() < buf.capacity() {
            *kept = std::mem::take(&mut buf);
        }
    });
}

thread_local! {
    /// f32 copy of the weight matrix being multiplied (grows to the largest matrix).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The slice itself when `E` is f32.
fn as_f32<E: Elem>(w: &[E]) -> Option<&[f32]> {
    if std::any::TypeId::of::<E>() == std::any::TypeId::of::<f32>() {
        // SAFETY: E is f32 (same type, same layout).
        Some(unsafe { std::slice::from_raw_parts(w.as_ptr() as *const f32, w.len()) })
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut o = vec![0.0; m * n];
        for r in 0..m {
            for j in 0..n {
                o[r * n + j] = (0..k).map(|c| x[r * k + c] * w[j * k + c]).sum();
            }
        }
        o
    }

    fn vals(n: usize, mul: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * mul) % 17) as f32 / 8.0 - 1.0)
            .collect()
    }

    fn rel(a: &[f32], b: &[f32]) -> f32 {
        let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
        let den: f32 = b.iter().map(|y| y * y).sum();
        (num / den.max(1e-30)).sqrt()
    }

    #[test]
    fn both_regimes_match_naive_for_every_dtype() {
        for (m, k, n) in [
            (1, 64, 70),
            (3, 33, 9),
            (8, 128, 64),
            (9, 64, 130),
            (40, 100, 65),
        ] {
            let x = vals(m * k, 7);
            let w = vals(n * k, 5);
            let want = naive(&x, m, k, &w, n);
            let mut out = vec![0.0; m * n];
            matmul(&x, m, k, &w, n, &mut out);
            assert!(rel(&out, &want) < 1e-5, "f32 {m}x{k}x{n}");
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            matmul(&x, m, k, &wh, n, &mut out);
            assert!(rel(&out, &want) < 1e-5, "f16 {m}x{k}x{n}"); // values exact in f16
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            matmul(&x, m, k, &wb, n, &mut out);
            assert!(rel(&out, &want) < 1e-5, "bf16 {m}x{k}x{n}");
        }
    }

    /// Many tiled (m > 8) bf16 matmuls at once on one pool: a thread waiting inside one call's
    /// rayon work steals another call, which must not find the scratch borrowed (it panicked with
    /// "RefCell already borrowed" on the GPU machine's parity test).
    #[test]
    fn concurrent_tiled_matmuls_on_one_pool() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .unwrap();
        let (m, k, n) = (12, 128, 1024);
        let x = vals(m * k, 7);
        let w = vals(n * k, 5);
        let want = naive(&x, m, k, &w, n);
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        // Callers on several threads, as the parity tests (and a server) call one backend.
        let outs: Vec<Vec<f32>> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    sc.spawn(|| {
                        let mut last = vec![0.0; m * n];
                        for _ in 0..40 {
                            pool.install(|| matmul(&x, m, k, &wb, n, &mut last));
                        }
                        last
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for out in &outs {
            assert!(rel(out, &want) < 1e-5);
        }
    }
}
