//! Helpers shared by the end-to-end tests: the default model, the reference fixture.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use farsight_engine::{Model, TextTokenizer};
use farsight_kernels::cpu::CpuBackend;
use serde_json::Value;

/// Repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The default model directory; fails with the fetch command when it is missing (CI fetches it
/// before running the tests, so a missing model is an error, not a skip).
pub fn model_dir() -> PathBuf {
    let d = root().join("models/smollm2-135m-instruct");
    assert!(
        d.join("model.safetensors").exists(),
        "{} is missing: run scripts/fetch-model.sh first",
        d.display()
    );
    d
}

/// The GGUF the default model was converted from.
pub fn gguf_path() -> PathBuf {
    let p = root().join("models/gguf/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-model.sh first",
        p.display()
    );
    p
}

pub fn load(dir: &Path, threads: usize) -> (Model<CpuBackend>, TextTokenizer) {
    let model = Model::load(dir, CpuBackend::new(threads).unwrap()).unwrap();
    let tok = TextTokenizer::from_dir(dir, &model.cfg.eos_token_ids).unwrap();
    (model, tok)
}

pub fn fixture_dir() -> PathBuf {
    root().join("tests/fixtures/smollm2")
}

pub fn fixture() -> Value {
    let p = fixture_dir().join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

pub fn f32_file(name: &str) -> Vec<f32> {
    let b = std::fs::read(fixture_dir().join(name)).unwrap();
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// The farsight binary built for this test run.
pub fn farsight() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_farsight"))
}
