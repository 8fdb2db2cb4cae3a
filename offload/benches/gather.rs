//! Gathering a Double Sparsity selection from the KV tiers: a row per (layer, token, KV head)
//! (the layout farsight uses) against a row per (layer, token) holding every head, where each
//! head's own selection forces fetching the union of the heads' tokens.
//!
//! `cargo bench -p farsight-offload --bench gather` (optionally `-- --quick`: fewer repetitions).
//! `FARSIGHT_BENCH_DIR` picks the directory of the disk tier's file (default: the workspace's
//! `target/`, a real disk; `/tmp` may be tmpfs).
//!
//! Shapes: SmolLM2-135M (30 layers, 3 KV heads, head_dim 64) and Llama-3.1-8B (32 layers, 8 KV
//! heads, head_dim 128), f16 K and V. T = 8192 tokens, k = T/16 tokens per KV head. Only two
//! layers are stored (a gather touches one layer; the figure per decode step is 1 layer x L).
//! Selections: "random" (k distinct tokens per head, uniform) and "clustered" (runs of 16
//! consecutive tokens, the locality real attention shows).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use farsight_offload::tier::AlignedBuf;
use farsight_offload::{DiskKvTier, DiskOptions, HostKvTier, KvTier, RowLayout};

const TOKENS: usize = 8192;
const STORED_LAYERS: usize = 2;
const EXTENT_SLOTS: usize = 1024;

struct Shape {
    name: &'static str,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
}

const SHAPES: [Shape; 2] = [
    Shape {
        name: "SmolLM2-135M",
        layers: 30,
        kv_heads: 3,
        head_dim: 64,
    },
    Shape {
        name: "Llama-3.1-8B",
        layers: 32,
        kv_heads: 8,
        head_dim: 128,
    },
];

/// xorshift64*: deterministic selections.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n as u64) as usize
    }
}

/// `k` distinct sorted tokens of `0..TOKENS`, in runs of `run` consecutive tokens.
fn select(rng: &mut Rng, k: usize, run: usize) -> Vec<u32> {
    let mut chosen = vec![false; TOKENS / run];
    let mut n = 0;
    while n < k / run {
        let c = rng.below(TOKENS / run);
        if !chosen[c] {
            chosen[c] = true;
            n += 1;
        }
    }
    (0..TOKENS / run)
        .filter(|&c| chosen[c])
        .flat_map(|c| (c * run..(c + 1) * run).map(|t| t as u32))
        .collect()
}

/// Median, min and max of `reps` timings of `f`, after one warm-up call.
fn time(reps: usize, mut f: impl FnMut()) -> (Duration, Duration, Duration) {
    f();
    let mut t: Vec<Duration> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    t.sort();
    (t[reps / 2], t[0], t[reps - 1])
}

fn fill(tier: &mut dyn KvTier) {
    tier.grow(TOKENS).unwrap();
    let bytes = tier.layout().token_layer_bytes();
    let mut data = vec![0u8; bytes];
    for slot in 0..TOKENS as u32 {
        for layer in 0..STORED_LAYERS {
            data.iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (i as u32 ^ slot) as u8);
            tier.write(layer, slot, &data).unwrap();
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (host_reps, disk_reps) = if quick { (11, 5) } else { (31, 11) };
    let dir = std::env::var_os("FARSIGHT_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    println!(
        "command: cargo bench -p farsight-offload --bench gather{}",
        if quick { " -- --quick" } else { "" }
    );
    println!(
        "T = {TOKENS}, k = T/16 per KV head, extent {EXTENT_SLOTS} slots, disk dir {}",
        dir.display()
    );
    println!(
        "times: one layer's gather, median (min-max) of {host_reps} host / {disk_reps} disk runs"
    );
    println!(
        "{:<13} {:<9} {:<15} {:>9} {:>11} {:>10} {:>26} {:>26}",
        "shape", "select", "layout", "rows", "useful MiB", "disk MiB", "host ms", "disk ms"
    );
    for shape in &SHAPES {
        println!(
            "# {}: {} layers (a decode step gathers {} such layers)",
            shape.name, shape.layers, shape.layers
        );
        let row = 2 * shape.head_dim * 2;
        let k = TOKENS / 16;
        let per_head = RowLayout {
            layers: STORED_LAYERS,
            kv_heads: shape.kv_heads,
            row_bytes: row,
            extent_slots: EXTENT_SLOTS,
        };
        let per_token = RowLayout {
            kv_heads: 1,
            row_bytes: row * shape.kv_heads,
            ..per_head
        };
        for (sel_name, run) in [("random", 1), ("clustered", 16)] {
            let mut rng = Rng(0x5eed ^ shape.kv_heads as u64 ^ run as u64);
            let sels: Vec<Vec<u32>> = (0..shape.kv_heads)
                .map(|_| select(&mut rng, k, run))
                .collect();
            let mut union: Vec<u32> = sels.concat();
            union.sort_unstable();
            union.dedup();
            for (layout_name, layout, reads) in [
                (
                    "row/token/head",
                    per_head,
                    sels.iter()
                        .enumerate()
                        .map(|(h, s)| (h, s.clone()))
                        .collect::<Vec<_>>(),
                ),
                ("row/token", per_token, vec![(0, union.clone())]),
            ] {
                let rows: usize = reads.iter().map(|(_, s)| s.len()).sum();
                let useful = rows * layout.row_bytes;
                // Page-aligned output, as the engine's staging buffers will be.
                let mut outs: Vec<AlignedBuf> = reads
                    .iter()
                    .map(|(_, s)| AlignedBuf::zeroed(s.len() * layout.row_bytes).unwrap())
                    .collect();
                let mut host = HostKvTier::new(layout);
                fill(&mut host);
                let mut gather = |tier: &dyn KvTier| {
                    for ((head, slots), out) in reads.iter().zip(outs.iter_mut()) {
                        tier.read(1, *head, slots, out.as_mut_slice()).unwrap();
                    }
                };
                let h = time(host_reps, || gather(&host));
                let opts = DiskOptions::default();
                let mut disk = DiskKvTier::create_with(&dir, layout, opts).unwrap();
                fill(&mut disk);
                disk.flush().unwrap();
                let before = disk.read_counters();
                let d = time(disk_reps, || gather(&disk));
                let after = disk.read_counters();
                let disk_bytes = (after.1 - before.1) / (disk_reps as u64 + 1);
                println!(
                    "{:<13} {:<9} {:<15} {:>9} {:>11.2} {:>10.2} {:>8.3} ({:.3}-{:.3}) {:>8.3} ({:.3}-{:.3})  [{}]",
                    shape.name,
                    sel_name,
                    layout_name,
                    rows,
                    useful as f64 / (1 << 20) as f64,
                    disk_bytes as f64 / (1 << 20) as f64,
                    ms(h.0), ms(h.1), ms(h.2),
                    ms(d.0), ms(d.1), ms(d.2),
                    disk.describe().rsplit('(').next().unwrap_or("").trim_end_matches(')'),
                );
            }
        }
    }
}
