//! `farsight bench dense --shape NAME`: dense decode and prefill speed of a synthetic model
//! (random weights generated on the device) next to the memory-bandwidth floor of a decode step.
//!
//! Decode: for each context length `T`, a KV cache of `T - 1` random rows (filled directly, not
//! by prefill), then `--warmup + --steps` single-token steps, each appending token `T - 1`,
//! attending over `T` keys, reading the logits back, and cut back to `T - 1` rows. The floor of
//! a step is `(weight bytes + K and V bytes of T tokens) / --hbm-gbs`. Prefill: a prompt of
//! `--prefill-context` token ids through the real chunked prefill, `--repeats` times after one
//! shorter warm-up prefill.

use std::io::Write;
use std::time::Instant;

use farsight_engine::generate::{new_cache, prefill};
use farsight_engine::model::{Logits, Segment};
use farsight_engine::synthetic::{fill_kv_random, shape_config};
use farsight_engine::Model;
use farsight_kernels::cpu::CpuBackend;
use farsight_kernels::cuda::CudaBackend;
use farsight_kernels::{Backend, DType, SampleSpec};
use farsight_offload::KvStore;

use super::bench::{bench_point, write_plot, CpuBenchArgs, Stats};
use super::common::{with_model, AnyModel, CliError, Device};
use super::plot::{BenchMetric, BenchPlot};

fn parse_dtype(s: &str) -> Result<DType, CliError> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        _ => Err(CliError::Usage(format!(
            "`{s}` is not a weight dtype (f32, f16, bf16)"
        ))),
    }
}

pub fn run(a: CpuBenchArgs) -> Result<(), CliError> {
    let shape = a.shape.clone().unwrap_or_default();
    if a.steps == 0 || a.repeats == 0 || a.prefill_chunk == 0 {
        return Err(CliError::Usage(
            "--steps, --repeats and --prefill-chunk must be at least 1".into(),
        ));
    }
    if a.sparse.attention != super::sparse::AttentionKind::Dense
        || a.sparse.host_kv_budget.is_some()
        || a.sparse.report_memory
    {
        return Err(CliError::Usage(
            "--shape times dense attention over a dense cache only: --attention, --host-kv-budget and --report-memory need --text".into(),
        ));
    }
    let cfg = shape_config(&shape)?;
    let dtype = parse_dtype(&a.weights_dtype)?;
    let t0 = Instant::now();
    let model = match a.model.device {
        Device::Cpu => AnyModel::Cpu(Model::synthetic(
            cfg,
            CpuBackend::new(a.model.threads)?,
            dtype,
            1,
        )?),
        Device::Cuda(n) => {
            let be = CudaBackend::new(n)
                .map_err(|e| CliError::Usage(format!("--device cuda:{n}: {e}")))?;
            AnyModel::Cuda(Model::synthetic(cfg, be, dtype, 1)?)
        }
    };
    let weight_bytes = with_model!(&model, m => m.weight_bytes());
    eprintln!(
        "synthetic {shape}: {:.2} GB of {dtype} weights generated on {} in {:.1} s",
        weight_bytes as f64 / 1e9,
        model.device_name(),
        t0.elapsed().as_secs_f64()
    );
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let (decode, prefill_runs) = with_model!(&model, m => measure(m, &a))?;

    let report = serde_json::json!({
        "command": command,
        "shape": shape,
        "device": model.device_name(),
        "weights_dtype": dtype.name(),
        "weight_bytes": weight_bytes,
        "kv_dtype": a.model.kv_dtype.name(),
        "hbm_gbs": a.hbm_gbs,
        "kv": "decode: KV cache filled with random rows (not by prefill); prefill: real chunked prefill of token ids",
        "warmup_steps": a.warmup,
        "steps": a.steps,
        "decode": decode,
        "prefill": prefill_runs,
    });
    let mut out = std::io::stdout().lock();
    let w =
        |out: &mut std::io::StdoutLock, s: String| writeln!(out, "{s}").map_err(CliError::Output);
    w(
        &mut out,
        "| context | decode step ms, median [min, max] | floor ms | x floor | tok/s |".into(),
    )?;
    w(&mut out, "| --- | --- | --- | --- | --- |".into())?;
    for d in &decode {
        let s = &d["step_ms"];
        let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
        w(
            &mut out,
            format!(
                "| {} | {:.2} [{:.2}, {:.2}] | {:.2} | {:.2} | {:.1} |",
                d["context"],
                f("median"),
                f("min"),
                f("max"),
                d["floor_ms"].as_f64().unwrap_or(f64::NAN),
                f("median") / d["floor_ms"].as_f64().unwrap_or(f64::NAN),
                1e3 / f("median")
            ),
        )?;
    }
    for p in &prefill_runs {
        let s = &p["tok_s"];
        let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
        w(
            &mut out,
            format!(
                "\nprefill of {} tokens in chunks of {}: {:.0} tok/s median [{:.0}, {:.0}] over {} runs",
                p["tokens"], p["chunk"], f("median"), f("min"), f("max"), p["runs"]
            ),
        )?;
    }
    w(
        &mut out,
        format!(
            "\nsynthetic {shape} ({:.2} GB of {dtype} weights) on {}, KV {}; decode over a KV cache \
             filled with random rows; floor = (weights + KV bytes) / {:.0} GB/s; reproduce: `{command}`",
            weight_bytes as f64 / 1e9,
            model.device_name(),
            a.model.kv_dtype,
            a.hbm_gbs
        ),
    )?;
    if let Some(p) = &a.json {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| CliError::io(dir, e))?;
        }
        std::fs::write(p, serde_json::to_string_pretty(&report).unwrap_or_default())
            .map_err(|e| CliError::io(p, e))?;
    }
    if let Some(base) = &a.plot {
        let mut metrics = vec![BenchMetric {
            name: "decode step".into(),
            unit: "ms per step".into(),
            points: decode
                .iter()
                .filter_map(|d| bench_point(&d["context"], &d["step_ms"]))
                .collect(),
            floor: decode
                .iter()
                .filter_map(|d| Some((d["context"].as_u64()? as usize, d["floor_ms"].as_f64()?)))
                .collect(),
        }];
        if !prefill_runs.is_empty() {
            metrics.push(BenchMetric {
                name: format!("prefill (chunks of {})", prefill_runs[0]["chunk"]),
                unit: "tokens/s".into(),
                points: prefill_runs
                    .iter()
                    .filter_map(|p| bench_point(&p["tokens"], &p["tok_s"]))
                    .collect(),
                floor: Vec::new(),
            });
        }
        let data = BenchPlot {
            title: format!(
                "synthetic {shape} ({:.2} GB of {dtype} weights) on {}, KV {}; floor at {:.0} GB/s",
                weight_bytes as f64 / 1e9,
                model.device_name(),
                a.model.kv_dtype,
                a.hbm_gbs
            ),
            footnote: command.clone(),
            metrics,
        };
        write_plot(&data, base)?;
    }
    Ok(())
}

type Rows = Vec<serde_json::Value>;

fn measure<B: Backend>(m: &Model<B>, a: &CpuBenchArgs) -> Result<(Rows, Rows), CliError> {
    let c = &m.cfg;
    let be = &m.backend;
    let kv_dtype = a.model.kv_dtype;
    let max_ctx = c.context_length();
    let mut decode = Vec::new();
    for &ctx in &a.context {
        let ctx = ctx.min(max_ctx);
        let past = ctx - 1;
        let mut kv = new_cache(m, kv_dtype)?;
        let t0 = Instant::now();
        fill_kv_random(m, &mut kv, past, 1, 77)?;
        let mut ws = m.workspace(1, 1)?;
        let mut tok = 1u32;
        let mut ms = Vec::with_capacity(a.steps);
        for step in 0..a.warmup + a.steps {
            kv.truncate(past);
            let t = Instant::now();
            let mut segs = [Segment {
                tokens: std::slice::from_ref(&tok),
                kv: &mut kv,
                logits: Logits::Sample(SampleSpec::GREEDY),
            }];
            // The argmax is picked on the device: one id comes back, not a logits row.
            tok = m.forward(&mut ws, &mut segs)?.swap_remove(0).into_token()?;
            let dt = t.elapsed().as_secs_f64() * 1e3;
            if step >= a.warmup {
                ms.push(dt);
            }
        }
        let kv_bytes = c.num_layers * 2 * ctx * c.kv_width() * kv_dtype.size();
        let floor_ms = (m.weight_bytes() + kv_bytes) as f64 / (a.hbm_gbs * 1e9) * 1e3;
        let st = Stats::of(&ms);
        eprintln!(
            "context {ctx}: KV filled in {:.1} s ({:.2} GB); decode step {:.2} ms median [{:.2}, {:.2}], floor {floor_ms:.2} ms ({:.2}x)",
            t0.elapsed().as_secs_f64() - ms.iter().sum::<f64>() / 1e3,
            kv_bytes as f64 / 1e9,
            st.median,
            st.min,
            st.max,
            st.median / floor_ms
        );
        decode.push(serde_json::json!({
            "context": ctx,
            "kv_bytes": kv_bytes,
            "step_ms": st,
            "steps_ms": ms,
            "floor_ms": floor_ms,
            "x_floor": st.median / floor_ms,
        }));
        drop(kv);
        drop(ws);
    }
    let mut prefill_runs = Vec::new();
    if a.prefill_context > 0 {
        let n = a.prefill_context.min(max_ctx);
        let v = c.vocab_size as u64;
        let prompt: Vec<u32> = (0..n as u64)
            .map(|i| ((i * 2_654_435_761) % v) as u32)
            .collect();
        let chunk = a.prefill_chunk.min(n);
        let run = |tokens: &[u32]| -> Result<f64, CliError> {
            let mut kv = new_cache(m, kv_dtype)?;
            kv.reserve(be, tokens.len())?;
            let mut ws = m.workspace(chunk, 1)?;
            let t = Instant::now();
            let l = prefill(m, &mut ws, &mut kv, tokens, chunk, &mut |_, _| {})?;
            let s = t.elapsed().as_secs_f64();
            assert!(
                l.iter().all(|x| x.is_finite()),
                "non-finite logits after prefill"
            );
            Ok(s)
        };
        let warm = run(&prompt[..(2 * chunk).min(n)])?;
        eprintln!(
            "prefill warm-up of {} tokens: {:.2} s",
            (2 * chunk).min(n),
            warm
        );
        let mut tps = Vec::new();
        for r in 0..a.repeats {
            let s = run(&prompt)?;
            eprintln!(
                "prefill {n} tokens run {r}: {s:.2} s, {:.0} tok/s",
                n as f64 / s
            );
            tps.push(n as f64 / s);
        }
        prefill_runs.push(serde_json::json!({
            "tokens": n,
            "chunk": chunk,
            "runs": a.repeats,
            "tok_s": Stats::of(&tps),
        }));
    }
    Ok((decode, prefill_runs))
}
