//! Settings of Double Sparsity decode, parsed from the command line.

use std::fmt;
use std::str::FromStr;

use super::evict::EvictConfig;

/// How many tokens attention reads per KV head (sinks and the recent window included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenBudget {
    /// A fixed number of tokens.
    Tokens(usize),
    /// `1/N` of the tokens visible to the query (rounded up).
    Fraction(usize),
}

impl TokenBudget {
    /// The budget for a query that sees `context` tokens.
    pub fn tokens(self, context: usize) -> usize {
        match self {
            TokenBudget::Tokens(k) => k,
            TokenBudget::Fraction(n) => context.div_ceil(n),
        }
    }
}

impl FromStr for TokenBudget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(den) = s.strip_prefix("1/") {
            let n: usize = den
                .parse()
                .map_err(|_| format!("token budget {s:?}: expected K or 1/N"))?;
            if n == 0 {
                return Err(format!("token budget {s:?}: N must be at least 1"));
            }
            return Ok(TokenBudget::Fraction(n));
        }
        let k: usize = s
            .parse()
            .map_err(|_| format!("token budget {s:?}: expected K or 1/N"))?;
        if k == 0 {
            return Err("token budget must be at least 1 token".into());
        }
        Ok(TokenBudget::Tokens(k))
    }
}

impl fmt::Display for TokenBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenBudget::Tokens(k) => write!(f, "{k}"),
            TokenBudget::Fraction(n) => write!(f, "1/{n}"),
        }
    }
}

/// Precision of the label cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabelBits {
    /// f16 values.
    B16,
    /// 4-bit codes with a per-row f16 minimum and scale (asymmetric min-max).
    B4,
}

impl FromStr for LabelBits {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "16" => Ok(LabelBits::B16),
            "4" => Ok(LabelBits::B4),
            o => Err(format!("label bits {o:?}: expected 16 or 4")),
        }
    }
}

impl fmt::Display for LabelBits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LabelBits::B16 => "16",
            LabelBits::B4 => "4",
        })
    }
}

/// Which query chooses a layer's rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Predict {
    /// The layer's own query (exact; what on-device sparse decode does).
    SameLayer,
    /// A prediction made one layer earlier from the previous layer's normed input and this
    /// layer's `W_q` label rows (what offloading needs, to fetch rows in the background).
    LayerAhead,
}

impl FromStr for Predict {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "same-layer" => Ok(Predict::SameLayer),
            "layer-ahead" => Ok(Predict::LayerAhead),
            o => Err(format!(
                "--predict {o:?}: expected same-layer or layer-ahead"
            )),
        }
    }
}

impl fmt::Display for Predict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Predict::SameLayer => "same-layer",
            Predict::LayerAhead => "layer-ahead",
        })
    }
}

/// Everything Double Sparsity decode needs besides the channels.
#[derive(Clone, Debug, PartialEq)]
pub struct SparseConfig {
    pub budget: TokenBudget,
    /// Label channels per KV head (`r`).
    pub label_channels: usize,
    pub label_bits: LabelBits,
    /// First tokens always attended.
    pub sink: usize,
    /// Last tokens always attended (the query's own token included).
    pub recent: usize,
    /// Layers that always attend densely.
    pub dense_layers: Vec<usize>,
    pub predict: Predict,
    /// Select rows for every query of a multi-token call too, each position attending as decode
    /// would (teacher-forced evaluation). Off: multi-token calls (prefill chunks) attend densely.
    pub sparse_prefill: bool,
    /// A byte budget on rows and labels, enforced by eviction (none: the store only grows).
    pub evict: Option<EvictConfig>,
    /// Tokens per selection unit (`--page-tokens`): 1 selects tokens; P > 1 selects aligned
    /// pages of P positions by their best label score (the same number of rows), so that the
    /// rows to fetch come in runs of P (units of P x 512 bytes per KV head for Llama-3.1-8B).
    pub page_tokens: usize,
    /// Row cache per (layer, KV head) in front of a tier that is not in memory (the disk), in
    /// multiples of the rows a sparse query reads (`--row-cache`; 1: none). The offloaded GPU
    /// store takes the same setting for its GPU row cache.
    pub row_cache: usize,
}

impl Default for SparseConfig {
    fn default() -> Self {
        SparseConfig {
            budget: TokenBudget::Fraction(16),
            label_channels: 8,
            label_bits: LabelBits::B16,
            sink: 4,
            recent: 32,
            dense_layers: Vec::new(),
            predict: Predict::SameLayer,
            sparse_prefill: false,
            evict: None,
            page_tokens: 1,
            row_cache: 1,
        }
    }
}

impl fmt::Display for SparseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "double-sparse budget {} channels {} bits {} sink {} recent {} predict {}",
            self.budget, self.label_channels, self.label_bits, self.sink, self.recent, self.predict
        )?;
        if !self.dense_layers.is_empty() {
            write!(f, " dense-layers {:?}", self.dense_layers)?;
        }
        if self.page_tokens > 1 {
            write!(f, " page-tokens {}", self.page_tokens)?;
        }
        if self.row_cache > 1 {
            write!(f, " row-cache {}", self.row_cache)?;
        }
        if let Some(e) = &self.evict {
            write!(f, " {e}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse_and_scale() {
        assert_eq!(
            "128".parse::<TokenBudget>().unwrap(),
            TokenBudget::Tokens(128)
        );
        assert_eq!(
            "1/16".parse::<TokenBudget>().unwrap(),
            TokenBudget::Fraction(16)
        );
        assert_eq!(TokenBudget::Fraction(16).tokens(6000), 375);
        assert_eq!(TokenBudget::Fraction(16).tokens(1), 1);
        for bad in ["0", "1/0", "x", "1/", "-3", "2/8"] {
            assert!(bad.parse::<TokenBudget>().is_err(), "{bad}");
        }
    }

    #[test]
    fn bits_and_predict_parse() {
        assert_eq!("4".parse::<LabelBits>().unwrap(), LabelBits::B4);
        assert!("8".parse::<LabelBits>().is_err());
        assert_eq!(
            "layer-ahead".parse::<Predict>().unwrap(),
            Predict::LayerAhead
        );
        assert!("ahead".parse::<Predict>().is_err());
    }
}
