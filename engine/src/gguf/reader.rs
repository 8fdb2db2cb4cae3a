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

use super::dequant::{self, GgmlType};
use super::GgufError;

/// `"GGUF"` read as a little-endian u32.
const MAGIC: u32 = 0x4655_4747;
/// Default data alignment when `general.alignment` is absent (spec).
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The spec limits metadata keys to 65535 bytes.
const MAX_KEY_LEN: u64 = 65_535;
/// Longest string value accepted. The largest strings in real files are chat templates of a few
/// tens of KiB; 16 MiB leaves a wide margin while bounding one allocation.
const MAX_STRING_LEN: u64 = 16 << 20;
/// ggml's `GGML_MAX_NAME` is 64 bytes including the NUL, so a tensor name has at most 63.
const MAX_TENSOR_NAME_LEN: u64 = 63;
/// Longest array accepted. The largest arrays are vocabularies and merge lists (a few hundred
/// thousand entries); 16 Mi entries bounds the element vector.
const MAX_ARRAY_LEN: u64 = 1 << 24;
/// Arrays may nest (the spec allows arrays of arrays); real files use at most one level. The cap
/// bounds recursion depth on crafted input.
const MAX_ARRAY_DEPTH: usize = 4;
/// Most tensors accepted. Large MoE models have a few thousand tensors.
const MAX_TENSORS: u64 = 1 << 20;
/// Most metadata pairs accepted. Real files have a few dozen.
const MAX_KV: u64 = 1 << 20;
/// ggml tensors have at most 4 dimensions (`GGML_MAX_DIMS`).
const MAX_DIMS: u64 = 4;
/// Largest `general.alignment` accepted; real files use 32 (some 64). It must be a power of two.
const MAX_ALIGNMENT: u64 = 1 << 20;
/// Smallest encoding of one metadata pair: key length, type id, a 1-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Smallest encoding of one tensor info: name length, n_dims, type id, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;

/// A metadata value. Arrays hold values of one type (checked on read).
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, if it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float: `F32` (widened through its shortest decimal form, so `1e-5f32`
    /// gives `1e-5`), `F64`, or an integer.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => v.to_string().parse().ok(),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The GGUF type name of the value (`"u32"`, `"string"`, `"array"`, ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::F32(_) => "f32",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F64(_) => "f64",
        }
    }
}

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
        let mut c = Cursor { buf: storage.bytes(), pos: 0 };
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
            if tensor_index.insert(info.name.clone(), tensors.len()).is_some() {
                return Err(GgufError::DuplicateTensor { name: info.name });
            }
            tensors.push(info);
        }

        let len = c.buf.len() as u64;
        let data_offset = c.offset().div_ceil(alignment) * alignment;
        check_tensor_ranges(&tensors, data_offset, len)?;

        Ok(GgufFile { storage, version, metadata, key_index, tensors, tensor_index, alignment, data_offset })
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
        let bad = || GgufError::BadTensor { name: info.name.clone(), reason: "data range outside the file".into() };
        let start = self.data_offset.checked_add(info.offset).ok_or_else(bad)?;
        let end = start.checked_add(info.n_bytes).ok_or_else(bad)?;
        let (start, end) = (usize::try_from(start).map_err(|_| bad())?, usize::try_from(end).map_err(|_| bad())?);
        self.storage.bytes().get(start..end).ok_or_else(bad)
    }

    /// Dequantises tensor `name` to `f32`, in ggml element order (row-major over [`TensorInfo::shape`]).
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let info = self.tensor(name).ok_or_else(|| GgufError::TensorNotFound(name.to_string()))?;
        let n = usize::try_from(info.n_elements).map_err(|_| GgufError::BadTensor {
            name: name.to_string(),
            reason: "too many elements for this platform".into(),
        })?;
        dequant::dequantize(info.ggml_type, &info.name, self.tensor_data(info)?, n)
    }
}

/// Checks that every tensor's data lies inside the file and that no two overlap.
fn check_tensor_ranges(tensors: &[TensorInfo], data_offset: u64, len: u64) -> Result<(), GgufError> {
    let mut ranges = Vec::with_capacity(tensors.len());
    for t in tensors {
        let end = data_offset.checked_add(t.offset).and_then(|s| s.checked_add(t.n_bytes));
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

/// A bounds-checked little-endian reader over the file bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, field: &'static str) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated { field, offset: self.offset(), need: n, len: self.buf.len() as u64 });
        }
        let n = n as usize; // fits: n <= remaining <= usize::MAX
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, field)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, GgufError> {
        self.array(field).map(u32::from_le_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, GgufError> {
        self.array(field).map(u64::from_le_bytes)
    }

    /// Reads a u64 count, checked against `cap` and against the bytes left when each item takes
    /// at least `min_item_bytes`, so the caller can allocate `count` items safely.
    fn count(&mut self, field: &'static str, cap: u64, min_item_bytes: u64) -> Result<usize, GgufError> {
        let offset = self.offset();
        let n = self.u64(field)?;
        let fit = self.remaining() / min_item_bytes.max(1);
        if n > cap || n > fit {
            return Err(GgufError::LimitExceeded { field, offset, value: n, limit: cap.min(fit) });
        }
        Ok(n as usize) // n <= cap <= 2^24 fits any usize we build for
    }

    fn string(&mut self, field: &'static str, cap: u64) -> Result<String, GgufError> {
        let offset = self.offset();
        let n = self.u64(field)?;
        if n > cap {
            return Err(GgufError::LimitExceeded { field, offset, value: n, limit: cap });
        }
        let bytes = self.take(n, field)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::Utf8 { field, offset })
    }

    /// Reads a value of GGUF type id `ty` (read at `type_offset`).
    fn value(&mut self, ty: u32, type_offset: u64, depth: usize) -> Result<GgufValue, GgufError> {
        Ok(match ty {
            0 => GgufValue::U8(u8::from_le_bytes(self.array("u8 value")?)),
            1 => GgufValue::I8(i8::from_le_bytes(self.array("i8 value")?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array("u16 value")?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array("i16 value")?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array("u32 value")?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array("i32 value")?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array("f32 value")?)),
            7 => {
                let offset = self.offset();
                match self.array::<1>("bool value")?[0] {
                    0 => GgufValue::Bool(false),
                    1 => GgufValue::Bool(true),
                    b => return Err(GgufError::Invalid { field: "bool value", offset, reason: format!("byte {b}") }),
                }
            }
            8 => GgufValue::String(self.string("string value length", MAX_STRING_LEN)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::LimitExceeded {
                        field: "array nesting depth",
                        offset: type_offset,
                        value: depth as u64 + 1,
                        limit: MAX_ARRAY_DEPTH as u64,
                    });
                }
                let elem_offset = self.offset();
                let elem_ty = self.u32("array element type")?;
                let min = min_value_bytes(elem_ty).ok_or_else(|| GgufError::Invalid {
                    field: "array element type",
                    offset: elem_offset,
                    reason: format!("unknown value type {elem_ty}"),
                })?;
                let n = self.count("array length", MAX_ARRAY_LEN, min)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem_ty, elem_offset, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(u64::from_le_bytes(self.array("u64 value")?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array("i64 value")?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array("f64 value")?)),
            _ => {
                return Err(GgufError::Invalid {
                    field: "metadata value type",
                    offset: type_offset,
                    reason: format!("unknown value type {ty}"),
                })
            }
        })
    }

    fn tensor_info(&mut self, alignment: u64) -> Result<TensorInfo, GgufError> {
        let name = self.string("tensor name length", MAX_TENSOR_NAME_LEN)?;
        let bad = |reason: String| GgufError::BadTensor { name: name.clone(), reason };
        let dims_offset = self.offset();
        let n_dims = u64::from(self.u32("tensor n_dims")?);
        if n_dims > MAX_DIMS {
            return Err(GgufError::LimitExceeded {
                field: "tensor n_dims",
                offset: dims_offset,
                value: n_dims,
                limit: MAX_DIMS,
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        let mut n_elements: u64 = 1;
        for _ in 0..n_dims {
            let d = self.u64("tensor dimension")?;
            // ggml counts elements in i64, so the product must stay below i64::MAX.
            n_elements = n_elements
                .checked_mul(d)
                .filter(|&n| n <= i64::MAX as u64)
                .ok_or_else(|| bad(format!("dimensions {dims:?} x {d} overflow the element count")))?;
            dims.push(d);
        }
        let type_offset = self.offset();
        let type_id = self.u32("tensor type")?;
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| GgufError::Invalid {
            field: "tensor type",
            offset: type_offset,
            reason: format!("unknown ggml type id {type_id} for tensor {name:?}"),
        })?;
        let data_offset_at = self.offset();
        let offset = self.u64("tensor data offset")?;
        if offset % alignment != 0 {
            return Err(GgufError::Invalid {
                field: "tensor data offset",
                offset: data_offset_at,
                reason: format!("{offset} for tensor {name:?} is not a multiple of the alignment {alignment}"),
            });
        }
        let (block, block_bytes) = ggml_type.block_layout();
        let row = dims.first().copied().unwrap_or(1);
        if row % block != 0 {
            return Err(bad(format!("row length {row} is not a multiple of the {ggml_type} block size {block}")));
        }
        // n_elements / block * block_bytes <= n_elements * 34/32, but check anyway.
        let n_bytes = (n_elements / block)
            .checked_mul(block_bytes)
            .ok_or_else(|| bad(format!("byte size of {n_elements} {ggml_type} elements overflows")))?;
        Ok(TensorInfo { name, dims, ggml_type, offset, n_elements, n_bytes })
    }
}

/// Smallest encoded size of a value of type `ty`, or `None` for an unknown type.
fn min_value_bytes(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4 | 5 | 6 => 4,
        8 | 10 | 11 | 12 => 8,
        9 => 12,
        _ => return None,
    })
}
