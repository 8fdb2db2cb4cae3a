//! Options shared by the commands: model directory, device, threads, KV dtype; loading.

use std::path::{Path, PathBuf};

use clap::Args;
use farsight_engine::{EngineError, Model, TextTokenizer};
use farsight_kernels::cpu::CpuBackend;
use farsight_kernels::cuda::CudaBackend;
use farsight_kernels::{Backend, DType};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

/// The embedded default model, made by `scripts/fetch-model.sh`.
pub const DEFAULT_MODEL: &str = "models/smollm2-135m-instruct";

/// A command failed; the message is one line.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Kernel(#[from] farsight_kernels::KernelError),
    #[error("{0}")]
    Usage(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing output: {0}")]
    Output(std::io::Error),
}

impl CliError {
    pub fn io(path: &Path, source: std::io::Error) -> CliError {
        CliError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Where to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

fn parse_device(s: &str) -> Result<Device, String> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(Device::Cuda(n)),
            _ => Err(format!("`{s}` is not a device (cpu, cuda, cuda:N)")),
        },
    }
}

fn parse_kv_dtype(s: &str) -> Result<DType, String> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        _ => Err(format!("`{s}` is not a KV dtype (f32, f16, bf16)")),
    }
}

/// Model and device options of every command that runs a model.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
    /// CPU threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Element type of the KV cache.
    #[arg(long, default_value = "f16", value_parser = parse_kv_dtype)]
    pub kv_dtype: DType,
}

/// A model on one of the backends.
pub enum AnyModel {
    Cpu(Model<CpuBackend>),
    Cuda(Model<CudaBackend>),
}

/// Runs `$body` with `$m` bound to the concrete `&Model<B>` inside an [`AnyModel`].
macro_rules! with_model {
    ($any:expr, $m:ident => $body:expr) => {
        match $any {
            $crate::cli::common::AnyModel::Cpu($m) => $body,
            $crate::cli::common::AnyModel::Cuda($m) => $body,
        }
    };
}
pub(crate) use with_model;

impl AnyModel {
    pub fn cfg(&self) -> &farsight_engine::ModelConfig {
        with_model!(self, m => &m.cfg)
    }
    pub fn device_name(&self) -> String {
        with_model!(self, m => m.backend.name())
    }
    pub fn weight_dtype(&self) -> DType {
        with_model!(self, m => m.weight_dtype())
    }
    /// Free memory of the GPU the model runs on (`None` on the CPU, whose memory is the host's).
    pub fn device_free_memory(&self) -> Option<usize> {
        match self {
            AnyModel::Cpu(_) => None,
            AnyModel::Cuda(m) => m.backend.free_memory().ok(),
        }
    }
}

/// A loaded model and its tokenizer.
pub struct Loaded {
    pub model: AnyModel,
    pub tok: TextTokenizer,
}

impl ModelArgs {
    /// Checks the directory and device, then loads model and tokenizer.
    pub fn load(&self) -> Result<Loaded, CliError> {
        let model = self.load_model()?;
        let tok = TextTokenizer::from_dir(&self.model, &model.cfg().eos_token_ids)?;
        Ok(Loaded { model, tok })
    }

    /// Checks the directory and device, then loads the model alone (no tokenizer needed).
    pub fn load_model(&self) -> Result<AnyModel, CliError> {
        if !self.model.is_dir() {
            let hint = if self.model == Path::new(DEFAULT_MODEL) {
                "; fetch the default model with scripts/fetch-model.sh".to_string()
            } else {
                String::new()
            };
            return Err(EngineError::MissingModel {
                path: self.model.clone(),
                hint,
            }
            .into());
        }
        let model = match self.device {
            Device::Cpu => AnyModel::Cpu(Model::load(&self.model, CpuBackend::new(self.threads)?)?),
            Device::Cuda(n) => {
                let be = CudaBackend::new(n)
                    .map_err(|e| CliError::Usage(format!("--device cuda:{n}: {e}")))?;
                AnyModel::Cuda(Model::load(&self.model, be)?)
            }
        };
        Ok(model)
    }
}

/// A progress bar on stderr for `total` tokens: done/total, tokens/s and the ETA; hidden when
/// stderr is not a terminal or the work is short.
pub fn token_progress(total: usize, what: &str, min_tokens: usize) -> ProgressBar {
    if total < min_tokens {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{what} [{{elapsed_precise}}] {{bar:40}} {{pos}}/{{len}} tokens, {{tps}}, ETA {{eta_precise}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .with_key("tps", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = w.write_fmt(format_args!("{:.0} tok/s", s.per_sec()));
        }),
    );
    pb
}

/// Progress of a prefill of at least `min_tokens` tokens: the bar of [`token_progress`] while it
/// runs (on a terminal), then one line on stderr: tokens, seconds, tokens/s.
pub struct PrefillProgress {
    pb: ProgressBar,
    start: std::time::Instant,
    summary: bool,
}

impl PrefillProgress {
    pub fn new(total: usize, min_tokens: usize) -> PrefillProgress {
        let pb = token_progress(total, "prefill", min_tokens);
        if !pb.is_hidden() {
            pb.enable_steady_tick(std::time::Duration::from_millis(500));
        }
        PrefillProgress {
            pb,
            start: std::time::Instant::now(),
            summary: total >= min_tokens,
        }
    }

    /// `done` of `total` prompt tokens are in (0 when the prefill starts).
    pub fn update(&mut self, done: usize, total: usize) {
        if done == 0 {
            self.start = std::time::Instant::now();
            self.pb.reset();
        }
        self.pb.set_position(done as u64);
        if done == total && !self.pb.is_finished() {
            self.pb.finish_and_clear();
            let s = self.start.elapsed().as_secs_f64();
            if self.summary {
                eprintln!(
                    "prefill: {total} tokens in {s:.1} s, {:.1} tok/s",
                    total as f64 / s.max(1e-9)
                );
            }
        }
    }
}

/// Reads a UTF-8 text file with a clear error.
pub fn read_text(path: &Path) -> Result<String, CliError> {
    std::fs::read_to_string(path).map_err(|e| CliError::io(path, e))
}
