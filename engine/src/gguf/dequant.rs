//! ggml tensor types and their dequantisation to `f32`.
//!
//! Block layouts follow ggml (`ggml-common.h`); all multi-byte values are little-endian:
//!
//! | type | block | bytes | layout                                  | value of element `j`                     |
//! |------|-------|-------|-----------------------------------------|------------------------------------------|
//! | F32  | 1     | 4     | `f32`                                   | itself                                   |
//! | F16  | 1     | 2     | IEEE half                               | itself                                   |
//! | BF16 | 1     | 2     | bfloat16                                | itself                                   |
//! | Q4_0 | 32    | 18    | `d: f16, qs: [u8; 16]`                  | `d * (nibble - 8)`                       |
//! | Q4_1 | 32    | 20    | `d: f16, m: f16, qs: [u8; 16]`          | `d * nibble + m`                         |
//! | Q8_0 | 32    | 34    | `d: f16, qs: [i8; 32]`                  | `d * qs[j]`                              |
//!
//! In the 4-bit types, element `j < 16` is the low nibble of `qs[j]` and element `j + 16` the high
//! nibble of `qs[j]`. The scale is widened to `f32` before multiplying, as ggml does.

use half::{bf16, f16};
use rayon::prelude::*;

use super::GgufError;

/// A ggml tensor type id, as stored in a GGUF tensor info.
///
/// All ids the format defines are named (so errors can name them); only some can be dequantised,
/// see [`GgmlType::is_supported`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    Iq2Xxs,
    Iq2Xs,
    Iq3Xxs,
    Iq1S,
    Iq4Nl,
    Iq3S,
    Iq2S,
    Iq4Xs,
    I8,
    I16,
    I32,
    I64,
    F64,
    Iq1M,
    BF16,
    Tq1_0,
    Tq2_0,
    Mxfp4,
}

impl GgmlType {
    /// The type for a ggml type id, or `None` for an id ggml does not define (or has retired).
    pub fn from_id(id: u32) -> Option<Self> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            16 => Iq2Xxs,
            17 => Iq2Xs,
            18 => Iq3Xxs,
            19 => Iq1S,
            20 => Iq4Nl,
            21 => Iq3S,
            22 => Iq2S,
            23 => Iq4Xs,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => Iq1M,
            30 => BF16,
            34 => Tq1_0,
            35 => Tq2_0,
            39 => Mxfp4,
            _ => return None,
        })
    }

    /// ggml's name for the type (`"Q4_1"`, `"BF16"`, ...).
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2K => "Q2_K",
            Q3K => "Q3_K",
            Q4K => "Q4_K",
            Q5K => "Q5_K",
            Q6K => "Q6_K",
            Q8K => "Q8_K",
            Iq2Xxs => "IQ2_XXS",
            Iq2Xs => "IQ2_XS",
            Iq3Xxs => "IQ3_XXS",
            Iq1S => "IQ1_S",
            Iq4Nl => "IQ4_NL",
            Iq3S => "IQ3_S",
            Iq2S => "IQ2_S",
            Iq4Xs => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            Iq1M => "IQ1_M",
            BF16 => "BF16",
            Tq1_0 => "TQ1_0",
            Tq2_0 => "TQ2_0",
            Mxfp4 => "MXFP4",
        }
    }

    /// `(elements per block, bytes per block)` as ggml defines them.
    pub fn block_layout(self) -> (u64, u64) {
        use GgmlType::*;
        match self {
            F32 | I32 => (1, 4),
            F16 | BF16 | I16 => (1, 2),
            I8 => (1, 1),
            I64 | F64 => (1, 8),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            Q2K => (256, 84),
            Q3K => (256, 110),
            Q4K => (256, 144),
            Q5K => (256, 176),
            Q6K => (256, 210),
            Q8K => (256, 292),
            Iq2Xxs => (256, 66),
            Iq2Xs => (256, 74),
            Iq3Xxs => (256, 98),
            Iq1S => (256, 50),
            Iq4Nl => (32, 18),
            Iq3S => (256, 110),
            Iq2S => (256, 82),
            Iq4Xs => (256, 136),
            Iq1M => (256, 56),
            Tq1_0 => (256, 54),
            Tq2_0 => (256, 66),
            Mxfp4 => (32, 17),
        }
    }

    /// Whether [`dequantize`] handles this type.
    pub fn is_supported(self) -> bool {
        use GgmlType::*;
        matches!(self, F32 | F16 | BF16 | Q4_0 | Q4_1 | Q8_0)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Blocks per rayon task: large enough that the task overhead is negligible.
const BLOCKS_PER_TASK: usize = 4096;

/// Dequantises `data` (the raw bytes of tensor `tensor` of type `ty`) into `out`.
///
/// Invariant checked here: `data.len()` is exactly `out.len() / block * block_bytes` and
/// `out.len()` is a multiple of the block size; otherwise an error, never a panic.
pub fn dequantize_into(
    ty: GgmlType,
    tensor: &str,
    data: &[u8],
    out: &mut [f32],
) -> Result<(), GgufError> {
    if !ty.is_supported() {
        return Err(GgufError::UnsupportedTensorType {
            type_name: ty.name().to_string(),
            tensor: tensor.to_string(),
        });
    }
    let (block, block_bytes) = ty.block_layout();
    let (block, block_bytes) = (block as usize, block_bytes as usize);
    let n_blocks = out.len() / block;
    if out.len() % block != 0 || n_blocks.checked_mul(block_bytes) != Some(data.len()) {
        return Err(GgufError::BadTensor {
            name: tensor.to_string(),
            reason: format!(
                "{} bytes of {} cannot hold {} elements",
                data.len(),
                ty,
                out.len()
            ),
        });
    }
    let f: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => dequant_f32,
        GgmlType::F16 => dequant_f16,
        GgmlType::BF16 => dequant_bf16,
        GgmlType::Q4_0 => dequant_q4_0,
        GgmlType::Q4_1 => dequant_q4_1,
        GgmlType::Q8_0 => dequant_q8_0,
        _ => unreachable!("is_supported() checked above"),
    };
    data.par_chunks(block_bytes * BLOCKS_PER_TASK)
        .zip(out.par_chunks_mut(block * BLOCKS_PER_TASK))
        .for_each(|(src, dst)| f(src, dst));
    Ok(())
}

/// Dequantises to a new vector of `n_elements` values. See [`dequantize_into`].
pub fn dequantize(
    ty: GgmlType,
    tensor: &str,
    data: &[u8],
    n_elements: usize,
) -> Result<Vec<f32>, GgufError> {
    if !ty.is_supported() {
        return Err(GgufError::UnsupportedTensorType {
            type_name: ty.name().to_string(),
            tensor: tensor.to_string(),
        });
    }
    let mut out = vec![0f32; n_elements];
    dequantize_into(ty, tensor, data, &mut out)?;
    Ok(out)
}

// The kernels below take slices whose lengths `dequantize_into` has matched: `src` holds exactly
// `dst.len() / block` blocks. `chunks_exact` keeps them panic-free even if that were not so.

fn le_f16(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

fn dequant_f32(src: &[u8], dst: &mut [f32]) {
    for (b, d) in src.chunks_exact(4).zip(dst.iter_mut()) {
        *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

fn dequant_f16(src: &[u8], dst: &mut [f32]) {
    for (b, d) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *d = le_f16(b);
    }
}

fn dequant_bf16(src: &[u8], dst: &mut [f32]) {
    for (b, d) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *d = bf16::from_le_bytes([b[0], b[1]]).to_f32();
    }
}

fn dequant_q4_0(src: &[u8], dst: &mut [f32]) {
    for (b, d) in src.chunks_exact(18).zip(dst.chunks_exact_mut(32)) {
        let scale = le_f16(&b[0..2]);
        let (lo, hi) = d.split_at_mut(16);
        for (j, &q) in b[2..18].iter().enumerate() {
            lo[j] = ((q & 0x0F) as i32 - 8) as f32 * scale;
            hi[j] = ((q >> 4) as i32 - 8) as f32 * scale;
        }
    }
}

fn dequant_q4_1(src: &[u8], dst: &mut [f32]) {
    for (b, d) in src.chunks_exact(20).zip(dst.chunks_exact_mut(32)) {
        let scale = le_f16(&b[0..2]);
        let min = le_f16(&b[2..4]);
        let (lo, hi) = d.split_at_mut(16);
        for (j, &q) in b[4..20].iter().enumerate() {
            lo[j] = (q & 0x0F) as f32 * scale + min;
            hi[j] = (q >> 4) as f32 * scale + min;
        }
    }
}

fn dequant_q8_0(src: &[u8], dst: &mut [f32]) {
    for (b, d) in src.chunks_exact(34).zip(dst.chunks_exact_mut(32)) {
        let scale = le_f16(&b[0..2]);
        for (x, &q) in d.iter_mut().zip(&b[2..34]) {
            *x = (q as i8) as f32 * scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn q4_0_block_by_hand() {
        // d = 0.5; qs[j] = low nibble j, high nibble 15 - j.
        let mut b = h(0.5).to_vec();
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let out = dequantize(GgmlType::Q4_0, "t", &b, 32).unwrap();
        // element j < 16: (j - 8) * 0.5; element 16 + j: (15 - j - 8) * 0.5
        assert_eq!(out[0], -4.0);
        assert_eq!(out[8], 0.0);
        assert_eq!(out[15], 3.5);
        assert_eq!(out[16], 3.5);
        assert_eq!(out[31], -4.0);
    }

    #[test]
    fn q4_1_block_by_hand() {
        // d = 0.25, m = -1.0; all bytes 0x3A: low nibble 10, high nibble 3.
        let mut b = h(0.25).to_vec();
        b.extend(h(-1.0));
        b.extend([0x3Au8; 16]);
        let out = dequantize(GgmlType::Q4_1, "t", &b, 32).unwrap();
        assert!(out[..16].iter().all(|&x| x == 1.5)); // 10 * 0.25 - 1
        assert!(out[16..].iter().all(|&x| x == -0.25)); // 3 * 0.25 - 1
    }

    #[test]
    fn q8_0_two_blocks_by_hand() {
        let mut b = h(2.0).to_vec();
        b.extend((0..32).map(|j| (j as i8 - 16) as u8));
        b.extend(h(-0.125));
        b.extend([127u8; 16].iter().chain([0x80u8; 16].iter())); // 127 and -128
        let out = dequantize(GgmlType::Q8_0, "t", &b, 64).unwrap();
        assert_eq!(out[0], -32.0);
        assert_eq!(out[16], 0.0);
        assert_eq!(out[31], 30.0);
        assert_eq!(out[32], -15.875);
        assert_eq!(out[63], 16.0);
    }

    #[test]
    fn float_types_by_hand() {
        let f32s: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(
            dequantize(GgmlType::F32, "t", &f32s, 2).unwrap(),
            vec![1.5, -2.0]
        );
        // f16 0x3C00 = 1.0, 0xC000 = -2.0; bf16 0x3F80 = 1.0, 0x4049 = 3.140625
        assert_eq!(
            dequantize(GgmlType::F16, "t", &[0x00, 0x3C, 0x00, 0xC0], 2).unwrap(),
            vec![1.0, -2.0]
        );
        assert_eq!(
            dequantize(GgmlType::BF16, "t", &[0x80, 0x3F, 0x49, 0x40], 2).unwrap(),
            vec![1.0, 3.140625]
        );
    }

    #[test]
    fn large_tensor_spans_many_tasks() {
        let n_blocks = BLOCKS_PER_TASK * 2 + 3;
        let mut b = Vec::new();
        for i in 0..n_blocks {
            b.extend(h(1.0));
            b.extend([(i % 100) as u8; 32]);
        }
        let out = dequantize(GgmlType::Q8_0, "t", &b, n_blocks * 32).unwrap();
        for i in 0..n_blocks {
            assert_eq!(out[i * 32 + 31], (i % 100) as f32);
        }
    }

    #[test]
    fn wrong_sizes_and_types_are_errors() {
        assert!(dequantize(GgmlType::Q8_0, "t", &[0u8; 33], 32).is_err());
        assert!(dequantize(GgmlType::Q8_0, "t", &[0u8; 34], 31).is_err());
        assert!(dequantize(GgmlType::F32, "t", &[0u8; 7], 2).is_err());
        let e = dequantize(GgmlType::Q6K, "blk.0.x", &[0u8; 210], 256).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unsupported tensor type Q6_K for tensor blk.0.x"
        );
    }
}
