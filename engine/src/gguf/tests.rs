//! Tests on GGUF files built in memory: a tiny llama (1 layer, hidden 32) that is parsed,
//! converted and checked, and fuzz-style corruption of every length field and truncation.

use half::f16;
use safetensors::SafeTensors;
use serde_json::Value;

use super::*;

/// A metadata value to write.
#[derive(Clone)]
pub(crate) enum V {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArr(Vec<String>),
    I32Arr(Vec<i32>),
}

/// A tensor to write: name, ggml dims (innermost first), ggml type, raw data.
pub(crate) struct T {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    pub data: Vec<u8>,
}

/// Where a length/count field sits in the built file: (label, byte offset, width in bytes).
pub(crate) type Field = (&'static str, usize, usize);

/// Writes a GGUF v3 file; returns the bytes and the positions of its length-like fields.
pub(crate) fn build(kv: &[(&str, V)], tensors: &[T]) -> (Vec<u8>, Vec<Field>) {
    let mut b = Vec::new();
    let mut fields = Vec::new();
    let rec = |fields: &mut Vec<Field>, label, at, w| fields.push((label, at, w));
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    rec(&mut fields, "n_tensors", b.len(), 8);
    b.extend((tensors.len() as u64).to_le_bytes());
    rec(&mut fields, "n_kv", b.len(), 8);
    b.extend((kv.len() as u64).to_le_bytes());
    fn string(b: &mut Vec<u8>, fields: &mut Vec<Field>, label: &'static str, s: &str, record: bool) {
        if record {
            fields.push((label, b.len(), 8));
        }
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    }
    for (k, v) in kv {
        string(&mut b, &mut fields, "key_len", k, true);
        rec(&mut fields, "value_type", b.len(), 4);
        match v {
            V::U32(x) => {
                b.extend(4u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            V::F32(x) => {
                b.extend(6u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            V::Bool(x) => {
                b.extend(7u32.to_le_bytes());
                b.push(*x as u8);
            }
            V::Str(s) => {
                b.extend(8u32.to_le_bytes());
                string(&mut b, &mut fields, "string_len", s, true);
            }
            V::StrArr(a) => {
                b.extend(9u32.to_le_bytes());
                rec(&mut fields, "array_elem_type", b.len(), 4);
                b.extend(8u32.to_le_bytes());
                rec(&mut fields, "array_len", b.len(), 8);
                b.extend((a.len() as u64).to_le_bytes());
                for (i, s) in a.iter().enumerate() {
                    string(&mut b, &mut fields, "array_string_len", s, i < 2 || i + 1 == a.len());
                }
            }
            V::I32Arr(a) => {
                b.extend(9u32.to_le_bytes());
                b.extend(5u32.to_le_bytes());
                rec(&mut fields, "array_len", b.len(), 8);
                b.extend((a.len() as u64).to_le_bytes());
                a.iter().for_each(|x| b.extend(x.to_le_bytes()));
            }
        }
    }
    let mut offset = 0u64;
    let mut offsets = Vec::new();
    for t in tensors {
        string(&mut b, &mut fields, "tensor_name_len", &t.name, true);
        rec(&mut fields, "n_dims", b.len(), 4);
        b.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            rec(&mut fields, "dim", b.len(), 8);
            b.extend(d.to_le_bytes());
        }
        rec(&mut fields, "tensor_type", b.len(), 4);
        b.extend(type_id(t.ty).to_le_bytes());
        rec(&mut fields, "offset", b.len(), 8);
        b.extend(offset.to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.data.len() as u64).div_ceil(32) * 32;
    }
    b.resize(b.len().div_ceil(32) * 32, 0);
    let start = b.len();
    for (t, o) in tensors.iter().zip(offsets) {
        b.resize(start + o as usize, 0);
        b.extend(&t.data);
    }
    (b, fields)
}

fn type_id(t: GgmlType) -> u32 {
    (0..64).find(|&i| GgmlType::from_id(i) == Some(t)).unwrap()
}

/// Deterministic pseudo-random bytes.
fn lcg(seed: &mut u64) -> u8 {
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (*seed >> 56) as u8
}

/// Valid data of `ty` for `n` elements: F32 values `base + i`, quantised blocks with small scales.
fn data(ty: GgmlType, n: usize, base: f32, seed: &mut u64) -> Vec<u8> {
    let mut out = Vec::new();
    match ty {
        GgmlType::F32 => (0..n).for_each(|i| out.extend((base + i as f32).to_le_bytes())),
        GgmlType::F16 => (0..n).for_each(|i| out.extend(f16::from_f32((i % 64) as f32 / 8.0).to_le_bytes())),
        GgmlType::BF16 => (0..n).for_each(|i| out.extend(half::bf16::from_f32(i as f32 / 4.0).to_le_bytes())),
        _ => {
            let (block, bytes) = ty.block_layout();
            let scales = if ty == GgmlType::Q4_1 { 2 } else { 1 };
            for _ in 0..n / block as usize {
                for _ in 0..scales {
                    out.extend(f16::from_f32(0.01 + lcg(seed) as f32 / 1000.0).to_le_bytes());
                }
                (0..bytes as usize - 2 * scales).for_each(|_| out.push(lcg(seed)));
            }
        }
    }
    out
}

pub(crate) const HIDDEN: u64 = 32;
pub(crate) const HEADS: u64 = 4;
pub(crate) const KV_HEADS: u64 = 2;
pub(crate) const FFN: u64 = 64;

pub(crate) fn tokens() -> Vec<String> {
    ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "h", "i", "Ġ", "a", "b", "hi", "Ġhi", "!", "<think>", "€"]
        .map(String::from)
        .to_vec()
}

/// The tiny llama's metadata and tensors.
pub(crate) fn tiny_llama() -> (Vec<(&'static str, V)>, Vec<T>) {
    let toks = tokens();
    let mut types = vec![1i32; toks.len()];
    types[..3].fill(3);
    types[11] = 4;
    let kv = vec![
        ("general.architecture", V::Str("llama".into())),
        ("general.name", V::Str("tiny".into())),
        ("llama.block_count", V::U32(1)),
        ("llama.context_length", V::U32(256)),
        ("llama.embedding_length", V::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", V::U32(FFN as u32)),
        ("llama.attention.head_count", V::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", V::U32(KV_HEADS as u32)),
        ("llama.rope.freq_base", V::F32(100000.0)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
        ("llama.rope.dimension_count", V::U32((HIDDEN / HEADS) as u32)),
        ("general.alignment", V::U32(32)),
        ("tokenizer.ggml.model", V::Str("gpt2".into())),
        ("tokenizer.ggml.pre", V::Str("smollm".into())),
        ("tokenizer.ggml.tokens", V::StrArr(toks.clone())),
        ("tokenizer.ggml.token_type", V::I32Arr(types)),
        ("tokenizer.ggml.merges", V::StrArr(vec!["h i".into(), "Ġ hi".into()])),
        ("tokenizer.ggml.bos_token_id", V::U32(1)),
        ("tokenizer.ggml.eos_token_id", V::U32(2)),
        ("tokenizer.ggml.unknown_token_id", V::U32(0)),
        ("tokenizer.ggml.add_bos_token", V::Bool(false)),
        ("tokenizer.chat_template", V::Str("{% for m in messages %}{{ m['content'] }}{% endfor %}".into())),
    ];
    let mut seed = 7;
    let vocab = toks.len() as u64;
    let mut t = |name: &str, dims: &[u64], ty: GgmlType, base: f32| T {
        name: name.into(),
        dims: dims.to_vec(),
        ty,
        data: data(ty, dims.iter().product::<u64>() as usize, base, &mut seed),
    };
    let kvd = KV_HEADS * HIDDEN / HEADS;
    let tensors = vec![
        t("token_embd.weight", &[HIDDEN, vocab], GgmlType::Q8_0, 0.0),
        t("blk.0.attn_norm.weight", &[HIDDEN], GgmlType::F32, 1.0),
        t("blk.0.attn_q.weight", &[HIDDEN, HIDDEN], GgmlType::F32, 0.0),
        t("blk.0.attn_k.weight", &[HIDDEN, kvd], GgmlType::F32, 0.0),
        t("blk.0.attn_v.weight", &[HIDDEN, kvd], GgmlType::BF16, 0.0),
        t("blk.0.attn_output.weight", &[HIDDEN, HIDDEN], GgmlType::Q4_0, 0.0),
        t("blk.0.ffn_gate.weight", &[HIDDEN, FFN], GgmlType::Q4_1, 0.0),
        t("blk.0.ffn_up.weight", &[HIDDEN, FFN], GgmlType::F16, 0.0),
        t("blk.0.ffn_down.weight", &[FFN, HIDDEN], GgmlType::Q4_1, 0.0),
        t("blk.0.ffn_norm.weight", &[HIDDEN], GgmlType::F32, 2.0),
        t("output_norm.weight", &[HIDDEN], GgmlType::F32, 3.0),
        t("rope_freqs.weight", &[HIDDEN / HEADS / 2], GgmlType::F32, 0.0),
    ];
    (kv, tensors)
}

fn tiny_bytes() -> (Vec<u8>, Vec<Field>) {
    let (kv, t) = tiny_llama();
    build(&kv, &t)
}

#[test]
fn parses_tiny_llama() {
    let (bytes, _) = tiny_bytes();
    let g = GgufFile::from_bytes(bytes).unwrap();
    assert_eq!(g.version(), 3);
    assert_eq!(g.alignment(), 32);
    assert_eq!(g.get("llama.block_count").and_then(|v| v.as_u64()), Some(1));
    assert_eq!(g.get("general.architecture").and_then(|v| v.as_str()), Some("llama"));
    assert_eq!(g.get("llama.attention.layer_norm_rms_epsilon").and_then(|v| v.as_f64()), Some(1e-5));
    assert_eq!(g.tensors().len(), 12);
    let q = g.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!(q.shape(), vec![HIDDEN, HIDDEN]);
    assert_eq!(q.ggml_type, GgmlType::F32);
    let v = g.dequantize("blk.0.attn_q.weight").unwrap();
    assert_eq!(v[..3], [0.0, 1.0, 2.0]);
    assert!(matches!(g.dequantize("nope"), Err(GgufError::TensorNotFound(_))));
    assert_eq!(g.metadata().count(), 22);
}

fn header_map(st: &SafeTensors<'_>) -> std::collections::BTreeMap<String, (String, Vec<usize>)> {
    st.tensors().into_iter().map(|(n, v)| (n, (format!("{:?}", v.dtype()), v.shape().to_vec()))).collect()
}

fn f32s(st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    st.tensor(name).unwrap().data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

#[test]
fn converts_tiny_llama() {
    let (bytes, _) = tiny_bytes();
    let g = GgufFile::from_bytes(bytes).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    let s = convert_file(&g, &out, &ConvertOptions { dtype: OutDtype::F32 }).unwrap();
    assert_eq!(s.tensors_written, 11);
    assert_eq!(s.skipped_tensors, vec!["rope_freqs.weight".to_string()]);
    assert_eq!(s.bytes_written, std::fs::metadata(out.join("model.safetensors")).unwrap().len());
    assert!(s.to_string().starts_with("wrote 11 tensors ("), "{s}");

    let cfg: Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
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
    assert_eq!(meta.metadata().as_ref().and_then(|m| m.get("format")).map(String::as_str), Some("pt"));
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
    assert_eq!(f32s(&st, "model.layers.0.mlp.gate_proj.weight"), g.dequantize("blk.0.ffn_gate.weight").unwrap());
    assert_eq!(f32s(&st, "model.embed_tokens.weight"), g.dequantize("token_embd.weight").unwrap());

    // No temporary files left, and a second run (F16) overwrites in place.
    let s2 = convert_file(&g, &out, &ConvertOptions::default()).unwrap();
    assert_eq!(s2.dtype, OutDtype::F16);
    let mut files: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    files.sort();
    assert_eq!(
        files,
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
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
    let tc: Value = serde_json::from_slice(&std::fs::read(dir.path().join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(tc["bos_token"], "<|im_start|>");
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert_eq!(tc["unk_token"], "<|endoftext|>");
    assert_eq!(tc["add_bos_token"], false);
    assert!(tc["chat_template"].as_str().unwrap().contains("messages"));
    let gc: Value = serde_json::from_slice(&std::fs::read(dir.path().join("generation_config.json")).unwrap()).unwrap();
    assert_eq!(gc["eos_token_id"], 2);
}

/// Parses (and, when that works, converts) without panicking; returns whether parsing failed.
fn parse_fails(bytes: Vec<u8>) -> bool {
    match GgufFile::from_bytes(bytes) {
        Err(_) => true,
        Ok(g) => {
            let dir = tempfile::tempdir().unwrap();
            let _ = convert_file(&g, dir.path(), &ConvertOptions::default());
            false
        }
    }
}

#[test]
fn corrupt_length_fields_are_errors() {
    let (bytes, fields) = tiny_bytes();
    let labels: std::collections::BTreeSet<&str> = fields.iter().map(|f| f.0).collect();
    for l in ["n_tensors", "n_kv", "key_len", "string_len", "array_len", "array_string_len", "tensor_name_len", "n_dims", "dim", "offset"] {
        assert!(labels.contains(l), "builder did not record {l}");
    }
    let len = bytes.len() as u64;
    for &(label, at, width) in &fields {
        let huge: &[u64] = if width == 8 { &[u64::MAX, 1 << 62, 1 << 40, len + 1] } else { &[u32::MAX as u64, 1000, 13] };
        for &v in huge {
            // (13 as a tensor type is Q5_K, whose 256-element blocks no row here can hold.)
            let mut b = bytes.clone();
            b[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
            assert!(GgufFile::from_bytes(b).is_err(), "{label} at {at} set to {v} parsed");
        }
        // Small nudges may or may not parse, but must never panic.
        let orig = match width {
            8 => u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()),
            _ => u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as u64,
        };
        for v in [orig.wrapping_sub(1), orig + 1, 0, orig * 2] {
            let mut b = bytes.clone();
            b[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
            parse_fails(b);
        }
    }
}

#[test]
fn truncation_is_an_error_everywhere() {
    let (bytes, _) = tiny_bytes();
    assert!(GgufFile::from_bytes(bytes.clone()).is_ok());
    for cut in 0..bytes.len() {
        assert!(GgufFile::from_bytes(bytes[..cut].to_vec()).is_err(), "truncated at {cut} of {} parsed", bytes.len());
    }
}

#[test]
fn random_byte_flips_never_panic() {
    let (bytes, _) = tiny_bytes();
    let header_end = GgufFile::from_bytes(bytes.clone()).unwrap().data_offset() as usize;
    let mut seed = 42u64;
    for _ in 0..2000 {
        let mut b = bytes.clone();
        for _ in 0..1 + lcg(&mut seed) % 4 {
            let at = (u32::from_le_bytes([lcg(&mut seed), lcg(&mut seed), lcg(&mut seed), 0]) as usize) % header_end;
            b[at] = lcg(&mut seed);
        }
        let _ = GgufFile::from_bytes(b);
    }
}

#[test]
fn header_rules() {
    let (bytes, _) = tiny_bytes();
    let mut b = bytes.clone();
    b[0] = b'X';
    assert!(matches!(GgufFile::from_bytes(b), Err(GgufError::BadMagic { .. })));
    for v in [1u32, 4] {
        let mut b = bytes.clone();
        b[4..8].copy_from_slice(&v.to_le_bytes());
        assert!(matches!(GgufFile::from_bytes(b), Err(GgufError::UnsupportedVersion(_))));
    }
    let (mut kv, t) = tiny_llama();
    for a in [0u32, 48, 1 << 30] {
        kv.retain(|(k, _)| *k != "general.alignment");
        kv.push(("general.alignment", V::U32(a)));
        let err = GgufFile::from_bytes(build(&kv, &t).0).unwrap_err();
        assert!(err.to_string().contains("general.alignment"), "{err}");
    }
    let (mut kv, t) = tiny_llama();
    kv.push(("general.name", V::Str("again".into())));
    assert!(matches!(GgufFile::from_bytes(build(&kv, &t).0), Err(GgufError::DuplicateKey { .. })));
    let (kv, mut t) = tiny_llama();
    t[1].name = "blk.0.attn_q.weight".into();
    assert!(matches!(GgufFile::from_bytes(build(&kv, &t).0), Err(GgufError::DuplicateTensor { .. })));
    let (kv, mut t) = tiny_llama();
    t[0].dims = vec![HIDDEN - 1, 26]; // Q8_0 rows must be whole blocks
    assert!(GgufFile::from_bytes(build(&kv, &t).0).is_err());
}

#[test]
fn unsupported_types_and_models_are_clear_errors() {
    let (kv, mut t) = tiny_llama();
    t[7].ty = GgmlType::Q6K;
    t[7].dims = vec![256, 8];
    t[7].data = vec![0; 210 * 8];
    let g = GgufFile::from_bytes(build(&kv, &t).0).unwrap();
    let e = g.dequantize("blk.0.ffn_up.weight").unwrap_err();
    assert_eq!(e.to_string(), "unsupported tensor type Q6_K for tensor blk.0.ffn_up.weight");

    let (mut kv, t) = tiny_llama();
    kv[0].1 = V::Str("gpt2".into());
    let g = GgufFile::from_bytes(build(&kv, &t).0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(convert_file(&g, dir.path(), &ConvertOptions::default()), Err(GgufError::UnsupportedModel(_))));

    let (kv, mut t) = tiny_llama();
    t.retain(|t| t.name != "blk.0.ffn_norm.weight");
    let g = GgufFile::from_bytes(build(&kv, &t).0).unwrap();
    assert!(matches!(convert_file(&g, dir.path(), &ConvertOptions::default()), Err(GgufError::TensorNotFound(_))));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing written on a failed conversion");
}
