//! Layer-ahead prediction of Double Sparsity's query labels (ALGORITHMS.md section 1).
//!
//! While layer `l` runs, the query labels of layer `l + 1` are predicted from layer `l`'s
//! attention-normed input: `q_hat = W_q^{l+1}[label rows] x`, rotated at the token's position.
//! RoPE mixes channel `c` with its partner `c +- head_dim/2`, so each label channel needs two
//! rows of `W_q`; [`LayerAhead`] keeps, per layer, the `2 r` rows of every query head in one
//! small matrix (values first, partners second), and the rotation is applied on the host.

use farsight_kernels::{Backend, Rope};

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};

/// Leading layers that select on their own query (synchronously) even with layer-ahead
/// prediction: layer 0 has no layer before it, and layer 1's prediction from the raw embeddings
/// is poor (on SmolLM2-135M: recall 0.17, and 0.10-0.19 of its rows reused from step to step,
/// against 0.9 and 0.7 for the other layers; BENCHMARKS.md).
pub const SAME_LAYER_LEADING: usize = 2;

/// The `W_q` label rows of every layer past the first [`SAME_LAYER_LEADING`].
pub struct LayerAhead<B: Backend> {
    /// `channels[layer][kv_head]`: the label channels the rows were cut for.
    pub channels: Vec<Vec<Vec<usize>>>,
    /// `rows[layer]`: `n_heads * 2r` rows of `W_q` (`None` for the leading layers).
    rows: Vec<Option<B::Matrix>>,
    /// The matching entries of the query bias (Qwen2), same order, where the weights live: the
    /// label-row matmul adds them, so its output is the query's label values before RoPE.
    bias: Vec<Option<B::Tensor>>,
    r: usize,
}

impl<B: Backend> LayerAhead<B> {
    /// Cuts the label rows for `channels` out of every layer's fused `[q; k; v]` matrix (and
    /// query bias), where the weights live.
    pub fn new(
        cfg: &ModelConfig,
        backend: &B,
        channels: &[Vec<Vec<usize>>],
        qkv: &[(&B::Matrix, Option<&B::Tensor>)],
    ) -> Result<LayerAhead<B>> {
        let (d, group) = (cfg.head_dim, cfg.num_heads / cfg.num_kv_heads);
        let r = channels
            .first()
            .and_then(|l| l.first())
            .map_or(0, |c| c.len());
        if channels.len() != cfg.num_layers || qkv.len() != cfg.num_layers || r == 0 {
            return Err(EngineError::Invalid(
                "layer-ahead channels do not fit the model".into(),
            ));
        }
        let lead = SAME_LAYER_LEADING.min(cfg.num_layers);
        let mut rows: Vec<Option<B::Matrix>> = (0..lead).map(|_| None).collect();
        let mut bias: Vec<Option<B::Tensor>> = (0..lead).map(|_| None).collect();
        for (l, layer_channels) in channels.iter().enumerate().skip(lead) {
            let mut idx = Vec::with_capacity(cfg.num_heads * 2 * r);
            for h in 0..cfg.num_heads {
                let ch = &layer_channels[h / group];
                for partner in [false, true] {
                    idx.extend(
                        ch.iter()
                            .map(|&c| h * d + if partner { (c + d / 2) % d } else { c }),
                    );
                }
            }
            let (m, qb) = qkv[l];
            rows.push(Some(backend.matrix_rows(m, &idx)?));
            bias.push(match qb {
                Some(t) => {
                    let all = backend.read_rows(t, 0, 1)?;
                    let picked: Vec<f32> = idx.iter().map(|&i| all[i]).collect();
                    let mut b = backend.tensor(1, picked.len())?;
                    backend.write_tensor(&mut b, 0, &picked)?;
                    Some(b)
                }
                None => None,
            });
        }
        Ok(LayerAhead {
            channels: channels.to_vec(),
            rows,
            bias,
            r,
        })
    }

    /// Output columns of a layer's label-row matmul.
    pub fn width(&self, n_heads: usize) -> usize {
        n_heads * 2 * self.r
    }

    /// Layer `layer`'s label rows (`None` for the leading layers, which select on their own query).
    pub fn rows(&self, layer: usize) -> Option<&B::Matrix> {
        self.rows.get(layer).and_then(|m| m.as_ref())
    }

    /// Layer `layer`'s query-bias entries in the rows' order (Qwen2), if any: the bias of the
    /// label-row matmul.
    pub fn bias(&self, layer: usize) -> Option<&B::Tensor> {
        self.bias.get(layer).and_then(|b| b.as_ref())
    }

    /// Turns one token's raw matmul output (`n_heads * 2r` values, the bias included) for layer
    /// `layer` into rotated label values (`n_heads * r`), appended to `out`.
    pub fn rotate(
        &self,
        cfg: &ModelConfig,
        layer: usize,
        raw: &[f32],
        pos: u32,
        rope: &Rope,
        out: &mut Vec<f32>,
    ) {
        let (d, r, group) = (cfg.head_dim, self.r, cfg.num_heads / cfg.num_kv_heads);
        for h in 0..cfg.num_heads {
            let base = h * 2 * r;
            for (j, &c) in self.channels[layer][h / group].iter().enumerate() {
                let at = |i: usize| raw[base + i];
                let (x, partner) = (at(j), at(r + j));
                let angle = pos as f32 * rope.inv_freq[c % (d / 2)];
                let (sin, cos) = angle.sin_cos();
                let (sin, cos) = (sin * rope.attention_scaling, cos * rope.attention_scaling);
                out.push(if c < d / 2 {
                    x * cos - partner * sin
                } else {
                    x * cos + partner * sin
                });
            }
        }
    }
}
