//! The Llama forward pass, written once over a [`Backend`].
//!
//! Read top to bottom: [`Model::load`] maps the checkpoint and uploads each layer (q|k|v fused
//! into one matrix, gate|up into another, so a layer is four matmuls); [`Model::forward`] runs a
//! batch of sequence segments (prefill chunks or single decode tokens) through every layer, the
//! new K/V rows going into each sequence's [`KvStore`], and returns the logits asked for.

use std::path::Path;

use farsight_kernels::{AttnShape, Backend, CausalAttn, DType, HostMatrix, Rope, SampleSpec};
use farsight_offload::KvStore;

use crate::ahead::LayerAhead;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::rope::{rope_for, RopeScaling};
use crate::weights::Weights;

#[path = "synthetic.rs"]
pub mod synthetic;

/// One decoder layer's weights.
struct Layer<B: Backend> {
    attn_norm: B::Tensor,
    /// `[q; k; v]` rows: `(q_width + 2 kv_width) x hidden`.
    qkv: B::Matrix,
    qkv_bias: Option<B::Tensor>,
    o: B::Matrix,
    o_bias: Option<B::Tensor>,
    mlp_norm: B::Tensor,
    /// `[gate; up]` rows: `2 intermediate x hidden`.
    gate_up: B::Matrix,
    down: B::Matrix,
}

/// A loaded model on a backend.
pub struct Model<B: Backend> {
    pub cfg: ModelConfig,
    pub backend: B,
    embed: B::Matrix,
    /// `None` when the output projection is tied to the embedding.
    lm_head: Option<B::Matrix>,
    norm: B::Tensor,
    layers: Vec<Layer<B>>,
    /// Frequencies when they do not depend on the sequence length (all but dynamic scaling).
    static_rope: Option<Rope>,
    weight_dtype: DType,
    weight_bytes: usize,
    /// Label rows of `W_q` for stores that want layer-ahead predictions.
    ahead: Option<LayerAhead<B>>,
}

/// What a segment wants back.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Logits {
    /// Nothing (a prefill chunk that is not the last).
    None,
    /// The last token's logits.
    Last,
    /// Every token's logits (teacher-forced evaluation).
    All,
    /// A token picked from the last token's logits by the backend, where the logits are
    /// ([`Backend::sample_rows`]: on the GPU only the id comes back): prefill end, decode.
    Sample(SampleSpec),
}

impl Logits {
    /// Output rows of a segment of `tokens` new tokens.
    fn rows(self, tokens: usize) -> usize {
        match self {
            Logits::None => 0,
            Logits::Last | Logits::Sample(_) => usize::from(tokens > 0),
            Logits::All => tokens,
        }
    }
}

/// What [`Model::forward`] returns for one segment.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// Nothing was asked for ([`Logits::None`]), or the segment had no tokens.
    Nothing,
    /// `vocab` values per row ([`Logits::Last`]: one row, [`Logits::All`]: one per token).
    Logits(Vec<f32>),
    /// The token picked from the last row ([`Logits::Sample`]).
    Token(u32),
}

impl Output {
    /// The logits; empty unless logits were asked for.
    pub fn into_logits(self) -> Vec<f32> {
        match self {
            Output::Logits(v) => v,
            Output::Nothing | Output::Token(_) => Vec::new(),
        }
    }

    /// The sampled token, if one was asked for.
    pub fn token(&self) -> Option<u32> {
        match self {
            Output::Token(t) => Some(*t),
            Output::Nothing | Output::Logits(_) => None,
        }
    }

    /// The sampled token; an error when the segment asked for something else or had no tokens.
    pub fn into_token(self) -> Result<u32> {
        self.token().ok_or_else(|| {
            EngineError::Invalid("forward: no token was sampled for this segment".into())
        })
    }
}

/// A run of new tokens of one sequence.
pub struct Segment<'a, B: Backend> {
    pub tokens: &'a [u32],
    pub kv: &'a mut dyn KvStore<B>,
    pub logits: Logits,
}

/// Activation buffers reused across calls (allocated for `rows` tokens, grown on demand).
pub struct Workspace<B: Backend> {
    rows: usize,
    logit_rows: usize,
    h: B::Tensor,
    xn: B::Tensor,
    qkv: B::Tensor,
    attn: B::Tensor,
    proj: B::Tensor,
    gate_up: B::Tensor,
    act: B::Tensor,
    sel: B::Tensor,
    logits: B::Tensor,
    /// Layer-ahead label-row outputs (allocated on first use).
    ahead: Option<B::Tensor>,
}

fn fuse(parts: &[HostMatrix<'_>], what: &str) -> Result<(Vec<u8>, usize, usize, DType)> {
    let dtype = parts[0].dtype;
    let cols = parts[0].cols;
    for p in parts {
        if p.dtype != dtype || p.cols != cols {
            return Err(EngineError::Unsupported(format!(
                "{what}: projections of different dtypes or widths ({} {}x{} vs {} {}x{})",
                dtype, parts[0].rows, cols, p.dtype, p.rows, p.cols
            )));
        }
    }
    let rows = parts.iter().map(|p| p.rows).sum();
    let mut bytes = Vec::with_capacity(parts.iter().map(|p| p.bytes.len()).sum());
    for p in parts {
        bytes.extend_from_slice(p.bytes);
    }
    Ok((bytes, rows, cols, dtype))
}

impl<B: Backend> Model<B> {
    /// Loads a Hugging Face model directory onto `backend`.
    pub fn load(dir: &Path, backend: B) -> Result<Model<B>> {
        let cfg = ModelConfig::from_dir(dir)?;
        let w = Weights::open(dir)?;
        let (hd, vocab, inter) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let (qw, kvw) = (cfg.q_width(), cfg.kv_width());
        let vector = |name: &str| -> Result<B::Tensor> {
            let v = w.vector(name, hd)?;
            let mut t = backend.tensor(1, hd)?;
            backend.write_tensor(&mut t, 0, &v)?;
            Ok(t)
        };
        let embed_view = w.matrix("model.embed_tokens.weight", vocab, hd)?;
        let weight_dtype = embed_view.dtype;
        let embed = backend.upload_matrix(embed_view)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(backend.upload_matrix(w.matrix("lm_head.weight", vocab, hd)?)?)
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let (bytes, rows, cols, dtype) = fuse(
                &[
                    w.matrix(&format!("{p}.self_attn.q_proj.weight"), qw, hd)?,
                    w.matrix(&format!("{p}.self_attn.k_proj.weight"), kvw, hd)?,
                    w.matrix(&format!("{p}.self_attn.v_proj.weight"), kvw, hd)?,
                ],
                "q/k/v",
            )?;
            let qkv = backend.upload_matrix(HostMatrix {
                rows,
                cols,
                dtype,
                bytes: &bytes,
            })?;
            let qkv_bias = if cfg.qkv_bias {
                let mut b = w.vector(&format!("{p}.self_attn.q_proj.bias"), qw)?;
                b.extend(w.vector(&format!("{p}.self_attn.k_proj.bias"), kvw)?);
                b.extend(w.vector(&format!("{p}.self_attn.v_proj.bias"), kvw)?);
                let mut t = backend.tensor(1, b.len())?;
                backend.write_tensor(&mut t, 0, &b)?;
                Some(t)
            } else {
                None
            };
            let o_bias = if cfg.o_bias {
                let b = w.vector(&format!("{p}.self_attn.o_proj.bias"), hd)?;
                let mut t = backend.tensor(1, hd)?;
                backend.write_tensor(&mut t, 0, &b)?;
                Some(t)
            } else {
                None
            };
            let (bytes, rows, cols, dtype) = fuse(
                &[
                    w.matrix(&format!("{p}.mlp.gate_proj.weight"), inter, hd)?,
                    w.matrix(&format!("{p}.mlp.up_proj.weight"), inter, hd)?,
                ],
                "gate/up",
            )?;
            let gate_up = backend.upload_matrix(HostMatrix {
                rows,
                cols,
                dtype,
                bytes: &bytes,
            })?;
            layers.push(Layer {
                attn_norm: vector(&format!("{p}.input_layernorm.weight"))?,
                qkv,
                qkv_bias,
                o: backend.upload_matrix(w.matrix(
                    &format!("{p}.self_attn.o_proj.weight"),
                    hd,
                    qw,
                )?)?,
                o_bias,
                mlp_norm: vector(&format!("{p}.post_attention_layernorm.weight"))?,
                gate_up,
                down: backend.upload_matrix(w.matrix(
                    &format!("{p}.mlp.down_proj.weight"),
                    hd,
                    inter,
                )?)?,
            });
        }
        let norm = vector("model.norm.weight")?;
        let static_rope = match cfg.rope_scaling {
            RopeScaling::Dynamic { .. } => None,
            _ => Some(rope_for(cfg.rope_theta, cfg.head_dim, &cfg.rope_scaling, 0)),
        };
        Ok(Model {
            weight_bytes: w.total_bytes(),
            cfg,
            backend,
            embed,
            lm_head,
            norm,
            layers,
            static_rope,
            weight_dtype,
            ahead: None,
        })
    }

    /// Prepares layer-ahead prediction for stores whose label channels are `channels`
    /// (`[layer][kv_head]`), cutting the label rows out of the loaded `W_q` matrices.
    pub fn enable_layer_ahead(&mut self, channels: &[Vec<Vec<usize>>]) -> Result<()> {
        if self.ahead.as_ref().is_some_and(|a| a.channels == channels) {
            return Ok(());
        }
        let qkv: Vec<_> = self
            .layers
            .iter()
            .map(|l| (&l.qkv, l.qkv_bias.as_ref()))
            .collect();
        self.ahead = Some(LayerAhead::new(&self.cfg, &self.backend, channels, &qkv)?);
        Ok(())
    }

    /// Predicts layer `next`'s query labels from `ws.xn` (the previous layer's normed input)
    /// for every segment whose store asks for it.
    fn predict_ahead(
        &self,
        ws: &mut Workspace<B>,
        segs: &mut [Segment<'_, B>],
        row0: &[usize],
        positions: &[u32],
        next: usize,
        rope: &Rope,
    ) -> Result<()> {
        if next >= self.layers.len() || !segs.iter().any(|s| s.kv.ahead_channels().is_some()) {
            return Ok(());
        }
        let ahead = self.ahead.as_ref().ok_or_else(|| {
            EngineError::Invalid(
                "layer-ahead prediction asked for, but the model has no label rows".into(),
            )
        })?;
        let Some(m) = ahead.rows(next) else {
            return Ok(());
        };
        let be = &self.backend;
        let n: usize = segs.iter().map(|s| s.tokens.len()).sum();
        let width = ahead.width(self.cfg.num_heads);
        let fits = ws.ahead.as_ref().is_some_and(|t| be.tensor_shape(t).0 >= n);
        if !fits {
            ws.ahead = Some(be.tensor(ws.rows.max(n), width)?);
        }
        let out = ws.ahead.as_mut().expect("allocated above");
        be.matmul(&ws.xn, m, ahead.bias(next), out, n)?;
        let mut raw = None;
        for (s, &r0) in segs.iter_mut().zip(row0) {
            match s.kv.ahead_channels() {
                None => continue,
                Some(ch) if ch != &ahead.channels[..] => {
                    return Err(EngineError::Invalid(
                        "store and model disagree on the label channels".into(),
                    ));
                }
                Some(_) => {}
            }
            let len = s.tokens.len();
            if s.kv
                .predict_raw(be, next, out, r0, len, positions[r0], rope)?
            {
                continue;
            }
            if raw.is_none() {
                raw = Some(be.read_rows(out, 0, n)?);
            }
            let raw = raw.as_deref().expect("read above");
            let mut q_hat =
                Vec::with_capacity(len * self.cfg.num_heads * ahead.channels[next][0].len());
            for i in r0..r0 + len {
                ahead.rotate(
                    &self.cfg,
                    next,
                    &raw[i * width..(i + 1) * width],
                    positions[i],
                    rope,
                    &mut q_hat,
                );
            }
            s.kv.predict(next, &q_hat, len)?;
        }
        Ok(())
    }

    /// Dtype of the stored weights.
    pub fn weight_dtype(&self) -> DType {
        self.weight_dtype
    }

    /// Bytes of weights in the checkpoint.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// The attention shape of every layer.
    pub fn attn_shape(&self) -> AttnShape {
        AttnShape {
            n_heads: self.cfg.num_heads,
            n_kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            window: self.cfg.sliding_window,
        }
    }

    /// Bytes of f32 buffers a [`Model::workspace`] of this size holds.
    pub fn workspace_bytes(&self, rows: usize, logit_rows: usize) -> usize {
        let c = &self.cfg;
        let per_row = 3 * c.hidden_size
            + c.q_width()
            + 2 * c.kv_width()
            + c.q_width()
            + 3 * c.intermediate_size;
        4 * (rows.max(1) * per_row + logit_rows.max(1) * (c.hidden_size + c.vocab_size))
    }

    /// Buffers for up to `rows` tokens per call and `logit_rows` logit rows.
    pub fn workspace(&self, rows: usize, logit_rows: usize) -> Result<Workspace<B>> {
        let be = &self.backend;
        let c = &self.cfg;
        let rows = rows.max(1);
        let logit_rows = logit_rows.max(1);
        Ok(Workspace {
            rows,
            logit_rows,
            h: be.tensor(rows, c.hidden_size)?,
            xn: be.tensor(rows, c.hidden_size)?,
            qkv: be.tensor(rows, c.q_width() + 2 * c.kv_width())?,
            attn: be.tensor(rows, c.q_width())?,
            proj: be.tensor(rows, c.hidden_size)?,
            gate_up: be.tensor(rows, 2 * c.intermediate_size)?,
            act: be.tensor(rows, c.intermediate_size)?,
            sel: be.tensor(logit_rows, c.hidden_size)?,
            logits: be.tensor(logit_rows, c.vocab_size)?,
            ahead: None,
        })
    }

    /// Runs the segments' new tokens through the model, appending their K/V rows to each
    /// segment's store. Returns, per segment, what it asked for (see [`Logits`]).
    pub fn forward(
        &self,
        ws: &mut Workspace<B>,
        segs: &mut [Segment<'_, B>],
    ) -> Result<Vec<Output>> {
        let be = &self.backend;
        let c = &self.cfg;
        let n: usize = segs.iter().map(|s| s.tokens.len()).sum();
        let n_logits: usize = segs.iter().map(|s| s.logits.rows(s.tokens.len())).sum();
        if n == 0 {
            return Ok(segs.iter().map(|_| Output::Nothing).collect());
        }
        if n > ws.rows || n_logits > ws.logit_rows {
            *ws = self.workspace(n.max(ws.rows), n_logits.max(ws.logit_rows))?;
        }

        // Token ids, positions and each segment's first row.
        let mut ids = Vec::with_capacity(n);
        let mut positions = Vec::with_capacity(n);
        let mut row0 = Vec::with_capacity(segs.len());
        for s in segs.iter_mut() {
            if s.kv.len() + s.tokens.len() > c.context_length() {
                return Err(EngineError::PromptTooLong {
                    tokens: s.kv.len() + s.tokens.len(),
                    context: c.context_length(),
                });
            }
            row0.push(ids.len());
            let p0 = s.kv.len() as u32;
            positions.extend((0..s.tokens.len() as u32).map(|i| p0 + i));
            ids.extend_from_slice(s.tokens);
            s.kv.reserve(be, s.tokens.len())?;
        }
        let dynamic_rope;
        let rope = match &self.static_rope {
            Some(r) => r,
            None => {
                let seq_len = positions.iter().max().map_or(0, |&p| p as usize + 1);
                dynamic_rope = rope_for(c.rope_theta, c.head_dim, &c.rope_scaling, seq_len);
                &dynamic_rope
            }
        };

        let shape = self.attn_shape();
        let (qw, kvw) = (c.q_width(), c.kv_width());
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        be.embedding(&self.embed, &ids, &mut ws.h)?;
        for (l, layer) in self.layers.iter().enumerate() {
            // Attention block.
            be.rms_norm(&ws.h, &layer.attn_norm, c.rms_norm_eps, &mut ws.xn, n)?;
            self.predict_ahead(ws, segs, &row0, &positions, l + 1, rope)?;
            be.matmul(&ws.xn, &layer.qkv, layer.qkv_bias.as_ref(), &mut ws.qkv, n)?;
            be.rope(&mut ws.qkv, 0, c.num_heads, c.head_dim, &positions, rope)?;
            be.rope(
                &mut ws.qkv,
                qw,
                c.num_kv_heads,
                c.head_dim,
                &positions,
                rope,
            )?;
            for (s, &r0) in segs.iter_mut().zip(&row0) {
                let len = s.tokens.len();
                if len == 0 {
                    continue;
                }
                s.kv.write(be, l, &ws.qkv, r0, qw, qw + kvw, len)?;
                let args = CausalAttn {
                    shape,
                    q_row0: r0,
                    q_col0: 0,
                    n_q: len,
                    n_past: s.kv.len(),
                    out_row0: r0,
                    scale,
                };
                s.kv.attend(be, l, &args, &ws.qkv, &mut ws.attn)?;
            }
            be.matmul(&ws.attn, &layer.o, layer.o_bias.as_ref(), &mut ws.proj, n)?;
            be.add(&mut ws.h, &ws.proj, n)?;
            // MLP block.
            be.rms_norm(&ws.h, &layer.mlp_norm, c.rms_norm_eps, &mut ws.xn, n)?;
            be.matmul(&ws.xn, &layer.gate_up, None, &mut ws.gate_up, n)?;
            be.silu_mul(&ws.gate_up, &mut ws.act, n)?;
            be.matmul(&ws.act, &layer.down, None, &mut ws.proj, n)?;
            be.add(&mut ws.h, &ws.proj, n)?;
        }
        for s in segs.iter_mut() {
            s.kv.commit(s.tokens.len());
        }

        // Final norm and output projection on the rows whose output is wanted: the rows to
        // sample first (`sample_rows` takes the leading rows), then those whose logits go back.
        let mut specs = Vec::new();
        let mut wanted = Vec::with_capacity(n_logits);
        for (s, &r0) in segs.iter().zip(&row0) {
            if let (Logits::Sample(spec), Some(last)) = (s.logits, s.tokens.len().checked_sub(1)) {
                specs.push(spec);
                wanted.push(r0 + last);
            }
        }
        for (s, &r0) in segs.iter().zip(&row0) {
            match s.logits {
                Logits::Last => wanted.extend((r0..r0 + s.tokens.len()).last()),
                Logits::All => wanted.extend(r0..r0 + s.tokens.len()),
                Logits::None | Logits::Sample(_) => {}
            }
        }
        if wanted.is_empty() {
            return Ok(segs.iter().map(|_| Output::Nothing).collect());
        }
        be.gather_rows(&ws.h, &wanted, &mut ws.sel, 0)?;
        let m = wanted.len();
        be.rms_norm(&ws.sel, &self.norm, c.rms_norm_eps, &mut ws.xn, m)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        be.matmul(&ws.xn, head, None, &mut ws.logits, m)?;
        let mut tokens = be.sample_rows(&ws.logits, &specs)?.into_iter();
        let logits = if m > specs.len() {
            be.read_rows(&ws.logits, specs.len(), m - specs.len())?
        } else {
            Vec::new()
        };
        let v = c.vocab_size;
        let mut at = 0;
        let mut out = Vec::with_capacity(segs.len());
        for s in segs.iter() {
            let k = s.logits.rows(s.tokens.len());
            out.push(match s.logits {
                _ if k == 0 => Output::Nothing,
                Logits::Sample(_) => Output::Token(tokens.next().ok_or_else(|| {
                    EngineError::Invalid("the backend sampled fewer rows than asked".into())
                })?),
                _ => {
                    at += k;
                    Output::Logits(logits[(at - k) * v..at * v].to_vec())
                }
            });
        }
        Ok(out)
    }
}
