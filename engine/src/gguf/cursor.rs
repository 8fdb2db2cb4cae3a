//! The bounds-checked cursor the reader parses with, and the hard caps on every length it reads.
//!
//! Each count or length read from the file is checked against a cap (which says why it is that
//! big) and against the bytes left in the file (given the smallest encoding of one item) before
//! anything is allocated.

use super::dequant::GgmlType;
use super::reader::TensorInfo;
use super::GgufError;
use super::GgufValue;

/// `"GGUF"` read as a little-endian u32.
pub(super) const MAGIC: u32 = 0x4655_4747;
/// Default data alignment when `general.alignment` is absent (spec).
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The spec limits metadata keys to 65535 bytes.
pub(super) const MAX_KEY_LEN: u64 = 65_535;
/// Longest string value accepted. The largest strings in real files are chat templates of a few
/// tens of KiB; 16 MiB leaves a wide margin while bounding one allocation.
pub(super) const MAX_STRING_LEN: u64 = 16 << 20;
/// ggml's `GGML_MAX_NAME` is 64 bytes including the NUL, so a tensor name has at most 63.
pub(super) const MAX_TENSOR_NAME_LEN: u64 = 63;
/// Longest array accepted. The largest arrays are vocabularies and merge lists (a few hundred
/// thousand entries); 16 Mi entries bounds the element vector.
pub(super) const MAX_ARRAY_LEN: u64 = 1 << 24;
/// Arrays may nest (the spec allows arrays of arrays); real files use at most one level. The cap
/// bounds recursion depth on crafted input.
pub(super) const MAX_ARRAY_DEPTH: usize = 4;
/// Most tensors accepted. Large MoE models have a few thousand tensors.
pub(super) const MAX_TENSORS: u64 = 1 << 20;
/// Most metadata pairs accepted. Real files have a few dozen.
pub(super) const MAX_KV: u64 = 1 << 20;
/// ggml tensors have at most 4 dimensions (`GGML_MAX_DIMS`).
pub(super) const MAX_DIMS: u64 = 4;
/// Largest `general.alignment` accepted; real files use 32 (some 64). It must be a power of two.
pub(super) const MAX_ALIGNMENT: u64 = 1 << 20;
/// Smallest encoding of one metadata pair: key length, type id, a 1-byte value.
pub(super) const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Smallest encoding of one tensor info: name length, n_dims, type id, offset.
pub(super) const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;

/// A bounds-checked little-endian reader over the file bytes.
pub(super) struct Cursor<'a> {
    pub(super) buf: &'a [u8],
    pub(super) pos: usize,
}

impl<'a> Cursor<'a> {
    pub(super) fn offset(&self) -> u64 {
        self.pos as u64
    }

    pub(super) fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    pub(super) fn take(&mut self, n: u64, field: &'static str) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                field,
                offset: self.offset(),
                need: n,
                len: self.buf.len() as u64,
            });
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

    pub(super) fn u32(&mut self, field: &'static str) -> Result<u32, GgufError> {
        self.array(field).map(u32::from_le_bytes)
    }

    pub(super) fn u64(&mut self, field: &'static str) -> Result<u64, GgufError> {
        self.array(field).map(u64::from_le_bytes)
    }

    /// Reads a u64 count, checked against `cap` and against the bytes left when each item takes
    /// at least `min_item_bytes`, so the caller can allocate `count` items safely.
    pub(super) fn count(
        &mut self,
        field: &'static str,
        cap: u64,
        min_item_bytes: u64,
    ) -> Result<usize, GgufError> {
        let offset = self.offset();
        let n = self.u64(field)?;
        let fit = self.remaining() / min_item_bytes.max(1);
        if n > cap || n > fit {
            return Err(GgufError::LimitExceeded {
                field,
                offset,
                value: n,
                limit: cap.min(fit),
            });
        }
        Ok(n as usize) // n <= cap <= 2^24 fits any usize we build for
    }

    pub(super) fn string(&mut self, field: &'static str, cap: u64) -> Result<String, GgufError> {
        let offset = self.offset();
        let n = self.u64(field)?;
        if n > cap {
            return Err(GgufError::LimitExceeded {
                field,
                offset,
                value: n,
                limit: cap,
            });
        }
        let bytes = self.take(n, field)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::Utf8 { field, offset })
    }

    /// Reads a value of GGUF type id `ty` (read at `type_offset`).
    pub(super) fn value(
        &mut self,
        ty: u32,
        type_offset: u64,
        depth: usize,
    ) -> Result<GgufValue, GgufError> {
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
                    b => {
                        return Err(GgufError::Invalid {
                            field: "bool value",
                            offset,
                            reason: format!("byte {b}"),
                        })
                    }
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

    pub(super) fn tensor_info(&mut self, alignment: u64) -> Result<TensorInfo, GgufError> {
        let name = self.string("tensor name length", MAX_TENSOR_NAME_LEN)?;
        let bad = |reason: String| GgufError::BadTensor {
            name: name.clone(),
            reason,
        };
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
                .ok_or_else(|| {
                    bad(format!(
                        "dimensions {dims:?} x {d} overflow the element count"
                    ))
                })?;
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
                reason: format!(
                    "{offset} for tensor {name:?} is not a multiple of the alignment {alignment}"
                ),
            });
        }
        let (block, block_bytes) = ggml_type.block_layout();
        let row = dims.first().copied().unwrap_or(1);
        if row % block != 0 {
            return Err(bad(format!(
                "row length {row} is not a multiple of the {ggml_type} block size {block}"
            )));
        }
        // n_elements / block * block_bytes <= n_elements * 34/32, but check anyway.
        let n_bytes = (n_elements / block)
            .checked_mul(block_bytes)
            .ok_or_else(|| {
                bad(format!(
                    "byte size of {n_elements} {ggml_type} elements overflows"
                ))
            })?;
        Ok(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            n_elements,
            n_bytes,
        })
    }
}

/// Smallest encoded size of a value of type `ty`, or `None` for an unknown type.
fn min_value_bytes(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10 | 11 | 12 => 8,
        9 => 12,
        _ => return None,
    })
}
