//! The continuous-batching scheduler on the default model: batched greedy outputs equal
//! single-sequence `generate`, admission and finish order, the per-step prompt budget,
//! streaming and cancellation.

mod common;

use std::cell::RefCell;
use std::rc::Rc;

use common::*;
use farsight_engine::batch::{BatchConfig, Scheduler, SeqOutput, SeqRequest};
use farsight_engine::generate::{generate, FinishReason, GenerateOptions};
use farsight_engine::sampler::SamplingParams;
use farsight_kernels::DType;

fn request(prompt: Vec<u32>, max_new_tokens: usize) -> SeqRequest {
    SeqRequest {
        prompt,
        max_new_tokens,
        sampling: SamplingParams::default(),
        stop: Vec::new(),
    }
}

/// Prompts of quite different lengths (5 to ~700 tokens).
fn prompts(tok: &farsight_engine::TextTokenizer) -> Vec<Vec<u32>> {
    let gpl = std::fs::read_to_string("/usr/share/common-licenses/GPL-3").unwrap();
    let texts = [
        "The capital of France is".to_string(),
        gpl[..3000].to_string(),
        "Once upon a time, in a small village by the sea,".to_string(),
        gpl[5000..5600].to_string(),
        "def fibonacci(n):".to_string(),
    ];
    texts.iter().map(|t| tok.encode(t).unwrap()).collect()
}

#[test]
fn batched_greedy_equals_single_sequence_generate() {
    let (model, tok) = load(&model_dir(), 0);
    let prompts = prompts(&tok);
    assert!(prompts[1].len() > 600, "{}", prompts[1].len());
    let opts = GenerateOptions {
        max_new_tokens: 20,
        kv_dtype: DType::F16,
        ..Default::default()
    };
    let single: Vec<_> = prompts
        .iter()
        .map(|p| generate(&model, &tok, p, &opts, &mut |_, _| {}, &mut |_| {}).unwrap())
        .collect();

    let cfg = BatchConfig {
        max_running: 3,
        prefill_tokens_per_step: 128,
        kv_dtype: DType::F16,
        kv_token_budget: 0,
    };
    let mut s = Scheduler::new(&model, &tok, cfg).unwrap();
    let streamed: Vec<Rc<RefCell<String>>> = prompts.iter().map(|_| Rc::default()).collect();
    for (p, buf) in prompts.iter().zip(&streamed) {
        let buf = buf.clone();
        s.submit(
            request(p.clone(), 20),
            Box::new(move |d| {
                buf.borrow_mut().push_str(d);
                true
            }),
        )
        .unwrap();
    }
    let mut out: Vec<SeqOutput> = Vec::new();
    while !s.is_idle() {
        out.extend(s.step().unwrap());
        assert!(s.running() <= 3);
    }
    out.sort_by_key(|o| o.id);
    for (i, (b, g)) in out.iter().zip(&single).enumerate() {
        assert_eq!(b.new_token_ids, g.new_token_ids, "prompt {i}");
        assert_eq!(b.text, g.text, "prompt {i}");
        assert_eq!(b.finish, g.finish, "prompt {i}");
        assert_eq!(*streamed[i].borrow(), b.text, "streamed text of prompt {i}");
        assert_eq!(b.prompt_tokens, prompts[i].len());
    }
    let st = s.stats();
    assert_eq!(st.max_batch, 3);
    assert!(st.batched_steps > 0);
    assert_eq!(st.finished, 5);
}

#[test]
fn a_finished_sequence_leaves_and_a_waiting_one_joins() {
    let (model, tok) = load(&model_dir(), 0);
    let p = tok
        .encode("Once upon a time, in a small village by the sea,")
        .unwrap();
    let cfg = BatchConfig {
        max_running: 2,
        prefill_tokens_per_step: 256,
        kv_dtype: DType::F16,
        kv_token_budget: 0,
    };
    let mut s = Scheduler::new(&model, &tok, cfg).unwrap();
    for n in [3, 10, 5, 5] {
        s.submit(request(p.clone(), n), Box::new(|_| true)).unwrap();
    }
    let mut finished_at = Vec::new();
    let mut step = 0;
    while !s.is_idle() {
        step += 1;
        for o in s.step().unwrap() {
            assert_eq!(o.finish, FinishReason::Length, "{o:?}");
            finished_at.push((o.id, step));
        }
        assert!(s.running() <= 2);
    }
    // 0 ends after 3 tokens (step 3), 2 joins at step 4 and ends at step 8, 3 joins at step 9
    // and ends at step 13; 1 ends after 10 tokens (step 10).
    assert_eq!(finished_at, vec![(0, 3), (2, 8), (1, 10), (3, 13)]);
}

#[test]
fn decode_goes_on_while_a_long_prompt_is_read_in_chunks() {
    let (model, tok) = load(&model_dir(), 0);
    let short = tok.encode("The capital of France is").unwrap();
    let long = prompts(&tok).swap_remove(1);
    let cfg = BatchConfig {
        max_running: 2,
        prefill_tokens_per_step: 100,
        kv_dtype: DType::F16,
        kv_token_budget: 0,
    };
    let mut s = Scheduler::new(&model, &tok, cfg).unwrap();
    let a = s.submit(request(short, 4), Box::new(|_| true)).unwrap();
    let b = s
        .submit(request(long.clone(), 1), Box::new(|_| true))
        .unwrap();
    let mut ends = Vec::new();
    for step in 1..=20 {
        for o in s.step().unwrap() {
            ends.push((o.id, step));
        }
        if s.is_idle() {
            break;
        }
    }
    // a: prompt (5 tokens) in step 1, then one token per step; b: 95 tokens in step 1, then
    // 100 per step.
    let b_steps = 1 + (long.len() - 95).div_ceil(100);
    assert_eq!(ends, vec![(a, 4), (b, b_steps)]);
}

#[test]
fn kv_budget_limits_admission_and_refuses_what_never_fits() {
    let (model, tok) = load(&model_dir(), 0);
    let p = tok.encode("Once upon a time").unwrap();
    let cfg = BatchConfig {
        max_running: 4,
        prefill_tokens_per_step: 64,
        kv_dtype: DType::F16,
        kv_token_budget: 2 * (p.len() + 4),
    };
    let mut s = Scheduler::new(&model, &tok, cfg).unwrap();
    for _ in 0..3 {
        s.submit(request(p.clone(), 4), Box::new(|_| true)).unwrap();
    }
    s.step().unwrap();
    assert_eq!((s.running(), s.waiting()), (2, 1));
    let too_long: Vec<u32> = std::iter::repeat_n(p[0], 3 * p.len() + 9).collect();
    let e = s
        .submit(request(too_long, 1), Box::new(|_| true))
        .unwrap_err()
        .to_string();
    assert!(e.contains("KV budget"), "{e}");
    while !s.is_idle() {
        s.step().unwrap();
    }
    assert_eq!(s.stats().finished, 3);
}

#[test]
fn a_closed_sink_cancels_and_bad_requests_are_refused() {
    let (model, tok) = load(&model_dir(), 0);
    let p = tok
        .encode("Once upon a time, in a small village by the sea,")
        .unwrap();
    let mut s = Scheduler::new(&model, &tok, BatchConfig::default()).unwrap();
    s.submit(request(p.clone(), 50), Box::new(|_| false))
        .unwrap();
    let mut out = Vec::new();
    while !s.is_idle() {
        out.extend(s.step().unwrap());
    }
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].finish, FinishReason::Cancelled);
    assert!(out[0].new_token_ids.len() < 50);
    assert!(s
        .submit(request(Vec::new(), 5), Box::new(|_| true))
        .is_err());
    let bad = SeqRequest {
        sampling: SamplingParams {
            temperature: -1.0,
            ..Default::default()
        },
        ..request(p, 5)
    };
    assert!(s.submit(bad, Box::new(|_| true)).is_err());
    let e = s
        .submit(request(vec![1; 9000], 5), Box::new(|_| true))
        .unwrap_err()
        .to_string();
    assert!(e.contains("context is 8192"), "{e}");
}
