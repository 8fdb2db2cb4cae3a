//! The GGUF reader: header, metadata and tensor infos, with the tensor data left in the mapping.
//!
//! Layout (GGUF v2/v3, little-endian; see the module docs for the spec):
//!
//! ```text
//! magic "GGUF" | version: u32 | n_tensors: u64 | n_kv: u64
//! n_kv   x { key: string, type: u32, value }
//! n_tensors x { name: string, n_dims: u32, dims: [u64; n_dims], type: u32, offset: u64 }
//! padding to `general.alignment` (default 32) | tensor data
//! ```
//!
//! A string is `len: u64` then `len` bytes of UTF-8; an array is `elem_type: u32, len: u64` then
//! the elements. Every length read from the file is checked against a hard cap *and* against the
//! bytes left in the file before anything is allocated, so a corrupt file gives a [`GgufError`],
//! never a panic or a huge allocation.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use memmap2::Mmap;

use super::cursor::*;
use super::dequant::{self, GgmlType};
pub use super::value::GgufValue;
use super::GgufError;

/// One tensor's description. Invariants (checked on open): `dims.len() <= 4`, the element count
/// and byte size do not overflow, `dims[0]` is a multiple of the type's block size, `offset` is
/// aligned, and the data lies inside the file without overlapping another tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (contiguous) dimension.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    pub n_elements: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Row-major shape (outermost first), as PyTorch/safetensors write it: `dims` reversed.
    pub fn shape(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }
}

/// The bytes of a file: a read-only mapping, or owned bytes (tests, in-memory input).
enum Storage {
    Mmap(Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file. Tensor data stays in the mapping until asked for.
pub struct GgufFile {
    storage: Storage,
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("n_kv", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

impl GgufFile {
    /// Opens and parses `path` through a read-only memory map.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| GgufError::io(path, e))?;
        // SAFETY: the mapping is read-only. Like every mmap-based reader we assume nobody truncates
        // or rewrites the file while it is open; all reads are bounds-checked against its length.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| GgufError::io(path, e))?;
        Self::parse(Storage::Mmap(mmap))
    }

    /// Parses a GGUF held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::parse(Storage::Owned(bytes))
    }

    fn parse(storage: Storage) -> Result<Self, GgufError> {
        let mut c = Cursor {
            buf: storage.bytes(),
            pos: 0,
        };
        let magic = c.u32("magic")?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic { found: magic });
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let n_tensors = c.count("tensor count", MAX_TENSORS, MIN_TENSOR_INFO_BYTES)?;
        let n_kv = c.count("metadata count", MAX_KV, MIN_KV_BYTES)?;

        let mut metadata = Vec::with_capacity(n_kv);
        let mut key_index = HashMap::with_capacity(n_kv);
        for _ in 0..n_kv {
            let key = c.string("metadata key", MAX_KEY_LEN)?;
            let type_offset = c.offset();
            let ty = c.u32("metadata value type")?;
            let value = c.value(ty, type_offset, 0)?;
            if key_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(GgufError::DuplicateKey { key });
            }
            metadata.push((key, value));
        }

        let alignment = match key_index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(GgufValue::U32(a)) => {
                let a = u64::from(*a);
                if a == 0 || !a.is_power_of_two() || a > MAX_ALIGNMENT {
                    return Err(GgufError::BadMetadata {
                        key: "general.alignment".into(),
                        reason: format!("{a} is not a power of two in 1..={MAX_ALIGNMENT}"),
                    });
                }
                a
            }
            Some(v) => {
                return Err(GgufError::BadMetadata {
                    key: "general.alignment".into(),
                    reason: format!("type {} (the spec says u32)", v.type_name()),
                })
            }
        };

        let mut tensors = Vec::with_capacity(n_tensors);
        let mut tensor_index = HashMap::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let info = c.tensor_info(alignment)?;
            if tensor_index
                .insert(info.name.clone(), tensors.len())
                .is_some()
            {
                return Err(GgufError::DuplicateTensor { name: info.name });
            }
            tensors.push(info);
        }

        let len = c.buf.len() as u64;
        let data_offset = c.offset().div_ceil(alignment) * alignment;
        check_tensor_ranges(&tensors, data_offset, len)?;

        Ok(GgufFile {
            storage,
            version,
            metadata,
            key_index,
            tensors,
            tensor_index,
            alignment,
            data_offset,
        })
    }

    /// GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset of the tensor data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The metadata value for `key`.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.key_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// All metadata pairs, in file order.
    pub fn metadata(&self) -> impl Iterator<Item = (&str, &GgufValue)> {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// All tensor infos, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The info of tensor `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor of this file (range checked on open).
    pub fn tensor_data(&self, info: &TensorInfo) -> Result<&[u8], GgufError> {
        let bad = || GgufError::BadTensor {
            name: info.name.clone(),
            reason: "data range outside the file".into(),
        };
        let start = self.data_offset.checked_add(info.offset).ok_or_else(bad)?;
        let end = start.checked_add(info.n_bytes).ok_or_else(bad)?;
        let (start, end) = (
            usize::try_from(start).map_err(|_| bad())?,
            usize::try_from(end).map_err(|_| bad())?,
        );
        self.storage.bytes().get(start..end).ok_or_else(bad)
    }

    /// Dequantises tensor `name` to `f32`, in ggml element order (row-major over [`TensorInfo::shape`]).
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let info = self
            .tensor(name)
            .ok_or_else(|| GgufError::TensorNotFound(name.to_string()))?;
        let n = usize::try_from(info.n_elements).map_err(|_| GgufError::BadTensor {
            name: name.to_string(),
            reason: "too many elements for this platform".into(),
        })?;
        dequant::dequantize(info.ggml_type, &info.name, self.tensor_data(info)?, n)
    }
}

/// Checks that every tensor's data lies inside the file and that no two overlap.
fn check_tensor_ranges(
    tensors: &[TensorInfo],
    data_offset: u64,
    len: u64,
) -> Result<(), GgufError> {
    let mut ranges = Vec::with_capacity(tensors.len());
    for t in tensors {
        let end = data_offset
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.n_bytes));
        match end {
            Some(end) if end <= len => ranges.push((t.offset, t.offset + t.n_bytes, &t.name)),
            _ => {
                return Err(GgufError::BadTensor {
                    name: t.name.clone(),
                    reason: format!(
                        "data [{data_offset} + {}, +{} bytes) runs past the end of the file ({len} bytes)",
                        t.offset, t.n_bytes
                    ),
                })
            }
        }
    }
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(GgufError::BadTensor {
                name: w[1].2.clone(),
                reason: format!("data at offset {} overlaps tensor {:?}", w[1].0, w[0].2),
            });
        }
    }
    Ok(())
}
