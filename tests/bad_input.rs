//! Bad input gets one clear line on stderr and a non-zero exit, never a panic.

mod common;

use std::path::Path;
use std::process::Output;

use common::*;

/// Asserts a failed run whose stderr is exactly one `error: ...` line containing `needle`.
fn assert_one_line_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert_ne!(out.status.code(), Some(101), "the process panicked: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains(needle), "expected `{needle}` in: {err}");
}

fn generate(model: &Path, prompt: &str) -> Output {
    farsight()
        .args(["generate", "--model"])
        .arg(model)
        .args(["--prompt", prompt, "--max-new-tokens", "2"])
        .output()
        .unwrap()
}

/// A copy of the default model's small files in a temp dir (no weights).
fn model_skeleton() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(model_dir().join(f), t.path().join(f)).unwrap();
    }
    t
}

#[test]
fn missing_model_directory() {
    let out = generate(Path::new("/nonexistent/model"), "hi");
    assert_one_line_error(&out, "/nonexistent/model not found");
}

#[test]
fn missing_default_model_says_how_to_fetch_it() {
    let cwd = tempfile::tempdir().unwrap();
    let out = farsight()
        .current_dir(cwd.path())
        .args(["generate", "--prompt", "hi"])
        .output()
        .unwrap();
    assert_one_line_error(&out, "scripts/fetch-model.sh");
}

#[test]
fn truncated_safetensors() {
    let t = model_skeleton();
    let full = std::fs::read(model_dir().join("model.safetensors")).unwrap();
    for cut in [4, 100, full.len() / 2, full.len() - 1] {
        std::fs::write(t.path().join("model.safetensors"), &full[..cut]).unwrap();
        let out = generate(t.path(), "hi");
        assert_one_line_error(&out, "model.safetensors");
    }
}

#[test]
fn missing_tensor_and_missing_weights() {
    let t = model_skeleton();
    let out = generate(t.path(), "hi");
    assert_one_line_error(&out, "no model.safetensors");
}

#[test]
fn unknown_architecture_and_unsupported_field() {
    let t = model_skeleton();
    let cfg = std::fs::read_to_string(t.path().join("config.json")).unwrap();
    std::fs::write(
        t.path().join("config.json"),
        cfg.replace("LlamaForCausalLM", "GPT2LMHeadModel"),
    )
    .unwrap();
    assert_one_line_error(&generate(t.path(), "hi"), "GPT2LMHeadModel");
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["rope_scaling"] = serde_json::json!({"rope_type": "longrope", "factor": 4.0});
    std::fs::write(t.path().join("config.json"), v.to_string()).unwrap();
    assert_one_line_error(&generate(t.path(), "hi"), "longrope");
    std::fs::write(t.path().join("config.json"), "{\"hidden_size\": ").unwrap();
    assert_one_line_error(&generate(t.path(), "hi"), "config.json");
}

#[test]
fn empty_prompt() {
    assert_one_line_error(&generate(&model_dir(), ""), "the prompt is empty");
    assert_one_line_error(&generate(&model_dir(), "  \n"), "the prompt is empty");
}

#[test]
fn prompt_longer_than_the_context() {
    let text = std::fs::read_to_string("/usr/share/common-licenses/GPL-3").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("long.txt");
    std::fs::write(&f, text.repeat(2)).unwrap();
    let out = farsight()
        .args(["generate", "--model"])
        .arg(model_dir())
        .arg("--prompt-file")
        .arg(&f)
        .output()
        .unwrap();
    assert_one_line_error(&out, "the model's context is 8,192 tokens");
}

#[test]
fn invalid_flags() {
    let m = model_dir();
    let run = |extra: &[&str]| {
        farsight()
            .args(["generate", "--model"])
            .arg(&m)
            .args(["--prompt", "hi"])
            .args(extra)
            .output()
            .unwrap()
    };
    assert_one_line_error(&run(&["--temperature", "-1"]), "temperature");
    assert_one_line_error(&run(&["--top-p", "1.5"]), "top-p");
    assert_one_line_error(&run(&["--device", "cuda"]), "cuda");
    // clap's own usage errors: non-zero (2), no panic
    let out = run(&["--device", "tpu"]);
    assert_eq!(out.status.code(), Some(2));
    let out = farsight()
        .args(["generate", "--model"])
        .arg(&m)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "neither --prompt nor --prompt-file"
    );
    let out = farsight()
        .args(["generate", "--prompt-file", "/nonexistent.txt"])
        .output()
        .unwrap();
    assert_one_line_error(&out, "/nonexistent.txt");
}

/// `bench offload`'s own checks come before the GPU is touched (here: there is none).
#[test]
fn bench_offload_flags() {
    let run = |extra: &[&str]| {
        farsight()
            .args(["bench", "offload", "--context", "1k"])
            .args(extra)
            .output()
            .unwrap()
    };
    assert_one_line_error(&run(&["--query-bias=-1"]), "--query-bias");
    assert_one_line_error(&run(&["--query-bias=nan"]), "--query-bias");
    assert_one_line_error(&run(&["--steps", "0"]), "--steps");
    assert_one_line_error(&run(&["--gather-blocks", "32,0"]), "--gather-blocks");
    assert_one_line_error(&run(&["--row-cache", "1,0"]), "--row-cache");
    assert_one_line_error(&run(&["--page-tokens", "1,0"]), "--page-tokens");
    assert_one_line_error(&run(&["--page-tokens", "128"]), "--page-tokens");
    let dir = tempfile::tempdir().unwrap();
    let disk = format!("disk:{}", dir.path().display());
    assert_one_line_error(
        &run(&["--page-tokens", "4", "--kv-store", &disk]),
        "--page-tokens",
    );
    let out = run(&["--timing-steps", "-1"]);
    assert_eq!(out.status.code(), Some(2), "clap rejects a negative count");
    let out = run(&["--kv-store", "tape"]);
    assert_eq!(out.status.code(), Some(2), "clap rejects an unknown store");
    // Valid flags, the disk tier included, reach the device check: a clear error here.
    let out = run(&[
        "--kv-store",
        &disk,
        "--query-bias",
        "6",
        "--gather-blocks",
        "16,32",
        "--timing-steps",
        "2",
        "--row-cache",
        "1,4",
    ]);
    assert_one_line_error(&out, "cuda");
    assert_one_line_error(&run(&["--page-tokens", "1,4"]), "cuda");
}

#[test]
fn corrupt_gguf_is_refused_by_convert() {
    let src = std::fs::read(gguf_path()).unwrap();
    let head = &src[..1 << 20];
    let dir = tempfile::tempdir().unwrap();
    // header: magic(4) version(4) n_tensors(8) n_kv(8), then the first key's length (8).
    let cases: Vec<(usize, u64)> = vec![(8, u64::MAX), (16, 1 << 40), (24, 7), (24, u64::MAX)];
    for (i, (off, val)) in cases.into_iter().enumerate() {
        let mut b = head.to_vec();
        b[off..off + 8].copy_from_slice(&val.to_le_bytes());
        let p = dir.path().join(format!("bad{i}.gguf"));
        std::fs::write(&p, &b).unwrap();
        let out = farsight()
            .arg("convert-gguf")
            .arg(&p)
            .arg(dir.path().join(format!("out{i}")))
            .output()
            .unwrap();
        assert_one_line_error(&out, "");
    }
    let p = dir.path().join("truncated.gguf");
    std::fs::write(&p, head).unwrap();
    let out = farsight()
        .arg("convert-gguf")
        .arg(&p)
        .arg(dir.path().join("out-t"))
        .output()
        .unwrap();
    assert_one_line_error(&out, "");
    let out = farsight()
        .arg("convert-gguf")
        .arg("/nonexistent.gguf")
        .arg(dir.path().join("o"))
        .output()
        .unwrap();
    assert_one_line_error(&out, "/nonexistent.gguf");
}
