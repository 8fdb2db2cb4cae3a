//! Scissorhands eviction on the default model: generation under a byte budget runs, evicts and
//! stays under the budget; the budget flags are checked and reported.

mod common;

use std::path::Path;
use std::process::Output;

use common::*;

fn run(args: &[&str]) -> Output {
    farsight().args(args).current_dir(root()).output().unwrap()
}

fn assert_one_line_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure; stderr: {err}");
    assert_ne!(out.status.code(), Some(101), "panicked: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains(needle), "expected `{needle}` in: {err}");
}

/// The first `chars` characters of the evaluation text, as a prompt file in `dir`.
fn prompt_file(dir: &Path, chars: usize) -> String {
    let text = std::fs::read_to_string(root().join("data/eval.txt")).unwrap();
    let p = dir.join("prompt.txt");
    std::fs::write(&p, text.chars().take(chars).collect::<String>()).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn generation_under_a_budget_evicts_and_stays_under_it() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = prompt_file(dir.path(), 3000);
    let out = run(&[
        "generate", "--prompt-file", &prompt, "--max-new-tokens", "40", "--attention", "double-sparse",
        "--host-kv-budget", "1/4", "--prefill-chunk", "64", "--json", "--report-memory",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("host KV budget:") && err.contains("peak RSS"), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let m = &v["kv_memory"];
    let budget = m["budget_bytes"].as_u64().unwrap();
    assert!(m["row_bytes"].as_u64().unwrap() + m["label_bytes"].as_u64().unwrap() <= budget, "{m}");
    assert!(m["evictions"].as_u64().unwrap() > 0 && m["evicted_tokens"].as_u64().unwrap() > 0, "{m}");
    let positions = m["positions"].as_u64().unwrap();
    assert_eq!(m["live_tokens"].as_u64().unwrap() + m["evicted_tokens"].as_u64().unwrap(), positions, "{m}");
    assert_eq!(v["new_token_ids"].as_array().unwrap().len(), 40);
}

#[test]
fn budget_flags_are_checked() {
    let out = run(&["generate", "--prompt", "x", "--host-kv-budget", "1GiB"]);
    assert_one_line_error(&out, "pass --attention double-sparse");
    let out = run(&["generate", "--prompt", "x", "--attention", "double-sparse", "--host-kv-budget", "1.5"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("(0, 1]"));
    let out = run(&["generate", "--prompt", "x", "--attention", "double-sparse", "--host-kv-budget", "1000"]);
    assert_one_line_error(&out, "sink 4 + recent 32");
    let dir = tempfile::tempdir().unwrap();
    let prompt = prompt_file(dir.path(), 3000);
    let out = run(&["generate", "--prompt-file", &prompt, "--attention", "double-sparse", "--host-kv-budget", "1/8"]);
    assert_one_line_error(&out, "use --prefill-chunk 28 or --host-kv-budget");
}

#[test]
fn report_memory_predicts_a_budgeted_store() {
    let out = run(&[
        "report", "memory", "--context", "65536", "--context-override", "65536", "--attention", "double-sparse",
        "--host-kv-budget", "1/8", "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let f = &v["footprint"];
    let ratio = f["compression_ratio"].as_f64().unwrap();
    assert!((8.0..8.5).contains(&ratio), "{f}");
    assert!(f["kv_bytes"].as_u64().unwrap() <= f["kv"]["budget_bytes"].as_u64().unwrap(), "{f}");
    let out = run(&["report", "memory", "--context", "2048"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("compression 1.00x"));
}
