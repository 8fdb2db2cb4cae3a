//! Tests on GGUF files built in memory: the tiny llama of `builder` is parsed, converted and
//! checked; `fuzz` corrupts every length field and truncates the file.

mod builder;
mod fuzz;

use half::f16;
use safetensors::SafeTensors;
use serde_json::Value;

use super::*;
use builder::*;

#[test]
fn parses_tiny_llama() {
    let (bytes, _) = tiny_bytes();
    let g = GgufFile::from_bytes(bytes).unwrap();
    assert_eq!(g.version(), 3);
    assert_eq!(g.alignment(), 32);
    assert_eq!(g.get("llama.block_count").and_then(|v| v.as_u64()), Some(1));
    assert_eq!(
        g.get("general.architecture").and_then(|v| v.as_str()),
        Some("llama")
    );
    assert_eq!(
        g.get("llama.attention.layer_norm_rms_epsilon")
            .and_then(|v| v.as_f64()),
        Some(1e-5)
    );
    assert_eq!(g.tensors().len(), 12);
    let q = g.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!(q.shape(), vec![HIDDEN, HIDDEN]);
    assert_eq!(q.ggml_type, GgmlType::F32);
    let v = g.dequantize("blk.0.attn_q.weight").unwrap();
    assert_eq!(v[..3], [0.0, 1.0, 2.0]);
    assert!(matches!(
        g.dequantize("nope"),
        Err(GgufError::TensorNotFound(_))
    ));
    assert_eq!(g.metadata().count(), 22);
}

fn header_map(st: &SafeTensors<'_>) -> std::collections::BTreeMap<String, (String, Vec<usize>)> {
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (format!("{:?}", v.dtype()), v.shape().to_vec())))
        .collect()
}

fn f32s(st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn converts_tiny_llama() {
    let (bytes, _) = tiny_bytes();
    let g = GgufFile::from_bytes(bytes).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    let s = convert_file(
        &g,
        &out,
        &ConvertOptions {
            dtype: OutDtype::F32,
        },
    )
    .unwrap();
    assert_eq!(s.tensors_written, 11);
    assert_eq!(s.skipped_tensors, vec!["rope_freqs.weight".to_string()]);
    assert_eq!(
        s.bytes_written,
        std::fs::metadata(out.join("model.safetensors"))
            .unwrap()
            .len()
    );
    assert!(s.to_string().starts_with("wrote 11 tensors ("), "{s}");

    let cfg: Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["hidden_size"], 32);
    assert_eq!(cfg["num_key_value_heads"], 2);
    assert_eq!(cfg["head_dim"], 8);
    assert_eq!(cfg["rms_norm_eps"], 1e-5);
    assert_eq!(cfg["rope_theta"], 100000.0);
    assert_eq!(cfg["vocab_size"], 13);
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["bos_token_id"], 1);
    assert_eq!(cfg["eos_token_id"], 2);
    assert_eq!(cfg["torch_dtype"], "float32");

    let buf = std::fs::read(out.join("model.safetensors")).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&buf).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt")
    );
    let st = SafeTensors::deserialize(&buf).unwrap();
    let h = header_map(&st);
    let names: Vec<&str> = h.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "model.embed_tokens.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.0.mlp.gate_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.post_attention_layernorm.weight",
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.o_proj.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.v_proj.weight",
            "model.norm.weight",
        ]
    );
    assert_eq!(h["model.embed_tokens.weight"].1, [13, 32]);
    assert_eq!(h["model.layers.0.self_attn.k_proj.weight"].1, [16, 32]);
    assert_eq!(h["model.layers.0.mlp.down_proj.weight"].1, [32, 64]);
    assert_eq!(h["model.layers.0.mlp.gate_proj.weight"].1, [64, 32]);
    assert_eq!(h["model.norm.weight"].1, [32]);
    assert!(h.values().all(|(d, _)| d == "F32"));

    // Q was written with value = 32 * gguf_row + col; per head (8 rows = 2 halves of 4) HF row
    // i*4 + j must come from GGUF row 2*j + i.
    let q = f32s(&st, "model.layers.0.self_attn.q_proj.weight");
    for h in 0..4 {
        for i in 0..2 {
            for j in 0..4 {
                let (hf, gg) = (h * 8 + i * 4 + j, h * 8 + 2 * j + i);
                assert_eq!(q[hf * 32], (gg * 32) as f32, "q row {hf}");
                assert_eq!(q[hf * 32 + 31], (gg * 32 + 31) as f32);
            }
        }
    }
    // K uses the KV head count (2 heads of 8 rows).
    let k = f32s(&st, "model.layers.0.self_attn.k_proj.weight");
    assert_eq!(k[32], (2 * 32) as f32); // HF row 1 = GGUF row 2
    assert_eq!(k[4 * 32], 32.0); // HF row 4 = GGUF row 1
    assert_eq!(k[12 * 32], (9 * 32) as f32); // head 1: HF row 8+4 = GGUF row 8+1
                                             // Unpermuted tensors equal the dequantised GGUF data.
    assert_eq!(
        f32s(&st, "model.layers.0.mlp.gate_proj.weight"),
        g.dequantize("blk.0.ffn_gate.weight").unwrap()
    );
    assert_eq!(
        f32s(&st, "model.embed_tokens.weight"),
        g.dequantize("token_embd.weight").unwrap()
    );

    // No temporary files left, and a second run (F16) overwrites in place and clears the
    // leftovers of a crashed run.
    std::fs::write(out.join(".model.safetensors.partial-1"), b"half a file").unwrap();
    let s2 = convert_file(&g, &out, &ConvertOptions::default()).unwrap();
    assert_eq!(s2.dtype, OutDtype::F16);
    let mut files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    let buf = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&buf).unwrap();
    let up = st.tensor("model.layers.0.mlp.up_proj.weight").unwrap();
    assert_eq!(format!("{:?}", up.dtype()), "F16");
    let want: Vec<u8> = g
        .dequantize("blk.0.ffn_up.weight")
        .unwrap()
        .iter()
        .flat_map(|&x| f16::from_f32(x).to_le_bytes())
        .collect();
    assert_eq!(up.data(), &want[..]);
}

#[test]
fn tiny_tokenizer_loads_in_tokenizers() {
    let (bytes, _) = tiny_bytes();
    let g = GgufFile::from_bytes(bytes).unwrap();
    let dir = tempfile::tempdir().unwrap();
    convert_file(&g, dir.path(), &ConvertOptions::default()).unwrap();
    let tok = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    let enc = tok.encode("hi hi<|im_end|>ab<think>!", false).unwrap();
    assert_eq!(enc.get_ids(), [8, 9, 2, 6, 7, 11, 10]);
    // No BOS is added for raw text even with special tokens on (add_bos_token is false).
    assert_eq!(tok.encode("hi", true).unwrap().get_ids(), [8]);
    // "€" is outside the byte alphabet, so its vocabulary key is respelled from its UTF-8 bytes.
    assert_ne!(tok.id_to_token(12).as_deref(), Some("€"));
    assert_eq!(tok.decode(&[12, 3], false).unwrap(), "€h");
    assert_eq!(tok.decode(&[8, 9, 2], false).unwrap(), "hi hi<|im_end|>");
    assert_eq!(tok.decode(&[8, 9, 2], true).unwrap(), "hi hi");
    let tc: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tc["bos_token"], "<|im_start|>");
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert_eq!(tc["unk_token"], "<|endoftext|>");
    assert_eq!(tc["add_bos_token"], false);
    assert!(tc["chat_template"].as_str().unwrap().contains("messages"));
    let gc: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("generation_config.json")).unwrap())
            .unwrap();
    assert_eq!(gc["eos_token_id"], 2);
}
