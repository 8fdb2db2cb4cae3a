//! `farsight bench`: speed measurements that print the command that reproduces them.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Subcommand};
use farsight_engine::generate::prefill_for;
use farsight_engine::model::{Logits, Segment};
use farsight_engine::Model;
use farsight_kernels::{Backend, SampleSpec};

use super::common::{read_text, with_model, CliError, ModelArgs};
use super::plot::{BenchMetric, BenchPlot, BenchPoint};
use super::sparse::SparseArgs;
use farsight_engine::kv::{new_store, Attention};
use farsight_offload::KvMemory;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Dense attention, one sequence: prefill and decode speed at given context lengths, on any
    /// device (`--device cpu|cuda`). With `--text`: a real model over a real text. With
    /// `--shape`: a synthetic model (random weights made on the device), decode steps timed
    /// over a KV cache filled with random rows, next to the memory-bandwidth floor.
    #[command(alias = "cpu")]
    Dense(CpuBenchArgs),
    /// The Double Sparsity decode attention operator on the GPU (label scores + exact top-k +
    /// attention over the selected rows) vs dense decode attention, one layer, per context and
    /// token budget; also with the rows gathered from pinned host memory (the offload case).
    Attention(super::bench_attention::AttnBenchArgs),
    /// Offloaded Double Sparsity decode on the GPU (synthetic model): the full KV in pinned
    /// host memory, labels and a row cache on the GPU, layer-ahead prefetch; ms per step,
    /// tokens/s, PCIe bytes, row-cache hit rate, recall, footprints, next to dense on the GPU.
    Offload(super::bench_offload::OffloadBenchArgs),
}

/// A token count: `512`, `4k` (= 4096), `256K`.
pub fn parse_count(s: &str) -> Result<usize, String> {
    let p = s.trim().to_ascii_lowercase();
    let (num, mul) = match p.strip_suffix('k') {
        Some(n) => (n.to_string(), 1024),
        None => (p.clone(), 1),
    };
    num.parse::<usize>()
        .ok()
        .filter(|&n| n > 0)
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("`{s}` is not a positive token count"))
}

#[derive(Args, Debug)]
pub struct CpuBenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// With --attention double-sparse, dense and sparse decode are timed in the same run
    /// (alternating repeats) and their ratio reported.
    #[command(flatten)]
    pub sparse: SparseArgs,
    /// Text whose first N tokens form the context (real-model mode).
    #[arg(long, required_unless_present = "shape")]
    pub text: Option<PathBuf>,
    /// Synthetic model of this shape instead of `--model` (llama-3.1-8b, llama-2-7b,
    /// smollm2-135m): random weights generated on the device.
    #[arg(long, conflicts_with = "text")]
    pub shape: Option<String>,
    /// Weight dtype of the synthetic model.
    #[arg(long, default_value = "bf16")]
    pub weights_dtype: String,
    /// Synthetic mode: timed decode steps per context (after `--warmup` steps).
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Synthetic mode: prompt length of the timed prefill (0: none).
    #[arg(long, default_value = "32k", value_parser = parse_count_or_zero)]
    pub prefill_context: usize,
    /// Synthetic mode: device memory bandwidth for the floor, GB/s (H100 device-to-device copy
    /// measured in shared/measurements/h100-ceilings.md).
    #[arg(long, default_value_t = 2970.0)]
    pub hbm_gbs: f64,
    /// Context lengths (comma-separated; `4k` = 4096).
    #[arg(long, default_value = "512,4096", value_delimiter = ',', value_parser = parse_count)]
    pub context: Vec<usize>,
    /// Tokens decoded after the context (greedy, EOS ignored).
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Measured runs per context (after the warm-up runs).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Unmeasured runs first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Prompt tokens per prefill step.
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Fill the context with random K/V rows instead of prefilling the text (decode timing at
    /// long contexts without the prefill; the prefill column then reports the fill).
    #[arg(long)]
    pub random_context: bool,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also plot the results against context: PATH.svg and PATH.png (PATH without extension).
    #[arg(long, value_name = "PATH")]
    pub plot: Option<PathBuf>,
}

fn parse_count_or_zero(s: &str) -> Result<usize, String> {
    if s.trim() == "0" {
        Ok(0)
    } else {
        parse_count(s)
    }
}

/// Median, min and max of repeated measurements.
#[derive(serde::Serialize, Clone, Copy, Debug)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(v: &[f64]) -> Stats {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        Stats {
            median,
            min: *s.first().unwrap_or(&f64::NAN),
            max: *s.last().unwrap_or(&f64::NAN),
        }
    }
}

/// One prefill of `prompt` then `new_tokens` greedy decode steps on a fresh cache; returns the
/// prefill and decode seconds (logits are read back each step, which waits for the device) and
/// the store's footprint at the end.
fn timed_run<B: Backend + 'static>(
    model: &Model<B>,
    prompt: &[u32],
    kv_dtype: farsight_kernels::DType,
    attention: &Attention,
    chunk: usize,
    new_tokens: usize,
    random_context: bool,
) -> Result<(f64, f64, KvMemory), CliError> {
    let mut kv = new_store(model, kv_dtype, attention)?;
    let kv = kv.as_mut();
    let mut ws = model.workspace(chunk.min(prompt.len()), 1)?;
    let t0 = Instant::now();
    let mut next = if random_context {
        farsight_engine::synthetic::fill_kv_random(model, kv, prompt.len(), new_tokens, 7)?;
        prompt[prompt.len() - 1]
    } else {
        let greedy = Logits::Sample(SampleSpec::GREEDY);
        prefill_for(model, &mut ws, kv, prompt, chunk, greedy, &mut |_, _| {})?.into_token()?
    };
    let tp = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for _ in 0..new_tokens {
        let mut segs = [Segment {
            tokens: std::slice::from_ref(&next),
            kv: &mut *kv,
            logits: Logits::Sample(SampleSpec::GREEDY),
        }];
        next = model
            .forward(&mut ws, &mut segs)?
            .swap_remove(0)
            .into_token()?;
    }
    let td = t1.elapsed().as_secs_f64();
    Ok((tp, td, kv.memory()))
}

pub fn run(c: BenchCommand) -> Result<(), CliError> {
    match c {
        BenchCommand::Dense(a) if a.shape.is_some() => super::bench_synthetic::run(a),
        BenchCommand::Dense(a) => cpu(a),
        BenchCommand::Attention(a) => super::bench_attention::run(a),
        BenchCommand::Offload(a) => super::bench_offload::run(a),
    }
}

fn cpu(a: CpuBenchArgs) -> Result<(), CliError> {
    if a.repeats == 0 || a.new_tokens == 0 || a.prefill_chunk == 0 {
        return Err(CliError::Usage(
            "--repeats, --new-tokens and --prefill-chunk must be at least 1".into(),
        ));
    }
    if a.random_context && a.sparse.host_kv_budget.is_some() {
        return Err(CliError::Usage(
            "--random-context fills the context in one call, which eviction cannot split: drop --host-kv-budget or --random-context".into(),
        ));
    }
    let mut loaded = a.model.load()?;
    // A budget given as a fraction is of each context's planned tokens (context + new tokens).
    let first = a.context.first().copied().unwrap_or(0);
    let sparse = a
        .sparse
        .attention_planned(&a.model, &mut loaded.model, first + a.new_tokens)?;
    let mut names = vec!["dense".to_string()];
    if !matches!(sparse, Attention::Dense) {
        names.push(a.sparse.label(&sparse));
    }
    let model = &loaded.model;
    let text_path = a.text.clone().unwrap_or_default();
    let text = read_text(&text_path)?;
    let ids = loaded.tok.encode(&text)?;
    let longest = a.context.iter().max().copied().unwrap_or(0);
    if ids.len() < longest {
        return Err(CliError::Usage(format!(
            "{} has {} tokens; --context {longest} needs that many",
            text_path.display(),
            ids.len()
        )));
    }
    if longest + a.new_tokens > model.cfg().context_length() {
        return Err(CliError::Usage(format!(
            "--context {longest} + --new-tokens {} exceeds the model's context of {}",
            a.new_tokens,
            model.cfg().context_length()
        )));
    }
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let mut runs = Vec::new();
    for (ci, &n) in a.context.iter().enumerate() {
        let prompt = &ids[..n];
        let mut attentions = vec![Attention::Dense];
        if names.len() > 1 {
            attentions.push(if ci == 0 {
                sparse.clone()
            } else {
                a.sparse
                    .budget_for(&a.model, model, &sparse, n + a.new_tokens)?
            });
        }
        let k = attentions.len();
        let mut memory = vec![KvMemory::default(); k];
        let (mut pre, mut dec) = (vec![Vec::new(); k], vec![Vec::new(); k]);
        // Repeats alternate between the attentions, so that machine noise hits both alike.
        for r in 0..a.warmup + a.repeats {
            for (i, att) in attentions.iter().enumerate() {
                let (tp, td, mem) = with_model!(model, m => timed_run(m, prompt, a.model.kv_dtype, att, a.prefill_chunk, a.new_tokens, a.random_context))?;
                memory[i] = mem;
                if r >= a.warmup {
                    pre[i].push(n as f64 / tp);
                    dec[i].push(a.new_tokens as f64 / td);
                }
                eprintln!(
                    "context {n} {} run {r}: prefill {:.1} tok/s, decode {:.1} tok/s{}",
                    names[i],
                    n as f64 / tp,
                    a.new_tokens as f64 / td,
                    if r < a.warmup { " (warm-up)" } else { "" }
                );
            }
        }
        for (i, att) in attentions.iter().enumerate() {
            let ratio = (i > 0).then(|| Stats::of(&dec[i]).median / Stats::of(&dec[0]).median);
            if a.sparse.report_memory {
                eprintln!("memory after the last run of context {n}, {}:", names[i]);
                let rows = a.prefill_chunk.min(n);
                super::report::print_after_run(super::report::footprint(
                    model,
                    a.model.kv_dtype,
                    memory[i].clone(),
                    rows,
                    1,
                ));
            }
            runs.push(serde_json::json!({
                "context": n,
                "attention": names[i],
                "attention_settings": att.describe(),
                "prefill_tok_s": Stats::of(&pre[i]),
                "decode_tok_s": Stats::of(&dec[i]),
                "decode_vs_dense": ratio,
                "kv_memory": memory[i],
            }));
        }
    }
    let report = serde_json::json!({
        "command": command,
        "model": a.model.model,
        "device": model.device_name(),
        "weights_dtype": model.weight_dtype().name(),
        "kv_dtype": a.model.kv_dtype.name(),
        "new_tokens": a.new_tokens,
        "repeats": a.repeats,
        "warmup": a.warmup,
        "runs": runs,
    });
    let mut out = std::io::stdout().lock();
    writeln!(out, "| context | attention | prefill tok/s (median [min, max]) | decode tok/s (median [min, max]) | decode vs dense |").map_err(CliError::Output)?;
    writeln!(out, "| --- | --- | --- | --- | --- |").map_err(CliError::Output)?;
    for r in &runs {
        let f = |k: &str| {
            let s = &r[k];
            format!(
                "{:.1} [{:.1}, {:.1}]",
                s["median"].as_f64().unwrap_or(0.0),
                s["min"].as_f64().unwrap_or(0.0),
                s["max"].as_f64().unwrap_or(0.0)
            )
        };
        let ratio = r["decode_vs_dense"]
            .as_f64()
            .map_or("1 (baseline)".to_string(), |x| format!("{x:.2}x"));
        let att = r["attention"].as_str().unwrap_or("");
        writeln!(
            out,
            "| {} | {att} | {} | {} | {ratio} |",
            r["context"],
            f("prefill_tok_s"),
            f("decode_tok_s")
        )
        .map_err(CliError::Output)?;
    }
    writeln!(
        out,
        "\n{} on {}, weights {}, KV {}; reproduce: `{command}`",
        a.model.model.display(),
        model.device_name(),
        model.weight_dtype(),
        a.model.kv_dtype
    )
    .map_err(CliError::Output)?;
    if let Some(p) = &a.json {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| CliError::io(dir, e))?;
        }
        std::fs::write(p, serde_json::to_string_pretty(&report).unwrap_or_default())
            .map_err(|e| CliError::io(p, e))?;
    }
    if let Some(base) = &a.plot {
        // One panel per (measurement, attention).
        let metric = |name: &str, key: &str, att: &str| BenchMetric {
            name: if names.len() > 1 {
                format!("{name}, {att}")
            } else {
                name.into()
            },
            unit: "tokens/s".into(),
            points: runs
                .iter()
                .filter(|r| r["attention"].as_str() == Some(att))
                .filter_map(|r| bench_point(&r["context"], &r[key]))
                .collect(),
            floor: Vec::new(),
        };
        let data = BenchPlot {
            title: format!(
                "{} on {}: weights {}, KV {}",
                a.model.model.display(),
                model.device_name(),
                model.weight_dtype(),
                a.model.kv_dtype
            ),
            footnote: command.clone(),
            metrics: names
                .iter()
                .flat_map(|att| {
                    [
                        metric("prefill", "prefill_tok_s", att),
                        metric(
                            &format!("decode ({} new tokens)", a.new_tokens),
                            "decode_tok_s",
                            att,
                        ),
                    ]
                })
                .collect(),
        };
        write_plot(&data, base)?;
    }
    Ok(())
}

/// A bench point from a JSON `context` and a JSON [`Stats`].
pub fn bench_point(context: &serde_json::Value, s: &serde_json::Value) -> Option<BenchPoint> {
    let f = |k: &str| s[k].as_f64();
    Some(BenchPoint {
        context: context.as_u64()? as usize,
        median: f("median")?,
        min: f("min")?,
        max: f("max")?,
    })
}

/// Writes `base.svg` and `base.png` and says so on stderr.
pub fn write_plot(data: &BenchPlot, base: &std::path::Path) -> Result<(), CliError> {
    super::plot::announce(
        &super::plot::bench_chart(data, base).map_err(|e| CliError::Usage(e.to_string()))?,
    );
    Ok(())
}
