//! Fuzz-style tests: corrupt length fields, truncation, random byte flips, header rules.

use super::builder::*;
use crate::gguf::*;

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
    for l in [
        "n_tensors",
        "n_kv",
        "key_len",
        "string_len",
        "array_len",
        "array_string_len",
        "tensor_name_len",
        "n_dims",
        "dim",
        "offset",
    ] {
        assert!(labels.contains(l), "builder did not record {l}");
    }
    let len = bytes.len() as u64;
    for &(label, at, width) in &fields {
        let huge: &[u64] = if width == 8 {
            &[u64::MAX, 1 << 62, 1 << 40, len + 1]
        } else {
            &[u32::MAX as u64, 1000, 13]
        };
        for &v in huge {
            // (13 as a tensor type is Q5_K, whose 256-element blocks no row here can hold.)
            let mut b = bytes.clone();
            b[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
            assert!(
                GgufFile::from_bytes(b).is_err(),
                "{label} at {at} set to {v} parsed"
            );
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
        assert!(
            GgufFile::from_bytes(bytes[..cut].to_vec()).is_err(),
            "truncated at {cut} of {} parsed",
            bytes.len()
        );
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
            let at = (u32::from_le_bytes([lcg(&mut seed), lcg(&mut seed), lcg(&mut seed), 0])
                as usize)
                % header_end;
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
    assert!(matches!(
        GgufFile::from_bytes(b),
        Err(GgufError::BadMagic { .. })
    ));
    for v in [1u32, 4] {
        let mut b = bytes.clone();
        b[4..8].copy_from_slice(&v.to_le_bytes());
        assert!(matches!(
            GgufFile::from_bytes(b),
            Err(GgufError::UnsupportedVersion(_))
        ));
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
    assert!(matches!(
        GgufFile::from_bytes(build(&kv, &t).0),
        Err(GgufError::DuplicateKey { .. })
    ));
    let (kv, mut t) = tiny_llama();
    t[1].name = "blk.0.attn_q.weight".into();
    assert!(matches!(
        GgufFile::from_bytes(build(&kv, &t).0),
        Err(GgufError::DuplicateTensor { .. })
    ));
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
    assert_eq!(
        e.to_string(),
        "unsupported tensor type Q6_K for tensor blk.0.ffn_up.weight"
    );

    let (mut kv, t) = tiny_llama();
    kv[0].1 = V::Str("gpt2".into());
    let g = GgufFile::from_bytes(build(&kv, &t).0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        convert_file(&g, dir.path(), &ConvertOptions::default()),
        Err(GgufError::UnsupportedModel(_))
    ));

    let (kv, mut t) = tiny_llama();
    t.retain(|t| t.name != "blk.0.ffn_norm.weight");
    let g = GgufFile::from_bytes(build(&kv, &t).0).unwrap();
    assert!(matches!(
        convert_file(&g, dir.path(), &ConvertOptions::default()),
        Err(GgufError::TensorNotFound(_))
    ));
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing written on a failed conversion"
    );
}
