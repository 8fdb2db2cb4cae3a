//! The attention flags shared by `generate`, `eval` and `bench`: dense or Double Sparsity.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use farsight_engine::calibrate::Calibration;
use farsight_engine::kv::{Attention, SparseSetup};
use farsight_offload::sparse::{LabelBits, Predict, SparseConfig, TokenBudget};
use farsight_offload::KvStoreSpec;

use super::common::{with_model, AnyModel, CliError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AttentionKind {
    Dense,
    DoubleSparse,
}

/// Attention options.
#[derive(Args, Debug, Clone)]
pub struct SparseArgs {
    /// dense: every KV row; double-sparse: label-selected rows (needs a calibration file).
    #[arg(long, value_enum, default_value = "dense")]
    pub attention: AttentionKind,
    /// Rows attended per KV head: K tokens, or 1/N of the context (sinks and recent included).
    #[arg(long, default_value = "1/16")]
    pub token_budget: TokenBudget,
    /// Label channels per KV head (at most the head dimension).
    #[arg(long, default_value_t = 8)]
    pub label_channels: usize,
    /// Label precision: 16 (f16) or 4 (4-bit with per-row scale).
    #[arg(long, default_value = "16")]
    pub label_bits: LabelBits,
    /// First tokens always attended.
    #[arg(long, default_value_t = 4)]
    pub sink: usize,
    /// Last tokens always attended.
    #[arg(long, default_value_t = 32)]
    pub recent: usize,
    /// Layers that attend densely, e.g. 0,1.
    #[arg(long, value_delimiter = ',')]
    pub dense_layers: Vec<usize>,
    /// Which query selects a layer's rows: same-layer or layer-ahead.
    #[arg(long, default_value = "same-layer")]
    pub predict: Predict,
    /// Where sparse attention keeps KV rows: host (memory) or disk:PATH (a file, O_DIRECT).
    #[arg(long, default_value = "host")]
    pub kv_store: KvStoreSpec,
    /// Calibration file (default: farsight-calibration.json in the model directory).
    #[arg(long)]
    pub calibration: Option<PathBuf>,
}

impl SparseArgs {
    /// The sparse settings (without channels).
    pub fn config(&self) -> SparseConfig {
        SparseConfig {
            budget: self.token_budget,
            label_channels: self.label_channels,
            label_bits: self.label_bits,
            sink: self.sink,
            recent: self.recent,
            dense_layers: self.dense_layers.clone(),
            predict: self.predict,
            sparse_prefill: false,
        }
    }

    /// Resolves the flags for `model` (loaded from `dir`): reads and checks the calibration and
    /// prepares layer-ahead prediction when asked.
    pub fn attention(&self, dir: &std::path::Path, model: &mut AnyModel) -> Result<Attention, CliError> {
        self.attention_with(dir, model, self.config())
    }

    /// As [`SparseArgs::attention`] with explicit settings (sweeps).
    pub fn attention_with(&self, dir: &std::path::Path, model: &mut AnyModel, cfg: SparseConfig) -> Result<Attention, CliError> {
        if self.attention == AttentionKind::Dense {
            if self.kv_store != KvStoreSpec::Host {
                return Err(CliError::Usage(
                    "--kv-store: the dense cache lives in device memory; a host or disk store needs --attention double-sparse".into(),
                ));
            }
            return Ok(Attention::Dense);
        }
        let c = model.cfg().clone();
        if cfg.label_channels == 0 || cfg.label_channels > c.head_dim {
            return Err(CliError::Usage(format!(
                "--label-channels {}: must be between 1 and the head dimension {}",
                cfg.label_channels, c.head_dim
            )));
        }
        if let Some(&l) = cfg.dense_layers.iter().find(|&&l| l >= c.num_layers) {
            return Err(CliError::Usage(format!("--dense-layers: layer {l} does not exist (the model has {})", c.num_layers)));
        }
        let path = self.calibration.clone().unwrap_or_else(|| Calibration::default_path(dir));
        let cal = Calibration::load(&path, dir, &c)?;
        let ranking = cal.channel_ranking();
        if cfg.predict == Predict::LayerAhead {
            let channels = ranking.top(cfg.label_channels, c.num_layers, c.num_kv_heads, c.head_dim)?;
            with_model!(model, m => m.enable_layer_ahead(dir, &channels))?;
        }
        Ok(Attention::DoubleSparse(Box::new(SparseSetup { cfg, ranking, store: self.kv_store.clone() })))
    }
}
