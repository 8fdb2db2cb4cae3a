//! GGUF (llama architecture) to a Hugging Face `LlamaForCausalLM` directory.
//!
//! Output, matching what transformers derives when it loads the GGUF itself
//! (`modeling_gguf_pytorch_utils.load_gguf_checkpoint`):
//!
//! * `model.safetensors`: every tensor dequantised to `f32`, the Q/K rows un-permuted (llama.cpp's
//!   converter interleaves the two rotary halves of each head; see [`unpermute_rows`]), then
//!   rounded once to the output dtype. Shapes are the GGUF dims reversed (`[out, in]`).
//! * `config.json`, `generation_config.json`, `tokenizer.json`, `tokenizer_config.json`.
//!
//! Every file is written to a temporary name in the output directory, synced, and renamed into
//! place, so an interrupted conversion never leaves a complete-looking partial file; running the
//! conversion again overwrites the same files (idempotent).

use std::fmt;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use half::{bf16, f16};
use serde_json::{json, Map, Value};

use super::config::LlamaParams;
use super::reader::{GgufFile, TensorInfo};
use super::tokenizer::GgufVocab;
use super::GgufError;

/// The dtype of the tensors in the written `model.safetensors`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutDtype {
    #[default]
    F16,
    BF16,
    F32,
}

impl OutDtype {
    /// The safetensors dtype name.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            OutDtype::F16 => "F16",
            OutDtype::BF16 => "BF16",
            OutDtype::F32 => "F32",
        }
    }

    /// The torch dtype name used in `config.json`.
    pub fn torch_name(self) -> &'static str {
        match self {
            OutDtype::F16 => "float16",
            OutDtype::BF16 => "bfloat16",
            OutDtype::F32 => "float32",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            OutDtype::F16 | OutDtype::BF16 => 2,
            OutDtype::F32 => 4,
        }
    }

    /// Rounds `src` (once, to nearest even) and appends the little-endian bytes to `out`.
    fn encode(self, src: &[f32], out: &mut Vec<u8>) {
        out.reserve(src.len() * self.size() as usize);
        match self {
            OutDtype::F16 => src
                .iter()
                .for_each(|&x| out.extend_from_slice(&f16::from_f32(x).to_le_bytes())),
            OutDtype::BF16 => src
                .iter()
                .for_each(|&x| out.extend_from_slice(&bf16::from_f32(x).to_le_bytes())),
            OutDtype::F32 => src
                .iter()
                .for_each(|&x| out.extend_from_slice(&x.to_le_bytes())),
        }
    }
}

impl fmt::Display for OutDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OutDtype::F16 => "f16",
            OutDtype::BF16 => "bf16",
            OutDtype::F32 => "f32",
        })
    }
}

impl FromStr for OutDtype {
    type Err = String;
    /// Accepts `f16`/`float16`, `bf16`/`bfloat16`, `f32`/`float32` (any case).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f16" | "float16" | "fp16" => Ok(OutDtype::F16),
            "bf16" | "bfloat16" => Ok(OutDtype::BF16),
            "f32" | "float32" | "fp32" => Ok(OutDtype::F32),
            _ => Err(format!("unknown dtype {s:?} (expected f16, bf16 or f32)")),
        }
    }
}

/// Options for [`convert_gguf`].
#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    pub dtype: OutDtype,
}

/// What [`convert_gguf`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertSummary {
    pub out_dir: PathBuf,
    /// Tensors in `model.safetensors`.
    pub tensors_written: usize,
    /// Parameters (elements) in `model.safetensors`.
    pub parameters: u64,
    /// Size of `model.safetensors` in bytes.
    pub bytes_written: u64,
    pub dtype: OutDtype,
    /// GGUF tensors with no Hugging Face counterpart that were left out (e.g. `rope_freqs.weight`).
    pub skipped_tensors: Vec<String>,
}

impl fmt::Display for ConvertSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "wrote {} tensors ({} parameters, {:.1} MiB, {}) to {}",
            self.tensors_written,
            self.parameters,
            self.bytes_written as f64 / (1024.0 * 1024.0),
            self.dtype,
            self.out_dir.display()
        )?;
        if !self.skipped_tensors.is_empty() {
            write!(f, "; skipped {}", self.skipped_tensors.join(", "))?;
        }
        Ok(())
    }
}

/// One output tensor: where it comes from and what it becomes.
#[derive(Debug, Clone)]
struct Planned<'a> {
    info: &'a TensorInfo,
    hf_name: String,
    /// Row-major HF shape.
    shape: Vec<u64>,
    /// Undo llama.cpp's Q/K row permutation with this many heads.
    unpermute_heads: Option<u64>,
}

/// The HF name of a GGUF llama tensor, and the heads to un-permute with, or `None` if unknown.
fn hf_name(p: &LlamaParams, gguf: &str) -> Option<(String, Option<u64>)> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some((n.to_string(), None));
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: u64 = layer.parse().ok().filter(|&l| l < p.layers)?;
    if layer.to_string() != rest[..rest.len() - suffix.len() - 1] {
        return None; // "blk.01." is not layer 1
    }
    let (name, heads) = match suffix {
        "attn_q.weight" => ("self_attn.q_proj.weight", Some(p.heads)),
        "attn_k.weight" => ("self_attn.k_proj.weight", Some(p.kv_heads)),
        "attn_v.weight" => ("self_attn.v_proj.weight", None),
        "attn_output.weight" => ("self_attn.o_proj.weight", None),
        "ffn_gate.weight" => ("mlp.gate_proj.weight", None),
        "ffn_up.weight" => ("mlp.up_proj.weight", None),
        "ffn_down.weight" => ("mlp.down_proj.weight", None),
        "attn_norm.weight" => ("input_layernorm.weight", None),
        "ffn_norm.weight" => ("post_attention_layernorm.weight", None),
        _ => return None,
    };
    Some((format!("model.layers.{layer}.{name}"), heads))
}

/// The HF shape each tensor must have.
fn expected_shape(p: &LlamaParams, hf: &str) -> Vec<u64> {
    let (h, q, kv) = (p.hidden, p.heads * p.head_dim, p.kv_heads * p.head_dim);
    let suffix = hf
        .rsplit_once("layers.")
        .map(|(_, s)| s.split_once('.').map_or(s, |x| x.1))
        .unwrap_or(hf);
    match suffix {
        "model.embed_tokens.weight" | "lm_head.weight" => vec![p.vocab, h],
        "model.norm.weight" | "input_layernorm.weight" | "post_attention_layernorm.weight" => {
            vec![h]
        }
        "self_attn.q_proj.weight" => vec![q, h],
        "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![kv, h],
        "self_attn.o_proj.weight" => vec![h, q],
        "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![p.ffn, h],
        "mlp.down_proj.weight" => vec![h, p.ffn],
        _ => vec![],
    }
}

/// Maps, checks and orders the tensors to write; names the ones skipped.
fn plan<'a>(
    g: &'a GgufFile,
    p: &LlamaParams,
) -> Result<(Vec<Planned<'a>>, Vec<String>), GgufError> {
    let mut planned = Vec::new();
    let mut skipped = Vec::new();
    for info in g.tensors() {
        let Some((hf, heads)) = hf_name(p, &info.name) else {
            skipped.push(info.name.clone());
            continue;
        };
        let shape = info.shape();
        let want = expected_shape(p, &hf);
        if shape != want {
            return Err(GgufError::BadTensor {
                name: info.name.clone(),
                reason: format!(
                    "shape {shape:?} does not match the metadata, which implies {want:?} for {hf}"
                ),
            });
        }
        planned.push(Planned {
            info,
            hf_name: hf,
            shape,
            unpermute_heads: heads,
        });
    }
    // Every tensor the model needs must be there.
    let mut required = vec![
        "token_embd.weight".to_string(),
        "output_norm.weight".to_string(),
    ];
    for l in 0..p.layers {
        for s in [
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
            "attn_norm",
            "ffn_norm",
        ] {
            required.push(format!("blk.{l}.{s}.weight"));
        }
    }
    if let Some(missing) = required.into_iter().find(|n| g.tensor(n).is_none()) {
        return Err(GgufError::TensorNotFound(missing));
    }
    Ok((planned, skipped))
}

/// Undoes llama.cpp's Q/K permutation in place on a row-major `[rows, cols]` matrix.
///
/// llama.cpp's converter stores, for each head, row `2*j + i` of the HF layout at row `i*half + j`
/// (`half = rows / heads / 2`), i.e. it reshapes to `(heads, 2, half, cols)` and swaps axes 1 and
/// 2. transformers reverses this by reshaping to `(heads, half, 2, cols)` and swapping the same
/// axes; so HF row `h*2*half + i*half + j` is GGUF row `h*2*half + 2*j + i`.
pub(crate) fn unpermute_rows(
    data: &[f32],
    rows: usize,
    cols: usize,
    heads: usize,
) -> Option<Vec<f32>> {
    if heads == 0 || rows % (heads * 2) != 0 || data.len() != rows.checked_mul(cols)? {
        return None;
    }
    let half = rows / heads / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for i in 0..2 {
            for j in 0..half {
                let dst = h * 2 * half + i * half + j;
                let src = h * 2 * half + 2 * j + i;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Some(out)
}

/// Writes `out_dir/name` through a temporary file in the same directory, synced and renamed.
/// The files a conversion writes.
const OUTPUT_FILES: [&str; 5] = [
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "config.json",
];

/// The temporary name `name` is written under before the rename.
fn partial_name(name: &str) -> String {
    format!(".{name}.partial-{}", std::process::id())
}

/// Removes temporary files a crashed earlier conversion left in `out_dir` (only ours, by name).
fn remove_stale_partials(out_dir: &Path) -> Result<(), GgufError> {
    let entries = fs::read_dir(out_dir).map_err(|e| GgufError::io(out_dir, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if OUTPUT_FILES
            .iter()
            .any(|f| name.starts_with(&format!(".{f}.partial-")))
        {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(())
}

fn write_atomic(
    out_dir: &Path,
    name: &str,
    write: impl FnOnce(&mut BufWriter<File>) -> Result<(), GgufError>,
) -> Result<(), GgufError> {
    let tmp = out_dir.join(partial_name(name));
    let dst = out_dir.join(name);
    let result = (|| {
        let file = File::create(&tmp).map_err(|e| GgufError::io(&tmp, e))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        write(&mut w)?;
        let file = w
            .into_inner()
            .map_err(|e| GgufError::io(&tmp, e.into_error()))?;
        file.sync_all().map_err(|e| GgufError::io(&tmp, e))?;
        fs::rename(&tmp, &dst).map_err(|e| GgufError::io(&dst, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn write_json(out_dir: &Path, name: &str, v: &Value, pretty: bool) -> Result<(), GgufError> {
    write_atomic(out_dir, name, |w| {
        let r = if pretty {
            serde_json::to_writer_pretty(&mut *w, v)
        } else {
            serde_json::to_writer(&mut *w, v)
        };
        r.map_err(|e| GgufError::Output {
            file: name.into(),
            reason: e.to_string(),
        })?;
        w.write_all(b"\n").map_err(|e| GgufError::io(name, e))
    })
}

/// Writes `model.safetensors` tensor by tensor, so only one dequantised tensor is in memory.
/// Returns (tensors, parameters, bytes).
fn write_safetensors(
    g: &GgufFile,
    out_dir: &Path,
    planned: &[Planned<'_>],
    dtype: OutDtype,
) -> Result<(usize, u64, u64), GgufError> {
    const NAME: &str = "model.safetensors";
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0u64;
    for t in planned {
        let n = t.info.n_elements * dtype.size(); // n_elements <= i64::MAX / 8 checked below
        let end = offset.checked_add(n).ok_or_else(|| GgufError::Output {
            file: NAME.into(),
            reason: "size overflow".into(),
        })?;
        header.insert(t.hf_name.clone(), json!({"dtype": dtype.safetensors_name(), "shape": t.shape, "data_offsets": [offset, end]}));
        offset = end;
    }
    let mut header = serde_json::to_vec(&Value::Object(header)).map_err(|e| GgufError::Output {
        file: NAME.into(),
        reason: e.to_string(),
    })?;
    header.resize(header.len().div_ceil(8) * 8, b' '); // data starts 8-byte aligned
    let params: u64 = planned.iter().map(|t| t.info.n_elements).sum();
    write_atomic(out_dir, NAME, |w| {
        let io = |e| GgufError::io(out_dir.join(NAME), e);
        w.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(&header).map_err(io)?;
        let mut bytes = Vec::new();
        for t in planned {
            let mut data = g.dequantize(&t.info.name)?;
            if let Some(heads) = t.unpermute_heads {
                let (rows, cols) = (t.shape[0] as usize, t.shape[1] as usize);
                data = unpermute_rows(&data, rows, cols, heads as usize).ok_or_else(|| {
                    GgufError::BadTensor {
                        name: t.info.name.clone(),
                        reason: format!(
                            "{rows} rows cannot be split into {heads} heads of two rotary halves"
                        ),
                    }
                })?;
            }
            bytes.clear();
            dtype.encode(&data, &mut bytes);
            w.write_all(&bytes).map_err(io)?;
        }
        Ok(())
    })?;
    Ok((planned.len(), params, 8 + header.len() as u64 + offset))
}

/// Converts the llama GGUF at `input` into a Hugging Face model directory `out_dir` (created if
/// needed): `model.safetensors`, `config.json`, `generation_config.json`, `tokenizer.json` and
/// `tokenizer_config.json`. Safe to re-run; each file is replaced atomically.
pub fn convert_gguf(
    input: &Path,
    out_dir: &Path,
    opts: &ConvertOptions,
) -> Result<ConvertSummary, GgufError> {
    let g = GgufFile::open(input)?;
    convert_file(&g, out_dir, opts)
}

/// [`convert_gguf`] on an already parsed file.
pub fn convert_file(
    g: &GgufFile,
    out_dir: &Path,
    opts: &ConvertOptions,
) -> Result<ConvertSummary, GgufError> {
    let p = LlamaParams::from_gguf(g)?;
    let vocab = GgufVocab::from_gguf(g)?;
    if p.vocab == 0 {
        return Err(GgufError::MissingKey("llama.vocab_size".into()));
    }
    // Build everything that can fail on metadata before touching the disk.
    let (planned, skipped) = plan(g, &p)?;
    let tokenizer = vocab.tokenizer_json()?;
    let tokenizer_config = vocab.tokenizer_config_json(p.context);
    let config = p.config_json(&vocab, opts.dtype);
    let id = |t: &Option<(u32, String)>| t.as_ref().map(|t| t.0);
    let generation = json!({
        "bos_token_id": id(&vocab.special.bos),
        "eos_token_id": id(&vocab.special.eos),
        "pad_token_id": id(&vocab.special.pad),
    });

    fs::create_dir_all(out_dir).map_err(|e| GgufError::io(out_dir, e))?;
    remove_stale_partials(out_dir)?;
    let (tensors_written, parameters, bytes_written) =
        write_safetensors(g, out_dir, &planned, opts.dtype)?;
    write_json(out_dir, "tokenizer.json", &tokenizer, false)?;
    write_json(out_dir, "tokenizer_config.json", &tokenizer_config, true)?;
    write_json(out_dir, "generation_config.json", &generation, true)?;
    write_json(out_dir, "config.json", &config, true)?; // last: its presence marks a finished conversion

    Ok(ConvertSummary {
        out_dir: out_dir.to_path_buf(),
        tensors_written,
        parameters,
        bytes_written,
        dtype: opts.dtype,
        skipped_tensors: skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp permute: reshape (heads, 2, half, cols) -> swap(1, 2).
        let (heads, half, cols) = (3usize, 4usize, 2usize);
        let rows = heads * 2 * half;
        let hf: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let mut gguf = vec![0f32; hf.len()];
        for h in 0..heads {
            for i in 0..2 {
                for j in 0..half {
                    let src = h * 2 * half + i * half + j; // HF row
                    let dst = h * 2 * half + j * 2 + i; // GGUF row
                    gguf[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_eq!(unpermute_rows(&gguf, rows, cols, heads).unwrap(), hf);
        assert!(unpermute_rows(&gguf, rows, cols, 5).is_none());
    }

    #[test]
    fn dtype_parse_and_round_once() {
        assert_eq!("BF16".parse::<OutDtype>().unwrap(), OutDtype::BF16);
        assert!("q4".parse::<OutDtype>().is_err());
        let mut b = Vec::new();
        OutDtype::F16.encode(&[1.0 + 1.0 / 4096.0], &mut b); // halfway between two f16: ties to even
        assert_eq!(b, f16::from_f32(1.0).to_le_bytes());
    }
}
