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
        "generate",
        "--prompt-file",
        &prompt,
        "--max-new-tokens",
        "40",
        "--attention",
        "double-sparse",
        "--host-kv-budget",
        "1/4",
        "--prefill-chunk",
        "64",
        "--json",
        "--report-memory",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("host KV budget:") && err.contains("peak RSS"),
        "{err}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let m = &v["kv_memory"];
    let budget = m["budget_bytes"].as_u64().unwrap();
    assert!(
        m["row_bytes"].as_u64().unwrap() + m["label_bytes"].as_u64().unwrap() <= budget,
        "{m}"
    );
    assert!(
        m["evictions"].as_u64().unwrap() > 0 && m["evicted_tokens"].as_u64().unwrap() > 0,
        "{m}"
    );
    let positions = m["positions"].as_u64().unwrap();
    assert_eq!(
        m["live_tokens"].as_u64().unwrap() + m["evicted_tokens"].as_u64().unwrap(),
        positions,
        "{m}"
    );
    assert_eq!(v["new_token_ids"].as_array().unwrap().len(), 40);
}

#[test]
fn budget_flags_are_checked() {
    let out = run(&["generate", "--prompt", "x", "--host-kv-budget", "1GiB"]);
    assert_one_line_error(&out, "pass --attention double-sparse");
    let out = run(&[
        "generate",
        "--prompt",
        "x",
        "--attention",
        "double-sparse",
        "--host-kv-budget",
        "1.5",
    ]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("(0, 1]"));
    let out = run(&[
        "generate",
        "--prompt",
        "x",
        "--attention",
        "double-sparse",
        "--host-kv-budget",
        "1000",
    ]);
    assert_one_line_error(&out, "sink 4 + recent 32");
    let dir = tempfile::tempdir().unwrap();
    let prompt = prompt_file(dir.path(), 3000);
    let out = run(&[
        "generate",
        "--prompt-file",
        &prompt,
        "--attention",
        "double-sparse",
        "--host-kv-budget",
        "1/8",
    ]);
    assert_one_line_error(&out, "use --prefill-chunk 28 or --host-kv-budget");
}

#[test]
fn report_memory_predicts_a_budgeted_store() {
    let out = run(&[
        "report",
        "memory",
        "--context",
        "65536",
        "--context-override",
        "65536",
        "--attention",
        "double-sparse",
        "--host-kv-budget",
        "1/8",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let f = &v["footprint"];
    let ratio = f["compression_ratio"].as_f64().unwrap();
    assert!((8.0..8.5).contains(&ratio), "{f}");
    assert!(
        f["kv_bytes"].as_u64().unwrap() <= f["kv"]["budget_bytes"].as_u64().unwrap(),
        "{f}"
    );
    let out = run(&["report", "memory", "--context", "2048"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("compression 1.00x"));
}

/// Rows + labels of a JSON `KvMemory` are under its budget, and it evicted.
fn assert_evicted_under_budget(m: &serde_json::Value) {
    let budget = m["budget_bytes"].as_u64().unwrap();
    assert!(
        m["row_bytes"].as_u64().unwrap() + m["label_bytes"].as_u64().unwrap() <= budget,
        "{m}"
    );
    assert!(m["evictions"].as_u64().unwrap() > 0, "{m}");
    let positions = m["positions"].as_u64().unwrap();
    assert_eq!(
        m["live_tokens"].as_u64().unwrap() + m["evicted_tokens"].as_u64().unwrap(),
        positions,
        "{m}"
    );
}

#[test]
fn bench_applies_the_budget_and_reports_memory() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = run(&[
        "bench",
        "dense",
        "--text",
        "data/eval.txt",
        "--context",
        "512",
        "--new-tokens",
        "4",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--prefill-chunk",
        "64",
        "--attention",
        "double-sparse",
        "--host-kv-budget",
        "1/2",
        "--report-memory",
        "--json",
        json.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // The fraction is of the context + new tokens (516 tokens), not of the model's context.
    let per_token_full = 30 * 2 * 3 * 64 * 2;
    assert!(
        err.contains(&format!(
            "of a {}-byte full KV of 516 tokens",
            516 * per_token_full
        )),
        "{err}"
    );
    assert_eq!(
        err.matches("measured vs").count(),
        2,
        "one report per attention: {err}"
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{v}");
    assert_eq!(
        runs[0]["kv_memory"]["budget_bytes"],
        serde_json::Value::Null,
        "{v}"
    );
    assert!(
        runs[1]["attention"]
            .as_str()
            .unwrap()
            .contains("host-kv-budget 0.5"),
        "{v}"
    );
    assert_evicted_under_budget(&runs[1]["kv_memory"]);
    assert_eq!(runs[1]["kv_memory"]["positions"], 516, "{v}");
    // Flags bench cannot honour are refused, not ignored.
    let out = run(&[
        "bench",
        "dense",
        "--text",
        "data/eval.txt",
        "--context",
        "512",
        "--attention",
        "double-sparse",
        "--host-kv-budget",
        "1/2",
        "--random-context",
    ]);
    assert_one_line_error(&out, "drop --host-kv-budget or --random-context");
    let out = run(&[
        "bench",
        "dense",
        "--shape",
        "smollm2-135m",
        "--context",
        "512",
        "--report-memory",
    ]);
    assert_one_line_error(&out, "need --text");
}

#[test]
fn passkey_evicts_between_prefill_chunks_under_a_budget_per_length() {
    let out = run(&[
        "eval",
        "passkey",
        "--lengths",
        "600,700",
        "--depths",
        "0.5",
        "--trials",
        "1",
        "--attention",
        "double-sparse",
        "--token-budget",
        "1000000",
        "--host-kv-budget",
        "1/2",
        "--chunk",
        "64",
        "--json",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // One budget per length: half the full KV of the length + the answer's 9 tokens.
    let per_token_full = 30 * 2 * 3 * 64 * 2;
    for len in [609, 709] {
        assert!(
            err.contains(&format!(
                "of a {}-byte full KV of {len} tokens",
                len * per_token_full
            )),
            "{err}"
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let trials = v["trials"].as_array().unwrap();
    assert_eq!(trials.len(), 2, "{v}");
    for t in trials {
        let r = &t["trial"];
        assert_evicted_under_budget(&r["kv_memory"]);
        // The needle is found (the key's five digits, twice) and what survived is counted.
        assert_eq!(r["key_tokens"], 10, "{r}");
        assert!(r["key_tokens_kept"].as_u64().unwrap() <= 10, "{r}");
        assert!(
            r["needle_tokens_kept"].as_u64().unwrap() <= r["needle_tokens"].as_u64().unwrap(),
            "{r}"
        );
    }
    let b = |i: usize| {
        v["settings"]["budgets"][i]["host_kv_budget_bytes"]
            .as_u64()
            .unwrap()
    };
    assert!(b(0) < b(1), "{v}");
    assert_eq!(
        v["summary"][0]["per_length"].as_array().unwrap().len(),
        2,
        "{v}"
    );
    // The whole prompt in one prefill call does not fit half of it: refused with the fix.
    let out = run(&[
        "eval",
        "passkey",
        "--lengths",
        "600",
        "--depths",
        "0.5",
        "--trials",
        "1",
        "--attention",
        "double-sparse",
        "--host-kv-budget",
        "1/2",
        "--chunk",
        "600",
    ]);
    assert_one_line_error(&out, "lower the chunk or raise --host-kv-budget");
}
