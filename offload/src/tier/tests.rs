//! Host and disk tiers against a reference model and against each other.
//!
//! Disk tiers are tested in a temp dir (`/tmp`, which may be tmpfs) and in one under the
//! workspace's `target/` (a real disk, where O_DIRECT applies), with io_uring and with the
//! pread pool, and with and without O_DIRECT.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::*;
use crate::SlotPool;

/// A small deterministic generator (xorshift64*), so failures replay exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A directory on the real disk (under the workspace's target/), removed on drop.
fn target_tempdir() -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/tier-tests");
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

/// Rows straddle blocks (96 bytes) and extents are not block-aligned (28 800 bytes).
const ODD: RowLayout = RowLayout {
    layers: 3,
    kv_heads: 2,
    row_bytes: 96,
    extent_slots: 50,
};
/// Power-of-two rows, block-aligned extents.
const EVEN: RowLayout = RowLayout {
    layers: 2,
    kv_heads: 3,
    row_bytes: 256,
    extent_slots: 64,
};

fn row_pattern(layout: &RowLayout, layer: usize, slot: u32, version: u64) -> Vec<u8> {
    let mut rng = Rng(((layer as u64) << 40) ^ ((slot as u64) << 8) ^ version ^ 0x9e37_79b9);
    (0..layout.token_layer_bytes())
        .map(|_| rng.next() as u8)
        .collect()
}

/// Random writes, frees with slot reuse, growth and reads, checked on every tier against a
/// reference map (unwritten rows read as zeros).
fn random_ops(tiers: &mut [Box<dyn KvTier>], seed: u64, steps: usize) {
    let layout = *tiers[0].layout();
    let mut rng = Rng(seed);
    let mut pool = SlotPool::new();
    let mut owned: Vec<u32> = Vec::new();
    let mut model: HashMap<(usize, u32), Vec<u8>> = HashMap::new();
    let mut version = 0u64;
    for _ in 0..steps {
        match rng.below(10) {
            // Append a few tokens (grows across extents).
            0..=3 => {
                for _ in 0..1 + rng.below(8) {
                    let slot = pool.alloc().unwrap();
                    owned.push(slot);
                    for t in tiers.iter_mut() {
                        t.grow(pool.capacity()).unwrap();
                    }
                    for layer in 0..layout.layers {
                        version += 1;
                        let data = row_pattern(&layout, layer, slot, version);
                        for t in tiers.iter_mut() {
                            t.write(layer, slot, &data).unwrap();
                        }
                        model.insert((layer, slot), data);
                    }
                }
            }
            // Evict a few tokens; their slots come back on the next appends.
            4 if !owned.is_empty() => {
                for _ in 0..1 + rng.below(4).min(owned.len() - 1) {
                    let slot = owned.swap_remove(rng.below(owned.len()));
                    pool.free(slot);
                }
            }
            // Overwrite one layer of a live token.
            5 if !owned.is_empty() => {
                let slot = owned[rng.below(owned.len())];
                let layer = rng.below(layout.layers);
                version += 1;
                let data = row_pattern(&layout, layer, slot, version);
                for t in tiers.iter_mut() {
                    t.write(layer, slot, &data).unwrap();
                }
                model.insert((layer, slot), data);
            }
            // Read a selection: runs of consecutive slots, scattered slots, repeats, any order.
            _ if tiers[0].capacity() > 0 => {
                let cap = tiers[0].capacity() as u32;
                let mut slots = Vec::new();
                for _ in 0..1 + rng.below(6) {
                    let start = rng.below(cap as usize) as u32;
                    let len = 1 + rng.below(70) as u32;
                    slots.extend(start..(start + len).min(cap));
                }
                let (layer, head) = (rng.below(layout.layers), rng.below(layout.kv_heads));
                let row = layout.row_bytes;
                let want: Vec<u8> = slots
                    .iter()
                    .flat_map(|&s| match model.get(&(layer, s)) {
                        Some(d) => d[head * row..][..row].to_vec(),
                        None => vec![0; row],
                    })
                    .collect();
                for t in tiers.iter() {
                    let mut out = vec![0xAA; slots.len() * row];
                    t.read(layer, head, &slots, &mut out).unwrap();
                    assert!(
                        out == want,
                        "{} differs: layer {layer} head {head}",
                        t.describe()
                    );
                }
                // Every head at once (one batch on the disk): head h reads every (h+1)-th slot
                // of the selection, from the h-th on (an empty list for some heads).
                let sels: Vec<Vec<u32>> = (0..layout.kv_heads)
                    .map(|h| slots.iter().copied().skip(h).step_by(h + 1).collect())
                    .collect();
                let wants: Vec<Vec<u8>> = sels
                    .iter()
                    .enumerate()
                    .map(|(h, sel)| {
                        sel.iter()
                            .flat_map(|&s| match model.get(&(layer, s)) {
                                Some(d) => d[h * row..][..row].to_vec(),
                                None => vec![0; row],
                            })
                            .collect()
                    })
                    .collect();
                for t in tiers.iter() {
                    let mut outs: Vec<Vec<u8>> =
                        sels.iter().map(|s| vec![0xAA; s.len() * row]).collect();
                    let mut reqs: Vec<(usize, &[u32], &mut [u8])> = sels
                        .iter()
                        .zip(outs.iter_mut())
                        .enumerate()
                        .map(|(h, (s, o))| (h, s.as_slice(), o.as_mut_slice()))
                        .collect();
                    t.read_heads(layer, &mut reqs).unwrap();
                    assert!(
                        outs == wants,
                        "{} read_heads differs: layer {layer}",
                        t.describe()
                    );
                }
            }
            _ => {}
        }
    }
}

/// Options with a tiny write-back cache, so that flushes and read-modify-writes happen often.
fn small_cache(force_pread: bool, buffered: bool) -> DiskOptions {
    DiskOptions {
        force_pread,
        buffered,
        write_back_bytes: 16 << 10,
    }
}

fn disk_variants(dir: &Path, layout: RowLayout) -> Vec<Box<dyn KvTier>> {
    let mut tiers: Vec<Box<dyn KvTier>> = vec![Box::new(HostKvTier::new(layout))];
    for (pread, buffered) in [(false, false), (true, false), (false, true)] {
        let tier = DiskKvTier::create_with(dir, layout, small_cache(pread, buffered)).unwrap();
        tiers.push(Box::new(tier));
    }
    tiers
}

#[test]
fn host_and_disk_agree_in_tmp() {
    let dir = tempfile::tempdir().unwrap();
    for (seed, layout) in [(1, ODD), (2, EVEN)] {
        random_ops(&mut disk_variants(dir.path(), layout), seed, 400);
    }
}

#[test]
fn host_and_disk_agree_on_real_disk() {
    let dir = target_tempdir();
    for (seed, layout) in [(3, ODD), (4, EVEN), (5, ODD)] {
        random_ops(&mut disk_variants(dir.path(), layout), seed, 400);
    }
}

#[test]
fn default_write_back_agrees_with_host() {
    let dir = target_tempdir();
    let mut tiers: Vec<Box<dyn KvTier>> = vec![
        Box::new(HostKvTier::new(EVEN)),
        Box::new(DiskKvTier::create(dir.path(), EVEN).unwrap()),
    ];
    random_ops(&mut tiers, 6, 300);
}

#[test]
fn reused_slot_after_flush_reads_new_rows() {
    let dir = target_tempdir();
    let mut tier = DiskKvTier::create_with(dir.path(), EVEN, small_cache(false, false)).unwrap();
    tier.grow(64).unwrap();
    let old = row_pattern(&EVEN, 1, 7, 0);
    tier.write(1, 7, &old).unwrap();
    tier.write(1, 8, &row_pattern(&EVEN, 1, 8, 0)).unwrap();
    tier.flush().unwrap();
    let new = row_pattern(&EVEN, 1, 7, 1);
    tier.write(1, 7, &new).unwrap();
    let mut out = vec![0; 2 * EVEN.row_bytes];
    tier.read(1, 2, &[7, 8], &mut out).unwrap();
    assert_eq!(&out[..256], &new[512..768]);
    assert_eq!(&out[256..], &row_pattern(&EVEN, 1, 8, 0)[512..768]);
    tier.flush().unwrap();
    tier.read(1, 2, &[7], &mut out[..256]).unwrap();
    assert_eq!(&out[..256], &new[512..768]);
}

#[test]
fn host_growth_keeps_rows_in_place() {
    let mut tier = HostKvTier::new(EVEN);
    tier.grow(1).unwrap();
    let data = row_pattern(&EVEN, 0, 3, 0);
    tier.write(0, 3, &data).unwrap();
    let mut before = vec![0; 256];
    tier.read(0, 1, &[3], &mut before).unwrap();
    tier.grow(10 * 64).unwrap();
    assert_eq!(tier.capacity(), 640);
    assert_eq!(tier.bytes(), 10 * EVEN.extent_bytes());
    let mut after = vec![0; 256];
    tier.read(0, 1, &[3], &mut after).unwrap();
    assert_eq!(before, after);
    assert_eq!(&after[..], &data[256..512]);
}

#[test]
fn grow_rounds_up_to_whole_extents_and_never_shrinks() {
    let mut tier = HostKvTier::new(ODD);
    tier.grow(51).unwrap();
    assert_eq!(tier.capacity(), 100);
    tier.grow(3).unwrap();
    assert_eq!(tier.capacity(), 100);
}

#[test]
fn read_rejects_slot_beyond_capacity() {
    let mut tier = HostKvTier::new(EVEN);
    tier.grow(64).unwrap();
    let mut out = vec![0; 256];
    let err = tier.read(0, 0, &[64], &mut out).unwrap_err().to_string();
    assert!(err.contains("slot 64"), "{err}");
}

#[test]
fn write_rejects_wrong_length() {
    let dir = tempfile::tempdir().unwrap();
    let mut tier = DiskKvTier::create(dir.path(), EVEN).unwrap();
    tier.grow(1).unwrap();
    let err = tier.write(0, 0, &[0; 256]).unwrap_err().to_string();
    assert!(err.contains("expected 768"), "{err}");
}

#[test]
fn slot_runs_split_at_gaps_and_extent_ends() {
    let slots = [3, 4, 5, 9, 8, 9, 10, 63, 64, 65];
    let runs: Vec<_> = slot_runs(&slots, 64).map(|r| (r.first, r.len)).collect();
    assert_eq!(runs, [(0, 3), (3, 1), (4, 3), (7, 1), (8, 2)]);
}

#[test]
fn disk_describe_names_path_and_io() {
    let dir = target_tempdir();
    let tier = DiskKvTier::create(dir.path(), EVEN).unwrap();
    let text = tier.describe();
    assert!(
        text.starts_with(&format!("disk:{}", tier.path().display())),
        "{text}"
    );
    assert!(
        text.contains("(io_uring") || text.contains("(pread"),
        "{text}"
    );
    assert!(tier.path().starts_with(dir.path()));
}

#[test]
fn forced_pread_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let tier = DiskKvTier::create_with(dir.path(), EVEN, small_cache(true, false)).unwrap();
    assert_eq!(tier.io_kind(), DiskIo::Pread);
    assert!(tier.describe().contains("(pread"), "{}", tier.describe());
}

#[test]
fn io_uring_is_used_where_the_kernel_allows_it() {
    let dir = tempfile::tempdir().unwrap();
    let tier = DiskKvTier::create_with(dir.path(), EVEN, small_cache(false, false)).unwrap();
    // Containers may refuse io_uring; then this is the fallback, which is also correct.
    eprintln!("disk tier I/O here: {}", tier.describe());
    if std::env::var_os("FARSIGHT_EXPECT_IO_URING").is_some() {
        assert_eq!(tier.io_kind(), DiskIo::IoUring);
    }
}

#[test]
fn real_disk_uses_o_direct() {
    let dir = target_tempdir();
    let tier = DiskKvTier::create(dir.path(), EVEN).unwrap();
    assert!(tier.is_direct(), "{}", tier.describe());
}

#[test]
fn file_is_removed_on_drop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv.bin");
    let mut tier = DiskKvTier::create(&path, EVEN).unwrap();
    tier.grow(100).unwrap();
    assert_eq!(tier.path(), path);
    assert!(path.exists());
    drop(tier);
    assert!(!path.exists());
}

#[test]
fn existing_file_is_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("precious.txt");
    std::fs::write(&path, "keep me").unwrap();
    let err = DiskKvTier::create(&path, EVEN).unwrap_err().to_string();
    assert!(err.contains("precious.txt"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
}

#[test]
fn unwritable_path_error_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-dir/kv.bin");
    let err = DiskKvTier::create(&path, EVEN).unwrap_err().to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("cannot create the KV file"), "{err}");
    // /proc refuses new files even to root.
    let err = DiskKvTier::create("/proc/farsight-kv.bin", EVEN)
        .unwrap_err()
        .to_string();
    assert!(err.contains("/proc/farsight-kv.bin"), "{err}");
}

/// Runs `disk_full_child` in a child process whose file size limit (RLIMIT_FSIZE) is 1 MiB:
/// growing the file past it fails with EFBIG, a real OS-level failure like a full disk.
#[test]
fn disk_full_is_a_clear_error() {
    let dir = target_tempdir();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "tier::tests::disk_full_child",
            "--ignored",
            "--nocapture",
        ])
        .env("FARSIGHT_DISK_FULL_DIR", dir.path())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("DISK FULL OK"),
        "{text}"
    );
}

#[test]
#[ignore = "run by disk_full_is_a_clear_error in a child process"]
fn disk_full_child() {
    let Some(dir) = std::env::var_os("FARSIGHT_DISK_FULL_DIR") else {
        return;
    };
    // SAFETY: plain syscalls; this process runs only this test.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let limit = libc::rlimit {
            rlim_cur: 1 << 20,
            rlim_max: 1 << 20,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
    // 64 slots x 2 layers x 3 heads x 256 B = 96 KiB per extent.
    let mut tier = DiskKvTier::create(&dir, EVEN).unwrap();
    tier.grow(640).unwrap();
    for slot in 0..640 {
        tier.write(1, slot, &row_pattern(&EVEN, 1, slot, 0))
            .unwrap();
    }
    tier.flush().unwrap();
    let err = tier.grow(64 * 11).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, farsight_kernels::KernelError::Io { .. }),
        "{text}"
    );
    assert!(text.contains("file size limit"), "{text}");
    assert!(text.contains(&tier.path().display().to_string()), "{text}");
    // The tier still works at its old size.
    let mut out = vec![0; 256];
    tier.read(1, 0, &[639], &mut out).unwrap();
    assert_eq!(&out[..], &row_pattern(&EVEN, 1, 639, 0)[..256]);
    println!("DISK FULL OK: {text}");
}

#[test]
fn spec_parses_host_and_disk() {
    assert_eq!("host".parse::<KvStoreSpec>().unwrap(), KvStoreSpec::Host);
    assert_eq!(
        "disk:/mnt/nvme/kv".parse::<KvStoreSpec>().unwrap(),
        KvStoreSpec::Disk("/mnt/nvme/kv".into())
    );
    assert_eq!(KvStoreSpec::Disk("/a:b".into()).to_string(), "disk:/a:b");
    assert_eq!(
        "disk:/a:b".parse::<KvStoreSpec>().unwrap(),
        KvStoreSpec::Disk("/a:b".into())
    );
}

#[test]
fn spec_rejects_unknown_text() {
    for bad in ["", "gpu", "disk", "disk:", "host:x", "Disk:/x"] {
        let err = bad.parse::<KvStoreSpec>().unwrap_err().to_string();
        assert!(
            err.contains("expected `host` or `disk:PATH`"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn spec_opens_each_tier() {
    let dir = tempfile::tempdir().unwrap();
    let host = KvStoreSpec::Host.open(EVEN).unwrap();
    assert_eq!(host.describe(), "host");
    let disk = KvStoreSpec::Disk(dir.path().into()).open(EVEN).unwrap();
    assert!(disk.describe().starts_with("disk:"));
    let zero = RowLayout {
        kv_heads: 0,
        ..EVEN
    };
    assert!(KvStoreSpec::Host.open(zero).is_err());
}
