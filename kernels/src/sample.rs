//! Token sampling from one row of logits, the random draw made by the caller: greedy (argmax), or
//! temperature with top-k and top-p (nucleus) filtering. [`sample_row`] is the reference every
//! backend's [`crate::Backend::sample_rows`] reproduces (the CPU backend calls it; the CUDA
//! backend runs the same selection on the device, `cuda/kernels/sample.cu`).
//!
//! The candidates are ordered by value (descending, IEEE total order) and then by id
//! (ascending); top-k keeps the first `top_k`, softmax runs over those, top-p keeps the shortest
//! prefix whose probability reaches `top_p`, and the draw `u` walks that prefix: the token is the
//! first whose cumulative mass reaches `u * total` (the last kept one if rounding leaves none).

use crate::backend::Result;
use crate::error::KernelError;

/// How to pick one token from a row of logits, with the uniform draw already made.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleSpec {
    /// 0: greedy (the first of equal maxima, as `torch.argmax`); else logits are divided by it.
    pub temperature: f32,
    /// Keep the `top_k` largest (0: all).
    pub top_k: u32,
    /// Keep the shortest prefix whose probability reaches `top_p`, in (0, 1] (1: all).
    pub top_p: f32,
    /// The uniform draw in [0, 1) (not used when greedy).
    pub u: f64,
}

impl SampleSpec {
    /// Greedy decoding (argmax).
    pub const GREEDY: SampleSpec = SampleSpec {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        u: 0.0,
    };

    /// True when the spec picks the argmax without a draw.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Rejects values with no meaning: a negative or non-finite temperature, top-p outside
    /// (0, 1], a draw outside [0, 1).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(KernelError::Invalid(m));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!(
                "sampling temperature {} (must be finite and >= 0)",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top-p {} (must be in (0, 1])", self.top_p));
        }
        if !(self.u >= 0.0 && self.u < 1.0) {
            return bad(format!("sampling draw {} (must be in [0, 1))", self.u));
        }
        Ok(())
    }
}

/// Index of the largest value, the first of equal maxima (as `torch.argmax`); 0 for an empty row.
/// A NaN never compares larger, so it is picked only at index 0.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Descending value (IEEE total order), then ascending id.
fn by_desc(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Picks a token from one row of logits (see the module docs); `scratch` holds the candidates
/// between calls. The spec is assumed valid ([`SampleSpec::validate`]); an empty row gives 0.
pub fn sample_row(logits: &[f32], spec: &SampleSpec, scratch: &mut Vec<(f32, u32)>) -> u32 {
    if spec.is_greedy() || logits.is_empty() {
        return argmax(logits);
    }
    let t = spec.temperature;
    let cand = scratch;
    cand.clear();
    cand.extend(logits.iter().enumerate().map(|(i, &v)| (v / t, i as u32)));
    let k = spec.top_k as usize;
    if k > 0 && k < cand.len() {
        cand.select_nth_unstable_by(k - 1, by_desc);
        cand.truncate(k);
    }
    cand.sort_unstable_by(by_desc);
    let max = cand[0].0;
    let mut total = 0.0f64;
    for c in cand.iter_mut() {
        c.0 = (c.0 - max).exp();
        total += c.0 as f64;
    }
    if spec.top_p < 1.0 {
        let mut acc = 0.0f64;
        let mut keep = cand.len();
        for (i, c) in cand.iter().enumerate() {
            acc += c.0 as f64 / total;
            if acc >= spec.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        cand.truncate(keep);
        total = cand.iter().map(|c| c.0 as f64).sum();
    }
    let mut r = spec.u * total;
    for c in cand.iter() {
        r -= c.0 as f64;
        if r <= 0.0 {
            return c.1;
        }
    }
    cand.last().map_or(0, |c| c.1)
}

#[cfg(test)]
mod tests;
