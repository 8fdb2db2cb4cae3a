//! 4-bit labels on the GPU (`cuda/labels.rs`, `kernels/labels.cu`) against the CPU label cache
//! (`farsight_offload::sparse::labels::LabelCache`, the reference): the labels written from a KV
//! cache and by `ds_put_rows` (new rows) are the CPU's bytes exactly, and the label scores equal
//! `LabelCache::score` of the group-summed query to rounding. Widths of whole and partial code
//! words; rows that tie at half a step, constant rows (scale 0) and rows whose scale overflows
//! f16. Skipped without a CUDA device.

mod common;

use common::vals;
use farsight_kernels::cuda::{CudaBackend, KvRows, Labels4, LabelsOut, RowSlab};
use farsight_kernels::{Backend, DType};
use farsight_offload::sparse::labels::LabelCache;
use farsight_offload::sparse::LabelBits;
use half::{bf16, f16};

fn backend() -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(be) => Some(be),
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            None
        }
    }
}

const N_KV: usize = 4;
const GROUP: usize = 4;
const D: usize = 128;

/// Label widths: whole words (8, 16, 64), a partial last word (12, 5), and 40.
const WIDTHS: [usize; 6] = [16, 8, 12, 5, 40, 64];

/// Channels of head `g`: `r` distinct channels spread over the head.
fn channels(r: usize) -> Vec<i32> {
    (0..N_KV * r)
        .map(|i| {
            let (g, c) = (i / r, i % r);
            ((c * 37 + g * 5) % D) as i32
        })
        .collect()
}

/// Key values of `n` tokens (`N_KV * D` per token): random, with special rows at the label
/// channels of every head - halves of a step (round half away from zero), a constant row, a
/// row whose scale overflows f16, and negative steps.
fn keys(n: usize, r: usize, chan: &[i32], seed: u64) -> Vec<f32> {
    let mut k: Vec<f32> = vals(n * N_KV * D, seed).iter().map(|v| v * 3.0).collect();
    for g in 0..N_KV {
        let at = |t: usize, c: usize| t * N_KV * D + g * D + chan[g * r + c] as usize;
        for c in 0..r {
            // Token 1: 0, 15, then halves: scale 1, every code a tie.
            k[at(1, c)] = match c {
                0 => 0.0,
                1 => 15.0,
                _ => (c % 15) as f32 + 0.5,
            };
            // Token 2: constant.
            k[at(2, c)] = 0.75;
            // Token 3: a scale past f16's range.
            k[at(3, c)] = if c % 2 == 0 { -1.0e6 } else { 1.0e6 };
            // Token 4: negative halves.
            k[at(4, c)] = -((c % 16) as f32) * 0.5 - 2.0;
        }
    }
    k
}

/// The CPU labels of `k` (f32 values per token, `N_KV * D` each) for tokens `0..n`.
fn cpu_labels(k: &[f32], n: usize, r: usize, chan: &[i32]) -> LabelCache {
    let mut c = LabelCache::new(1, N_KV, r, LabelBits::B4);
    c.grow(n);
    for t in 0..n {
        for g in 0..N_KV {
            let v: Vec<f32> = (0..r)
                .map(|j| k[t * N_KV * D + g * D + chan[g * r + j] as usize])
                .collect();
            c.write(0, g, t as u32, &v);
        }
    }
    c
}

/// Compares the GPU labels of tokens `t0..t1` with the CPU's: parameters and code bytes exactly
/// (a zero minimum may differ in sign only), padding codes zero, dequantised values exactly.
fn assert_same_labels(be: &CudaBackend, gpu: &Labels4, cpu: &LabelCache, t0: usize, t1: usize) {
    let r = gpu.r;
    let words = Labels4::words(r);
    let codes = be.dev_read(&gpu.codes).unwrap();
    let params = be.dev_read(&gpu.params).unwrap();
    let mut checked = 0;
    for g in 0..N_KV {
        for t in t0..t1 {
            let want = cpu.row_bytes(0, g, t as u32);
            let p = params[g * gpu.cap + t];
            let lo = f16::from_bits(p as u16);
            let want_lo = f16::from_le_bytes([want[0], want[1]]);
            assert!(
                lo.to_bits() == want_lo.to_bits()
                    || (lo.to_f32() == 0.0 && want_lo.to_f32() == 0.0),
                "r {r} head {g} token {t}: lo {lo} vs CPU {want_lo}"
            );
            assert_eq!(
                (p >> 16) as u16,
                u16::from_le_bytes([want[2], want[3]]),
                "r {r} head {g} token {t}: scale bits"
            );
            let row = &codes[(g * gpu.cap + t) * words..][..words];
            let bytes: Vec<u8> = row.iter().flat_map(|w| w.to_le_bytes()).collect();
            assert_eq!(
                &bytes[..r.div_ceil(2)],
                &want[4..],
                "r {r} head {g} token {t}: code bytes"
            );
            // Padding: the high nibble of the last byte when r is odd, and whole bytes after.
            let mut pad = bytes[r.div_ceil(2)..].iter().all(|&b| b == 0);
            if r % 2 == 1 {
                pad &= bytes[r / 2] >> 4 == 0;
            }
            assert!(pad, "r {r} head {g} token {t}: padding codes not zero");
            let scale = f16::from_bits((p >> 16) as u16).to_f32();
            let got: Vec<f32> = (0..r)
                .map(|c| lo.to_f32() + scale * ((row[c / 8] >> (4 * (c % 8))) & 15) as f32)
                .collect();
            let want_v = cpu.read(0, g, t as u32);
            for (c, (a, b)) in got.iter().zip(&want_v).enumerate() {
                assert!(
                    a.to_bits() == b.to_bits() || (a == b) || (a.is_nan() && b.is_nan()),
                    "r {r} head {g} token {t} channel {c}: {a} vs CPU {b}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 0);
}

#[test]
fn labels4_from_cache_equal_cpu_label_cache() {
    let Some(be) = backend() else { return };
    let n = 3000;
    for dtype in [DType::BF16, DType::F16] {
        for r in WIDTHS {
            let chan_h = channels(r);
            let chan = be.dev_upload(&chan_h).unwrap();
            // The cache's 16-bit values, and the f32 values the CPU quantises.
            let raw = keys(n, r, &chan_h, 17 + r as u64);
            let (bits, k): (Vec<u16>, Vec<f32>) = match dtype {
                DType::BF16 => raw
                    .iter()
                    .map(|&v| {
                        let b = bf16::from_f32(v);
                        (b.to_bits(), b.to_f32())
                    })
                    .unzip(),
                _ => raw
                    .iter()
                    .map(|&v| {
                        // f16 cannot hold 1e6: those rows become +-inf (scale NaN/inf on both).
                        let h = f16::from_f32(v.clamp(-6.0e4, 6.0e4));
                        (h.to_bits(), h.to_f32())
                    })
                    .unzip(),
            };
            let dev = be.dev_upload(&bits).unwrap();
            let rows = KvRows {
                k: be.dev_ptr(&dev),
                v: 0,
                tok_stride: N_KV * D,
                head_stride: D,
                dtype,
            };
            let cap = n + 37;
            let mut gpu = be.labels4(N_KV, cap, r).unwrap();
            // Two calls: a first range, then the rest (t0 > 0 addressing).
            be.ds_labels4_from_cache(&rows, D, &chan, 0, 1000, &mut gpu)
                .unwrap();
            be.ds_labels4_from_cache(&rows, D, &chan, 1000, n, &mut gpu)
                .unwrap();
            let cpu = cpu_labels(&k, n, r, &chan_h);
            assert_same_labels(&be, &gpu, &cpu, 0, n);
            println!(
                "labels4 from a {} cache, r {r}: {} labels equal the CPU's",
                dtype.name(),
                n * N_KV
            );
        }
    }
}

#[test]
fn put_rows_labels4_equal_cpu_label_cache() {
    let Some(be) = backend() else { return };
    let (n, t0) = (300, 50);
    for r in WIDTHS {
        let chan_h = channels(r);
        let chan = be.dev_upload(&chan_h).unwrap();
        // Source rows: [K | V] of N_KV heads per token, f32 (as the model hands them over).
        let k = keys(n, r, &chan_h, 5 + r as u64);
        let cols = 2 * N_KV * D;
        let mut src_h = vec![0.0f32; n * cols];
        for t in 0..n {
            src_h[t * cols..t * cols + N_KV * D].copy_from_slice(&k[t * N_KV * D..][..N_KV * D]);
            let v = vals(N_KV * D, 1000 + t as u64);
            src_h[t * cols + N_KV * D..(t + 1) * cols].copy_from_slice(&v);
        }
        let mut src = be.tensor(n, cols).unwrap();
        be.write_tensor(&mut src, 0, &src_h).unwrap();
        let cap = t0 + n + 3;
        let slab = be.dev_zeros::<u8>(cap * N_KV * 2 * D * 2).unwrap();
        let dst = RowSlab {
            ptr: be.dev_ptr(&slab),
            tok_stride: N_KV * 2 * D,
            head_stride: 2 * D,
            dtype: DType::BF16,
        };
        let mut gpu = be.labels4(N_KV, cap, r).unwrap();
        // In two calls: a prefill chunk, then one decode token.
        be.ds_put_rows(
            &src,
            0,
            0,
            N_KV * D,
            n - 1,
            N_KV,
            D,
            &dst,
            t0,
            0,
            0,
            Some((&chan, LabelsOut::B4(&mut gpu))),
        )
        .unwrap();
        be.ds_put_rows(
            &src,
            n - 1,
            0,
            N_KV * D,
            1,
            N_KV,
            D,
            &dst,
            t0 + n - 1,
            0,
            0,
            Some((&chan, LabelsOut::B4(&mut gpu))),
        )
        .unwrap();
        // CPU labels of tokens t0..t0+n (slots = tokens).
        let mut shifted = vec![0.0f32; (t0 + n) * N_KV * D];
        shifted[t0 * N_KV * D..].copy_from_slice(&k);
        let cpu = cpu_labels(&shifted, t0 + n, r, &chan_h);
        assert_same_labels(&be, &gpu, &cpu, t0, t0 + n);
        // Tokens before t0 were not written.
        let params = be.dev_read(&gpu.params).unwrap();
        assert!(
            (0..N_KV).all(|g| params[g * cap..g * cap + t0].iter().all(|&p| p == 0)),
            "r {r}: labels written outside the new tokens"
        );
        println!(
            "labels4 by ds_put_rows, r {r}: {} labels equal the CPU's",
            n * N_KV
        );
    }
}

#[test]
fn label_scores4_equal_cpu_label_cache_scores() {
    let Some(be) = backend() else { return };
    let n = 20_011;
    for r in WIDTHS {
        let chan_h = channels(r);
        let chan = be.dev_upload(&chan_h).unwrap();
        let k: Vec<f32> = keys(n, r, &chan_h, 40 + r as u64)
            .iter()
            .map(|&v| bf16::from_f32(v.clamp(-100.0, 100.0)).to_f32())
            .collect();
        let bits: Vec<u16> = k.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        let dev = be.dev_upload(&bits).unwrap();
        let rows = KvRows {
            k: be.dev_ptr(&dev),
            v: 0,
            tok_stride: N_KV * D,
            head_stride: D,
            dtype: DType::BF16,
        };
        let mut gpu = be.labels4(N_KV, n, r).unwrap();
        be.ds_labels4_from_cache(&rows, D, &chan, 0, n, &mut gpu)
            .unwrap();
        let cpu = cpu_labels(&k, n, r, &chan_h);
        let qh = vals(N_KV * GROUP * D, 3 + r as u64);
        let mut q = be.tensor(2, N_KV * GROUP * D).unwrap();
        // The query in row 1 (row 0 is other values).
        be.write_tensor(&mut q, 0, &vals(N_KV * GROUP * D, 99))
            .unwrap();
        be.write_tensor(&mut q, 1, &qh).unwrap();
        for (t0, t1) in [(0usize, n), (4, n - 64), (1000, 1001), (7, 520)] {
            let m = t1 - t0;
            let mut sc = be.dev_zeros::<f32>(N_KV * m).unwrap();
            be.ds_label_scores4_at(&q, 1, &chan, GROUP, D, &gpu, t0, t1, &mut sc)
                .unwrap();
            let got = be.dev_read(&sc).unwrap();
            let slots: Vec<u32> = (t0 as u32..t1 as u32).collect();
            let mut worst = 0.0f64;
            for g in 0..N_KV {
                // The group-summed query labels, summed in head order as the kernel does.
                let qs: Vec<f32> = (0..r)
                    .map(|c| {
                        let mut s = 0.0f32;
                        for j in 0..GROUP {
                            s += qh[(g * GROUP + j) * D + chan_h[g * r + c] as usize];
                        }
                        s
                    })
                    .collect();
                let mut want = Vec::new();
                cpu.score(0, g, &qs, &slots, &mut want);
                let mag: f32 = qs.iter().map(|x| x.abs()).sum();
                for (i, (&a, &b)) in got[g * m..(g + 1) * m].iter().zip(&want).enumerate() {
                    // Relative to the size of the terms: |q| . |label| bounds the sum's rounding.
                    let label = cpu.read(0, g, (t0 + i) as u32);
                    let size = mag * label.iter().fold(0.0f32, |x, v| x.max(v.abs())) + 1e-6;
                    let e = ((a - b).abs() / size) as f64;
                    worst = worst.max(e);
                    assert!(
                        e < 1e-5,
                        "r {r} head {g} token {}: GPU {a} vs CPU {b} (relative {e:.2e})",
                        t0 + i
                    );
                }
            }
            println!("label_scores4 r {r} tokens {t0}..{t1}: worst relative error {worst:.2e}");
        }
    }
}

#[test]
fn labels4_bad_shapes_are_errors() {
    let Some(be) = backend() else { return };
    assert!(be.labels4(N_KV, 10, 0).is_err(), "r 0");
    assert!(be.labels4(N_KV, 10, 65).is_err(), "r past DS_MAX_R");
    assert!(be.labels4(N_KV, 0, 16).is_err(), "no tokens");
    let gpu = be.labels4(N_KV, 10, 16).unwrap();
    assert_eq!(gpu.bytes(), N_KV * 10 * (8 + 4));
    let chan = be.dev_upload(&channels(16)).unwrap();
    let q = be.tensor(1, N_KV * GROUP * D).unwrap();
    let mut sc = be.dev_zeros::<f32>(N_KV * 20).unwrap();
    assert!(
        be.ds_label_scores4_at(&q, 0, &chan, GROUP, D, &gpu, 0, 11, &mut sc)
            .is_err(),
        "tokens past the capacity"
    );
    assert!(
        be.ds_label_scores4_at(&q, 1, &chan, GROUP, D, &gpu, 0, 5, &mut sc)
            .is_err(),
        "query row past the tensor"
    );
    let short = be.dev_upload(&channels(8)).unwrap();
    assert!(
        be.ds_label_scores4_at(&q, 0, &short, GROUP, D, &gpu, 0, 5, &mut sc)
            .is_err(),
        "too few channels"
    );
}
