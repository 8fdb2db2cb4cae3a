//! Block-level CUDA kernels run on the CPU (no GPU needed): the kernel source is compiled by the
//! host `g++` with `kernels/tests/emulate/emulate.h` (one OS thread per CUDA thread, barriers for
//! `__syncthreads`, per-warp barriers for votes) and a harness that checks the kernel's
//! invariants. Catches logic errors in scans, compaction and slot bookkeeping before a device
//! run; not races the emulation's barriers hide, nor anything about speed. Skipped without g++.

use std::path::Path;
use std::process::Command;

/// Compiles `harness` after the kernel source and runs it; its stdout on success.
fn emulate(name: &str, harness: &str) -> Option<String> {
    if Command::new("g++").arg("--version").output().is_err() {
        eprintln!("no g++: emulated kernel test skipped");
        return None;
    }
    let dir = std::env::temp_dir().join(format!("farsight-emulate-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join(format!("{name}.cpp"));
    let bin = dir.join(name);
    let text = format!(
        "{}\n{}\n{}\n{}",
        include_str!("emulate/emulate.h"),
        include_str!("../src/cuda/kernels/host_check.h"),
        // Dynamic shared memory: the harness defines the arrays. Inline PTX: dropped (the
        // host_check.h `asm` macro does not see `asm volatile`).
        farsight_kernels::cuda::kernel_source()
            .replace("extern __shared__", "extern")
            .replace("asm volatile", "asm"),
        harness
    );
    std::fs::write(&src, text).unwrap();
    let out = Command::new("g++")
        .args(["-std=c++20", "-O1", "-pthread", "-w", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the emulation harness does not compile:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(Path::new(&bin)).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout).to_string();
    assert!(
        run.status.success(),
        "emulated {name} failed:\n{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    Some(stdout)
}

/// `ds_residency_lru` (`--row-cache F`) over 160 rounds of drifting, alternating selections,
/// with 32 to 96 threads per block (several chunks per pass) and 1024 (as launched): misses are
/// exactly the selected rows not resident before, residents and slots distinct, every slot
/// holding its token once the misses are gathered, attention's index list pointing at the
/// selected rows, evictions only when full and least recently selected first.
#[test]
fn lru_residency_kernel_keeps_its_invariants() {
    if let Some(out) = emulate("residency", include_str!("emulate/residency.cpp")) {
        print!("{out}");
        assert!(out.contains("evictions"), "{out}");
    }
}

/// The page-granular selection's plain kernels: page scores (`ds_page_max`), pages of 4 rows
/// gathered from a `[g][token]` slab into page-sized cache slots after the fixed window rows
/// (one and three blocks), and `ds_unpack_rows` reading that slab back (prefill staging).
#[test]
fn page_kernels_move_whole_pages() {
    if let Some(out) = emulate("pages", include_str!("emulate/pages.cpp")) {
        print!("{out}");
        assert!(out.contains("agree"), "{out}");
    }
}
