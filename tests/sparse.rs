//! Double Sparsity on the default model: sparse equals dense when nothing is dropped, the disk
//! tier equals the host tier, calibration is deterministic, and bad settings are refused.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use common::*;
use farsight_engine::calibrate::{calibrate, model_identity, Calibration};
use farsight_engine::eval::perplexity_with;
use farsight_engine::kv::{new_sparse_store, new_store, Attention, SparseSetup};
use farsight_engine::model::{Logits, Segment};
use farsight_kernels::DType;
use farsight_offload::sparse::{ChannelRanking, Predict, SparseConfig, TokenBudget};
use farsight_offload::{KvStore, KvStoreSpec};

fn text_ids(n: usize) -> Vec<u32> {
    let (_, tok) = load(&model_dir(), 1);
    let text = std::fs::read_to_string(root().join("data/eval.txt")).unwrap();
    let mut ids = tok.encode(&text).unwrap();
    ids.truncate(n);
    ids
}

/// A calibration of the default model on 256 tokens, made once per test run.
fn calibration_file() -> PathBuf {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        let dir = root().join("target/test-calibration");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("smollm2-256.json");
        let out = farsight()
            .args(["calibrate", "--model"])
            .arg(model_dir())
            .args(["--text", "data/calibration.txt", "--tokens", "256", "--out"])
            .arg(&path)
            .current_dir(root())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        path
    })
    .clone()
}

/// All-position logits of `ids` through `kv`, in 100-token calls.
fn logits(
    model: &farsight_engine::Model<farsight_kernels::cpu::CpuBackend>,
    ids: &[u32],
    kv: &mut dyn KvStore<farsight_kernels::cpu::CpuBackend>,
) -> Vec<f32> {
    let mut ws = model.workspace(100, 100).unwrap();
    let mut all = Vec::new();
    for part in ids.chunks(100) {
        let mut segs = [Segment {
            tokens: part,
            kv: &mut *kv,
            logits: Logits::All,
        }];
        all.extend(
            model
                .forward(&mut ws, &mut segs)
                .unwrap()
                .swap_remove(0)
                .into_logits(),
        );
    }
    all
}

fn setup(cfg: SparseConfig, store: KvStoreSpec, ranking: ChannelRanking) -> SparseSetup {
    SparseSetup {
        cfg,
        ranking,
        store,
        capacity: None,
    }
}

#[test]
fn full_budget_sparse_equals_dense_and_disk_equals_host() {
    let (model, _) = load(&model_dir(), 2);
    let c = &model.cfg;
    let ids = text_ids(300);
    let natural = ChannelRanking::natural(c.num_layers, c.num_kv_heads, c.head_dim);
    let cfg = SparseConfig {
        budget: TokenBudget::Tokens(1 << 20),
        label_channels: c.head_dim,
        sparse_prefill: true,
        ..SparseConfig::default()
    };
    // The same arithmetic as the dense CPU attention (keys scored four at a time), so equal
    // to rounding means equal here, for f32 and f16 rows.
    for dt in [DType::F32, DType::F16] {
        let mut dense = new_store(&model, dt, &Attention::Dense).unwrap();
        let want = logits(&model, &ids, dense.as_mut());
        let mut host = new_sparse_store(
            &model,
            dt,
            &setup(cfg.clone(), KvStoreSpec::Host, natural.clone()),
        )
        .unwrap();
        let got = logits(&model, &ids, &mut host);
        let err = rel_l2(&got, &want);
        assert!(
            err < 1e-6,
            "{dt}: sparse with everything selected vs dense: rel L2 {err}"
        );
    }
    let mut dense = new_store(&model, DType::F16, &Attention::Dense).unwrap();
    let want = logits(&model, &ids, dense.as_mut());

    // A real budget on both tiers: identical logits, bit for bit.
    let dir = tempfile::tempdir_in(root().join("target")).unwrap();
    let small = SparseConfig {
        budget: TokenBudget::Fraction(8),
        label_channels: 8,
        ..cfg
    };
    let mut host = new_sparse_store(
        &model,
        DType::F16,
        &setup(small.clone(), KvStoreSpec::Host, natural.clone()),
    )
    .unwrap();
    let disk_spec = KvStoreSpec::Disk(dir.path().to_path_buf());
    let mut disk = new_sparse_store(
        &model,
        DType::F16,
        &setup(small.clone(), disk_spec, natural.clone()),
    )
    .unwrap();
    assert!(
        disk.tier_name().starts_with("disk:"),
        "{}",
        disk.tier_name()
    );
    let a = logits(&model, &ids, &mut host);
    let b = logits(&model, &ids, &mut disk);
    assert_eq!(a, b, "disk tier differs from host tier");
    // The same behind an in-memory row cache of 4x the rows read: the same logits, most rows
    // served from memory.
    let cached_cfg = SparseConfig {
        row_cache: 4,
        ..small.clone()
    };
    let cached_spec = KvStoreSpec::Disk(dir.path().to_path_buf());
    let mut cached = new_sparse_store(
        &model,
        DType::F16,
        &setup(cached_cfg, cached_spec, natural.clone()),
    )
    .unwrap();
    let c4 = logits(&model, &ids, &mut cached);
    assert_eq!(
        a, c4,
        "disk tier behind the row cache differs from host tier"
    );
    let rc = cached
        .row_cache_stats()
        .expect("a row cache in front of the disk");
    assert!(
        rc.hit_rate().unwrap() > 0.5,
        "consecutive positions reuse rows: {rc:?}"
    );
    assert!(
        host.row_cache_stats().is_none(),
        "no cache in front of host memory"
    );
    assert!(
        rel_l2(&a, &want) > 1e-4,
        "a 1/8 budget should change the logits"
    );
    let st = host.stats();
    assert!(st.sparse_rows < st.visible_rows / 4, "{st:?}");
}

#[test]
fn layer_ahead_predicts_most_of_the_selection() {
    let (mut model, _) = load(&model_dir(), 2);
    let c = model.cfg.clone();
    let cal = Calibration::load(&calibration_file(), &model_dir(), &c).unwrap();
    let ranking = cal.channel_ranking();
    let cfg = SparseConfig {
        budget: TokenBudget::Tokens(64),
        predict: Predict::LayerAhead,
        sparse_prefill: true,
        ..SparseConfig::default()
    };
    let channels = ranking
        .top(cfg.label_channels, c.num_layers, c.num_kv_heads, c.head_dim)
        .unwrap();
    model.enable_layer_ahead(&channels).unwrap();
    let ids = text_ids(400);
    let mut kv =
        new_sparse_store(&model, DType::F16, &setup(cfg, KvStoreSpec::Host, ranking)).unwrap();
    perplexity_with(&model, &ids, 128, &mut kv, &mut |_, _| {}).unwrap();
    let st = kv.stats();
    let per = st.recall_per_layer();
    assert_eq!(per[0], None, "layer 0 has no layer before it");
    let overall = st.recall().unwrap();
    // The middle layers' residual stream changes little: recall well above chance (64/400).
    assert!(overall > 0.6, "layer-ahead recall {overall}: {per:?}");
    // Consecutive positions choose largely the same rows (chance would be about k / middle,
    // 28 of up to 364 here; measured 0.82, and 0.80 for the guess).
    let reuse = st.step_reuse().unwrap();
    let ahead = st.ahead_step_reuse().unwrap();
    assert!(
        reuse > 0.7,
        "step-to-step reuse {reuse}: {:?}",
        st.reuse_per_layer()
    );
    assert!(
        ahead > 0.6,
        "guess reuse {ahead}: {:?}",
        st.ahead_reuse_per_layer()
    );
}

#[test]
fn calibration_is_deterministic_and_accumulates_every_chunk() {
    let (model, _) = load(&model_dir(), 2);
    let ids = text_ids(160);
    let id = model_identity(&model_dir(), &model.cfg).unwrap();
    let a = calibrate(&model, id.clone(), "t".into(), &ids, 160, &mut |_, _| {}).unwrap();
    let b = calibrate(&model, id.clone(), "t".into(), &ids, 32, &mut |_, _| {}).unwrap();
    assert_eq!(a.tokens, 160);
    assert_eq!(b.tokens, 160);
    for (la, lb) in a.scores.iter().zip(&b.scores) {
        for (ha, hb) in la.iter().zip(lb) {
            for (x, y) in ha.iter().zip(hb) {
                assert!(
                    (x - y).abs() <= 1e-4 * x.abs().max(1e-3),
                    "chunking changed the statistic: {x} vs {y}"
                );
            }
        }
    }
    // The first chunk alone gives different statistics: the later chunks were counted.
    let first = calibrate(&model, id, "t".into(), &ids[..32], 32, &mut |_, _| {}).unwrap();
    assert_ne!(first.scores, b.scores);
}

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
fn prompt_file(dir: &Path, chars: usize) -> PathBuf {
    let text = std::fs::read_to_string(root().join("data/eval.txt")).unwrap();
    let cut: String = text.chars().take(chars).collect();
    let p = dir.join("prompt.txt");
    std::fs::write(&p, cut).unwrap();
    p
}

fn sparse_generate(extra: &[&str]) -> Output {
    let cal = calibration_file();
    let mut args = vec![
        "generate",
        "--max-new-tokens",
        "4",
        "--attention",
        "double-sparse",
        "--calibration",
        cal.to_str().unwrap(),
    ];
    if !extra.contains(&"--prompt-file") {
        args.extend(["--prompt", "The history of the long voyage"]);
    }
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn calibration_of_another_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(calibration_file()).unwrap()).unwrap();
    v["model_identity"] =
        serde_json::json!("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef");
    let other = dir.path().join("other.json");
    std::fs::write(&other, v.to_string()).unwrap();
    let out = run(&[
        "generate",
        "--prompt",
        "x",
        "--attention",
        "double-sparse",
        "--calibration",
        other.to_str().unwrap(),
    ]);
    assert_one_line_error(&out, "made for another model");
    let missing = dir.path().join("none.json");
    let out = run(&[
        "eval",
        "ppl",
        "--text",
        "data/eval.txt",
        "--attention",
        "double-sparse",
        "--calibration",
        missing.to_str().unwrap(),
    ]);
    assert_one_line_error(&out, "farsight calibrate");
}

#[test]
fn bad_sparse_settings_are_refused() {
    assert_one_line_error(&sparse_generate(&["--token-budget", "0"]), "at least 1");
    assert_one_line_error(&sparse_generate(&["--token-budget", "1/0"]), "at least 1");
    assert_one_line_error(
        &sparse_generate(&["--label-channels", "65"]),
        "head dimension 64",
    );
    assert_one_line_error(&sparse_generate(&["--label-bits", "8"]), "16 or 4");
    assert_one_line_error(&sparse_generate(&["--dense-layers", "30"]), "layer 30");
    assert_one_line_error(&sparse_generate(&["--kv-store", "tape:/x"]), "disk:PATH");
    let out = run(&["generate", "--prompt", "x", "--kv-store", "disk:/tmp"]);
    assert_one_line_error(&out, "--attention double-sparse");
}

#[test]
fn unwritable_disk_path_is_refused() {
    let out = sparse_generate(&["--kv-store", "disk:/proc/farsight-kv"]);
    assert_one_line_error(&out, "/proc/farsight-kv");
}

#[test]
fn a_disk_that_fills_up_mid_run_is_a_clear_error() {
    // A 30 MiB file-size limit: the first extent of 1024 tokens (23.6 MB) fits, the second
    // does not, so the KV file fills up in the middle of a ~2400-token prefill.
    let dir = tempfile::tempdir_in(root().join("target")).unwrap();
    let kv_dir = dir.path().join("kv");
    std::fs::create_dir(&kv_dir).unwrap();
    let prompt = prompt_file(dir.path(), 10_000);
    let cal = calibration_file();
    let script = format!(
        "ulimit -f 30720; exec {} generate --prompt-file {} --max-new-tokens 2 --attention double-sparse --calibration {} --kv-store disk:{}",
        env!("CARGO_BIN_EXE_farsight"),
        prompt.display(),
        cal.display(),
        kv_dir.display()
    );
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .current_dir(root())
        .output()
        .unwrap();
    assert_one_line_error(&out, "file size limit");
    // The KV file is removed on the way out.
    assert_eq!(std::fs::read_dir(&kv_dir).unwrap().count(), 0);
}

#[test]
fn generate_on_disk_equals_host() {
    let dir = tempfile::tempdir_in(root().join("target")).unwrap();
    let store = format!("disk:{}", dir.path().display());
    let prompt = prompt_file(dir.path(), 3000);
    let base = [
        "--prompt-file",
        prompt.to_str().unwrap(),
        "--token-budget",
        "64",
        "--json",
    ];
    let host_args = base.to_vec();
    let mut cmd_host: Vec<&str> = host_args.clone();
    cmd_host.extend(["--kv-store", "host"]);
    let a = sparse_generate(&cmd_host);
    let mut cmd_disk = host_args;
    cmd_disk.extend(["--kv-store", store.as_str()]);
    let b = sparse_generate(&cmd_disk);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    let ja: serde_json::Value = serde_json::from_slice(&a.stdout).unwrap();
    let jb: serde_json::Value = serde_json::from_slice(&b.stdout).unwrap();
    assert_eq!(ja["new_token_ids"], jb["new_token_ids"]);
    assert!(
        jb["settings"]["attention"]
            .as_str()
            .unwrap()
            .contains("disk:"),
        "{jb}"
    );
}

#[test]
fn sparse_eval_commands_run_and_report_their_settings() {
    let cal = calibration_file();
    let cal = cal.to_str().unwrap();
    let common = [
        "--attention",
        "double-sparse",
        "--calibration",
        cal,
        "--json",
    ];
    let json = |args: &[&str]| -> serde_json::Value {
        let mut all: Vec<&str> = args.to_vec();
        all.extend_from_slice(&common);
        let out = run(&all);
        assert!(
            out.status.success(),
            "{:?}: {}",
            args,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let v = json(&[
        "eval",
        "agreement",
        "--text",
        "data/eval.txt",
        "--max-tokens",
        "96",
        "--token-budget",
        "16",
    ]);
    let top1 = v["agreement"]["top1"].as_f64().unwrap();
    assert!(
        (0.0..=1.0).contains(&top1) && v["agreement"]["positions"] == 96,
        "{v}"
    );
    assert!(
        v["settings"]["attention"]
            .as_str()
            .unwrap()
            .contains("budget 16"),
        "{v}"
    );
    let v = json(&[
        "eval",
        "sweep",
        "--text",
        "data/eval.txt",
        "--max-tokens",
        "64",
        "--budgets",
        "1/2",
        "--channels",
        "8",
        "--bits",
        "4",
    ]);
    assert_eq!(v["rows"].as_array().unwrap().len(), 1, "{v}");
    assert!(v["dense_ppl"].as_f64().unwrap() > 1.0);
    let v = json(&[
        "eval",
        "passkey",
        "--lengths",
        "200",
        "--depths",
        "0.5",
        "--trials",
        "1",
        "--compare-dense",
    ]);
    assert_eq!(v["summary"].as_array().unwrap().len(), 2, "{v}");
    for t in v["trials"].as_array().unwrap() {
        // Without a budget every token of the key stays.
        assert_eq!(
            (&t["trial"]["key_tokens"], &t["trial"]["key_tokens_kept"]),
            (&10.into(), &10.into()),
            "{t}"
        );
    }
}
