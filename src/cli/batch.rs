//! `farsight batch`: run a JSONL file of documents through the continuous-batching scheduler,
//! one result line per document, resumable and shardable (see `jsonl.rs` for the file rules).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, ValueEnum};
use farsight_engine::batch::{BatchConfig, Scheduler, SeqOutput, SeqRequest};
use farsight_engine::chat::Message;
use farsight_engine::sampler::SamplingParams;
use farsight_engine::{Model, TextTokenizer};
use farsight_kernels::Backend;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};

use super::common::{read_text, with_model, CliError, ModelArgs};
use super::jsonl::{self, id_key, line_key, Doc, InputLines, ResultsFile};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Task {
    /// Ask for a summary of the text, through the model's chat template.
    Summarize,
    /// Continue the text as it is (no chat template).
    Generate,
}

/// The instruction of `--task summarize` (the user message, before the chat template).
const SUMMARIZE_TEMPLATE: &str = "Summarize the following text in a few sentences.\n\n{{ text }}";

#[derive(Args, Debug)]
pub struct BatchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Input JSON Lines: {"id": ..., "text": ..., optional max_new_tokens, temperature, top_k,
    /// top_p, seed, stop}.
    #[arg(long)]
    pub input: PathBuf,
    /// Output JSON Lines; an existing file is resumed (documents already in it are skipped).
    #[arg(long)]
    pub output: PathBuf,
    /// summarize: the text in a summarisation instruction through the chat template;
    /// generate: the text as the raw prompt.
    #[arg(long, value_enum, default_value = "summarize")]
    pub task: Task,
    /// A minijinja template of the prompt with {{ text }} (and {{ id }}); with summarize it is
    /// the user message, with generate the raw prompt.
    #[arg(long)]
    pub prompt_template: Option<PathBuf>,
    /// Most new tokens per document (a document's max_new_tokens overrides it).
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Documents generated at once.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// This run's slice of the input, I/N: the lines whose number (from 1) minus 1, modulo N,
    /// is I.
    #[arg(long, value_parser = parse_shard)]
    pub shard: Option<(usize, usize)>,
    /// Prompt tokens per scheduler step (bounds the time of a step while prompts are read).
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
    /// KV tokens the running documents may hold together (0: no limit beyond the context).
    #[arg(long, default_value_t = 0)]
    pub max_kv_tokens: usize,
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
}

fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    let bad = || format!("`{s}` is not a shard I/N with 0 <= I < N");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n) = (
        i.trim().parse::<usize>().map_err(|_| bad())?,
        n.trim().parse::<usize>().map_err(|_| bad())?,
    );
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

/// The settings one document runs with (recorded in its result line).
#[derive(serde::Serialize, Clone)]
struct Settings {
    task: Task,
    max_new_tokens: usize,
    temperature: f64,
    top_k: usize,
    top_p: f64,
    seed: u64,
    stop: Vec<String>,
}

/// An f32 setting as the f64 with the same shortest decimal form (0.7, not 0.699999988).
fn decimal(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

impl serde::Serialize for Task {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            Task::Summarize => "summarize",
            Task::Generate => "generate",
        })
    }
}

/// What the job knows about a document in flight.
struct InFlight {
    id: Value,
    settings: Settings,
}

/// Turns a document into prompt ids.
struct PromptBuilder<'t> {
    tok: &'t TextTokenizer,
    task: Task,
    env: minijinja::Environment<'static>,
}

impl PromptBuilder<'_> {
    fn ids(&self, doc: &Doc) -> Result<Vec<u32>, String> {
        if doc.text.trim().is_empty() {
            return Err("the text is empty".into());
        }
        let t = self.env.get_template("prompt").map_err(|e| e.to_string())?;
        let content = t
            .render(minijinja::context! { text => &doc.text, id => minijinja::Value::from(minijinja::value::Serde(&doc.id)) })
            .map_err(|e| format!("prompt template: {e}"))?;
        let prompt = match (self.task, &self.tok.chat_template) {
            (Task::Summarize, Some(chat)) => chat
                .render(
                    &[Message {
                        role: "user".into(),
                        content,
                    }],
                    true,
                )
                .map_err(|e| e.to_string())?,
            _ => content,
        };
        self.tok.encode(&prompt).map_err(|e| e.to_string())
    }
}

pub fn run(a: BatchArgs) -> Result<(), CliError> {
    if a.batch_size == 0 || a.prefill_chunk == 0 {
        return Err(CliError::Usage(
            "--batch-size and --prefill-chunk must be at least 1".into(),
        ));
    }
    let base = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    };
    base.validate()?;
    let total = jsonl::count_lines(
        &a.input,
        a.shard.map_or(0, |s| s.0),
        a.shard.map_or(1, |s| s.1),
    )?;
    let source = match &a.prompt_template {
        Some(p) => read_text(p)?,
        None if a.task == Task::Summarize => SUMMARIZE_TEMPLATE.to_string(),
        None => "{{ text }}".to_string(),
    };
    let mut env = minijinja::Environment::new();
    env.add_template_owned("prompt", source)
        .map_err(|e| CliError::Usage(format!("--prompt-template: {e}")))?;
    let mut results = ResultsFile::open(&a.output)?;
    let loaded = a.model.load()?;
    if a.task == Task::Summarize && loaded.tok.chat_template.is_none() {
        return Err(CliError::Usage(format!(
            "--task summarize: {} has no chat template (use --task generate)",
            a.model.model.display()
        )));
    }
    let prompts = PromptBuilder {
        tok: &loaded.tok,
        task: a.task,
        env,
    };
    with_model!(&loaded.model, m => run_jobs(m, &loaded.tok, &a, &prompts, &mut results, total))
}

/// Counters of one run.
#[derive(Default)]
struct Tally {
    written: usize,
    errors: usize,
    skipped: usize,
    new_tokens: usize,
}

fn run_jobs<B: Backend>(
    model: &Model<B>,
    tok: &TextTokenizer,
    a: &BatchArgs,
    prompts: &PromptBuilder<'_>,
    results: &mut ResultsFile,
    total: usize,
) -> Result<(), CliError> {
    let cfg = BatchConfig {
        max_running: a.batch_size,
        prefill_tokens_per_step: a.prefill_chunk,
        kv_dtype: a.model.kv_dtype,
        kv_token_budget: a.max_kv_tokens,
    };
    let mut sched = Scheduler::new(model, tok, cfg)?;
    let (shard, shards) = a.shard.unwrap_or((0, 1));
    let mut input = InputLines::open(&a.input)?;
    let mut in_flight: HashMap<u64, InFlight> = HashMap::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut tally = Tally::default();
    let pb = progress_bar(total);
    let t0 = Instant::now();
    let mut input_done = false;
    loop {
        while !input_done && sched.waiting() < a.batch_size {
            let Some((no, bytes)) = input.next_line()? else {
                input_done = true;
                break;
            };
            if !jsonl::in_shard(no, shard, shards) || jsonl::is_blank(bytes) {
                continue;
            }
            let doc = match jsonl::parse_doc(bytes) {
                Ok(d) => d,
                Err(msg) => {
                    write_error(
                        results,
                        &mut tally,
                        &pb,
                        Value::Null,
                        no,
                        &format!("line {no}: {msg}"),
                    )?;
                    continue;
                }
            };
            let key = id_key(&doc.id);
            if results.done.contains(&key) {
                tally.skipped += 1;
                pb.inc(1);
                continue;
            }
            if let Some(first) = seen.get(&key) {
                let msg = format!("line {no}: duplicate id {} (first on line {first})", doc.id);
                write_error(results, &mut tally, &pb, Value::Null, no, &msg)?;
                continue;
            }
            seen.insert(key, no);
            let s = &doc.settings;
            let settings = Settings {
                task: a.task,
                max_new_tokens: s.max_new_tokens.unwrap_or(a.max_new_tokens),
                temperature: decimal(s.temperature.unwrap_or(a.temperature)),
                top_k: s.top_k.unwrap_or(a.top_k),
                top_p: decimal(s.top_p.unwrap_or(a.top_p)),
                seed: s.seed.unwrap_or(a.seed),
                stop: s
                    .stop
                    .clone()
                    .map_or_else(|| a.stop.clone(), |s| s.into_vec()),
            };
            let submitted = prompts.ids(&doc).and_then(|ids| {
                let req = SeqRequest {
                    prompt: ids,
                    max_new_tokens: settings.max_new_tokens,
                    sampling: SamplingParams {
                        temperature: settings.temperature as f32,
                        top_k: settings.top_k,
                        top_p: settings.top_p as f32,
                        seed: settings.seed,
                    },
                    stop: settings.stop.clone(),
                };
                sched
                    .submit(req, Box::new(|_| true))
                    .map_err(|e| e.to_string())
            });
            match submitted {
                Ok(seq) => {
                    in_flight.insert(
                        seq,
                        InFlight {
                            id: doc.id,
                            settings,
                        },
                    );
                }
                Err(msg) => write_error(results, &mut tally, &pb, doc.id, no, &msg)?,
            }
        }
        if sched.is_idle() {
            if input_done {
                break;
            }
            continue;
        }
        for out in sched.step()? {
            let Some(doc) = in_flight.remove(&out.id) else {
                continue;
            };
            results.write(&record(&doc, &out))?;
            tally.written += 1;
            tally.new_tokens += out.new_token_ids.len();
            pb.inc(1);
            let secs = t0.elapsed().as_secs_f64().max(1e-9);
            pb.set_message(format!("{:.1} tok/s", tally.new_tokens as f64 / secs));
        }
    }
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64().max(1e-9);
    eprintln!(
        "batch: {} written ({} errors), {} already done, {} new tokens in {:.2} s: {:.1} tok/s, {:.1} docs/min",
        tally.written,
        tally.errors,
        tally.skipped,
        tally.new_tokens,
        secs,
        tally.new_tokens as f64 / secs,
        (tally.written - tally.errors) as f64 * 60.0 / secs,
    );
    Ok(())
}

fn record(doc: &InFlight, out: &SeqOutput) -> Value {
    let t = &out.timings;
    json!({
        "id": doc.id,
        "output": out.text,
        "finish_reason": out.finish,
        "prompt_tokens": out.prompt_tokens,
        "new_tokens": out.new_token_ids.len(),
        "timings": {
            "queued_s": t.queued_s,
            "prefill_s": t.prefill_s,
            "decode_s": t.decode_s,
            "total_s": t.queued_s + t.prefill_s + t.decode_s,
        },
        "settings": doc.settings,
    })
}

fn write_error(
    results: &mut ResultsFile,
    tally: &mut Tally,
    pb: &ProgressBar,
    id: Value,
    line: usize,
    msg: &str,
) -> Result<(), CliError> {
    let key = if id.is_null() {
        line_key(line)
    } else {
        id_key(&id)
    };
    if results.done.contains(&key) {
        tally.skipped += 1;
    } else {
        results.write(&json!({ "id": id, "line": line, "error": msg }))?;
        tally.written += 1;
        tally.errors += 1;
    }
    pb.inc(1);
    Ok(())
}

/// Documents done, tokens/s and ETA on stderr; hidden when stderr is not a terminal.
fn progress_bar(total: usize) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template("batch {bar:30} {pos}/{len} docs ({msg}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}
