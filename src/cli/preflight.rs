//! Refusing a run before any work when it cannot fit, with what would: the model's context, a
//! host KV budget too small for sinks + recent window + one call, and the footprint that
//! `farsight report memory` predicts against each tier's memory (GPU: free device memory; host:
//! MemAvailable plus this process's resident set; disk: free space of the store's directory).

use std::path::Path;

use farsight_engine::kv::{full_kv_bytes, Attention};
use farsight_kernels::DType;
use farsight_offload::sparse::evict::EVICT_EXTENT_SLOTS;
use farsight_offload::KvStoreSpec;

use super::common::{AnyModel, CliError};
use super::report::{
    budget_slot_cap, footprint, host_memory_available, human_bytes, predict, sparse_token_bytes,
    Footprint,
};

/// The tokens a run holds.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub prompt: usize,
    pub new_tokens: usize,
    /// Prompt tokens per prefill call.
    pub chunk: usize,
}

impl Plan {
    fn total(&self) -> usize {
        self.prompt.saturating_add(self.new_tokens)
    }
}

/// Errors when `plan` cannot run with `attention` on `model` (its context already overridden).
pub fn check(
    model: &AnyModel,
    kv_dtype: DType,
    attention: &Attention,
    plan: Plan,
) -> Result<(), CliError> {
    check_context(model, plan)?;
    check_budget(model, kv_dtype, attention, plan)?;
    check_memory(model, kv_dtype, attention, plan)
}

/// `262144` -> "262,144".
fn count(n: usize) -> String {
    let digits = n.to_string().into_bytes();
    let groups: Vec<&str> = digits
        .rchunks(3)
        .rev()
        .map(|g| std::str::from_utf8(g).unwrap_or_default())
        .collect();
    groups.join(",")
}

/// "1 token", "262,144 tokens".
fn tokens(n: usize) -> String {
    format!("{} token{}", count(n), if n == 1 { "" } else { "s" })
}

fn check_context(model: &AnyModel, plan: Plan) -> Result<(), CliError> {
    let ctx = model.cfg().context_length();
    let Plan {
        prompt: p,
        new_tokens: n,
        ..
    } = plan;
    if plan.total() <= ctx {
        return Ok(());
    }
    let fits = match (p < ctx, n < ctx) {
        (true, true) => format!(
            "use --max-new-tokens {} or a prompt of at most {} tokens",
            ctx - p,
            count(ctx - n)
        ),
        (true, false) => format!("use --max-new-tokens {}", ctx - p),
        (false, true) => format!(
            "at most {} prompt tokens fit with --max-new-tokens {n}",
            count(ctx - n)
        ),
        (false, false) => format!("at most {} tokens fit", count(ctx)),
    };
    Err(CliError::Usage(format!(
        "the prompt is {} and --max-new-tokens {n} more, but the model's context is {}: {fits} \
         (--context-override N goes past the trained context)",
        tokens(p),
        tokens(ctx)
    )))
}

/// The sparse store evicts to make room for a call; it cannot when sinks + recent window + the
/// call's tokens pass the slots the budget holds (the store would fail mid-prefill).
fn check_budget(
    model: &AnyModel,
    kv_dtype: DType,
    attention: &Attention,
    plan: Plan,
) -> Result<(), CliError> {
    let Attention::DoubleSparse(s) = attention else {
        return Ok(());
    };
    let Some(e) = &s.cfg.evict else { return Ok(()) };
    let cap = budget_slot_cap(model.cfg(), kv_dtype, &s.cfg);
    if plan.total() <= cap {
        return Ok(());
    }
    let chunk = plan.chunk.max(1);
    // The largest call that finds the store full: a whole prefill chunk, the last (shorter)
    // one, or a decode token.
    let call = if plan.prompt <= cap {
        1
    } else if (cap / chunk + 1) * chunk <= plan.prompt {
        chunk
    } else {
        plan.prompt - (plan.prompt - 1) / chunk * chunk
    };
    let (sink, recent) = (s.cfg.sink, s.cfg.recent);
    let need = call + sink + recent;
    if cap >= need {
        return Ok(());
    }
    let per_token = sparse_token_bytes(model.cfg(), kv_dtype, &s.cfg);
    let want = need.div_ceil(EVICT_EXTENT_SLOTS) * EVICT_EXTENT_SLOTS * per_token;
    let more = format!("--host-kv-budget {}MiB", want.div_ceil(1 << 20));
    let fix = if cap > sink + recent {
        format!("use --prefill-chunk {} or {more}", cap - sink - recent)
    } else {
        format!("use {more}")
    };
    let what = if call == 1 {
        "a decode step".to_string()
    } else {
        format!("a prefill call of {call} tokens")
    };
    Err(CliError::Usage(format!(
        "--host-kv-budget {} bytes holds rows + labels of {}, but {what} with sink {sink} + recent {recent} needs {need}: {fix}",
        e.budget_bytes,
        tokens(cap)
    )))
}

/// Bytes of `f`'s lines on `tier`, and of those the KV (rows and labels).
fn on_tier(f: &Footprint, tier: &str) -> (usize, usize) {
    let lines = || f.lines.iter().filter(|l| l.tier == tier);
    (
        lines().map(|l| l.bytes).sum(),
        lines()
            .filter(|l| matches!(l.what, "rows" | "labels"))
            .map(|l| l.bytes)
            .sum(),
    )
}

/// What `tier` can hold: for the GPU and the host, what is free plus what this process holds
/// there already (the weights, loaded before the check).
fn available(model: &AnyModel, attention: &Attention, f: &Footprint, tier: &str) -> Option<usize> {
    match tier {
        "gpu" => Some(
            model.device_free_memory()?
                + f.lines
                    .iter()
                    .filter(|l| l.tier == "gpu" && l.what == "weights")
                    .map(|l| l.bytes)
                    .sum::<usize>(),
        ),
        "host" => host_memory_available(),
        "disk" => match attention {
            Attention::DoubleSparse(s) => match &s.store {
                KvStoreSpec::Disk(p) => disk_free(p),
                KvStoreSpec::Host => None,
            },
            Attention::Dense => None,
        },
        _ => None,
    }
}

/// Free space for an unprivileged user on the file system of `path` (a directory, or a file in one).
pub fn disk_free(path: &Path) -> Option<usize> {
    use std::os::unix::ffi::OsStrExt;
    let dir = if path.is_dir() {
        path
    } else {
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
    };
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: `c` is a NUL-terminated path and `st` a plain struct that statvfs fills.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0)
        .then(|| st.f_bavail as usize * st.f_frsize as usize)
}

fn check_memory(
    model: &AnyModel,
    kv_dtype: DType,
    attention: &Attention,
    plan: Plan,
) -> Result<(), CliError> {
    let rows = plan.chunk.min(plan.prompt).max(1);
    let at = |tokens: usize| {
        footprint(
            model,
            kv_dtype,
            predict(model, kv_dtype, attention, tokens, plan.chunk),
            rows,
            1,
        )
    };
    let f = at(plan.total());
    for tier in ["gpu", "host", "disk"] {
        let (need, kv) = on_tier(&f, tier);
        let Some(avail) = available(model, attention, &f, tier).filter(|&a| need > a) else {
            continue;
        };
        let head = format!(
            "the prompt is {} and --max-new-tokens {} more",
            tokens(plan.prompt),
            plan.new_tokens
        );
        if kv == 0 {
            return Err(CliError::Usage(format!(
                "{head}; the weights and workspace need {} of {tier} memory but {} is available",
                human_bytes(need),
                human_bytes(avail)
            )));
        }
        // The most tokens whose footprint fits (it grows with the tokens).
        let (mut lo, mut hi) = (0, plan.total());
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if on_tier(&at(mid), tier).0 <= avail {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        return Err(CliError::Usage(format!(
            "{head}; with {} and {} KV the KV cache needs {} of {tier} memory ({} with the weights and workspace) but {} \
             is available: at most {} fit; {}",
            describe(attention),
            kv_dtype.name(),
            human_bytes(kv),
            human_bytes(need),
            human_bytes(avail),
            tokens(lo),
            advice(model, kv_dtype, attention, plan, &f, tier),
        )));
    }
    Ok(())
}

fn describe(attention: &Attention) -> String {
    match attention {
        Attention::Dense => "dense attention".into(),
        Attention::DoubleSparse(s) => match &s.cfg.evict {
            Some(e) => format!(
                "double-sparse attention, a {} store and a {} host KV budget",
                s.store,
                human_bytes(e.budget_bytes)
            ),
            None => format!("double-sparse attention and a {} store", s.store),
        },
    }
}

/// Which flags would fit: a host KV budget `1/N` (rows + labels stay under it) sized to the room
/// the KV has on its tier (the host, for a dense cache leaving the GPU), or a disk store.
fn advice(
    model: &AnyModel,
    kv_dtype: DType,
    attention: &Attention,
    plan: Plan,
    f: &Footprint,
    tier: &str,
) -> String {
    let kv_tier = if tier == "gpu" { "host" } else { tier };
    let (need, kv) = on_tier(f, kv_tier);
    let room = available(model, attention, f, kv_tier)
        .unwrap_or(0)
        .saturating_sub(need - kv);
    let full = full_kv_bytes(model.cfg(), kv_dtype, plan.total());
    let n = (full as f64 / room.max(1) as f64)
        .log2()
        .ceil()
        .max(1.0)
        .exp2();
    let budget = format!("--host-kv-budget 1/{n}");
    let disk = "--kv-store disk:PATH";
    match attention {
        Attention::Dense if room >= full => {
            "use --attention double-sparse (its KV lives in host memory)".into()
        }
        Attention::Dense => {
            format!("use --attention double-sparse {budget} or --attention double-sparse {disk}")
        }
        Attention::DoubleSparse(s) => match (&s.cfg.evict, &s.store, tier) {
            (_, KvStoreSpec::Disk(p), "disk") => {
                format!("free space in {} or use {budget}", p.display())
            }
            (Some(_), _, _) => format!("lower --host-kv-budget to 1/{n}"),
            (None, KvStoreSpec::Host, _) => format!("use {budget} or {disk}"),
            (None, KvStoreSpec::Disk(_), _) => format!("use {budget}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_have_thousands_separators() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1,000");
        assert_eq!(count(262_144), "262,144");
        assert_eq!(tokens(1), "1 token");
        assert_eq!(tokens(1_048_576), "1,048,576 tokens");
    }
}
