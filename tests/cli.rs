//! The command line end to end on the default model.

mod common;

use common::*;
use serde_json::Value;

fn run_ok(args: &[&str]) -> (String, String) {
    let out = farsight().args(args).output().unwrap();
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "farsight {args:?} failed: {se}");
    (so, se)
}

#[test]
fn generate_json_and_streamed_text_agree() {
    let m = model_dir();
    let m = m.to_str().unwrap();
    let (json, _) = run_ok(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "12",
        "--json",
    ]);
    let v: Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(v["prompt_tokens"], 5);
    let ids = v["new_token_ids"].as_array().unwrap();
    assert!(!ids.is_empty() && ids.len() <= 12);
    assert!(v["timings"]["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["timings"]["prefill_s"].as_f64().unwrap() > 0.0);
    let text = v["text"].as_str().unwrap();
    assert!(text.contains("Paris"), "{text}");
    let (streamed, err) = run_ok(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "12",
    ]);
    assert_eq!(streamed.trim_end_matches('\n'), text);
    assert!(
        err.contains("prefill:") && err.contains("tok/s"),
        "closing line: {err}"
    );
}

#[test]
fn chat_stop_strings_and_sampling_seed() {
    let m = model_dir();
    let m = m.to_str().unwrap();
    let (json, _) = run_ok(&[
        "generate",
        "--model",
        m,
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--json",
        "--max-new-tokens",
        "40",
    ]);
    let v: Value = serde_json::from_str(json.trim()).unwrap();
    assert!(v["text"].as_str().unwrap().contains("Paris"), "{v}");
    assert_eq!(v["finish_reason"], "eos");
    let (json, _) = run_ok(&[
        "generate",
        "--model",
        m,
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--json",
        "--stop",
        "Paris",
    ]);
    let v: Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(v["finish_reason"], "stop");
    assert!(!v["text"].as_str().unwrap().contains("Paris"));
    let args = [
        "generate",
        "--model",
        m,
        "--prompt",
        "Once upon a time",
        "--temperature",
        "0.9",
        "--top-p",
        "0.95",
        "--top-k",
        "50",
        "--seed",
        "7",
        "--json",
        "--max-new-tokens",
        "16",
    ];
    let a: Value = serde_json::from_str(run_ok(&args).0.trim()).unwrap();
    let b: Value = serde_json::from_str(run_ok(&args).0.trim()).unwrap();
    assert_eq!(
        a["new_token_ids"], b["new_token_ids"],
        "same seed, same tokens"
    );
}

#[test]
fn eval_ppl_json() {
    let m = model_dir();
    let (json, err) = run_ok(&[
        "eval",
        "ppl",
        "--model",
        m.to_str().unwrap(),
        "--text",
        "/usr/share/common-licenses/GPL-3",
        "--max-tokens",
        "300",
        "--json",
    ]);
    let v: Value = serde_json::from_str(json.trim()).unwrap();
    let ppl = v["ppl"].as_f64().unwrap();
    assert!(ppl > 1.0 && ppl < 100.0, "{ppl}");
    assert_eq!(v["tokens"], 300);
    assert!(err.contains("eval ppl:"), "settings line: {err}");
}
