//! 4-bit labels on the GPU (`kernels/labels.cu`): the layout, the writer from a KV cache, and
//! the label scores; new rows' labels are written by [`CudaBackend::ds_put_rows`] with
//! [`LabelsOut::B4`].
//!
//! Per KV head and token: the codes in `ceil(r / 8)` u32 words (channel `c` in bits `4 * (c %
//! 8)` of word `c / 8`: read as bytes, the CPU `LabelCache`'s code bytes, zero-padded to a word)
//! and one u32 of parameters (f16 minimum in the low half, f16 scale in the high half). Codes and
//! parameters are separate arrays, contiguous in the token, so that a scoring warp reads both
//! with coalesced, aligned loads of 4 to 16 bytes. Quantisation is the CPU's bit for bit.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{int, shape_err, CudaBackend, CudaTensor, DevBuf, KvRows, DS_MAX_R};
use crate::backend::{DType, Result};

/// Tokens per thread of the scoring kernel (`DS4_TOK` in labels.cu).
const DS4_TOK: usize = 2;

/// 4-bit labels of `heads` KV heads x `cap` tokens of `r` channels (see the module docs).
pub struct Labels4 {
    pub heads: usize,
    pub cap: usize,
    pub r: usize,
    /// `[head][token][words]`.
    pub codes: DevBuf<u32>,
    /// `[head][token]`: `lo_f16 | scale_f16 << 16`.
    pub params: DevBuf<u32>,
}

impl Labels4 {
    /// Code words per label of `r` channels.
    pub fn words(r: usize) -> usize {
        r.div_ceil(8)
    }

    /// Bytes per (token, KV head) of `r`-channel labels on the GPU.
    pub fn row_bytes(r: usize) -> usize {
        4 * Self::words(r) + 4
    }

    /// Bytes held on the device.
    pub fn bytes(&self) -> usize {
        (self.codes.len + self.params.len) * 4
    }

    /// The shape is one the kernels can address (the fields are public).
    pub(super) fn check(&self, what: &str) -> Result<()> {
        if self.r == 0
            || self.r > DS_MAX_R
            || self.codes.len < self.heads * self.cap * Self::words(self.r)
            || self.params.len < self.heads * self.cap
        {
            return Err(shape_err(format!(
                "{what}: 4-bit labels of {} channels x {} tokens x {} heads do not fit their buffers",
                self.r, self.cap, self.heads
            )));
        }
        Ok(())
    }
}

/// Where [`CudaBackend::ds_put_rows`] writes the new tokens' labels.
pub enum LabelsOut<'a> {
    /// f16 values `[head][token][r]`, `cap` tokens per head.
    F16 {
        r: usize,
        labels: &'a mut DevBuf<u16>,
        cap: usize,
    },
    /// 4-bit labels.
    B4(&'a mut Labels4),
}

impl CudaBackend {
    /// Zeroed 4-bit labels for `heads` KV heads x `cap` tokens of `r` channels (1 to
    /// [`DS_MAX_R`]).
    pub fn labels4(&self, heads: usize, cap: usize, r: usize) -> Result<Labels4> {
        if r == 0 || r > DS_MAX_R {
            return Err(shape_err(format!(
                "4-bit labels of {r} channels: 1 to {DS_MAX_R} supported"
            )));
        }
        if heads == 0 || cap == 0 {
            return Err(shape_err("4-bit labels for no heads or no tokens".into()));
        }
        Ok(Labels4 {
            heads,
            cap,
            r,
            codes: self.dev_zeros(heads * cap * Labels4::words(r))?,
            params: self.dev_zeros(heads * cap)?,
        })
    }

    /// Writes the 4-bit labels of tokens `t0..t1` from the K rows `k` (f16/bf16; head `g` of
    /// token `t` at `k.k + (t * tok_stride + g * head_dim)` elements) at the channels `chan`
    /// (`heads * r`), quantised as the CPU `LabelCache::write` does.
    #[allow(clippy::too_many_arguments)]
    pub fn ds_labels4_from_cache(
        &self,
        k: &KvRows,
        head_dim: usize,
        chan: &DevBuf<i32>,
        t0: usize,
        t1: usize,
        labels: &mut Labels4,
    ) -> Result<()> {
        labels.check("ds_labels4_from_cache")?;
        let (heads, r, cap) = (labels.heads, labels.r, labels.cap);
        if chan.len < heads * r || t1 > cap || t0 > t1 {
            return Err(shape_err(format!(
                "ds_labels4_from_cache: tokens {t0}..{t1} of {cap}, {} channels for {heads} x {r}",
                chan.len
            )));
        }
        if t1 == t0 {
            return Ok(());
        }
        let name = match k.dtype {
            DType::BF16 => "ds_labels4_from_cache_bf16",
            DType::F16 => "ds_labels4_from_cache_f16",
            DType::F32 => {
                return Err(shape_err(
                    "labels from an f32 cache: not implemented".into(),
                ))
            }
        };
        let (ts, hd, rr, w) = (
            k.tok_stride as i64,
            int(head_dim, "head_dim")?,
            int(r, "r")?,
            int(Labels4::words(r), "words")?,
        );
        let (a, b_, c) = (t0 as i64, t1 as i64, cap as i64);
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&k.k)
            .arg(&ts)
            .arg(&hd)
            .arg(&chan.data)
            .arg(&rr)
            .arg(&w)
            .arg(&a)
            .arg(&b_)
            .arg(&c);
        b.arg(&mut labels.codes.data).arg(&mut labels.params.data);
        let cfg = LaunchConfig {
            grid_dim: ((t1 - t0).div_ceil(256) as u32, heads as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.map_err(Self::launch_err(name))?;
        Ok(())
    }

    /// Label scores of the query in row `q_row` of `q` (`heads * group * head_dim` values)
    /// against 4-bit labels, tokens `t0..t1`: `scores[g][t - t0] = lo * qsum + scale * sum_c
    /// qs[c] * code_c`, `qs[c] = sum_{h in group g} q[h][chan[g][c]]`, `qsum = sum_c qs[c]`
    /// (the CPU `LabelCache::score` of the group-summed query).
    #[allow(clippy::too_many_arguments)]
    pub fn ds_label_scores4_at(
        &self,
        q: &CudaTensor,
        q_row: usize,
        chan: &DevBuf<i32>,
        group: usize,
        head_dim: usize,
        labels: &Labels4,
        t0: usize,
        t1: usize,
        scores: &mut DevBuf<f32>,
    ) -> Result<()> {
        labels.check("ds_label_scores4")?;
        let (heads, r, cap) = (labels.heads, labels.r, labels.cap);
        let n = t1.saturating_sub(t0);
        if q.cols < heads * group * head_dim
            || q_row >= q.rows
            || chan.len < heads * r
            || t1 > cap
            || scores.len < heads * n
        {
            return Err(shape_err("ds_label_scores4: shapes".into()));
        }
        if n == 0 {
            return Ok(());
        }
        const NAMES: [&str; 8] = [
            "ds_label_scores4_w1",
            "ds_label_scores4_w2",
            "ds_label_scores4_w3",
            "ds_label_scores4_w4",
            "ds_label_scores4_w5",
            "ds_label_scores4_w6",
            "ds_label_scores4_w7",
            "ds_label_scores4_w8",
        ];
        let name = NAMES[Labels4::words(r) - 1];
        let (gr, hd, rr) = (
            int(group, "group")?,
            int(head_dim, "head_dim")?,
            int(r, "r")?,
        );
        let (c, a, b_) = (cap as i64, t0 as i64, t1 as i64);
        let qv = q.data.slice(q_row * q.cols..);
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&qv)
            .arg(&chan.data)
            .arg(&gr)
            .arg(&hd)
            .arg(&rr)
            .arg(&labels.codes.data)
            .arg(&labels.params.data);
        b.arg(&c).arg(&a).arg(&b_).arg(&mut scores.data);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256 * DS4_TOK) as u32, heads as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.map_err(Self::launch_err(name))?;
        Ok(())
    }
}
