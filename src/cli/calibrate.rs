//! `farsight calibrate`: rank every KV head's channels for Double Sparsity labels.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use farsight_engine::calibrate::{calibrate, model_identity, Calibration};

use super::common::{read_text, token_progress, with_model, CliError, ModelArgs};

#[derive(Args, Debug)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Calibration text (plain UTF-8).
    #[arg(long)]
    pub text: PathBuf,
    /// Tokens of the text to use (from its start).
    #[arg(long, default_value_t = 4096)]
    pub tokens: usize,
    /// Tokens per forward call.
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// Output file (default: farsight-calibration.json in the model directory).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(a: CalibrateArgs) -> Result<(), CliError> {
    if a.tokens == 0 || a.chunk == 0 {
        return Err(CliError::Usage(
            "--tokens and --chunk must be at least 1".into(),
        ));
    }
    let text = read_text(&a.text)?;
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| Calibration::default_path(&a.model.model));
    let loaded = a.model.load()?;
    let mut ids = loaded.tok.encode(&text)?;
    ids.truncate(a.tokens.min(loaded.model.cfg().context_length()));
    let identity = model_identity(&a.model.model, loaded.model.cfg())?;
    eprintln!(
        "calibrate: model {}, {} tokens of {}, device {}",
        a.model.model.display(),
        ids.len(),
        a.text.display(),
        loaded.model.device_name()
    );
    let pb = token_progress(ids.len(), "calibrate", 1024);
    let source = format!("{} ({} tokens)", a.text.display(), ids.len());
    let cal = with_model!(&loaded.model, m => calibrate(m, identity, source, &ids, a.chunk, &mut |d, _| pb.set_position(d as u64)))?;
    pb.finish_and_clear();
    cal.save(&out)?;
    writeln!(
        std::io::stdout(),
        "wrote {} ({} layers x {} KV heads, {} channels each, {} tokens)",
        out.display(),
        cal.layers,
        cal.kv_heads,
        cal.head_dim,
        cal.tokens
    )
    .map_err(CliError::Output)?;
    Ok(())
}
