//! Double Sparsity calibration: which channels of each KV head make the best labels.
//!
//! Text runs through the dense model; for every layer, query head `h` and channel `c` the
//! statistic `s[h][c] = mean over tokens |q[h][c] * k[g(h)][c]|` (post-RoPE, each token's query
//! with its own key: the paper's "qk" statistic) is accumulated over every prefill chunk - the
//! public reference code kept only the last block. A KV head's channels are ranked by the sum of
//! `s` over its group's query heads. The file records the model's identity and is refused for
//! any other model.

use std::io::Write;
use std::path::{Path, PathBuf};

use farsight_kernels::{Backend, CausalAttn, DType, Result as KResult};
use farsight_offload::sparse::ChannelRanking;
use farsight_offload::{DenseKvCache, KvStore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::model::{Logits, Model, Segment};
use crate::weights::Weights;

/// File name of the calibration beside the model.
pub const FILE_NAME: &str = "farsight-calibration.json";
const FORMAT: &str = "farsight-double-sparsity-calibration";
const VERSION: u32 = 1;

/// A model's channel ranking and the statistics it came from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Calibration {
    pub format: String,
    pub version: u32,
    /// [`model_identity`] of the model it was made for.
    pub model_identity: String,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Tokens the statistics were accumulated over.
    pub tokens: usize,
    /// Where the text came from (informational).
    pub source: String,
    /// `ranking[layer][kv_head]`: channels, most important first.
    pub ranking: Vec<Vec<Vec<usize>>>,
    /// `scores[layer][head][channel]`: mean |q k| per query head.
    pub scores: Vec<Vec<Vec<f64>>>,
}

/// A hash that tells one checkpoint from another: the config and the bytes of the first and
/// last layers' key projections (cheap to read, different for any two trained models).
pub fn model_identity(dir: &Path, cfg: &ModelConfig) -> Result<String> {
    let config = dir.join("config.json");
    let mut h = Sha256::new();
    h.update(std::fs::read(&config).map_err(|e| EngineError::io(&config, e))?);
    let w = Weights::open(dir)?;
    for l in [0, cfg.num_layers - 1] {
        let m = w.matrix(
            &format!("model.layers.{l}.self_attn.k_proj.weight"),
            cfg.kv_width(),
            cfg.hidden_size,
        )?;
        h.update(m.bytes);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Wraps the dense cache and accumulates `|q * k|` from every row written.
struct Collector<B: Backend> {
    inner: DenseKvCache<B>,
    heads: usize,
    group: usize,
    head_dim: usize,
    /// `sums[layer][head * head_dim + c]`.
    sums: Vec<Vec<f64>>,
    tokens: usize,
}

impl<B: Backend> KvStore<B> for Collector<B> {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn reserve(&mut self, backend: &B, n: usize) -> KResult<()> {
        self.inner.reserve(backend, n)
    }
    /// The model writes `[q | k | v]` rows with `q` from column 0 (see `Model::forward`).
    fn write(
        &mut self,
        be: &B,
        layer: usize,
        src: &B::Tensor,
        row0: usize,
        k_col0: usize,
        v_col0: usize,
        n: usize,
    ) -> KResult<()> {
        let cols = be.tensor_shape(src).1;
        let rows = be.read_rows(src, row0, n)?;
        let d = self.head_dim;
        let sums = &mut self.sums[layer];
        for row in rows.chunks(cols) {
            for h in 0..self.heads {
                let q = &row[h * d..(h + 1) * d];
                let k = &row[k_col0 + (h / self.group) * d..][..d];
                for c in 0..d {
                    sums[h * d + c] += (q[c] as f64 * k[c] as f64).abs();
                }
            }
        }
        if layer == 0 {
            self.tokens += n;
        }
        self.inner.write(be, layer, src, row0, k_col0, v_col0, n)
    }
    fn commit(&mut self, n: usize) {
        self.inner.commit(n)
    }
    fn truncate(&mut self, len: usize) {
        self.inner.truncate(len)
    }
    fn attend(
        &self,
        be: &B,
        layer: usize,
        args: &CausalAttn,
        q: &B::Tensor,
        out: &mut B::Tensor,
    ) -> KResult<()> {
        self.inner.attend(be, layer, args, q, out)
    }
    fn bytes(&self) -> usize {
        self.inner.bytes()
    }
}

/// Runs `tokens` through `model` in `chunk`-token calls and ranks every KV head's channels.
pub fn calibrate<B: Backend>(
    model: &Model<B>,
    identity: String,
    source: String,
    tokens: &[u32],
    chunk: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Calibration> {
    let c = &model.cfg;
    if tokens.is_empty() {
        return Err(EngineError::Invalid(
            "calibration needs at least one token of text".into(),
        ));
    }
    if tokens.len() > c.context_length() {
        return Err(EngineError::PromptTooLong {
            tokens: tokens.len(),
            context: c.context_length(),
        });
    }
    let (h, d) = (c.num_heads, c.head_dim);
    let mut col = Collector {
        inner: DenseKvCache::new(
            &model.backend,
            c.num_layers,
            c.kv_width(),
            DType::F32,
            c.context_length(),
        )?,
        heads: h,
        group: h / c.num_kv_heads,
        head_dim: d,
        sums: vec![vec![0.0; h * d]; c.num_layers],
        tokens: 0,
    };
    let chunk = chunk.max(1);
    let mut ws = model.workspace(chunk.min(tokens.len()), 1)?;
    let mut done = 0;
    for part in tokens.chunks(chunk) {
        let mut segs = [Segment {
            tokens: part,
            kv: &mut col,
            logits: Logits::None,
        }];
        model.forward(&mut ws, &mut segs)?;
        done += part.len();
        progress(done, tokens.len());
    }
    let n = col.tokens as f64;
    let scores: Vec<Vec<Vec<f64>>> = col
        .sums
        .iter()
        .map(|l| {
            l.chunks(d)
                .map(|hc| hc.iter().map(|s| s / n).collect())
                .collect()
        })
        .collect();
    let group = h / c.num_kv_heads;
    let ranking = scores
        .iter()
        .map(|layer| {
            (0..c.num_kv_heads)
                .map(|g| {
                    let total: Vec<f64> = (0..d)
                        .map(|ch| (0..group).map(|j| layer[g * group + j][ch]).sum())
                        .collect();
                    let mut order: Vec<usize> = (0..d).collect();
                    order.sort_by(|&a, &b| total[b].total_cmp(&total[a]).then(a.cmp(&b)));
                    order
                })
                .collect()
        })
        .collect();
    Ok(Calibration {
        format: FORMAT.into(),
        version: VERSION,
        model_identity: identity,
        layers: c.num_layers,
        heads: h,
        kv_heads: c.num_kv_heads,
        head_dim: d,
        tokens: col.tokens,
        source,
        ranking,
        scores,
    })
}

impl Calibration {
    /// The ranking, for a sparse store.
    pub fn channel_ranking(&self) -> ChannelRanking {
        ChannelRanking {
            order: self.ranking.clone(),
        }
    }

    /// Writes the file (to a temporary name first, then renamed: never a half-written file).
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string(self).map_err(|e| EngineError::Invalid(e.to_string()))?;
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            EngineError::io(path, e)
        })
    }

    /// Reads and checks the calibration at `path` for the model `dir` / `cfg`.
    pub fn load(path: &Path, dir: &Path, cfg: &ModelConfig) -> Result<Calibration> {
        let bad = |msg: String| EngineError::Config {
            path: path.to_path_buf(),
            msg,
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(EngineError::Invalid(format!(
                    "double-sparse attention needs a calibration file and {} does not exist; make one with \
                     `farsight calibrate --model {} --text FILE`",
                    path.display(),
                    dir.display()
                )))
            }
            Err(e) => return Err(EngineError::io(path, e)),
        };
        if text.len() > 64 << 20 {
            return Err(bad("calibration file larger than 64 MiB".into()));
        }
        let c: Calibration =
            serde_json::from_str(&text).map_err(|e| bad(format!("not a calibration file: {e}")))?;
        if c.format != FORMAT || c.version != VERSION {
            return Err(bad(format!(
                "format {:?} version {}, expected {FORMAT:?} version {VERSION}",
                c.format, c.version
            )));
        }
        let id = model_identity(dir, cfg)?;
        if c.model_identity != id {
            return Err(bad(format!(
                "made for another model (identity {}…, this model {}…); recalibrate with `farsight calibrate --model {}`",
                &c.model_identity.get(..12).unwrap_or(&c.model_identity),
                &id[..12],
                dir.display()
            )));
        }
        let shape = (c.layers, c.heads, c.kv_heads, c.head_dim);
        let want = (
            cfg.num_layers,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        );
        if shape != want {
            return Err(bad(format!(
                "shape {shape:?} (layers, heads, kv heads, head dim), model {want:?}"
            )));
        }
        c.channel_ranking()
            .top(1, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
            .map_err(|e| bad(e.to_string()))?;
        Ok(c)
    }

    /// Default location: beside the model.
    pub fn default_path(dir: &Path) -> PathBuf {
        dir.join(FILE_NAME)
    }
}
