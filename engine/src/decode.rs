//! The per-sequence side of decoding, shared by [`crate::generate`] (one sequence) and
//! [`crate::batch`] (many): sampling the next token, turning ids into text deltas, holding back
//! text that may start a stop string, and deciding when the sequence ends (EOS, stop string,
//! token limit, full context).

use farsight_kernels::SampleSpec;

use crate::error::Result;
use crate::sampler::{Sampler, SamplingParams};
use crate::tokenizer::{StreamDecoder, TextTokenizer};

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token.
    Eos,
    /// A stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
    /// The model's context is full.
    Context,
    /// The caller went away (a closed stream); only the batch scheduler reports it.
    Cancelled,
}

impl FinishReason {
    /// The OpenAI name: `stop` (EOS or a stop string) or `length` (token limit or context).
    pub fn openai(self) -> &'static str {
        match self {
            FinishReason::Eos | FinishReason::Stop | FinishReason::Cancelled => "stop",
            FinishReason::Length | FinishReason::Context => "length",
        }
    }
}

/// Releases text to the caller while holding back any tail that may start a stop string.
pub(crate) struct StopFilter {
    stops: Vec<String>,
    /// Everything received so far (cut before a stop string once one is found).
    pub(crate) text: String,
    /// Bytes of `text` already released.
    emitted: usize,
}

impl StopFilter {
    pub(crate) fn new(stops: Vec<String>) -> StopFilter {
        StopFilter {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            text: String::new(),
            emitted: 0,
        }
    }

    /// Adds a delta; returns true when a stop string was found (the text is then cut before it).
    pub(crate) fn push(&mut self, delta: &str, out: &mut dyn FnMut(&str)) -> bool {
        let longest = self.stops.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut from = self.text.len().saturating_sub(longest);
        self.text.push_str(delta);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min();
        if let Some(at) = hit {
            self.text.truncate(at);
            self.release(at, out);
            return true;
        }
        // Hold back the longest tail that is a proper prefix of a stop string.
        let mut safe = self.text.len();
        for (i, _) in self.text.char_indices().rev().take(64) {
            let tail = &self.text[i..];
            if self
                .stops
                .iter()
                .any(|s| s.len() > tail.len() && s.starts_with(tail))
            {
                safe = i;
            }
        }
        self.release(safe.max(self.emitted), out);
        false
    }

    /// Releases everything up to byte `upto`.
    pub(crate) fn release(&mut self, upto: usize, out: &mut dyn FnMut(&str)) {
        if upto > self.emitted {
            out(&self.text[self.emitted..upto]);
            self.emitted = upto;
        }
    }
}

/// One sequence's decoding state: sampler, incremental detokenizer, stop filter, the ids so far.
pub struct Continuation {
    sampler: Sampler,
    stream: StreamDecoder,
    filter: StopFilter,
    ids: Vec<u32>,
    max_new_tokens: usize,
    context: usize,
}

/// A finished continuation.
#[derive(Clone, Debug)]
pub struct Finished {
    /// Every sampled id (an EOS that ended generation included).
    pub ids: Vec<u32>,
    /// The text, cut before a stop string, without special tokens.
    pub text: String,
    pub finish: FinishReason,
}

impl Continuation {
    /// A fresh state; `context` is the model's context length.
    pub fn new(
        sampling: SamplingParams,
        stop: Vec<String>,
        max_new_tokens: usize,
        context: usize,
    ) -> Continuation {
        Continuation {
            sampler: Sampler::new(sampling),
            stream: StreamDecoder::default(),
            filter: StopFilter::new(stop),
            ids: Vec::new(),
            max_new_tokens,
            context,
        }
    }

    /// The spec of the next token's pick (with its draw from this sequence's generator), for
    /// [`crate::model::Logits::Sample`]: the backend picks where the logits are.
    pub fn next_spec(&mut self) -> SampleSpec {
        self.sampler.next_spec()
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.ids.len()
    }

    /// Takes the sampled token `id` (the cache holds `kv_len` tokens, `id` not yet among them),
    /// streams the text it completes, and returns why generation ends with it, or `None` when
    /// `id` is to be fed to the model for the next token.
    pub fn accept(
        &mut self,
        tok: &TextTokenizer,
        id: u32,
        kv_len: usize,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Option<FinishReason>> {
        if self.max_new_tokens == 0 {
            return Ok(Some(FinishReason::Length));
        }
        self.ids.push(id);
        if tok.eos_ids.contains(&id) {
            return Ok(Some(FinishReason::Eos));
        }
        if let Some(delta) = self.stream.push(tok, id)? {
            if self.filter.push(&delta, on_text) {
                return Ok(Some(FinishReason::Stop));
            }
        }
        if self.ids.len() >= self.max_new_tokens {
            return Ok(Some(FinishReason::Length));
        }
        if kv_len >= self.context {
            return Ok(Some(FinishReason::Context));
        }
        Ok(None)
    }

    /// Ends the sequence for `reason`: flushes held-back bytes and text (unless a stop string
    /// ended it, or the caller cancelled it) and returns the result.
    pub fn finish(
        mut self,
        tok: &TextTokenizer,
        reason: FinishReason,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Finished> {
        let mut finish = reason;
        if !matches!(reason, FinishReason::Stop | FinishReason::Cancelled) {
            let hit = match self.stream.flush(tok)? {
                Some(delta) => self.filter.push(&delta, on_text),
                None => false,
            };
            if hit {
                finish = FinishReason::Stop;
            } else {
                let end = self.filter.text.len();
                self.filter.release(end, on_text);
            }
        }
        Ok(Finished {
            ids: self.ids,
            text: self.filter.text,
            finish,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool, String) {
        let mut f = StopFilter::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        let mut hit = false;
        for d in deltas {
            if f.push(d, &mut |s| out.push_str(s)) {
                hit = true;
                break;
            }
        }
        if !hit {
            let end = f.text.len();
            f.release(end, &mut |s| out.push_str(s));
        }
        (out, hit, f.text)
    }

    #[test]
    fn stop_strings_cut_and_never_leak_a_partial_match() {
        let (out, hit, text) = run(&["\nUser:"], &["Hello", " there\nU", "ser: more"]);
        assert!(hit);
        assert_eq!(out, "Hello there");
        assert_eq!(text, "Hello there");
        // a partial match that does not complete is released at the end
        let (out, hit, _) = run(&["STOP"], &["ab", "ST", "OX"]);
        assert!(!hit);
        assert_eq!(out, "abSTOX");
        let (out, _, _) = run(&[], &["é", "ü"]);
        assert_eq!(out, "éü");
        // an empty stop string matches nothing
        let (out, hit, _) = run(&[""], &["abc"]);
        assert!(!hit);
        assert_eq!(out, "abc");
    }

    #[test]
    fn openai_finish_reasons() {
        assert_eq!(FinishReason::Eos.openai(), "stop");
        assert_eq!(FinishReason::Stop.openai(), "stop");
        assert_eq!(FinishReason::Length.openai(), "length");
        assert_eq!(FinishReason::Context.openai(), "length");
    }
}
