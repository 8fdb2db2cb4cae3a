//! `sample_row` against hand-computed picks: greedy ties, the walk order (value, then id), top-k,
//! top-p, both, temperature, draws at the ends of [0, 1), and draw frequencies.

use super::*;

fn spec(temperature: f32, top_k: u32, top_p: f32, u: f64) -> SampleSpec {
    SampleSpec {
        temperature,
        top_k,
        top_p,
        u,
    }
}

fn pick(logits: &[f32], s: SampleSpec) -> u32 {
    s.validate().unwrap();
    sample_row(logits, &s, &mut Vec::new())
}

#[test]
fn greedy_is_argmax_first_of_ties() {
    assert_eq!(pick(&[0.1, 3.0, 3.0, -1.0], SampleSpec::GREEDY), 1);
    // -0 and +0 are equal maxima: the first wins.
    assert_eq!(pick(&[-1.0, -0.0, 0.0], SampleSpec::GREEDY), 1);
    assert_eq!(pick(&[-1.0, 0.0, -0.0], SampleSpec::GREEDY), 1);
    // A NaN is never larger; at index 0 nothing is larger than it.
    assert_eq!(pick(&[1.0, f32::NAN, 2.0], SampleSpec::GREEDY), 2);
    assert_eq!(pick(&[f32::NAN, 1.0, 2.0], SampleSpec::GREEDY), 0);
    assert_eq!(pick(&[], SampleSpec::GREEDY), 0);
    assert_eq!(pick(&[], spec(1.0, 0, 1.0, 0.5)), 0);
}

#[test]
fn equal_logits_walk_in_id_order() {
    // Ten equal masses: the draw u picks id floor(10 u).
    let logits = [0.25f32; 10];
    for (u, want) in [(0.0, 0), (0.05, 0), (0.35, 3), (0.71, 7), (0.999, 9)] {
        assert_eq!(pick(&logits, spec(1.0, 0, 1.0, u)), want, "u={u}");
    }
    // Top-5 of equal values = the five lowest ids.
    assert_eq!(pick(&logits, spec(0.7, 5, 1.0, 0.999)), 4);
    assert_eq!(pick(&logits, spec(0.7, 5, 1.0, 0.5)), 2);
}

#[test]
fn order_is_value_then_id() {
    // Values 2 (ids 3, 5), 1 (ids 0, 4), 0 (ids 1, 2): masses e^0, e^0, e^-1, e^-1, e^-2, e^-2.
    let logits = [1.0f32, 0.0, 0.0, 2.0, 1.0, 2.0];
    let e: Vec<f64> = [0.0f32, 0.0, -1.0, -1.0, -2.0, -2.0]
        .iter()
        .map(|&d| d.exp() as f64)
        .collect();
    let total: f64 = e.iter().sum();
    let order = [3u32, 5, 0, 4, 1, 2];
    let mut cum = 0.0;
    for (j, &id) in order.iter().enumerate() {
        let mid = (cum + e[j] / 2.0) / total;
        assert_eq!(pick(&logits, spec(1.0, 0, 1.0, mid)), id, "j={j}");
        cum += e[j];
    }
}

#[test]
fn top_k_keeps_the_k_largest() {
    let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
    assert_eq!(pick(&logits, spec(1.0, 1, 1.0, 0.9)), argmax(&logits));
    // Value 3.0 (i*37 % 11 == 10) is held by ids 8, 19, 30, 41, ...: top-3 are 8, 19, 30.
    for u in [0.0, 0.4, 0.7, 0.99] {
        let t = pick(&logits, spec(1.0, 3, 1.0, u));
        assert!([8, 19, 30].contains(&t), "u={u}: {t}");
    }
    assert_eq!(pick(&logits, spec(1.0, 3, 1.0, 0.99)), 30);
    // top_k at or past the vocabulary keeps everything.
    let all = pick(&logits, spec(1.0, 0, 1.0, 0.99999));
    assert_eq!(pick(&logits, spec(1.0, 100, 1.0, 0.99999)), all);
    assert_eq!(pick(&logits, spec(1.0, 1000, 1.0, 0.99999)), all);
}

#[test]
fn top_p_within_top_k() {
    // Probabilities 0.4, 0.3, 0.2, 0.1.
    let logits: Vec<f32> = [0.4f32, 0.3, 0.2, 0.1].iter().map(|p| p.ln()).collect();
    let last = |k: u32, p: f32| pick(&logits, spec(1.0, k, p, 0.999));
    // No top-k: 0.4, 0.7 -> top-p 0.5 keeps two.
    assert_eq!(last(0, 0.5), 1);
    // Top-2 renormalised: 4/7 >= 0.5 keeps one.
    assert_eq!(last(2, 0.5), 0);
    // Top-3: 4/9, 7/9 keeps two.
    assert_eq!(last(3, 0.5), 1);
    assert_eq!(last(0, 0.95), 3);
    assert_eq!(last(0, 1.0), 3);
    // A draw at 0 is the largest whatever the filters.
    assert_eq!(pick(&logits, spec(1.0, 2, 0.3, 0.0)), 0);
}

#[test]
fn top_p_keeps_only_the_nucleus() {
    let logits = [0.6f32.ln(), 0.3f32.ln(), 0.1f32.ln()];
    for j in 0..100 {
        let u = (j as f64 + 0.5) / 100.0;
        assert_eq!(pick(&logits, spec(1.0, 0, 0.5, u)), 0);
        assert_ne!(pick(&logits, spec(1.0, 0, 0.85, u)), 2);
    }
}

#[test]
fn draw_frequencies_follow_the_tempered_softmax() {
    // Logits 0, ln 4 at T = 2: probabilities 1/3, 2/3. Draws on a regular grid.
    let logits = [0.0f32, 4.0f32.ln()];
    let n = 3000;
    let ones = (0..n)
        .filter(|&j| pick(&logits, spec(2.0, 0, 1.0, (j as f64 + 0.5) / n as f64)) == 1)
        .count();
    assert!((ones as f64 / n as f64 - 2.0 / 3.0).abs() < 1e-3, "{ones}");
    // T = 0.5 sharpens: 1/17, 16/17.
    let ones = (0..n)
        .filter(|&j| pick(&logits, spec(0.5, 0, 1.0, (j as f64 + 0.5) / n as f64)) == 1)
        .count();
    assert!(
        (ones as f64 / n as f64 - 16.0 / 17.0).abs() < 1e-3,
        "{ones}"
    );
}

#[test]
fn odd_values_do_not_panic() {
    let rows: [&[f32]; 4] = [
        &[f32::NAN, 1.0, 2.0],
        &[f32::INFINITY, 1.0, f32::NEG_INFINITY],
        &[f32::NEG_INFINITY; 3],
        &[1e30, -1e30, 0.0],
    ];
    for row in rows {
        for s in [spec(1.0, 0, 0.9, 0.5), spec(1e-30, 2, 1.0, 0.99)] {
            assert!((pick(row, s) as usize) < row.len());
        }
    }
}

#[test]
fn invalid_specs_are_rejected() {
    for s in [
        spec(-1.0, 0, 1.0, 0.5),
        spec(f32::NAN, 0, 1.0, 0.5),
        spec(f32::INFINITY, 0, 1.0, 0.5),
        spec(1.0, 0, 0.0, 0.5),
        spec(1.0, 0, 1.5, 0.5),
        spec(1.0, 0, f32::NAN, 0.5),
        spec(1.0, 0, 1.0, 1.0),
        spec(1.0, 0, 1.0, -0.1),
        spec(1.0, 0, 1.0, f64::NAN),
    ] {
        let e = s.validate().unwrap_err();
        assert!(matches!(e, KernelError::Invalid(_)), "{e}");
    }
    assert!(SampleSpec::GREEDY.validate().is_ok());
}

#[test]
fn default_sample_rows_pairs_rows_with_specs() {
    use crate::cpu::CpuBackend;
    use crate::Backend;
    let be = CpuBackend::new(1).unwrap();
    let (rows, vocab) = (5usize, 300usize);
    let data: Vec<f32> = (0..rows * vocab)
        .map(|i| ((i * 7919) % 257) as f32 * 0.05)
        .collect();
    let mut t = be.tensor(rows, vocab).unwrap();
    be.write_tensor(&mut t, 0, &data).unwrap();
    let specs: Vec<SampleSpec> = (0..4)
        .map(|r| spec(0.5 * r as f32, 10 * r, 0.9, 0.2 * r as f64 + 0.1))
        .collect();
    let got = be.sample_rows(&t, &specs).unwrap();
    let want: Vec<u32> = specs
        .iter()
        .enumerate()
        .map(|(r, s)| pick(&data[r * vocab..(r + 1) * vocab], *s))
        .collect();
    assert_eq!(got, want);
    assert!(be.sample_rows(&t, &[]).unwrap().is_empty());
    // More specs than rows, a bad spec (named by row), an empty vocabulary: errors.
    let six = vec![SampleSpec::GREEDY; 6];
    assert!(matches!(
        be.sample_rows(&t, &six),
        Err(KernelError::Shape(_))
    ));
    let bad = [SampleSpec::GREEDY, spec(1.0, 0, 1.0, 1.5)];
    match be.sample_rows(&t, &bad) {
        Err(KernelError::Invalid(m)) => assert!(m.starts_with("row 1: "), "{m}"),
        other => panic!("{other:?}"),
    }
    let empty = be.tensor(2, 0).unwrap();
    assert!(matches!(
        be.sample_rows(&empty, &[SampleSpec::GREEDY]),
        Err(KernelError::Shape(_))
    ));
}
