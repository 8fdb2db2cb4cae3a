//! Memory-mapped safetensors weights: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. Headers are validated by the `safetensors` crate (offsets
//! inside the file, no overlap); tensors are handed to the backend as [`HostMatrix`] views of
//! the mapping, so nothing is read before it is needed.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use farsight_kernels::{DType, HostMatrix};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{EngineError, Result};

/// Where one tensor's bytes are.
#[derive(Clone, Debug)]
struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

/// All tensors of a model directory, memory-mapped.
pub struct Weights {
    files: Vec<(PathBuf, Mmap)>,
    entries: HashMap<String, Entry>,
}

fn werr(path: &Path, msg: impl Into<String>) -> EngineError {
    EngineError::Weights {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

impl Weights {
    /// Maps the safetensors files of `dir`.
    pub fn open(dir: &Path) -> Result<Weights> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        // With an index: tensor name -> shard file name, checked against the shards' headers.
        let mut index_map: Vec<(String, String)> = Vec::new();
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| EngineError::io(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| werr(&index, format!("not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| werr(&index, "no `weight_map` object"))?;
            for (t, f) in map {
                let f = f
                    .as_str()
                    .ok_or_else(|| werr(&index, format!("non-string shard name for `{t}`")))?;
                index_map.push((t.clone(), f.to_string()));
            }
            let mut names: Vec<String> = index_map.iter().map(|(_, f)| f.clone()).collect();
            names.sort();
            names.dedup();
            for n in &names {
                if n.contains('/') || n.contains('\\') || n.starts_with('.') {
                    return Err(werr(
                        &index,
                        format!("shard name `{n}` is not a plain file name"),
                    ));
                }
            }
            names.into_iter().map(|n| dir.join(n)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(werr(
                dir,
                "no model.safetensors or model.safetensors.index.json",
            ));
        };

        let mut out = Weights {
            files: Vec::new(),
            entries: HashMap::new(),
        };
        for (fi, path) in files.into_iter().enumerate() {
            let f = File::open(&path).map_err(|e| EngineError::io(&path, e))?;
            // SAFETY: the file is opened read-only; farsight never writes model files while a
            // model is loaded. A concurrent writer from outside could change the bytes we read
            // (never the mapping's length), which the format checks below do not protect from.
            let map = unsafe { Mmap::map(&f) }.map_err(|e| EngineError::io(&path, e))?;
            let (header_len, meta) = SafeTensors::read_metadata(&map)
                .map_err(|e| werr(&path, format!("invalid safetensors file: {e}")))?;
            let data_start = 8 + header_len;
            for (name, info) in meta.tensors() {
                let dtype = match info.dtype {
                    Dtype::F32 => DType::F32,
                    Dtype::F16 => DType::F16,
                    Dtype::BF16 => DType::BF16,
                    other => {
                        return Err(werr(
                            &path,
                            format!("tensor `{name}` has dtype {other:?} (need f32, f16 or bf16)"),
                        ))
                    }
                };
                let (s, e) = info.data_offsets;
                out.entries.insert(
                    name.clone(),
                    Entry {
                        file: fi,
                        dtype,
                        shape: info.shape.clone(),
                        start: data_start + s,
                        end: data_start + e,
                    },
                );
            }
            out.files.push((path, map));
        }
        for (t, f) in &index_map {
            let in_shard = out
                .entries
                .get(t)
                .map(|e| &out.files[e.file].0)
                .and_then(|p| p.file_name());
            if in_shard.and_then(|n| n.to_str()) != Some(f.as_str()) {
                return Err(werr(
                    &index,
                    format!("the index places tensor `{t}` in {f}, which does not contain it"),
                ));
            }
        }
        Ok(out)
    }

    /// True when the tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Shape and dtype of a tensor.
    pub fn info(&self, name: &str) -> Option<(&[usize], DType)> {
        self.entries
            .get(name)
            .map(|e| (e.shape.as_slice(), e.dtype))
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).ok_or_else(|| {
            let dir = self
                .files
                .first()
                .and_then(|(p, _)| p.parent())
                .unwrap_or(Path::new("."));
            werr(dir, format!("missing tensor `{name}`"))
        })
    }

    /// A 2-D tensor of shape `[rows, cols]` as a backend upload view.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<HostMatrix<'_>> {
        let e = self.entry(name)?;
        let path = &self.files[e.file].0;
        if e.shape != [rows, cols] {
            return Err(werr(
                path,
                format!(
                    "tensor `{name}` has shape {:?}, expected [{rows}, {cols}]",
                    e.shape
                ),
            ));
        }
        Ok(HostMatrix {
            rows,
            cols,
            dtype: e.dtype,
            bytes: &self.files[e.file].1[e.start..e.end],
        })
    }

    /// A 1-D tensor of `len` values, converted to f32.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let e = self.entry(name)?;
        let path = &self.files[e.file].0;
        if e.shape != [len] {
            return Err(werr(
                path,
                format!("tensor `{name}` has shape {:?}, expected [{len}]", e.shape),
            ));
        }
        let b = &self.files[e.file].1[e.start..e.end];
        Ok(match e.dtype {
            DType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        })
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> usize {
        self.entries.values().map(|e| e.end - e.start).sum()
    }
}
