//! Next-token sampling: greedy, or temperature with top-k and top-p (nucleus) filtering, from a
//! seeded ChaCha generator so a seed reproduces a run.

use farsight_kernels::sample::{sample_row, SampleSpec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Index of the largest value (the first of equal maxima, as `torch.argmax`).
pub use farsight_kernels::sample::argmax;

use crate::error::{EngineError, Result};

/// How to pick the next token.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1: all).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Rejects values with no meaning (negative temperature, top-p outside (0, 1]).
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0) || !self.temperature.is_finite() {
            return Err(EngineError::Invalid(format!(
                "temperature {} (must be >= 0)",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(EngineError::Invalid(format!(
                "top-p {} (must be in (0, 1])",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// A sampler with its own random state.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Scratch: (logit, id) candidates.
    cand: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Sampler {
            params,
            rng,
            cand: Vec::new(),
        }
    }

    /// The next pick's spec: the parameters and a fresh uniform draw from the generator (drawn
    /// only when sampling, so greedy consumes nothing and a seed reproduces a run whether the
    /// pick is made here ([`Sampler::sample`]) or by a backend ([`Backend::sample_rows`])).
    ///
    /// [`Backend::sample_rows`]: farsight_kernels::Backend::sample_rows
    pub fn next_spec(&mut self) -> SampleSpec {
        let p = &self.params;
        let u = if p.temperature > 0.0 {
            self.rng.random::<f64>()
        } else {
            0.0
        };
        SampleSpec {
            temperature: p.temperature,
            top_k: u32::try_from(p.top_k).unwrap_or(u32::MAX),
            top_p: p.top_p,
            u,
        }
    }

    /// Picks a token from one row of logits on the host.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let spec = self.next_spec();
        sample_row(logits, &spec, &mut self.cand)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_first_of_ties() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_reproduces() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 1,
            top_p: 1.0,
            seed: 3,
        });
        assert_eq!(s.sample(&logits), argmax(&logits));
        let p = SamplingParams {
            temperature: 0.8,
            top_k: 0,
            top_p: 0.9,
            seed: 42,
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(p.clone());
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(p);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        assert!(
            a.iter().any(|&t| t != a[0]),
            "sampling at T=0.8 should vary"
        );
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // probabilities ~ 0.6, 0.3, 0.1: top_p 0.5 keeps the first only.
        let logits = [0.6f32.ln(), 0.3f32.ln(), 0.1f32.ln()];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            seed: 1,
        });
        for _ in 0..100 {
            assert_eq!(s.sample(&logits), 0);
        }
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.85,
            seed: 1,
        });
        let draws: Vec<u32> = (0..300).map(|_| s.sample(&logits)).collect();
        assert!(draws.contains(&1) && !draws.contains(&2));
    }

    /// `Sampler::sample` as it was before the algorithm moved to `farsight_kernels::sample`.
    fn old_sample(p: &SamplingParams, rng: &mut ChaCha8Rng, logits: &[f32]) -> u32 {
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        let mut cand: Vec<(f32, u32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &v)| (v / p.temperature, i as u32))
            .collect();
        let by_desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, by_desc);
            cand.truncate(p.top_k);
        }
        cand.sort_unstable_by(by_desc);
        let max = cand[0].0;
        let mut total = 0.0f64;
        for c in cand.iter_mut() {
            c.0 = (c.0 - max).exp();
            total += c.0 as f64;
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0f64;
            let mut keep = cand.len();
            for (i, c) in cand.iter().enumerate() {
                acc += c.0 as f64 / total;
                if acc >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep);
            total = cand.iter().map(|c| c.0 as f64).sum();
        }
        let mut r = rng.random::<f64>() * total;
        for c in &cand {
            r -= c.0 as f64;
            if r <= 0.0 {
                return c.1;
            }
        }
        cand.last().map_or(0, |c| c.1)
    }

    #[test]
    fn same_tokens_as_the_old_sampler() {
        // Logits on a coarse grid (many ties), several temperatures and filters, one sampler per
        // setting drawing 40 tokens from rows that change every step.
        let mut diffs = 0;
        let mut varied = 0;
        for seed in 0..6u64 {
            for (t, k, p) in [
                (0.0, 0, 1.0),
                (0.7, 0, 1.0),
                (1.0, 40, 1.0),
                (1.5, 0, 0.9),
                (1.0, 40, 0.9),
                (0.8, 1, 0.5),
                (1.2, 1000, 0.99),
                (1.0, 0, 0.5),
            ] {
                let params = SamplingParams {
                    temperature: t,
                    top_k: k,
                    top_p: p,
                    seed,
                };
                let mut new = Sampler::new(params.clone());
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let mut picks = Vec::new();
                for step in 0..40u64 {
                    let logits: Vec<f32> = (0..3000u64)
                        .map(|i| ((i * 7919 + step * 104_729 + seed) % 61) as f32 * 0.25 - 7.0)
                        .collect();
                    let a = new.sample(&logits);
                    let b = old_sample(&params, &mut rng, &logits);
                    diffs += usize::from(a != b);
                    picks.push(a);
                }
                varied += usize::from(picks.iter().any(|&x| x != picks[0]));
            }
        }
        assert_eq!(diffs, 0);
        assert!(varied > 30, "{varied} settings varied");
    }

    #[test]
    fn next_spec_draws_only_when_sampling() {
        let mut g = Sampler::new(SamplingParams::default());
        assert_eq!(g.next_spec(), SampleSpec::GREEDY);
        let p = SamplingParams {
            temperature: 0.9,
            top_k: 5,
            top_p: 0.8,
            seed: 11,
        };
        let mut s = Sampler::new(p);
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for _ in 0..5 {
            let spec = s.next_spec();
            assert_eq!((spec.temperature, spec.top_k, spec.top_p), (0.9, 5, 0.8));
            assert_eq!(spec.u, rng.random::<f64>());
        }
        let huge = SamplingParams {
            top_k: usize::MAX,
            temperature: 1.0,
            ..Default::default()
        };
        assert_eq!(Sampler::new(huge).next_spec().top_k, u32::MAX);
    }

    #[test]
    fn invalid_params_are_rejected() {
        assert!(SamplingParams {
            temperature: -1.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            top_p: 1.5,
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
