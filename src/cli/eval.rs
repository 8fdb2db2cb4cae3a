//! `farsight eval`: accuracy measurements.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use farsight_engine::eval::perplexity;

use super::common::{read_text, token_progress, with_model, CliError, ModelArgs};

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// Perplexity of the first N tokens of a text file, teacher-forced.
    Ppl(PplArgs),
}

#[derive(Args, Debug)]
pub struct PplArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text file.
    #[arg(long)]
    pub text: PathBuf,
    /// Tokens to evaluate from the start of the text (0: all, up to the model's context).
    #[arg(long, default_value_t = 0)]
    pub max_tokens: usize,
    /// Tokens per forward call.
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(c: EvalCommand) -> Result<(), CliError> {
    match c {
        EvalCommand::Ppl(a) => ppl(a),
    }
}

fn ppl(a: PplArgs) -> Result<(), CliError> {
    if a.chunk == 0 {
        return Err(CliError::Usage("--chunk must be at least 1".into()));
    }
    let text = read_text(&a.text)?;
    let loaded = a.model.load()?;
    let mut ids = loaded.tok.encode(&text)?;
    let limit = if a.max_tokens == 0 { loaded.model.cfg().context_length() } else { a.max_tokens };
    ids.truncate(limit);
    eprintln!(
        "eval ppl: model {}, {} tokens of {}, device {}, kv {}, attention dense",
        a.model.model.display(),
        ids.len(),
        a.text.display(),
        loaded.model.device_name(),
        a.model.kv_dtype
    );
    let pb = token_progress(ids.len(), "eval", 2048);
    let r = with_model!(&loaded.model, m => perplexity(m, &ids, a.chunk, a.model.kv_dtype, &mut |d, _| pb.set_position(d as u64)))?;
    pb.finish_and_clear();
    let mut out = std::io::stdout().lock();
    if a.json {
        let v = serde_json::json!({
            "ppl": r.ppl,
            "nll_mean": r.nll_mean,
            "tokens": r.tokens,
            "seconds": r.seconds,
            "settings": {
                "model": a.model.model,
                "text": a.text,
                "max_tokens": a.max_tokens,
                "device": loaded.model.device_name(),
                "kv_dtype": a.model.kv_dtype.name(),
                "attention": "dense",
            },
        });
        writeln!(out, "{v}").map_err(CliError::Output)?;
    } else {
        writeln!(out, "perplexity {:.4} over {} tokens (mean NLL {:.5}, {:.1} s)", r.ppl, r.tokens, r.nll_mean, r.seconds)
            .map_err(CliError::Output)?;
    }
    Ok(())
}
