//! farsight against Hugging Face transformers on the same GGUF (fixture made by
//! `scripts/make-reference.py`): token ids, chat rendering, last-position logits, greedy
//! continuations and perplexity.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use common::*;
use farsight_engine::chat::Message;
use farsight_engine::eval::perplexity;
use farsight_engine::generate::{new_cache, prefill};
use farsight_engine::gguf::{convert_gguf, ConvertOptions, OutDtype};
use farsight_engine::model::{Logits, Segment};
use farsight_engine::sampler::argmax;
use farsight_engine::{Model, TextTokenizer};
use farsight_kernels::cpu::CpuBackend;
use farsight_kernels::DType;

/// An f32 conversion of the GGUF (the reference runs the dequantised weights in f32), made once
/// per test run in a temporary directory.
fn f32_model_dir() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let t = tempfile::tempdir().unwrap();
        convert_gguf(
            &gguf_path(),
            t.path(),
            &ConvertOptions {
                dtype: OutDtype::F32,
            },
        )
        .unwrap();
        t
    })
    .path()
    .to_path_buf()
}

fn last_logits(model: &Model<CpuBackend>, ids: &[u32], kv: DType) -> Vec<f32> {
    let mut cache = new_cache(model, kv).unwrap();
    let mut ws = model.workspace(64, 1).unwrap();
    prefill(model, &mut ws, &mut cache, ids, 64, &mut |_, _| {}).unwrap()
}

/// Greedy ids, EOS ignored, and the step's top-2 margins are in the fixture.
fn greedy(model: &Model<CpuBackend>, ids: &[u32], n: usize, kv: DType) -> Vec<u32> {
    let mut cache = new_cache(model, kv).unwrap();
    let mut ws = model.workspace(64, 1).unwrap();
    let mut logits = prefill(model, &mut ws, &mut cache, ids, 64, &mut |_, _| {}).unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let t = argmax(&logits);
        out.push(t);
        let mut segs = [Segment {
            tokens: std::slice::from_ref(&t),
            kv: &mut cache,
            logits: Logits::Last,
        }];
        logits = model
            .forward(&mut ws, &mut segs)
            .unwrap()
            .swap_remove(0)
            .into_logits();
    }
    out
}

/// Greedy ids must agree until the first step whose reference top-2 margin is within the
/// logits error we allow (a tie there may flip legitimately); at least `min_steps` must agree.
fn check_greedy(
    name: &str,
    got: &[u32],
    want: &[u32],
    margins: &[f64],
    tol: f64,
    min_steps: usize,
) -> usize {
    let first_diff = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(want.len());
    let first_close = margins.iter().position(|&m| m < tol).unwrap_or(want.len());
    println!("{name}: greedy ids identical for {first_diff} of {} steps (first near-tie at step {first_close})", want.len());
    assert!(
        first_diff >= first_close.min(want.len()) && first_diff >= min_steps.min(first_close),
        "{name}: greedy ids diverge at step {first_diff} (first near-tie at {first_close}): got {:?}, want {:?}",
        &got[..first_diff.saturating_add(1).min(got.len())],
        &want[..first_diff.saturating_add(1).min(want.len())]
    );
    first_diff
}

fn f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn token_ids_match_the_reference_on_tricky_strings() {
    let tok = TextTokenizer::from_dir(&model_dir(), &[2]).unwrap();
    let fx = fixture();
    let mut n = 0;
    for case in fx["tokenization"]
        .as_array()
        .unwrap()
        .iter()
        .chain(fx["prompts"].as_array().unwrap())
    {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids"]);
        assert_eq!(tok.encode(text).unwrap(), want, "ids of {text:?}");
        n += 1;
    }
    assert!(n >= 30, "only {n} cases");
}

#[test]
fn chat_template_renders_like_transformers() {
    let tok = TextTokenizer::from_dir(&model_dir(), &[2]).unwrap();
    let tmpl = tok
        .chat_template
        .as_ref()
        .expect("the default model has a chat template");
    let fx = fixture();
    for case in fx["chat"].as_array().unwrap() {
        let msgs: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let got = tmpl.render(&msgs, gen).unwrap();
        assert_eq!(got, case["rendered"].as_str().unwrap());
        assert_eq!(tok.encode(&got).unwrap(), ids(&case["ids"]));
    }
}

#[test]
fn f32_weights_match_transformers_logits_and_greedy_tokens() {
    let (model, _) = load(&f32_model_dir(), 2);
    let fx = fixture();
    for (i, p) in fx["prompts"].as_array().unwrap().iter().enumerate() {
        let name = p["name"].as_str().unwrap();
        let prompt = ids(&p["ids"]);
        let want = f32_file(p["logits_file"].as_str().unwrap());
        let got = last_logits(&model, &prompt, DType::F32);
        let e = rel_l2(&got, &want);
        println!("{name}: f32 weights, f32 KV: logits rel L2 {e:.2e}");
        assert!(e < 1e-3, "prompt {i} ({name}): rel L2 {e}");
        let g = greedy(&model, &prompt, 40, DType::F32);
        let same = check_greedy(
            name,
            &g,
            &ids(&p["greedy_ids"]),
            &f64s(&p["greedy_top2_margin"]),
            1e-2,
            32,
        );
        // The same weights in f32: at least 32 identical greedy tokens, near-ties or not.
        assert!(same >= 32, "{name}: only {same} identical greedy tokens");
    }
}

#[test]
fn default_f16_model_stays_close_to_transformers() {
    let (model, _) = load(&model_dir(), 2);
    let fx = fixture();
    for p in fx["prompts"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let prompt = ids(&p["ids"]);
        let want = f32_file(p["logits_file"].as_str().unwrap());
        for kv in [DType::F32, DType::F16] {
            let e = rel_l2(&last_logits(&model, &prompt, kv), &want);
            println!("{name}: f16 weights, {kv} KV: logits rel L2 {e:.2e}");
            assert!(e < 3e-3, "{name} with {kv} KV: rel L2 {e}");
        }
        let g = greedy(&model, &prompt, 40, DType::F16);
        check_greedy(
            name,
            &g,
            &ids(&p["greedy_ids"]),
            &f64s(&p["greedy_top2_margin"]),
            0.1,
            16,
        );
    }
}

#[test]
fn perplexity_matches_transformers_within_half_a_percent() {
    let fx = fixture();
    let want = fx["ppl"]["ppl"].as_f64().unwrap();
    let tokens = ids(&fx["ppl"]["ids"]);
    let text = std::fs::read_to_string(fx["ppl"]["text_file"].as_str().unwrap()).unwrap();
    let (model, tok) = load(&model_dir(), 2);
    let mut ours = tok.encode(&text).unwrap();
    ours.truncate(tokens.len());
    assert_eq!(ours, tokens, "tokenization of the perplexity text");
    for (dir, kv) in [(model_dir(), DType::F16), (f32_model_dir(), DType::F32)] {
        let (m, _) = load(&dir, 2);
        let r = perplexity(&m, &tokens, 256, kv, &mut |_, _| {}).unwrap();
        let dev = (r.ppl / want - 1.0).abs();
        println!(
            "{}: ppl {:.4} vs transformers {want:.4} ({:+.3}%)",
            dir.display(),
            r.ppl,
            100.0 * (r.ppl / want - 1.0)
        );
        assert!(dev < 0.005, "ppl {} vs {want}", r.ppl);
    }
    drop(model);
}
