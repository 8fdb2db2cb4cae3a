//! `farsight eval logits` (hidden): the logits of every position of given token ids, then
//! greedy tokens, written to files for comparing with another implementation
//! (scripts/gpu-parity.py).

use std::path::PathBuf;

use clap::Args;

use crate::cli::common::{read_text, with_model, CliError, ModelArgs};

#[derive(Args, Debug)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Token ids, separated by whitespace or commas (a JSON array works too).
    #[arg(long)]
    pub tokens: PathBuf,
    /// Output: a JSON summary here, and the logits (little-endian f32, tokens x vocab,
    /// row-major) in the same path with the extension `.bin`.
    #[arg(long)]
    pub out: PathBuf,
    /// Greedy tokens to generate after the given ids (decode steps, one token per call).
    #[arg(long, default_value_t = 0)]
    pub greedy: usize,
    /// Tokens per prefill forward call.
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
}

pub(super) fn logits(a: LogitsArgs) -> Result<(), CliError> {
    if a.chunk == 0 {
        return Err(CliError::Usage("--chunk must be at least 1".into()));
    }
    let text = read_text(&a.tokens)?;
    let ids: Vec<u32> = text
        .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>().map_err(|_| {
                CliError::Usage(format!("`{s}` in {} is not a token id", a.tokens.display()))
            })
        })
        .collect::<Result<_, _>>()?;
    if ids.is_empty() {
        return Err(CliError::Usage(format!(
            "{} holds no token ids",
            a.tokens.display()
        )));
    }
    let model = a.model.load_model()?;
    let vocab = model.cfg().vocab_size;
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(CliError::Usage(format!(
            "token id {bad} outside the vocabulary ({vocab})"
        )));
    }
    let t0 = std::time::Instant::now();
    let (all, greedy) = with_model!(&model, m => teacher_forced_then_greedy(m, &ids, a.chunk, a.greedy, a.model.kv_dtype))?;
    let seconds = t0.elapsed().as_secs_f64();
    let bin = a.out.with_extension("bin");
    let bytes: Vec<u8> = all.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&bin, bytes).map_err(|e| CliError::io(&bin, e))?;
    let argmax: Vec<u32> = all
        .chunks(vocab)
        .map(farsight_engine::sampler::argmax)
        .collect();
    let v = serde_json::json!({
        "tokens": ids,
        "vocab": vocab,
        "logits_file": bin,
        "logits_shape": [ids.len(), vocab],
        "argmax": argmax,
        "greedy": greedy,
        "seconds": seconds,
        "device": model.device_name(),
        "weights_dtype": model.weight_dtype().name(),
        "kv_dtype": a.model.kv_dtype.name(),
        "chunk": a.chunk,
    });
    std::fs::write(&a.out, v.to_string()).map_err(|e| CliError::io(&a.out, e))?;
    eprintln!(
        "logits of {} positions -> {}; {} greedy tokens; {:.2} s",
        ids.len(),
        bin.display(),
        greedy.len(),
        seconds
    );
    Ok(())
}

/// All-position logits of `ids` (prefill in `chunk`-token calls), then `greedy` decode steps.
fn teacher_forced_then_greedy<B: farsight_kernels::Backend>(
    m: &farsight_engine::Model<B>,
    ids: &[u32],
    chunk: usize,
    greedy: usize,
    kv_dtype: farsight_kernels::DType,
) -> Result<(Vec<f32>, Vec<u32>), CliError> {
    use farsight_engine::model::{Logits, Segment};
    let mut kv = farsight_engine::generate::new_cache(m, kv_dtype)?;
    let mut ws = m.workspace(chunk.min(ids.len()), chunk.min(ids.len()))?;
    let mut all = Vec::with_capacity(ids.len() * m.cfg.vocab_size);
    for part in ids.chunks(chunk) {
        let mut segs = [Segment {
            tokens: part,
            kv: &mut kv,
            logits: Logits::All,
        }];
        all.extend(m.forward(&mut ws, &mut segs)?.swap_remove(0).into_logits());
    }
    let vocab = m.cfg.vocab_size;
    let mut next = farsight_engine::sampler::argmax(&all[all.len() - vocab..]);
    let mut out = Vec::with_capacity(greedy);
    for i in 0..greedy {
        out.push(next);
        if i + 1 == greedy {
            break;
        }
        let mut segs = [Segment {
            tokens: std::slice::from_ref(&next),
            kv: &mut kv,
            logits: Logits::Sample(farsight_kernels::SampleSpec::GREEDY),
        }];
        next = m.forward(&mut ws, &mut segs)?.swap_remove(0).into_token()?;
    }
    Ok((all, out))
}
