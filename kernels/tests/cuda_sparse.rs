//! Parity of the CUDA Double Sparsity kernels (`cuda/sparse.rs`) with CPU references: labels,
//! label scores, exact top-k (against a full sort: score descending, lower index first), sparse
//! attention over indexed rows (device and pinned host memory) and the row gather. Skipped
//! without a CUDA device. Prints `sparse` lines with the measured errors.

mod common;

use common::vals;
use farsight_kernels::cuda::{CudaBackend, DevBuf, HostPages, KvRows, PinnedKind};
use farsight_kernels::{Backend, DType};

fn backend() -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(be) => Some(be),
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            None
        }
    }
}

const N_HEADS: usize = 32;
const N_KV: usize = 8;
const D: usize = 128;
const R: usize = 16;

fn rel_l2(a: &[f32], b: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        num += (*x as f64 - y) * (*x as f64 - y);
        den += y * y;
    }
    (num / den.max(1e-300)).sqrt()
}

/// Reference top-k: indices of the k largest (total order, ties to lower index), ascending.
fn topk_ref(s: &[f32], k: usize) -> Vec<i32> {
    let mut idx: Vec<usize> = (0..s.len()).collect();
    idx.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
    let mut v: Vec<i32> = idx[..k].iter().map(|&i| i as i32).collect();
    v.sort_unstable();
    v
}

fn channels() -> Vec<i32> {
    (0..N_KV * R)
        .map(|i| ((i * 37 + i / R * 5) % D) as i32)
        .collect()
}

#[test]
fn labels_scores_and_topk_match_cpu() {
    let Some(be) = backend() else { return };
    let n = 70_000;
    let mut k = be.cache(n, N_KV * D, DType::BF16).unwrap();
    be.fill_cache_random(&mut k, 1.0, 7).unwrap();
    let kh = be.read_cache(&k).unwrap();
    let chan_h = channels();
    let chan = be.dev_upload(&chan_h).unwrap();
    let mut labels: DevBuf<u16> = be.dev_zeros(N_KV * n * R).unwrap();
    let rows = KvRows {
        k: be.cache_ptr(&k),
        v: 0,
        tok_stride: N_KV * D,
        head_stride: D,
        dtype: DType::BF16,
    };
    be.ds_labels_from_cache(&rows, N_KV, D, &chan, R, 0, n, &mut labels, n)
        .unwrap();
    let lab = be.dev_read(&labels).unwrap();
    let mut bad = 0;
    for g in 0..N_KV {
        for t in 0..n {
            for c in 0..R {
                let want =
                    half::f16::from_f32(kh[t * N_KV * D + g * D + chan_h[g * R + c] as usize]);
                if lab[(g * n + t) * R + c] != want.to_bits() {
                    bad += 1;
                }
            }
        }
    }
    assert_eq!(bad, 0, "labels differ");
    println!(
        "sparse labels_from_cache bf16 -> f16: {} values bit-exact",
        N_KV * n * R
    );

    let qh = vals(N_HEADS * D, 11);
    let mut q = be.tensor(1, N_HEADS * D).unwrap();
    be.write_tensor(&mut q, 0, &qh).unwrap();
    for (t0, t1) in [(0usize, n), (4, n - 64), (1000, 1001)] {
        let m = t1 - t0;
        let mut sc: DevBuf<f32> = be.dev_zeros(N_KV * m).unwrap();
        be.ds_label_scores(
            &q,
            &chan,
            N_KV,
            N_HEADS / N_KV,
            D,
            R,
            &labels,
            n,
            t0,
            t1,
            &mut sc,
        )
        .unwrap();
        let got = be.dev_read(&sc).unwrap();
        let group = N_HEADS / N_KV;
        let mut want = vec![0.0f64; N_KV * m];
        for g in 0..N_KV {
            let qs: Vec<f64> = (0..R)
                .map(|c| {
                    (0..group)
                        .map(|j| qh[(g * group + j) * D + chan_h[g * R + c] as usize] as f64)
                        .sum()
                })
                .collect();
            for i in 0..m {
                want[g * m + i] = (0..R)
                    .map(|c| qs[c] * half::f16::from_bits(lab[(g * n + t0 + i) * R + c]).to_f64())
                    .sum();
            }
        }
        let e = rel_l2(&got, &want);
        println!("sparse label_scores tokens {t0}..{t1}: rel-L2 {e:.2e}");
        assert!(e < 1e-5, "label scores rel-L2 {e}");

        // Top-k of these scores against a full CPU sort.
        if m >= 16 {
            let mut scratch = be.ds_topk_scratch(N_KV, m).unwrap();
            for (cluster, kk) in [false, true]
                .into_iter()
                .flat_map(|c| [1, 7, m / 16, m / 64, m - 1, m].map(|k| (c, k)))
            {
                if kk == 0 || be.set_topk_cluster(cluster) != cluster {
                    continue;
                }
                let stride = kk + 5;
                let mut out: DevBuf<i32> = be.dev_zeros(N_KV * stride).unwrap();
                be.ds_topk(&sc, N_KV, m, kk, t0, &mut out, stride, 2, &mut scratch)
                    .unwrap();
                let o = be.dev_read(&out).unwrap();
                for g in 0..N_KV {
                    let want: Vec<i32> = topk_ref(&got[g * m..(g + 1) * m], kk)
                        .iter()
                        .map(|i| i + t0 as i32)
                        .collect();
                    assert_eq!(
                        &o[g * stride + 2..g * stride + 2 + kk],
                        &want[..],
                        "top-{kk} of {m}, head {g} (cluster kernel: {cluster})"
                    );
                }
            }
            println!("sparse topk over label scores ({m} per head, 8 heads): exact for k in 1, 7, m/16, m/64, m-1, m");
        }
    }
}

#[test]
fn topk_ties_and_large_n_exact() {
    let Some(be) = backend() else { return };
    let heads = 3;
    for (n, levels) in [
        (1usize << 20, 0usize),
        (1 << 20, 5),
        (300_000, 1),
        (100_000, 1000),
        (5000, 3),
    ] {
        let v = vals(heads * n, n as u64 + levels as u64);
        let s: Vec<f32> = v
            .iter()
            .enumerate()
            .map(|(i, &x)| match levels {
                0 => x * 1000.0,
                1 => {
                    if i % 2 == 0 {
                        0.0
                    } else {
                        -0.0
                    }
                }
                l => ((x * l as f32).round() - 1.0) * 0.5,
            })
            .collect();
        let sc = be.dev_upload(&s).unwrap();
        let mut scratch = be.ds_topk_scratch(heads, n).unwrap();
        let kernels = [false, true];
        for (cluster, kk) in kernels
            .into_iter()
            .flat_map(|c| [1, 33, n / 16, n / 64, n / 2 + 1, n].map(|k| (c, k)))
        {
            if be.set_topk_cluster(cluster) != cluster {
                continue;
            }
            let mut out: DevBuf<i32> = be.dev_zeros(heads * kk).unwrap();
            be.ds_topk(&sc, heads, n, kk, 0, &mut out, kk, 0, &mut scratch)
                .unwrap();
            let o = be.dev_read(&out).unwrap();
            for h in 0..heads {
                let want = topk_ref(&s[h * n..(h + 1) * n], kk);
                assert_eq!(
                    &o[h * kk..(h + 1) * kk],
                    &want[..],
                    "n {n} levels {levels} k {kk} head {h} (cluster kernel: {cluster})"
                );
            }
        }
        println!(
            "sparse topk n {n} x {heads} heads, {} : exact for k in 1, 33, n/16, n/64, n/2+1, n",
            match levels {
                0 => "distinct values".to_string(),
                1 => "+0/-0 only".to_string(),
                l => format!("{l} levels (ties)"),
            }
        );
    }
}

/// Reference attention of one query over rows `sel[g]` of K/V (f32 copies), f64 math.
fn attn_ref(q: &[f32], k: &[f32], v: &[f32], sel: &[Vec<i32>], scale: f64) -> Vec<f64> {
    let group = N_HEADS / N_KV;
    let mut out = vec![0.0f64; N_HEADS * D];
    for h in 0..N_HEADS {
        let g = h / group;
        let s: Vec<f64> = sel[g]
            .iter()
            .map(|&t| {
                (0..D)
                    .map(|d| q[h * D + d] as f64 * k[t as usize * N_KV * D + g * D + d] as f64)
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let m = s.iter().cloned().fold(f64::MIN, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        for d in 0..D {
            out[h * D + d] = sel[g]
                .iter()
                .zip(&e)
                .map(|(&t, w)| w * v[t as usize * N_KV * D + g * D + d] as f64)
                .sum::<f64>()
                / z;
        }
    }
    out
}

#[test]
fn sparse_attention_and_gather_match_cpu() {
    let Some(be) = backend() else { return };
    let n = 40_000;
    // Both host-page kinds: huge pages registered with the driver, and cuMemHostAlloc.
    for (dtype, pages) in [
        (DType::BF16, HostPages::Huge),
        (DType::F16, HostPages::Cuda),
        (DType::BF16, HostPages::Cuda),
    ] {
        let mut k = be.cache(n, N_KV * D, dtype).unwrap();
        let mut v = be.cache(n, N_KV * D, dtype).unwrap();
        be.fill_cache_random(&mut k, 1.0, 21).unwrap();
        be.fill_cache_random(&mut v, 1.0, 22).unwrap();
        let (kh, vh) = (be.read_cache(&k).unwrap(), be.read_cache(&v).unwrap());
        let qh = vals(N_HEADS * D, 5);
        let mut q = be.tensor(1, N_HEADS * D).unwrap();
        be.write_tensor(&mut q, 0, &qh).unwrap();
        let scale = 1.0 / (D as f32).sqrt();
        let dev = KvRows {
            k: be.cache_ptr(&k),
            v: be.cache_ptr(&v),
            tok_stride: N_KV * D,
            head_stride: D,
            dtype,
        };
        // Host tier layout: [token][kv head][K | V], from the same values (bit copies).
        let es = dtype.size();
        let row = 2 * D * es;
        let mut host = be.pinned_with(n * N_KV * row, pages).unwrap();
        println!("host rows: {} ({} bytes)", host.kind().name(), host.len());
        assert_eq!(host.len(), n * N_KV * row);
        if pages == HostPages::Cuda {
            assert_eq!(host.kind(), PinnedKind::Cuda);
        }
        let kb = to_bytes(&kh, dtype);
        let vb = to_bytes(&vh, dtype);
        {
            let h = host.as_mut_slice().unwrap();
            for t in 0..n {
                for g in 0..N_KV {
                    let o = (t * N_KV + g) * row;
                    let src = (t * N_KV * D + g * D) * es;
                    h[o..o + D * es].copy_from_slice(&kb[src..src + D * es]);
                    h[o + D * es..o + row].copy_from_slice(&vb[src..src + D * es]);
                }
            }
        }
        let hp = host.ptr().unwrap();
        let host_rows = KvRows {
            k: hp,
            v: hp + (D * es) as u64,
            tok_stride: N_KV * 2 * D,
            head_stride: 2 * D,
            dtype,
        };
        for n_sel in [1usize, 31, 257, 2500, n] {
            let sel: Vec<Vec<i32>> = (0..N_KV)
                .map(|g| {
                    if n_sel == n {
                        return (0..n as i32).collect();
                    }
                    // Distinct rows: 7919 is prime and does not divide n.
                    let mut s: Vec<i32> = (0..n_sel)
                        .map(|j| ((j * 7919 + g * 13) % n) as i32)
                        .collect();
                    s.sort_unstable();
                    s
                })
                .collect();
            let flat: Vec<i32> = sel.iter().flatten().cloned().collect();
            let idx = be.dev_upload(&flat).unwrap();
            let want = attn_ref(&qh, &kh, &vh, &sel, scale as f64);
            let mut out = be.tensor(1, N_HEADS * D).unwrap();
            let mut worst = 0.0f64;
            for (what, rows) in [("device", &dev), ("pinned host (zero-copy)", &host_rows)] {
                be.sparse_attention(
                    &q,
                    rows,
                    Some(&idx),
                    n_sel,
                    n_sel,
                    N_HEADS,
                    N_KV,
                    D,
                    scale,
                    &mut out,
                )
                .unwrap();
                let got = be.read_rows(&out, 0, 1).unwrap();
                let e = rel_l2(&got, &want);
                println!(
                    "sparse attention {dtype:?} {n_sel} rows/head from {what}: rel-L2 {e:.2e}"
                );
                worst = worst.max(e);
            }
            // Gather from the pinned host tier, then attend over the compact rows.
            let mut dst: DevBuf<u8> = be.dev_zeros(N_KV * n_sel * row).unwrap();
            be.ds_gather_rows(hp, N_KV * row, row, &idx, n_sel, n_sel, N_KV, row, &mut dst)
                .unwrap();
            let gathered = be.dev_read(&dst).unwrap();
            let hs = host.as_mut_slice().unwrap();
            for g in 0..N_KV {
                for (j, &t) in sel[g].iter().enumerate() {
                    let o = (t as usize * N_KV + g) * row;
                    assert!(
                        gathered[(g * n_sel + j) * row..(g * n_sel + j + 1) * row]
                            == hs[o..o + row],
                        "gathered row differs"
                    );
                }
            }
            let dp = be.dev_ptr(&dst);
            let compact = KvRows {
                k: dp,
                v: dp + (D * es) as u64,
                tok_stride: 2 * D,
                head_stride: n_sel * 2 * D,
                dtype,
            };
            be.sparse_attention(
                &q, &compact, None, 0, n_sel, N_HEADS, N_KV, D, scale, &mut out,
            )
            .unwrap();
            let got = be.read_rows(&out, 0, 1).unwrap();
            let e = rel_l2(&got, &want);
            println!("sparse gather {dtype:?} {n_sel} rows/head: bit-exact; attention over gathered rows rel-L2 {e:.2e}");
            worst = worst.max(e);
            assert!(worst < 1e-4, "sparse attention rel-L2 {worst}");
        }
    }
}

fn to_bytes(x: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::BF16 => x
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
            .collect(),
        DType::F16 => x
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes())
            .collect(),
        DType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}
