//! Rotary position embedding frequencies, with the scaling types of Hugging Face configs:
//! `default`, `linear`, `dynamic` (NTK), `yarn` and `llama3`. Each computes what transformers'
//! `ROPE_INIT_FUNCTIONS` computes for the same config.

use std::f64::consts::PI;

use farsight_kernels::Rope;
use serde_json::{Map, Value};

/// How the base frequencies are scaled.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    Linear {
        factor: f64,
    },
    /// Dynamic NTK: the base grows once the sequence passes `original_max` (the config's
    /// `max_position_embeddings`); the frequencies of a forward call follow its longest position,
    /// and cached keys keep the rotation they were written with, as in transformers.
    Dynamic {
        factor: f64,
        original_max: usize,
    },
    Yarn {
        factor: f64,
        original_max: usize,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: f64,
        truncate: bool,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max: usize,
    },
}

fn num(o: &Map<String, Value>, key: &str) -> Option<f64> {
    o.get(key).and_then(Value::as_f64)
}

fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl RopeScaling {
    /// Parses `rope_scaling` (or transformers 5's `rope_parameters`); `None` or type `default`
    /// means no scaling. Errors name the unsupported type or missing field.
    pub fn from_json(
        o: Option<&Map<String, Value>>,
        max_position_embeddings: usize,
    ) -> Result<RopeScaling, String> {
        let Some(o) = o else {
            return Ok(RopeScaling::None);
        };
        let ty = o
            .get("rope_type")
            .or_else(|| o.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let factor =
            || num(o, "factor").ok_or_else(|| format!("rope_scaling `{ty}` needs `factor`"));
        let original_max = o
            .get("original_max_position_embeddings")
            .and_then(Value::as_u64)
            .map(|v| v as usize);
        Ok(match ty {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: factor()? },
            // transformers 5 starts scaling past `max_position_embeddings` (an
            // `original_max_position_embeddings` key is ignored for this type).
            "dynamic" => RopeScaling::Dynamic { factor: factor()?, original_max: max_position_embeddings },
            "yarn" => {
                let orig = original_max.unwrap_or(max_position_embeddings);
                // transformers 5: `factor` as given; derived from the lengths only when absent.
                let factor = match num(o, "factor") {
                    Some(f) => f,
                    None if orig > 0 => max_position_embeddings as f64 / orig as f64,
                    None => return Err("rope_scaling `yarn` needs `factor`".into()),
                };
                let attention_factor = match num(o, "attention_factor") {
                    Some(a) => a,
                    None => match (num(o, "mscale"), num(o, "mscale_all_dim")) {
                        (Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => {
                            yarn_mscale(factor, m) / yarn_mscale(factor, ma)
                        }
                        _ => yarn_mscale(factor, 1.0),
                    },
                };
                RopeScaling::Yarn {
                    factor,
                    original_max: orig,
                    beta_fast: num(o, "beta_fast").unwrap_or(32.0),
                    beta_slow: num(o, "beta_slow").unwrap_or(1.0),
                    attention_factor,
                    truncate: o.get("truncate").and_then(Value::as_bool).unwrap_or(true),
                }
            }
            "llama3" => RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: num(o, "low_freq_factor")
                    .ok_or("rope_scaling `llama3` needs `low_freq_factor`")?,
                high_freq_factor: num(o, "high_freq_factor")
                    .ok_or("rope_scaling `llama3` needs `high_freq_factor`")?,
                original_max: original_max
                    .ok_or("rope_scaling `llama3` needs `original_max_position_embeddings`")?,
            },
            other => {
                return Err(format!(
                    "unsupported rope_scaling type `{other}` (supported: default, linear, dynamic, yarn, llama3)"
                ))
            }
        })
    }
}

/// Frequencies for `head_dim`, base `theta`; `seq_len` (the longest position + 1 of the
/// current call) matters only for dynamic scaling.
pub fn rope_for(theta: f64, head_dim: usize, scaling: &RopeScaling, seq_len: usize) -> Rope {
    let dim = head_dim as f64;
    let base_freqs = |base: f64| -> Vec<f64> {
        (0..head_dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f64 / dim))
            .collect()
    };
    let (inv, scale) = match *scaling {
        RopeScaling::None => (base_freqs(theta), 1.0),
        RopeScaling::Linear { factor } => (
            base_freqs(theta).into_iter().map(|f| f / factor).collect(),
            1.0,
        ),
        RopeScaling::Dynamic {
            factor,
            original_max,
        } => {
            let base = if seq_len > original_max {
                theta
                    * ((factor * seq_len as f64 / original_max as f64) - (factor - 1.0))
                        .powf(dim / (dim - 2.0))
            } else {
                theta
            };
            (base_freqs(base), 1.0)
        }
        RopeScaling::Yarn {
            factor,
            original_max,
            beta_fast,
            beta_slow,
            attention_factor,
            truncate,
        } => {
            let corr =
                |rot: f64| dim * (original_max as f64 / (rot * 2.0 * PI)).ln() / (2.0 * theta.ln());
            let (mut low, mut high) = (corr(beta_fast), corr(beta_slow));
            if truncate {
                low = low.floor();
                high = high.ceil();
            }
            let low = low.max(0.0);
            let high = high.min(dim - 1.0);
            let high = if low == high { high + 0.001 } else { high };
            let inv = (0..head_dim / 2)
                .map(|i| {
                    let pos = theta.powf((2 * i) as f64 / dim);
                    let extrap = 1.0 / pos;
                    let interp = 1.0 / (factor * pos);
                    let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    let extrap_factor = 1.0 - ramp;
                    interp * (1.0 - extrap_factor) + extrap * extrap_factor
                })
                .collect();
            (inv, attention_factor)
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max,
        } => {
            let old = original_max as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            let inv = base_freqs(theta)
                .into_iter()
                .map(|f| {
                    let wavelen = 2.0 * PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect();
            (inv, 1.0)
        }
    };
    Rope {
        inv_freq: inv.into_iter().map(|f: f64| f as f32).collect(),
        attention_scaling: scale as f32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(s: &str) -> Map<String, Value> {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn default_frequencies() {
        let r = rope_for(10000.0, 8, &RopeScaling::None, 1);
        assert_eq!(r.inv_freq.len(), 4);
        assert!((r.inv_freq[0] - 1.0).abs() < 1e-7);
        assert!((r.inv_freq[1] - 0.1).abs() < 1e-7);
        assert!((r.inv_freq[3] - 0.001).abs() < 1e-9);
        assert_eq!(r.attention_scaling, 1.0);
    }

    #[test]
    fn llama3_scaling_matches_hand_values() {
        // Llama 3.1: factor 8, low 1, high 4, original 8192, theta 500000, head_dim 128.
        let s = RopeScaling::from_json(
            Some(&obj(r#"{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}"#)),
            131072,
        )
        .unwrap();
        let r = rope_for(500000.0, 128, &s, 1);
        let base = rope_for(500000.0, 128, &RopeScaling::None, 1);
        // high frequencies (short wavelengths) unchanged, lowest ones divided by 8
        assert_eq!(r.inv_freq[0], base.inv_freq[0]);
        assert!((r.inv_freq[63] - base.inv_freq[63] / 8.0).abs() < 1e-12);
        // a medium frequency lies strictly between
        let i = (0..64)
            .find(|&i| {
                let w = 2.0 * PI / base.inv_freq[i] as f64;
                w > 8192.0 / 4.0 && w < 8192.0
            })
            .unwrap();
        assert!(r.inv_freq[i] < base.inv_freq[i] && r.inv_freq[i] > base.inv_freq[i] / 8.0);
    }

    #[test]
    fn linear_dynamic_and_yarn() {
        let lin =
            RopeScaling::from_json(Some(&obj(r#"{"type":"linear","factor":4.0}"#)), 4096).unwrap();
        assert!((rope_for(10000.0, 8, &lin, 1).inv_freq[1] - 0.025).abs() < 1e-8);
        let dynm =
            RopeScaling::from_json(Some(&obj(r#"{"type":"dynamic","factor":2.0}"#)), 100).unwrap();
        assert_eq!(
            rope_for(10000.0, 8, &dynm, 100),
            rope_for(10000.0, 8, &RopeScaling::None, 1)
        );
        // seq 200 with factor 2 over 100: base * (2*2 - 1)^(8/6)
        let b = 10000.0 * 3f64.powf(8.0 / 6.0);
        let got = rope_for(10000.0, 8, &dynm, 200).inv_freq[1];
        assert!((got as f64 - 1.0 / b.powf(0.25)).abs() < 1e-7);
        let yarn = RopeScaling::from_json(Some(&obj(r#"{"rope_type":"yarn","factor":4.0}"#)), 4096)
            .unwrap();
        let r = rope_for(10000.0, 64, &yarn, 1);
        let base = rope_for(10000.0, 64, &RopeScaling::None, 1);
        assert_eq!(r.inv_freq[0], base.inv_freq[0]); // extrapolated
        assert!((r.inv_freq[31] - base.inv_freq[31] / 4.0).abs() < 1e-12); // interpolated
        assert!((r.attention_scaling - (0.1 * 4f32.ln() + 1.0)).abs() < 1e-6);
        assert!(
            RopeScaling::from_json(Some(&obj(r#"{"type":"longrope","factor":4.0}"#)), 1)
                .unwrap_err()
                .contains("longrope")
        );
    }
}
