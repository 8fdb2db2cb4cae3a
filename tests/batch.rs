//! `farsight batch` end to end: SIGKILL at several points and resume (every document exactly
//! once, valid JSONL after every kill), shards partition the input, bad documents become error
//! lines while the job goes on.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn batch(input: &Path, output: &Path, extra: &[&str]) -> Command {
    let mut c = farsight();
    c.arg("batch")
        .arg("--model")
        .arg(model_dir())
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output);
    c.args([
        "--task",
        "generate",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "3",
    ])
    .args(extra);
    c
}

fn write_docs(path: &Path, n: usize) -> Vec<String> {
    let words = [
        "river", "mountain", "city", "garden", "library", "engine", "orchard",
    ];
    let mut text = String::new();
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("doc-{i}");
        let w = words[i % words.len()];
        let body = format!("The {w} number {i} was described in the old book as").repeat(1 + i % 3);
        text.push_str(&json!({"id": id, "text": body}).to_string());
        text.push('\n');
        ids.push(id);
    }
    std::fs::write(path, text).unwrap();
    ids
}

/// Parses every line (all must be whole JSON); returns the records.
fn read_results(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "torn last line: {text:?}"
    );
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

fn complete_lines(path: &Path) -> usize {
    std::fs::read(path)
        .map(|b| b.iter().filter(|&&c| c == b'\n').count())
        .unwrap_or(0)
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "batch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sigkill_at_any_point_then_resume_writes_every_document_once() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("docs.jsonl"), dir.path().join("out.jsonl"));
    let ids = write_docs(&input, 12);
    // Kill after 0 documents (during start-up), after 1, after some more.
    for target in [0, 1, 5] {
        let mut child = batch(&input, &output, &[]).spawn().unwrap();
        let t0 = Instant::now();
        if target == 0 {
            std::thread::sleep(Duration::from_millis(150));
        } else {
            while complete_lines(&output) < target && t0.elapsed() < Duration::from_secs(120) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let recs = read_results(&output);
        assert!(
            recs.len() >= target,
            "{} lines after kill at {target}",
            recs.len()
        );
        assert!(
            recs.len() < ids.len(),
            "the job ended before the kill at {target}"
        );
    }
    // A torn line as a crash in the middle of a write would leave it.
    let mut bytes = std::fs::read(&output).unwrap();
    let done: Vec<String> = read_results(&output)
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    let pending = ids.iter().find(|i| !done.contains(i)).unwrap();
    bytes.extend_from_slice(format!("{{\"id\":\"{pending}\",\"output\":\"half").as_bytes());
    std::fs::write(&output, bytes).unwrap();

    let out = batch(&input, &output, &[]).output().unwrap();
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already done"), "{err}");
    let recs = read_results(&output);
    let mut count: HashMap<String, usize> = HashMap::new();
    for r in &recs {
        assert!(r.get("error").is_none(), "{r}");
        assert!(r["new_tokens"].as_u64().unwrap() >= 1, "{r}");
        *count
            .entry(r["id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(count.len(), ids.len(), "{count:?}");
    assert!(count.values().all(|&c| c == 1), "{count:?}");
    // A further run writes nothing.
    ok(&batch(&input, &output, &[]).output().unwrap());
    assert_eq!(read_results(&output).len(), ids.len());
}

#[test]
fn shards_partition_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("docs.jsonl");
    let mut ids = write_docs(&input, 7);
    let mut text = std::fs::read_to_string(&input).unwrap();
    text.push_str("{\"id\": \"broken\"\n"); // line 8: malformed
    std::fs::write(&input, text).unwrap();
    ids.push("line:8".into());
    let mut seen: Vec<String> = Vec::new();
    for i in 0..3 {
        let output = dir.path().join(format!("out-{i}.jsonl"));
        ok(&batch(&input, &output, &["--shard", &format!("{i}/3")])
            .output()
            .unwrap());
        for r in read_results(&output) {
            let key = match r["id"].as_str() {
                Some(id) => id.to_string(),
                None => format!("line:{}", r["line"]),
            };
            let line = ids.iter().position(|x| *x == key).unwrap() + 1;
            assert_eq!((line - 1) % 3, i, "{key} in shard {i}");
            seen.push(key);
        }
    }
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids, "every line in exactly one shard");
    let out = batch(&input, &dir.path().join("x.jsonl"), &["--shard", "3/3"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "a shard index past the count is a usage error"
    );
}

#[test]
fn bad_documents_become_error_lines_and_the_job_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("docs.jsonl"), dir.path().join("out.jsonl"));
    let long = std::fs::read_to_string("/usr/share/common-licenses/GPL-3")
        .unwrap()
        .repeat(2);
    let lines = [
        json!({"id": "long", "text": long}).to_string(),
        "[1, 2".to_string(),
        json!({"id": "ok", "text": "Rust is a programming language that", "max_new_tokens": 3, "stop": ["\n"]}).to_string(),
        json!({"id": "hot", "text": "Once upon a time", "temperature": -2.0}).to_string(),
        json!({"text": "no id"}).to_string(),
    ];
    std::fs::write(&input, lines.join("\n")).unwrap();
    let out = batch(&input, &output, &[]).output().unwrap();
    ok(&out);
    let recs = read_results(&output);
    assert_eq!(recs.len(), 5, "{recs:?}");
    let by = |k: &str| recs.iter().find(|r| r["id"] == k).unwrap().clone();
    assert!(by("long")["error"]
        .as_str()
        .unwrap()
        .contains("context is 8192 tokens"));
    assert!(by("hot")["error"].as_str().unwrap().contains("temperature"));
    let good = by("ok");
    assert_eq!(good["new_tokens"], 3);
    assert_eq!(good["settings"]["max_new_tokens"], 3);
    assert_eq!(good["settings"]["stop"], json!(["\n"]));
    assert!(good["timings"]["total_s"].as_f64().unwrap() > 0.0);
    for (line, needle) in [(2, "line 2"), (5, "id")] {
        let r = recs.iter().find(|r| r["line"] == line).unwrap();
        assert!(
            r["id"].is_null() && r["error"].as_str().unwrap().contains(needle),
            "{r}"
        );
    }
    // A missing input file: one line, non-zero.
    let out = batch(&dir.path().join("nope.jsonl"), &output, &[])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.lines().count() == 1 && err.contains("nope.jsonl"),
        "{err}"
    );
}
