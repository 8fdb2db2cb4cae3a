//! Exact causal softmax attention on the CPU over a dense KV cache (f32, f16 or bf16 rows).
//!
//! One task per (query row, query head); a task scores its keys into a scratch vector, takes the
//! softmax and accumulates the values. GQA: query head `h` reads KV head `h / group`.

use rayon::prelude::*;

use super::simd::Elem;
use crate::backend::CausalAttn;

/// Shared raw output pointer; tasks write disjoint `head_dim` slices.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: each task writes only its own (row, head) slice.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Runs [`CausalAttn`] with `q` (`q_cols` wide), the cache rows `k`/`v` (`kv_cols` wide) and
/// `out` (`out_cols` wide).
#[allow(clippy::too_many_arguments)]
pub fn causal<E: Elem>(
    a: &CausalAttn,
    q: &[f32],
    q_cols: usize,
    k: &[E],
    v: &[E],
    kv_cols: usize,
    out: &mut [f32],
    out_cols: usize,
) {
    let s = a.shape;
    let d = s.head_dim;
    let group = s.group();
    let optr = OutPtr(out.as_mut_ptr());
    let tasks = a.n_q * s.n_heads;
    (0..tasks).into_par_iter().for_each_init(Vec::<f32>::new, |scores, t| {
        let optr = optr;
        let (i, h) = (t / s.n_heads, t % s.n_heads);
        let g = h / group;
        let end = a.n_past + i + 1;
        let start = s.window.map_or(0, |w| end.saturating_sub(w));
        let qrow = a.q_row0 + i;
        let qv = &q[qrow * q_cols + a.q_col0 + h * d..][..d];
        scores.clear();
        let mut max = f32::NEG_INFINITY;
        for j in start..end {
            let kr = &k[j * kv_cols + g * d..][..d];
            let sc = E::dot(kr, qv) * a.scale;
            max = max.max(sc);
            scores.push(sc);
        }
        let mut sum = 0.0f32;
        for sc in scores.iter_mut() {
            *sc = (*sc - max).exp();
            sum += *sc;
        }
        let inv = 1.0 / sum;
        // SAFETY: row out_row0+i, columns h*d..(h+1)*d are written by this task only.
        let o = unsafe {
            std::slice::from_raw_parts_mut(optr.0.add((a.out_row0 + i) * out_cols + h * d), d)
        };
        o.fill(0.0);
        for (jj, p) in scores.iter().enumerate() {
            let j = start + jj;
            E::axpy(o, p * inv, &v[j * kv_cols + g * d..][..d]);
        }
    });
}
