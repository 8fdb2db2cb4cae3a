//! Converts the real SmolLM2-135M-Instruct Q4_1 GGUF when it is present at
//! `models/gguf/SmolLM2-135M-Instruct.Q4_1.gguf` (see `scripts/fetch-model.sh`); skipped otherwise.

use std::path::PathBuf;

use farsight_engine::gguf::{convert_gguf, ConvertOptions, GgmlType, GgufFile, OutDtype};

fn model_path() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../models/gguf/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "note: {} not found; skipping (run scripts/fetch-model.sh)",
            p.display()
        );
        None
    }
}

#[test]
fn real_smollm2_gguf_converts() {
    let Some(path) = model_path() else { return };
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.version(), 3);
    assert_eq!(g.tensors().len(), 272);
    assert_eq!(
        g.tensor("token_embd.weight").unwrap().ggml_type,
        GgmlType::Q8_0
    );
    assert_eq!(
        g.tensor("blk.0.attn_q.weight").unwrap().ggml_type,
        GgmlType::Q4_1
    );
    assert!(g.tensor("output.weight").is_none());

    let dir = tempfile::tempdir().unwrap();
    let s = convert_gguf(
        &path,
        dir.path(),
        &ConvertOptions {
            dtype: OutDtype::F16,
        },
    )
    .unwrap();
    println!("{s}");
    assert_eq!(s.tensors_written, 272);
    assert_eq!(s.parameters, 134_515_008);
    assert!(s.skipped_tensors.is_empty());

    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["num_hidden_layers"], 30);
    assert_eq!(cfg["num_attention_heads"], 9);
    assert_eq!(cfg["num_key_value_heads"], 3);
    assert_eq!(cfg["head_dim"], 64);
    assert_eq!(cfg["rope_theta"], 100000.0);
    assert_eq!(cfg["rms_norm_eps"], 1e-5);
    assert_eq!(cfg["tie_word_embeddings"], true);

    // Ids as transformers gives them when it loads the GGUF.
    let tok = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    let cases: &[(&str, &[u32])] = &[
        ("hello <|im_start|> world", &[28120, 216, 1, 905]),
        (
            "<|im_start|>user\nWhat is 12345?<|im_end|>\n",
            &[1, 4093, 198, 1780, 314, 216, 33, 34, 35, 36, 37, 47, 2, 198],
        ),
        (
            "中文 😀 e\u{301}",
            &[28589, 29184, 40303, 218, 297, 151, 219],
        ),
        ("", &[]),
    ];
    for (text, want) in cases {
        let enc = tok.encode(*text, true).unwrap();
        assert_eq!(enc.get_ids(), *want, "{text:?}");
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), *text);
    }
}

/// With `GGUF_CONVERT_OUT=DIR` (and optionally `GGUF_CONVERT_DTYPE=f16|bf16|f32`), converts the real
/// GGUF into DIR and keeps it, for checks against transformers (`scripts/check-tokenizer.py`).
#[test]
fn real_smollm2_gguf_convert_to_env_dir() {
    let Ok(out) = std::env::var("GGUF_CONVERT_OUT") else {
        return;
    };
    let Some(path) = model_path() else { return };
    let dtype: OutDtype = std::env::var("GGUF_CONVERT_DTYPE")
        .unwrap_or_else(|_| "f16".into())
        .parse()
        .unwrap();
    let s = convert_gguf(&path, std::path::Path::new(&out), &ConvertOptions { dtype }).unwrap();
    println!("{s}");
}
