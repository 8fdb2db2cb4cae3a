//! Run-time compilation of the CUDA kernels with NVRTC, and an on-disk PTX cache.
//!
//! The kernel sources are embedded in the binary (`include_str!`) and compiled at first use for
//! the device's architecture (`--gpu-architecture=sm_XY` from its compute capability). The PTX is
//! cached under `$XDG_CACHE_HOME/farsight/ptx` (or `~/.cache/farsight/ptx`), keyed by a hash of
//! the source, the architecture and the options; a missing, corrupt or unwritable cache falls back
//! to compiling (a cached file that fails to load is recompiled and overwritten).

use std::path::PathBuf;

use cudarc::nvrtc::{CompileOptions, Ptx};

/// The kernel sources, compiled as one translation unit.
pub(crate) fn source() -> String {
    let mut s = String::new();
    s.push_str(include_str!("kernels/ops.cu"));
    s.push('\n');
    s.push_str(include_str!("kernels/attention.cu"));
    s.push('\n');
    s.push_str(include_str!("kernels/flash.cu"));
    s.push('\n');
    s.push_str(include_str!("kernels/random.cu"));
    s.push('\n');
    s.push_str(include_str!("kernels/sparse.cu"));
    s.push('\n');
    s.push_str(include_str!("kernels/labels.cu"));
    s.push('\n');
    s.push_str(include_str!("kernels/offload.cu"));
    s.push('\n');
    s.push_str(include_str!("kernels/residency.cu"));
    s.push('\n');
    s.push_str(include_str!("kernels/sample.cu"));
    s
}

/// Last line of every cached file: a truncated file lacks it and is ignored.
const END_MARK: &str = "\n// farsight-ptx-end\n";

/// FNV-1a, 64 bits: stable across builds and Rust versions (unlike `DefaultHasher`).
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0u8)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The cache directory, if one can be named.
pub(crate) fn cache_dir() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(std::env::var_os("HOME")?).join(".cache"),
    };
    Some(base.join("farsight").join("ptx"))
}

/// NVRTC options for an architecture such as `sm_90`.
pub(crate) fn options(arch: &str) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()]
}

/// Where the PTX of `src` for `arch` is (or would be) cached.
pub(crate) fn cache_path(src: &str, arch: &str) -> Option<PathBuf> {
    let opts = options(arch).join(" ");
    let key = fnv1a(&[src, arch, &opts, env!("CARGO_PKG_VERSION")]);
    Some(cache_dir()?.join(format!("{key:016x}.ptx")))
}

/// The cached PTX, if present and complete.
pub(crate) fn read_cached(src: &str, arch: &str) -> Option<String> {
    let text = std::fs::read_to_string(cache_path(src, arch)?).ok()?;
    let body = text.strip_suffix(END_MARK)?;
    if !body.contains(".version") || !body.contains(".target") {
        return None;
    }
    Some(body.to_string())
}

/// Compiles `src` for `arch` and stores the PTX in the cache (best effort).
pub(crate) fn compile(src: &str, arch: &str) -> Result<String, String> {
    let opts = CompileOptions {
        options: options(arch),
        ..Default::default()
    };
    let ptx: Ptx = cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { nvrtc, log, .. } => {
            format!("NVRTC failed ({nvrtc:?}):\n{}", log.to_string_lossy())
        }
        other => format!("NVRTC failed: {other:?}"),
    })?;
    let text = ptx.to_src();
    let _ = write_cached(src, arch, &text);
    Ok(text)
}

fn write_cached(src: &str, arch: &str, ptx: &str) -> Option<()> {
    let path = cache_path(src, arch)?;
    std::fs::create_dir_all(path.parent()?).ok()?;
    // Write then rename, so that a reader never sees a half-written file.
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, format!("{ptx}{END_MARK}")).ok()?;
    if std::fs::rename(&tmp, &path).is_err() {
        let _ = std::fs::remove_file(&tmp);
        return None;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where no GPU (so no NVRTC) is at hand, a host C++ compiler checks the kernel sources'
    /// syntax and types against stand-ins for the CUDA built-ins (`kernels/host_check.h`), and
    /// that every kernel the backend loads is defined: a typo in a kernel otherwise shows only
    /// on the GPU machine, where it breaks every kernel (one translation unit). Skipped when no
    /// `g++` is installed.
    #[test]
    fn kernel_sources_pass_a_host_syntax_check() {
        if std::process::Command::new("g++")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("no g++: host syntax check of the CUDA sources skipped");
            return;
        }
        let dir = std::env::temp_dir().join(format!("farsight-cu-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("kernels.cpp");
        let text = format!("{}\n{}", include_str!("kernels/host_check.h"), source());
        std::fs::write(&file, text).unwrap();
        let run = |args: &[&str]| {
            std::process::Command::new("g++")
                .args(["-std=c++17", "-w"])
                .args(args)
                .arg(&file)
                .output()
                .unwrap()
        };
        let out = run(&["-fsyntax-only"]);
        assert!(
            out.status.success(),
            "the kernel sources do not compile:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pre = run(&["-E", "-P"]);
        assert!(pre.status.success());
        let pre = String::from_utf8_lossy(&pre.stdout);
        let words: Vec<&str> = pre
            .split(|c: char| c == '(' || c.is_whitespace())
            .filter(|w| !w.is_empty())
            .collect();
        let defined: std::collections::HashSet<&str> = words
            .windows(2)
            .filter(|w| w[0] == "void")
            .map(|w| w[1])
            .collect();
        let missing: Vec<&&str> = super::super::KERNELS
            .iter()
            .filter(|k| !defined.contains(**k))
            .collect();
        assert!(
            missing.is_empty(),
            "kernels loaded but not defined: {missing:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn key_depends_on_source_and_arch() {
        let a = fnv1a(&["x", "sm_90"]);
        assert_ne!(a, fnv1a(&["x", "sm_89"]));
        assert_ne!(a, fnv1a(&["y", "sm_90"]));
        assert_eq!(a, fnv1a(&["x", "sm_90"]));
        // Part boundaries matter.
        assert_ne!(fnv1a(&["ab", "c"]), fnv1a(&["a", "bc"]));
    }

    #[test]
    fn truncated_cache_file_is_ignored() {
        let dir = std::env::temp_dir().join(format!("farsight-ptx-test-{}", std::process::id()));
        std::env::set_var("XDG_CACHE_HOME", &dir);
        let src = "// test source";
        assert!(read_cached(src, "sm_90").is_none());
        let path = cache_path(src, "sm_90").unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, ".version 8.0\n.target sm_90\n").unwrap(); // no end mark
        assert!(read_cached(src, "sm_90").is_none());
        write_cached(src, "sm_90", ".version 8.0\n.target sm_90\n").unwrap();
        assert_eq!(
            read_cached(src, "sm_90").unwrap(),
            ".version 8.0\n.target sm_90\n"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
