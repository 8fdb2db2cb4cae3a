//! CPU backend ops against straightforward scalar definitions.

use super::*;
use crate::backend::AttnShape;

fn vals(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn rel(a: &[f32], b: &[f32]) -> f32 {
    let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f32 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-30)).sqrt()
}

fn naive_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
    n_past: usize,
    n_q: usize,
    scale: f32,
) -> Vec<f32> {
    let d = s.head_dim;
    let mut out = vec![0.0; n_q * s.q_width()];
    for i in 0..n_q {
        for h in 0..s.n_heads {
            let g = h / s.group();
            let end = n_past + i + 1;
            let start = s.window.map_or(0, |w| end.saturating_sub(w));
            let qv = &q[i * s.q_width() + h * d..][..d];
            let sc: Vec<f32> = (start..end)
                .map(|j| {
                    (0..d)
                        .map(|c| qv[c] * k[j * s.kv_width() + g * d + c])
                        .sum::<f32>()
                        * scale
                })
                .collect();
            let m = sc.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = sc.iter().map(|x| (x - m).exp()).collect();
            let z: f32 = e.iter().sum();
            for (jj, p) in e.iter().enumerate() {
                let j = start + jj;
                for c in 0..d {
                    out[i * s.q_width() + h * d + c] += p / z * v[j * s.kv_width() + g * d + c];
                }
            }
        }
    }
    out
}

#[test]
fn attention_matches_naive_with_gqa_window_and_offsets() {
    let be = CpuBackend::new(2).unwrap();
    for (window, n_past, n_q, dtype, tol) in [
        (None, 0, 5, DType::F32, 1e-5),
        (None, 7, 3, DType::F32, 1e-5),
        (Some(4), 6, 4, DType::F32, 1e-5),
        (None, 9, 1, DType::F16, 2e-3),
        (None, 3, 2, DType::BF16, 2e-2),
        // several key chunks in the split-K decode schedule, with and without a window
        (None, 700, 1, DType::F32, 1e-5),
        (Some(300), 650, 2, DType::F32, 1e-5),
        (None, 1000, 4, DType::F16, 2e-3),
        (Some(3), 600, 6, DType::F32, 1e-5),
    ] {
        let s = AttnShape {
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 16,
            window,
        };
        let total = n_past + n_q;
        let qd = vals(n_q * s.q_width(), 1);
        let kd = vals(total * s.kv_width(), 2);
        let vd = vals(total * s.kv_width(), 3);
        // q sits at row 1, column 8 of a wider tensor, as in a fused qkv buffer.
        let mut q = be.tensor(n_q + 1, s.q_width() + 8).unwrap();
        for i in 0..n_q {
            let row = i + 1;
            q.data[row * q.cols + 8..][..s.q_width()]
                .copy_from_slice(&qd[i * s.q_width()..][..s.q_width()]);
        }
        let mut kt = be.tensor(total, s.kv_width()).unwrap();
        kt.data.copy_from_slice(&kd);
        let mut vt = be.tensor(total, s.kv_width()).unwrap();
        vt.data.copy_from_slice(&vd);
        let mut kc = be.cache(2, s.kv_width(), dtype).unwrap();
        let mut vc = be.cache(2, s.kv_width(), dtype).unwrap();
        be.cache_grow(&mut kc, total).unwrap();
        be.cache_grow(&mut vc, total).unwrap();
        be.cache_write(&mut kc, 0, &kt, 0, 0, total).unwrap();
        be.cache_write(&mut vc, 0, &vt, 0, 0, total).unwrap();
        let mut out = be.tensor(n_q, s.q_width()).unwrap();
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        let args = CausalAttn {
            shape: s,
            q_row0: 1,
            q_col0: 8,
            n_q,
            n_past,
            out_row0: 0,
            scale,
        };
        be.attention(&args, &q, &kc, &vc, &mut out).unwrap();
        let want = naive_attention(&qd, &kd, &vd, s, n_past, n_q, scale);
        let e = rel(&out.data, &want);
        assert!(e < tol, "{window:?} {n_past} {n_q} {dtype}: rel {e}");
    }
}

#[test]
fn attention_rejects_short_cache_and_bad_groups() {
    let be = CpuBackend::new(1).unwrap();
    let s = AttnShape {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 8,
        window: None,
    };
    let q = be.tensor(1, 32).unwrap();
    let k = be.cache(3, 16, DType::F32).unwrap();
    let v = be.cache(3, 16, DType::F32).unwrap();
    let mut out = be.tensor(1, 32).unwrap();
    let a = CausalAttn {
        shape: s,
        q_row0: 0,
        q_col0: 0,
        n_q: 1,
        n_past: 3,
        out_row0: 0,
        scale: 1.0,
    };
    assert!(be.attention(&a, &q, &k, &v, &mut out).is_err());
    let bad = CausalAttn {
        shape: AttnShape { n_kv_heads: 3, ..s },
        n_past: 0,
        ..a
    };
    assert!(be.attention(&bad, &q, &k, &v, &mut out).is_err());
}

#[test]
fn rope_rotates_half_pairs_by_position() {
    let be = CpuBackend::new(1).unwrap();
    let (heads, d) = (2, 8);
    let data = vals(3 * heads * d, 5);
    let mut x = be.tensor(3, heads * d).unwrap();
    x.data.copy_from_slice(&data);
    let inv: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / d as f32))
        .collect();
    let rope = Rope {
        inv_freq: inv.clone(),
        attention_scaling: 1.0,
    };
    be.rope(&mut x, 0, heads, d, &[0, 5, 100], &rope).unwrap();
    for (r, p) in [0u32, 5, 100].into_iter().enumerate() {
        for h in 0..heads {
            for i in 0..d / 2 {
                let a = p as f32 * inv[i];
                let x0 = data[r * heads * d + h * d + i];
                let x1 = data[r * heads * d + h * d + i + d / 2];
                let got0 = x.data[r * heads * d + h * d + i];
                let got1 = x.data[r * heads * d + h * d + i + d / 2];
                assert!((got0 - (x0 * a.cos() - x1 * a.sin())).abs() < 1e-5);
                assert!((got1 - (x1 * a.cos() + x0 * a.sin())).abs() < 1e-5);
            }
        }
    }
    // position 0 is the identity
    assert!(rel(&x.data[..heads * d], &data[..heads * d]) < 1e-7);
}

#[test]
fn norm_silu_add_embedding_and_matmul_bias() {
    let be = CpuBackend::new(2).unwrap();
    let mut x = be.tensor(2, 4).unwrap();
    x.data
        .copy_from_slice(&[1.0, 2.0, 3.0, 4.0, -1.0, 0.0, 1.0, 0.5]);
    let mut w = be.tensor(1, 4).unwrap();
    w.data.copy_from_slice(&[1.0, 0.5, 2.0, 1.0]);
    let mut out = be.tensor(2, 4).unwrap();
    be.rms_norm(&x, &w, 1e-6, &mut out, 2).unwrap();
    let inv = 1.0 / ((1.0f32 + 4.0 + 9.0 + 16.0) / 4.0 + 1e-6).sqrt();
    assert!((out.data[2] - 3.0 * inv * 2.0).abs() < 1e-6);

    let mut gu = be.tensor(1, 4).unwrap();
    gu.data.copy_from_slice(&[1.0, -2.0, 3.0, 4.0]);
    let mut o = be.tensor(1, 2).unwrap();
    be.silu_mul(&gu, &mut o, 1).unwrap();
    let silu = |g: f32| g / (1.0 + (-g).exp());
    assert!((o.data[0] - silu(1.0) * 3.0).abs() < 1e-6);
    assert!((o.data[1] - silu(-2.0) * 4.0).abs() < 1e-6);

    let bytes: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let m = be
        .upload_matrix(HostMatrix {
            rows: 3,
            cols: 2,
            dtype: DType::F32,
            bytes: &bytes,
        })
        .unwrap();
    let mut e = be.tensor(2, 2).unwrap();
    be.embedding(&m, &[2, 0], &mut e).unwrap();
    assert_eq!(e.data, vec![5.0, 6.0, 1.0, 2.0]);
    assert!(be.embedding(&m, &[3], &mut e).is_err());
    let mut bias = be.tensor(1, 3).unwrap();
    bias.data.copy_from_slice(&[0.5, 0.0, -1.0]);
    let mut y = be.tensor(2, 3).unwrap();
    be.matmul(&e, &m, Some(&bias), &mut y, 2).unwrap();
    assert_eq!(y.data, vec![17.5, 39.0, 60.0, 5.5, 11.0, 16.0]);
    let mut a = e.clone();
    be.add(&mut a, &e, 2).unwrap();
    assert_eq!(a.data, vec![10.0, 12.0, 2.0, 4.0]);
    assert!(be
        .upload_matrix(HostMatrix {
            rows: 3,
            cols: 3,
            dtype: DType::F32,
            bytes: &bytes
        })
        .is_err());
}
