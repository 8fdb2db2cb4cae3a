//! `farsight generate`: stream a continuation (or a chat reply) to stdout.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use farsight_engine::chat::Message;
use farsight_engine::generate::{generate, GenerateOptions};
use farsight_engine::sampler::SamplingParams;
use farsight_engine::EngineError;

use super::common::{read_text, with_model, CliError, ModelArgs, PrefillProgress};
use super::preflight::{self, Plan};
use super::sparse::SparseArgs;

#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("input").required(true).args(["prompt", "prompt_file"]))]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sparse: SparseArgs,
    /// The prompt text.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// Treat the prompt as a user message and render the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat (the template's default when absent).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Sample among the K most likely tokens only (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sample from the smallest set of tokens whose probability reaches P.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop before this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Prompt tokens per prefill step.
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: GenerateArgs) -> Result<(), CliError> {
    let text = match (&a.prompt, &a.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => read_text(f)?,
        (None, None) => unreachable!("clap requires one of --prompt and --prompt-file"),
    };
    if text.trim().is_empty() {
        return Err(EngineError::EmptyPrompt.into());
    }
    if a.prefill_chunk == 0 {
        return Err(CliError::Usage("--prefill-chunk must be at least 1".into()));
    }
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    };
    sampling.validate()?;
    let mut loaded = a.model.load()?;

    let prompt_text = if a.chat {
        let tmpl = loaded.tok.chat_template.as_ref().ok_or_else(|| {
            CliError::Usage(format!(
                "--chat: {} has no chat template",
                a.model.model.display()
            ))
        })?;
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(Message {
                role: "system".into(),
                content: s.clone(),
            });
        }
        msgs.push(Message {
            role: "user".into(),
            content: text,
        });
        tmpl.render(&msgs, true)?
    } else {
        text
    };
    let ids = loaded.tok.encode(&prompt_text)?;
    let attention =
        a.sparse
            .attention_planned(&a.model, &mut loaded.model, ids.len() + a.max_new_tokens)?;
    let (model, tok) = (&loaded.model, &loaded.tok);
    let plan = Plan {
        prompt: ids.len(),
        new_tokens: a.max_new_tokens,
        chunk: a.prefill_chunk,
    };
    preflight::check(model, a.model.kv_dtype, &attention, plan)?;
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling,
        stop: a.stop.clone(),
        prefill_chunk: a.prefill_chunk,
        kv_dtype: a.model.kv_dtype,
        attention: attention.clone(),
    };

    let mut progress = PrefillProgress::new(ids.len(), 2048);
    let mut out = std::io::stdout().lock();
    let mut write_err = None;
    let stream = !a.json;
    let g = with_model!(model, model => generate(
        model,
        tok,
        &ids,
        &opts,
        &mut |done, total| progress.update(done, total),
        &mut |t| {
            if stream && write_err.is_none() {
                if let Err(e) = out.write_all(t.as_bytes()).and_then(|_| out.flush()) {
                    write_err = Some(e);
                }
            }
        },
    ))?;
    if let Some(e) = write_err {
        return Err(CliError::Output(e));
    }
    if a.sparse.report_memory {
        let rows = a.prefill_chunk.min(ids.len());
        super::report::print_after_run(super::report::footprint(
            model,
            a.model.kv_dtype,
            g.kv_memory.clone(),
            rows,
            1,
        ));
    }
    if a.json {
        let v = serde_json::json!({
            "prompt_tokens": g.prompt_tokens,
            "new_token_ids": g.new_token_ids,
            "text": g.text,
            "finish_reason": g.finish,
            "timings": {
                "prefill_s": g.prefill_s,
                "prefill_tokens_per_s": g.prefill_tokens_per_s(),
                "decode_s": g.decode_s,
                "decode_steps": g.decode_steps,
                "decode_tokens_per_s": g.decode_tokens_per_s(),
            },
            "kv_memory": g.kv_memory,
            "settings": {
                "model": a.model.model,
                "device": model.device_name(),
                "kv_dtype": a.model.kv_dtype.name(),
                "attention": attention.describe(),
                "chat": a.chat,
                "max_new_tokens": a.max_new_tokens,
                "temperature": a.temperature,
                "top_k": a.top_k,
                "top_p": a.top_p,
                "seed": a.seed,
            },
        });
        writeln!(out, "{v}").map_err(CliError::Output)?;
    } else {
        writeln!(out).map_err(CliError::Output)?;
        eprintln!(
            "[prefill: {} tokens in {:.2} s, {:.1} tok/s | decode: {} tokens in {:.2} s, {:.1} tok/s | {:?}]",
            g.prompt_tokens,
            g.prefill_s,
            g.prefill_tokens_per_s(),
            g.new_token_ids.len(),
            g.decode_s,
            g.decode_tokens_per_s(),
            g.finish,
        );
        if let Some(r) = g.kv_memory.selection_reuse {
            eprintln!("[step-to-step selection reuse {r:.4}]");
        }
        if let (Some(r), Some(b)) = (g.kv_memory.row_cache_hit_rate, g.kv_memory.row_cache_bytes) {
            eprintln!(
                "[row cache in memory: hit rate {r:.4}, {:.1} MiB]",
                b as f64 / (1 << 20) as f64
            );
        }
    }
    Ok(())
}
