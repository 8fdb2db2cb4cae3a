//! A GGUF writer for tests, and the tiny llama (1 layer, hidden 32) the tests use.

use half::f16;

use crate::gguf::GgmlType;

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
    fn string(
        b: &mut Vec<u8>,
        fields: &mut Vec<Field>,
        label: &'static str,
        s: &str,
        record: bool,
    ) {
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
                    string(
                        &mut b,
                        &mut fields,
                        "array_string_len",
                        s,
                        i < 2 || i + 1 == a.len(),
                    );
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
pub(crate) fn lcg(seed: &mut u64) -> u8 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*seed >> 56) as u8
}

/// Valid data of `ty` for `n` elements: F32 values `base + i`, quantised blocks with small scales.
fn data(ty: GgmlType, n: usize, base: f32, seed: &mut u64) -> Vec<u8> {
    let mut out = Vec::new();
    match ty {
        GgmlType::F32 => (0..n).for_each(|i| out.extend((base + i as f32).to_le_bytes())),
        GgmlType::F16 => {
            (0..n).for_each(|i| out.extend(f16::from_f32((i % 64) as f32 / 8.0).to_le_bytes()))
        }
        GgmlType::BF16 => {
            (0..n).for_each(|i| out.extend(half::bf16::from_f32(i as f32 / 4.0).to_le_bytes()))
        }
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
    [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "h",
        "i",
        "Ġ",
        "a",
        "b",
        "hi",
        "Ġhi",
        "!",
        "<think>",
        "€",
    ]
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
        (
            "llama.rope.dimension_count",
            V::U32((HIDDEN / HEADS) as u32),
        ),
        ("general.alignment", V::U32(32)),
        ("tokenizer.ggml.model", V::Str("gpt2".into())),
        ("tokenizer.ggml.pre", V::Str("smollm".into())),
        ("tokenizer.ggml.tokens", V::StrArr(toks.clone())),
        ("tokenizer.ggml.token_type", V::I32Arr(types)),
        (
            "tokenizer.ggml.merges",
            V::StrArr(vec!["h i".into(), "Ġ hi".into()]),
        ),
        ("tokenizer.ggml.bos_token_id", V::U32(1)),
        ("tokenizer.ggml.eos_token_id", V::U32(2)),
        ("tokenizer.ggml.unknown_token_id", V::U32(0)),
        ("tokenizer.ggml.add_bos_token", V::Bool(false)),
        (
            "tokenizer.chat_template",
            V::Str("{% for m in messages %}{{ m['content'] }}{% endfor %}".into()),
        ),
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
        t(
            "blk.0.attn_output.weight",
            &[HIDDEN, HIDDEN],
            GgmlType::Q4_0,
            0.0,
        ),
        t("blk.0.ffn_gate.weight", &[HIDDEN, FFN], GgmlType::Q4_1, 0.0),
        t("blk.0.ffn_up.weight", &[HIDDEN, FFN], GgmlType::F16, 0.0),
        t("blk.0.ffn_down.weight", &[FFN, HIDDEN], GgmlType::Q4_1, 0.0),
        t("blk.0.ffn_norm.weight", &[HIDDEN], GgmlType::F32, 2.0),
        t("output_norm.weight", &[HIDDEN], GgmlType::F32, 3.0),
        t(
            "rope_freqs.weight",
            &[HIDDEN / HEADS / 2],
            GgmlType::F32,
            0.0,
        ),
    ];
    (kv, tensors)
}

/// The tiny llama as bytes, with its length-field positions.
pub(crate) fn tiny_bytes() -> (Vec<u8>, Vec<Field>) {
    let (kv, t) = tiny_llama();
    build(&kv, &t)
}
