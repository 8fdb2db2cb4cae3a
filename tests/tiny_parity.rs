//! farsight against Hugging Face transformers on tiny random-weight models of every supported
//! architecture / config variant (fixtures made by `scripts/make-tiny-models.py`, described in
//! `tests/fixtures/tiny/README.md`): all-position logits of the ids run in one forward call, in
//! 7-token chunks and token by token, and a 16-token greedy continuation. Plus the loader's
//! errors for a wrong tensor shape and a missing tensor.

mod common;

use std::path::{Path, PathBuf};

use common::{ids, rel_l2, root};
use farsight_engine::generate::new_cache;
use farsight_engine::model::{Logits, Segment};
use farsight_engine::sampler::argmax;
use farsight_engine::Model;
use farsight_kernels::cpu::CpuBackend;
use farsight_kernels::cuda::CudaBackend;
use farsight_kernels::Backend;
use farsight_kernels::DType;
use serde_json::Value;

/// Every variant in the fixture directory; `every_fixture_has_a_test` keeps this in step.
const VARIANTS: &[&str] = &[
    "llama",
    "llama-tied-bf16",
    "llama3-rope-sharded",
    "llama-yarn",
    "llama-linear",
    "llama-dynamic",
    "llama-bias",
    "llama-headdim",
    "mistral-window",
    "qwen2",
    "qwen2-f16",
];

const CHUNK: usize = 7;

fn tiny_root() -> PathBuf {
    // FARSIGHT_REPO_ROOT: where the fixtures are when the test binary runs on another machine
    // (the GPU machine gets a copy of the repository elsewhere).
    std::env::var_os("FARSIGHT_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(root)
        .join("tests/fixtures/tiny")
}

fn tiny_dir(name: &str) -> PathBuf {
    tiny_root().join(name)
}

fn reference(dir: &Path) -> Value {
    let p = dir.join("reference.json");
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

fn read_f32(path: &Path) -> Vec<f32> {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(b.len() % 4, 0, "{}", path.display());
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn load(dir: &Path) -> Model<CpuBackend> {
    Model::load(dir, CpuBackend::new(2).unwrap())
        .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
}

/// All-position logits of `ids` fed `chunk` tokens per forward call into one dense f32 cache.
fn logits_in_chunks<B: Backend>(model: &Model<B>, ids: &[u32], chunk: usize) -> Vec<f32> {
    let mut cache = new_cache(model, DType::F32).unwrap();
    let mut ws = model.workspace(chunk, chunk).unwrap();
    let mut out = Vec::with_capacity(ids.len() * model.cfg.vocab_size);
    for part in ids.chunks(chunk) {
        let mut segs = [Segment {
            tokens: part,
            kv: &mut cache,
            logits: Logits::All,
        }];
        let mut got = model
            .forward(&mut ws, &mut segs)
            .unwrap_or_else(|e| panic!("forward of {} tokens (chunk {chunk}): {e}", part.len()));
        assert_eq!(got.len(), 1);
        let got = got.swap_remove(0).into_logits();
        assert_eq!(got.len(), part.len() * model.cfg.vocab_size);
        out.extend(got);
    }
    out
}

/// Prompt in one call, then `n` argmax steps one token at a time.
fn greedy<B: Backend>(model: &Model<B>, ids: &[u32], n: usize) -> Vec<u32> {
    let mut cache = new_cache(model, DType::F32).unwrap();
    let mut ws = model.workspace(ids.len(), 1).unwrap();
    let mut segs = [Segment {
        tokens: ids,
        kv: &mut cache,
        logits: Logits::Last,
    }];
    let mut logits = model
        .forward(&mut ws, &mut segs)
        .unwrap()
        .swap_remove(0)
        .into_logits();
    let mut out = Vec::with_capacity(n);
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
            .unwrap_or_else(|e| panic!("decode step {} of greedy: {e}", out.len()))
            .swap_remove(0)
            .into_logits();
    }
    out
}

/// Where a variant's logits differ from the reference, for the failure message.
fn worst_row(got: &[f32], want: &[f32], vocab: usize) -> String {
    let (mut worst, mut at) = (0.0f64, 0);
    for (r, (g, w)) in got.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
        let e = rel_l2(g, w);
        if e > worst {
            (worst, at) = (e, r);
        }
    }
    let first_bad = got
        .chunks(vocab)
        .zip(want.chunks(vocab))
        .position(|(g, w)| rel_l2(g, w) > 1e-3)
        .map_or("none".to_string(), |r| r.to_string());
    format!("worst position {at} (rel L2 {worst:.2e}), first position over 1e-3: {first_bad}")
}

fn check_variant(name: &str) {
    let dir = tiny_dir(name);
    check_variant_on(name, &load(&dir), 1.0, true);
}

/// Checks one variant on `model`; `tol_scale` widens the tolerance of 16-bit weights (a GPU
/// backend rounds prefill activations to the weight dtype); `strict_greedy` asserts the greedy
/// ids (otherwise they are only reported).
fn check_variant_on<B: Backend>(name: &str, model: &Model<B>, tol_scale: f64, strict_greedy: bool) {
    let dir = tiny_dir(name);
    let fx = reference(&dir);
    let prompt = ids(&fx["ids"]);
    let vocab = fx["vocab_size"].as_u64().unwrap() as usize;
    assert_eq!(model.cfg.vocab_size, vocab);
    let wdtype = fx["weights_dtype"].as_str().unwrap();
    // f32 weights: only the summation order differs. bf16/f16: the reference ran the same
    // rounded weights upcast to f32, farsight upcasts them in its kernels.
    let tol = if wdtype == "f32" {
        1e-4
    } else {
        1e-3 * tol_scale
    };
    let full_want = read_f32(&dir.join(fx["logits_file"].as_str().unwrap()));
    assert_eq!(full_want.len(), prompt.len() * vocab);
    // Dynamic NTK rope depends on the longest position of each call, so transformers' own
    // chunked and stepped runs are the references for those (the same as `full` otherwise).
    let chunk_want = fx["chunk_logits_file"]
        .as_str()
        .map(|f| read_f32(&dir.join(f)));
    let step_want = fx["step_logits_file"]
        .as_str()
        .map(|f| read_f32(&dir.join(f)));

    let mut errors = Vec::new();
    let mut report = format!("{name} ({wdtype} weights, tol {tol:.0e}):");
    for (what, chunk, want) in [
        ("one call", prompt.len(), &full_want),
        (
            "7-token chunks",
            CHUNK,
            chunk_want.as_ref().unwrap_or(&full_want),
        ),
        (
            "token by token",
            1,
            step_want.as_ref().unwrap_or(&full_want),
        ),
    ] {
        let got = logits_in_chunks(model, &prompt, chunk);
        let e = rel_l2(&got, want);
        report += &format!(" {what} {e:.2e};");
        if !(e < tol) {
            errors.push(format!(
                "{what}: rel L2 {e:.3e} >= {tol:.0e}; {}",
                worst_row(&got, want, vocab)
            ));
        }
    }
    let want_greedy = ids(&fx["greedy_ids"]);
    let got_greedy = greedy(model, &prompt, want_greedy.len());
    report += &format!(
        " greedy {}",
        if got_greedy == want_greedy {
            "equal"
        } else {
            "DIFFERENT"
        }
    );
    println!("{report}");
    if got_greedy != want_greedy && (strict_greedy || wdtype == "f32") {
        errors.push(format!(
            "greedy ids: got {got_greedy:?}, want {want_greedy:?}"
        ));
    }
    assert!(errors.is_empty(), "{name}:\n  {}", errors.join("\n  "));
}

macro_rules! variant_tests {
    ($($(#[$m:meta])* $f:ident => $name:literal),* $(,)?) => {
        $(
            #[test]
            $(#[$m])*
            fn $f() {
                check_variant($name);
            }
        )*
    };
}

variant_tests! {
    llama => "llama",
    llama_tied_bf16 => "llama-tied-bf16",
    llama3_rope_sharded => "llama3-rope-sharded",
    llama_yarn => "llama-yarn",
    llama_linear => "llama-linear",
    llama_dynamic => "llama-dynamic",
    llama_bias => "llama-bias",
    llama_headdim => "llama-headdim",
    mistral_window => "mistral-window",
    qwen2 => "qwen2",
    qwen2_f16 => "qwen2-f16",
}

#[test]
fn every_fixture_has_a_test() {
    let mut dirs: Vec<String> = std::fs::read_dir(tiny_root())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    let mut known: Vec<String> = VARIANTS.iter().map(|s| s.to_string()).collect();
    known.sort();
    assert_eq!(dirs, known);
}

#[test]
fn config_json_is_what_transformers_5_writes() {
    // The fixtures are only meaningful if they exercise transformers 5's config layout.
    let c: Value = serde_json::from_str(
        &std::fs::read_to_string(tiny_dir("llama3-rope-sharded").join("config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(c["rope_parameters"]["rope_type"], "llama3", "{c}");
    assert!(tiny_dir("llama3-rope-sharded")
        .join("model.safetensors.index.json")
        .exists());
    let m = load(&tiny_dir("llama3-rope-sharded"));
    assert_eq!(m.cfg.rope_theta, 10000.0);
    assert!(matches!(
        m.cfg.rope_scaling,
        farsight_engine::rope::RopeScaling::Llama3 {
            original_max: 32,
            ..
        }
    ));
    let m = load(&tiny_dir("mistral-window"));
    assert_eq!(m.cfg.sliding_window, Some(8));
    let m = load(&tiny_dir("llama-headdim"));
    assert_eq!(
        (m.cfg.head_dim, m.cfg.hidden_size, m.cfg.num_heads),
        (32, 64, 4)
    );
}

/// A copy of a fixture model directory (model files only) in a temporary directory.
fn copy_model(name: &str) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(tiny_dir(name)).unwrap() {
        let e = e.unwrap();
        let f = e.file_name().to_string_lossy().into_owned();
        if f.ends_with(".json") || f.ends_with(".safetensors") {
            std::fs::copy(e.path(), t.path().join(&f)).unwrap();
        }
    }
    t
}

fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn load_err(dir: &Path) -> String {
    match Model::load(dir, CpuBackend::new(2).unwrap()) {
        Ok(_) => panic!("{} loaded, expected an error", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn wrong_tensor_shape_is_named() {
    for name in ["llama", "llama3-rope-sharded"] {
        let t = copy_model(name);
        edit_json(&t.path().join("config.json"), |c| {
            let i = c["intermediate_size"].as_u64().unwrap();
            c["intermediate_size"] = (i + 1).into();
        });
        let msg = load_err(t.path());
        println!("{name}, intermediate_size + 1: {msg}");
        assert!(
            msg.contains("model.layers.0.mlp.gate_proj.weight"),
            "{name}: {msg}"
        );
        assert!(
            msg.contains("[128, 64]") && msg.contains("[129, 64]"),
            "{name}: {msg}"
        );
    }
}

const VICTIM: &str = "model.layers.1.self_attn.o_proj.weight";

#[test]
fn tensor_missing_from_the_index_is_named() {
    let t = copy_model("llama3-rope-sharded");
    edit_json(&t.path().join("model.safetensors.index.json"), |v| {
        let map = v["weight_map"].as_object_mut().unwrap();
        let shard = map.remove(VICTIM).expect("victim tensor in the index");
        map.insert(format!("{VICTIM}_renamed"), shard);
    });
    let msg = load_err(t.path());
    println!("renamed in the index: {msg}");
    assert!(msg.contains(VICTIM), "{msg}");
}

/// Renames a tensor inside a safetensors file's header (the data is left as it is).
fn rename_in_safetensors(path: &Path, from: &str, to: &str) -> bool {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let Some(entry) = header.remove(from) else {
        return false;
    };
    header.insert(to.to_string(), entry);
    let mut h = serde_json::to_vec(&header).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
    true
}

#[test]
fn tensor_missing_from_the_files_is_named() {
    for name in ["llama", "llama3-rope-sharded"] {
        let t = copy_model(name);
        let mut renamed = 0;
        for e in std::fs::read_dir(t.path()).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "safetensors") {
                renamed += usize::from(rename_in_safetensors(
                    &p,
                    VICTIM,
                    &format!("{VICTIM}_renamed"),
                ));
            }
        }
        assert_eq!(renamed, 1, "{name}");
        let idx = t.path().join("model.safetensors.index.json");
        if idx.exists() {
            edit_json(&idx, |v| {
                let map = v["weight_map"].as_object_mut().unwrap();
                let shard = map.remove(VICTIM).unwrap();
                map.insert(format!("{VICTIM}_renamed"), shard);
            });
        }
        let msg = load_err(t.path());
        println!("{name}, renamed in the file: {msg}");
        assert!(
            msg.contains(&format!("missing tensor `{VICTIM}`")),
            "{name}: {msg}"
        );
    }
}

/// Every variant on the GPU against the same transformers references (skipped without a GPU).
#[test]
fn every_variant_on_cuda() {
    if let Err(e) = CudaBackend::new(0) {
        println!("skipped: no CUDA device ({e})");
        return;
    }
    for name in VARIANTS {
        let be = CudaBackend::new(0).unwrap();
        let model = Model::load(&tiny_dir(name), be).unwrap_or_else(|e| panic!("{name}: {e}"));
        // 16-bit weights: the GPU rounds prefill activations to the weight dtype before cuBLAS
        // (kernels/src/cuda/NOTES.md), about 1e-2 relative on these tiny models.
        check_variant_on(name, &model, 20.0, false);
    }
}
