//! Exact causal softmax attention on the CPU over a dense KV cache (f32, f16 or bf16 rows).
//!
//! Two schedules over the same arithmetic:
//! - many queries (prefill): one task per (query row, query head); a task scores its keys into a
//!   scratch vector, takes the softmax and accumulates the values;
//! - few queries (decode): one task per (KV head, chunk of keys) computing every query head of
//!   the group against the chunk (each key row is read once for the whole group), keeping a
//!   partial max, sum and weighted value sum; the partials are merged exactly afterwards
//!   (split-K, as flash-decoding does), so two cores share even a single KV head's context.
//!
//! GQA: query head `h` reads KV head `h / group`.

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
    if a.n_q <= SPLIT_MAX_QUERIES {
        return split_keys(a, q, q_cols, k, v, kv_cols, out, out_cols);
    }
    let s = a.shape;
    let d = s.head_dim;
    let group = s.group();
    let optr = OutPtr(out.as_mut_ptr());
    let tasks = a.n_q * s.n_heads;
    (0..tasks)
        .into_par_iter()
        .for_each_init(Vec::<f32>::new, |scores, t| {
            let optr = optr;
            let (i, h) = (t / s.n_heads, t % s.n_heads);
            let g = h / group;
            let end = a.n_past + i + 1;
            let start = s.window.map_or(0, |w| end.saturating_sub(w));
            let qrow = a.q_row0 + i;
            let qv = &q[qrow * q_cols + a.q_col0 + h * d..][..d];
            scores.clear();
            scores.resize(end - start, 0.0);
            key_scores(qv, k, kv_cols, g * d, start, scores, a.scale);
            let max = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let mut sum = 0.0f32;
            for sc in scores.iter_mut() {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            let inv = 1.0 / sum;
            scores.iter_mut().for_each(|p| *p *= inv);
            // SAFETY: row out_row0+i, columns h*d..(h+1)*d are written by this task only.
            let o = unsafe {
                std::slice::from_raw_parts_mut(optr.0.add((a.out_row0 + i) * out_cols + h * d), d)
            };
            E::weighted_rows(o, scores, &v[start * kv_cols + g * d..], kv_cols);
        });
}

/// At most this many new queries use the split-over-keys schedule.
const SPLIT_MAX_QUERIES: usize = 4;
/// Keys per split-K task (at least; fewer chunks for short contexts).
const KEY_CHUNK: usize = 256;

/// Partial softmax state of one (query row, head) over one chunk of keys.
struct Partial {
    max: f32,
    sum: f32,
    acc: Vec<f32>,
}

#[allow(clippy::too_many_arguments)]
fn split_keys<E: Elem>(
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
    let total = a.n_past + a.n_q;
    let chunks = total.div_ceil(KEY_CHUNK).max(1);
    // Task (g, c): KV head g, keys [c*KEY_CHUNK, ..); result: for each (query row i, head in
    // group) a Partial (empty when the chunk lies wholly outside that query's range).
    let tasks: Vec<(usize, usize)> = (0..s.n_kv_heads)
        .flat_map(|g| (0..chunks).map(move |c| (g, c)))
        .collect();
    let partials: Vec<Vec<Option<Partial>>> = tasks
        .par_iter()
        .map(|&(g, c)| {
            let lo = c * KEY_CHUNK;
            let hi = ((c + 1) * KEY_CHUNK).min(total);
            let mut res = Vec::with_capacity(a.n_q * group);
            let mut scores = vec![0.0f32; hi.saturating_sub(lo)];
            for i in 0..a.n_q {
                let end = a.n_past + i + 1;
                let start = s.window.map_or(0, |w| end.saturating_sub(w));
                let (from, to) = (lo.max(start), hi.min(end));
                for hh in 0..group {
                    if from >= to {
                        res.push(None);
                        continue;
                    }
                    let h = g * group + hh;
                    let qv = &q[(a.q_row0 + i) * q_cols + a.q_col0 + h * d..][..d];
                    let sc = &mut scores[..to - from];
                    key_scores(qv, k, kv_cols, g * d, from, sc, a.scale);
                    let max = sc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                    let mut sum = 0.0f32;
                    for x in sc.iter_mut() {
                        *x = (*x - max).exp();
                        sum += *x;
                    }
                    let mut acc = vec![0.0f32; d];
                    E::weighted_rows(&mut acc, sc, &v[from * kv_cols + g * d..], kv_cols);
                    res.push(Some(Partial { max, sum, acc }));
                }
            }
            res
        })
        .collect();
    // Merge: out = sum_c exp(m_c - M) acc_c / sum_c exp(m_c - M) sum_c.
    for i in 0..a.n_q {
        for g in 0..s.n_kv_heads {
            for hh in 0..group {
                let h = g * group + hh;
                let idx = i * group + hh;
                let parts = (0..chunks).filter_map(|c| partials[g * chunks + c][idx].as_ref());
                let m = parts.clone().fold(f32::NEG_INFINITY, |m, p| m.max(p.max));
                let o = &mut out[(a.out_row0 + i) * out_cols + h * d..][..d];
                o.fill(0.0);
                let mut z = 0.0f32;
                for p in parts {
                    let w = (p.max - m).exp();
                    z += w * p.sum;
                    for (o, x) in o.iter_mut().zip(&p.acc) {
                        *o += w * x;
                    }
                }
                let inv = 1.0 / z;
                o.iter_mut().for_each(|x| *x *= inv);
            }
        }
    }
}

/// `out[j] = scale * q . k[(from + j) * kv_cols + col ..][..d]`, four keys at a time.
fn key_scores<E: Elem>(
    q: &[f32],
    k: &[E],
    kv_cols: usize,
    col: usize,
    from: usize,
    out: &mut [f32],
    scale: f32,
) {
    let d = q.len();
    let row = |j: usize| &k[(from + j) * kv_cols + col..][..d];
    let n = out.len();
    let mut j = 0;
    while j + 4 <= n {
        let s = E::dot4([row(j), row(j + 1), row(j + 2), row(j + 3)], q);
        for t in 0..4 {
            out[j + t] = s[t] * scale;
        }
        j += 4;
    }
    while j < n {
        out[j] = E::dot(row(j), q) * scale;
        j += 1;
    }
}
