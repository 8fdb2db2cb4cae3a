//! `--plot` of the report commands writes an SVG and a PNG beside the usual output.

mod common;

use std::path::Path;

use common::*;

fn run_ok(args: &[&str]) -> (String, String) {
    let out = farsight().args(args).output().unwrap();
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "farsight {args:?} failed: {se}");
    (so, se)
}

/// The SVG is an `<svg>` document (well-formed XML) holding each of `labels` as text; the PNG
/// has the PNG magic, the size of the plots (1000 x 600) and more than a blank image's bytes.
fn check_plot(base: &Path, labels: &[&str]) {
    let svg = std::fs::read_to_string(base.with_extension("svg")).unwrap();
    assert!(
        svg.trim_start().starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "{}",
        &svg[..svg.len().min(200)]
    );
    let doc = roxmltree::Document::parse(&svg).expect("the SVG is well-formed XML");
    let texts: Vec<&str> = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .map(str::trim)
        .collect();
    for l in labels {
        assert!(texts.contains(l), "svg lacks the text {l:?}: {texts:?}");
    }
    let png = std::fs::read(base.with_extension("png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let be = |i: usize| u32::from_be_bytes(png[i..i + 4].try_into().unwrap());
    assert_eq!((be(16), be(20)), (1000, 600));
    assert!(png.len() > 10_000, "png of {} bytes", png.len());
}

#[test]
fn eval_sweep_plot_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("sweep");
    let md = dir.path().join("sweep.md");
    let (table, err) = run_ok(&[
        "eval",
        "sweep",
        "--attention",
        "double-sparse",
        "--text",
        "data/eval.txt",
        "--max-tokens",
        "64",
        "--chunk",
        "32",
        "--budgets",
        "1/2,1/4",
        "--channels",
        "8",
        "--bits",
        "16",
        "--out",
        md.to_str().unwrap(),
        "--plot",
        base.to_str().unwrap(),
    ]);
    assert!(table.contains("| dense | all |"), "{table}");
    assert!(
        err.contains("plot: ") && err.contains("sweep.svg") && err.contains("sweep.png"),
        "{err}"
    );
    assert!(md.exists());
    check_plot(
        &base,
        &["8 channels, 16-bit labels", "1/2", "1/4", "perplexity"],
    );
}

#[test]
fn bench_dense_plot_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("bench");
    let json = dir.path().join("bench.json");
    let (table, err) = run_ok(&[
        "bench",
        "cpu",
        "--model",
        model_dir().to_str().unwrap(),
        "--text",
        "data/eval.txt",
        "--context",
        "32,64",
        "--new-tokens",
        "2",
        "--repeats",
        "2",
        "--warmup",
        "0",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        base.to_str().unwrap(),
    ]);
    assert!(table.contains("| 64 |"), "{table}");
    assert!(err.contains("bench.png"), "{err}");
    check_plot(
        &base,
        &[
            "prefill (median, min-max)",
            "decode (2 new tokens) (median, min-max)",
            "tokens/s",
            "32",
            "64",
        ],
    );
}

#[test]
fn report_memory_plot_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("memory");
    let (json, err) = run_ok(&[
        "report",
        "memory",
        "--model",
        model_dir().to_str().unwrap(),
        "--context",
        "4k,16k,64k",
        "--context-override",
        "65536",
        "--attention",
        "double-sparse",
        "--host-kv-budget",
        "1/8",
        "--json",
        "--plot",
        base.to_str().unwrap(),
    ]);
    assert!(
        err.contains("memory.svg") && err.contains("memory.png"),
        "{err}"
    );
    let contexts: Vec<u64> = json
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["settings"]["context"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(contexts, [4096, 16384, 65536]);
    check_plot(
        &base,
        &[
            "weights (host)",
            "workspace (host)",
            "windows (gpu)",
            "labels (host)",
            "rows (host)",
            "total",
            "full dense KV",
            "4k",
            "16k",
            "64k",
        ],
    );
}
