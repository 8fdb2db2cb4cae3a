//! `generate` refuses a run that cannot fit before doing any work: one `error:` line saying what
//! would fit, a non-zero exit, and no prefill.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;
use farsight_engine::TextTokenizer;

fn run(args: &[&str]) -> (Output, Duration) {
    let t = Instant::now();
    let out = farsight().args(args).current_dir(root()).output().unwrap();
    (out, t.elapsed())
}

/// A refused run: exit status 1 (no panic), nothing on stdout, no prefill, and one `error:`
/// line holding every needle.
fn assert_refused(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        out.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!err.lines().any(|l| l.starts_with("prefill")), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "expected `{n}` in: {}", lines[0]);
    }
}

/// The first `chars` characters of the evaluation text repeated `copies` times, in `dir`;
/// returns the path and its token count.
fn prompt_file(dir: &Path, chars: usize, copies: usize) -> (PathBuf, usize) {
    let text: String = std::fs::read_to_string(root().join("data/eval.txt"))
        .unwrap()
        .chars()
        .take(chars)
        .collect();
    let text = text.repeat(copies);
    let p = dir.join("prompt.txt");
    std::fs::write(&p, &text).unwrap();
    let tokens = TextTokenizer::from_dir(&model_dir(), &[])
        .unwrap()
        .encode(&text)
        .unwrap()
        .len();
    (p, tokens)
}

/// `8092` -> "8,092".
fn count(n: usize) -> String {
    let digits = n.to_string().into_bytes();
    digits
        .rchunks(3)
        .rev()
        .map(|g| String::from_utf8(g.to_vec()).unwrap())
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn prompt_past_the_context_is_refused_with_what_fits() {
    let dir = tempfile::tempdir().unwrap();
    let (long, n) = prompt_file(dir.path(), usize::MAX, 1);
    assert!(n > 8192);
    let (out, _) = run(&[
        "generate",
        "--prompt-file",
        long.to_str().unwrap(),
        "--max-new-tokens",
        "100",
    ]);
    let prompt = format!("the prompt is {} tokens", count(n));
    assert_refused(
        &out,
        &[
            &prompt,
            "the model's context is 8,192 tokens",
            "at most 8,092 prompt tokens fit with --max-new-tokens 100",
        ],
    );

    // The prompt fits, the new tokens do not.
    let (short, n) = prompt_file(dir.path(), 3000, 1);
    let (out, _) = run(&[
        "generate",
        "--prompt-file",
        short.to_str().unwrap(),
        "--max-new-tokens",
        "8000",
    ]);
    let fix = format!(
        "use --max-new-tokens {} or a prompt of at most 192 tokens",
        8192 - n
    );
    assert_refused(&out, &["--max-new-tokens 8000 more", &fix]);
}

#[test]
fn budget_too_small_is_refused_with_what_fits() {
    let sparse = [
        "generate",
        "--attention",
        "double-sparse",
        "--max-new-tokens",
        "2",
    ];
    let (out, _) = run(&[&sparse[..], &["--prompt", "x", "--host-kv-budget", "1000"]].concat());
    assert_refused(
        &out,
        &[
            "holds rows + labels of 0 tokens",
            "a decode step with sink 4 + recent 32 needs 37",
            "use --host-kv-budget 2MiB",
        ],
    );
    // What it suggests runs.
    let (out, _) = run(&[&sparse[..], &["--prompt", "x", "--host-kv-budget", "2MiB"]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A prefill chunk that the budget cannot hold next to the sinks and the recent window: the
    // store would fail part-way through the prefill.
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = prompt_file(dir.path(), 3000, 1);
    let (out, _) = run(&[
        &sparse[..],
        &[
            "--prompt-file",
            p.to_str().unwrap(),
            "--host-kv-budget",
            "1/8",
        ],
    ]
    .concat());
    assert_refused(
        &out,
        &[
            "holds rows + labels of 64 tokens",
            "a prefill call of 512 tokens",
            "use --prefill-chunk 28 or --host-kv-budget",
        ],
    );
}

#[test]
fn memory_too_small_is_refused_before_any_prefill() {
    // ~300K tokens, a context stretched to 2^30 and a billion new tokens: the dense KV (20 TiB)
    // fits no machine; without the check the prefill would run for hours.
    let dir = tempfile::tempdir().unwrap();
    let (p, n) = prompt_file(dir.path(), usize::MAX, 4);
    assert!(n > 256 * 1024, "{n}");
    let base = [
        "generate",
        "--prompt-file",
        p.to_str().unwrap(),
        "--context-override",
        "1073741824",
        "--max-new-tokens",
        "1000000000",
    ];
    let (out, took) = run(&base);
    assert_refused(
        &out,
        &[
            "with dense attention and f16 KV the KV cache needs",
            "of host memory",
            "tokens fit; use --attention double-sparse --host-kv-budget 1/",
            "or --attention double-sparse --kv-store disk:PATH",
        ],
    );
    assert!(took < Duration::from_secs(15), "refused after {took:?}");

    let (out, took) = run(&[&base[..], &["--attention", "double-sparse"]].concat());
    assert_refused(
        &out,
        &[
            "with double-sparse attention and a host store",
            "tokens fit; use --host-kv-budget 1/",
            "or --kv-store disk:PATH",
        ],
    );
    assert!(took < Duration::from_secs(15), "refused after {took:?}");
}
