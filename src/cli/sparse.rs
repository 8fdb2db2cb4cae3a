//! The attention flags shared by `generate`, `eval` and `bench`: dense or Double Sparsity.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use farsight_engine::calibrate::Calibration;
use farsight_engine::kv::{full_kv_bytes, label_bytes_per_token};
use farsight_engine::kv::{Attention, SparseSetup};
use farsight_offload::sparse::{
    EvictConfig, HostKvBudget, LabelBits, Predict, SparseConfig, TokenBudget,
};
use farsight_offload::KvStoreSpec;

use super::common::{with_model, AnyModel, CliError, ModelArgs};

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
    /// Row cache per (layer, KV head) in multiples of the rows a query selects: with --device
    /// cuda the GPU's (1 holds exactly the current selection), on the CPU one in memory in front
    /// of --kv-store disk (1: none). Larger caches also keep rows recent steps selected (least
    /// recently selected evicted first), so fewer rows are fetched from host memory or disk.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub row_cache: u32,
    /// Tokens per selection unit: 1 selects single tokens; P > 1 selects the budget's `k / P`
    /// aligned pages of P positions (wholly between the sinks and the recent window) with the
    /// best label scores, whole: fetch units of P rows, what the GPU's host gathers and disk
    /// reads need (with `--device cuda`: host tier only).
    #[arg(long, default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=farsight_offload::sparse::MAX_PAGE_TOKENS as i64))]
    pub page_tokens: u32,
    /// Calibration file (default: farsight-calibration.json in the model directory).
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// Cap on the sparse store's rows + labels, enforced by Scissorhands eviction: bytes (2GiB,
    /// 512MiB) or a fraction (0.25, 1/4) of the full KV of the run's planned tokens (generate:
    /// prompt + max new tokens; eval: the evaluated tokens, or each passkey length + its answer;
    /// bench: each context + new tokens; report memory: --context).
    #[arg(long)]
    pub host_kv_budget: Option<HostKvBudget>,
    /// History window of the unimportance counters (forward calls).
    #[arg(long, default_value_t = 32)]
    pub evict_window: usize,
    /// A token is unimportant to a query when its attention weight is below THRESHOLD/t.
    #[arg(long, default_value_t = 1.0)]
    pub evict_threshold: f32,
    /// Fraction of the budget's tokens evicted per batch.
    #[arg(long, default_value_t = 0.05)]
    pub evict_batch: f64,
    /// Accept up to N tokens of context, past the model's trained context (RoPE extends; quality
    /// past the trained length is not claimed: for memory tests of long ingestion).
    #[arg(long)]
    pub context_override: Option<usize>,
    /// Print the memory footprint per tier (and the peak RSS) at the end, on stderr.
    #[arg(long)]
    pub report_memory: bool,
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
            evict: None,
            page_tokens: self.page_tokens as usize,
            row_cache: self.row_cache as usize,
        }
    }

    /// Applies `--context-override` to the loaded model (once, before anything sizes a cache).
    pub fn apply_context(&self, model: &mut AnyModel) -> Result<(), CliError> {
        let Some(n) = self.context_override else {
            return Ok(());
        };
        let trained = model.cfg().context_length();
        with_model!(model, m => m.cfg.max_position_embeddings = n);
        if model.cfg().context_length() != n {
            return Err(CliError::Usage("--context-override: the model's RoPE scaling depends on the context; not supported".into()));
        }
        if n > trained {
            eprintln!("warning: --context-override {n} exceeds the trained context {trained}: outputs past {trained} are not meaningful");
        }
        Ok(())
    }

    /// The eviction settings for a run of at most `planned` tokens, printing the resolved budget.
    fn evict(
        &self,
        model: &AnyModel,
        kv_dtype: farsight_kernels::DType,
        cfg: &SparseConfig,
        planned: usize,
    ) -> Result<Option<EvictConfig>, CliError> {
        let Some(b) = self.host_kv_budget else {
            return Ok(None);
        };
        if self.evict_window == 0
            || self.evict_threshold.is_nan()
            || self.evict_threshold < 0.0
            || !(0.0..=1.0).contains(&self.evict_batch)
        {
            return Err(CliError::Usage(
                "--evict-window must be >= 1, --evict-threshold >= 0, --evict-batch in [0, 1]"
                    .into(),
            ));
        }
        let c = model.cfg();
        let full = full_kv_bytes(c, kv_dtype, planned);
        let bytes = b.resolve(full);
        let per_token = full_kv_bytes(c, kv_dtype, 1) + label_bytes_per_token(c, cfg);
        eprintln!(
            "host KV budget: {bytes} bytes ({b} of a {full}-byte full KV of {planned} tokens; rows + labels of ~{} tokens)",
            bytes / per_token
        );
        Ok(Some(EvictConfig {
            window: self.evict_window,
            threshold: self.evict_threshold,
            batch: self.evict_batch,
            ..EvictConfig::new(bytes)
        }))
    }

    /// Resolves the flags for `model` (loaded from `dir`) for a run of at most `planned` tokens
    /// (what a budget given as a fraction is a fraction of): reads and checks the calibration and
    /// prepares layer-ahead prediction when asked.
    pub fn attention_planned(
        &self,
        margs: &ModelArgs,
        model: &mut AnyModel,
        planned: usize,
    ) -> Result<Attention, CliError> {
        self.attention_with(margs, model, self.config(), planned)
    }

    /// `attention` (resolved by these flags) with its byte budget re-resolved for a run of at
    /// most `planned` tokens, printing it: commands that run several lengths (`eval passkey`,
    /// `bench`) budget each length as a fraction of its own full KV.
    pub fn budget_for(
        &self,
        margs: &ModelArgs,
        model: &AnyModel,
        attention: &Attention,
        planned: usize,
    ) -> Result<Attention, CliError> {
        match attention {
            Attention::DoubleSparse(s) if self.host_kv_budget.is_some() => {
                let mut s = s.clone();
                s.cfg.evict = self.evict(model, margs.kv_dtype, &s.cfg, planned)?;
                Ok(Attention::DoubleSparse(s))
            }
            a => Ok(a.clone()),
        }
    }

    /// A name for `attention` that is the same at every planned length: its settings with the
    /// budget as given on the command line (not the bytes it resolves to).
    pub fn label(&self, attention: &Attention) -> String {
        match attention {
            Attention::Dense => "dense".into(),
            Attention::DoubleSparse(s) => {
                let mut cfg = s.cfg.clone();
                cfg.evict = None;
                match self.host_kv_budget {
                    Some(b) => format!("{cfg} store {} host-kv-budget {b}", s.store),
                    None => format!("{cfg} store {}", s.store),
                }
            }
        }
    }

    /// As [`SparseArgs::attention_planned`] with explicit settings (sweeps).
    pub fn attention_with(
        &self,
        margs: &ModelArgs,
        model: &mut AnyModel,
        mut cfg: SparseConfig,
        planned: usize,
    ) -> Result<Attention, CliError> {
        let dir = margs.model.as_path();
        self.apply_context(model)?;
        if self.attention == AttentionKind::Dense {
            if self.host_kv_budget.is_some() {
                return Err(CliError::Usage(
                    "--host-kv-budget: eviction ranks tokens by the sparse store's scores; pass --attention double-sparse".into(),
                ));
            }
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
            return Err(CliError::Usage(format!(
                "--dense-layers: layer {l} does not exist (the model has {})",
                c.num_layers
            )));
        }
        cfg.evict = self.evict(model, margs.kv_dtype, &cfg, planned)?;
        let path = self
            .calibration
            .clone()
            .unwrap_or_else(|| Calibration::default_path(dir));
        let cal = Calibration::load(&path, dir, &c)?;
        let ranking = cal.channel_ranking();
        if cfg.predict == Predict::LayerAhead {
            let channels =
                ranking.top(cfg.label_channels, c.num_layers, c.num_kv_heads, c.head_dim)?;
            with_model!(model, m => m.enable_layer_ahead(&channels))?;
        }
        Ok(Attention::DoubleSparse(Box::new(SparseSetup {
            cfg,
            ranking,
            store: self.kv_store.clone(),
            capacity: Some(planned),
        })))
    }
}
