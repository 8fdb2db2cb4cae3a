//! The offloaded store's label cache on the GPU, in the precision the run asked for
//! (`--label-bits 16|4`): f16 values `[KV head][token][r]`, or 4-bit codes with a per-row f16
//! minimum and scale ([`Labels4`], `kernels/labels.cu`), quantised bit for bit as the CPU
//! `LabelCache` does, so both select the same rows from the same keys.

use farsight_kernels::cuda::{CudaBackend, CudaTensor, DevBuf, KvRows, Labels4, LabelsOut};
use farsight_kernels::Result;
use farsight_offload::sparse::LabelBits;

/// Bytes per (token, KV head) of `r`-channel labels of `bits` on the GPU.
pub fn gpu_label_bytes(bits: LabelBits, r: usize) -> usize {
    match bits {
        LabelBits::B16 => 2 * r,
        LabelBits::B4 => Labels4::row_bytes(r),
    }
}

/// One layer's labels: every KV head, `cap` tokens, `r` channels.
pub enum GpuLabels {
    F16 {
        data: DevBuf<u16>,
        heads: usize,
        cap: usize,
        r: usize,
    },
    B4(Labels4),
}

impl GpuLabels {
    /// Zeroed labels of `bits` for `heads` KV heads x `cap` tokens of `r` channels.
    pub fn new(
        be: &CudaBackend,
        bits: LabelBits,
        heads: usize,
        cap: usize,
        r: usize,
    ) -> Result<GpuLabels> {
        Ok(match bits {
            LabelBits::B16 => GpuLabels::F16 {
                data: be.dev_zeros(heads * cap * r)?,
                heads,
                cap,
                r,
            },
            LabelBits::B4 => GpuLabels::B4(be.labels4(heads, cap, r)?),
        })
    }

    /// Bytes held on the device.
    pub fn bytes(&self) -> usize {
        match self {
            GpuLabels::F16 { data, .. } => data.len * 2,
            GpuLabels::B4(l) => l.bytes(),
        }
    }

    /// Where [`CudaBackend::ds_put_rows`] writes new tokens' labels.
    pub fn out(&mut self) -> LabelsOut<'_> {
        match self {
            GpuLabels::F16 { data, cap, r, .. } => LabelsOut::F16 {
                r: *r,
                labels: data,
                cap: *cap,
            },
            GpuLabels::B4(l) => LabelsOut::B4(l),
        }
    }

    /// Labels of tokens `t0..t1` from the K rows `k` (head `g` of token `t` at `t * tok_stride +
    /// g * head_stride` elements) at the channels `chan`.
    pub fn write_from_cache(
        &mut self,
        be: &CudaBackend,
        k: &KvRows,
        head_stride: usize,
        chan: &DevBuf<i32>,
        t0: usize,
        t1: usize,
    ) -> Result<()> {
        match self {
            GpuLabels::F16 {
                data,
                heads,
                cap,
                r,
            } => be.ds_labels_from_cache(k, *heads, head_stride, chan, *r, t0, t1, data, *cap),
            GpuLabels::B4(l) => be.ds_labels4_from_cache(k, head_stride, chan, t0, t1, l),
        }
    }

    /// Label scores of tokens `t0..t1` (`scores[g][t - t0]`) for the query in row `q_row` of `q`
    /// (the group's query heads summed at the label channels `chan`).
    #[allow(clippy::too_many_arguments)]
    pub fn scores(
        &self,
        be: &CudaBackend,
        q: &CudaTensor,
        q_row: usize,
        chan: &DevBuf<i32>,
        group: usize,
        head_dim: usize,
        t0: usize,
        t1: usize,
        scores: &mut DevBuf<f32>,
    ) -> Result<()> {
        match self {
            GpuLabels::F16 {
                data,
                heads,
                cap,
                r,
            } => be.ds_label_scores_at(
                q, q_row, chan, *heads, group, head_dim, *r, data, *cap, t0, t1, scores,
            ),
            GpuLabels::B4(l) => {
                be.ds_label_scores4_at(q, q_row, chan, group, head_dim, l, t0, t1, scores)
            }
        }
    }
}
