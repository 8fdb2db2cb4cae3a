//! The disk tier of the offloaded store (`--kv-store disk:PATH` with `--device cuda`).
//!
//! The full rows live in one file ([`DiskKvTier`]: O_DIRECT reads through io_uring, a
//! write-back cache of whole blocks; token `t` is slot `t`). The GPU side is the host tier's:
//! labels, sinks, the recent ring and the row cache stay on the device, and the same kernels
//! move rows, reading pinned host buffers that this module fills from the file:
//!
//! - new rows: the put kernel writes them into a pinned pending buffer (`[token][KV head][row]`,
//!   the tokens of the current forward call); [`DiskRows::store_tokens`] writes them to the file
//!   when the call commits;
//! - misses: the residency's miss lists come to the host, [`DiskRows::load_misses`] reads those
//!   rows into pinned staging (`[KV head][miss][row]`), and the gather kernel copies staging
//!   entry `m` (an ordinal, not a token) into the row cache;
//! - sinks and ring refills, prefill's past rows: [`DiskRows::load_tokens`] into the host slab
//!   layout (`[token][KV head][row]`), then the host tier's kernels.
//!
//! What this costs: a device-to-host read of the miss lists per selection (the host must know
//! which rows to read) and a synchronisation per forward call before the new rows are written
//! out. Reads are per KV head; rows of one head are contiguous in the file (what a clustered
//! selection and the 4 KiB block want).

use std::path::Path;

use farsight_kernels::{KernelError, Result};
use farsight_offload::tier::{DiskKvTier, KvTier, RowLayout};

use super::{bad, Slab};

/// Slots per extent of the file (the unit it grows by; also the run length within which
/// consecutive tokens of one (layer, head) are contiguous).
const EXTENT_SLOTS: usize = 4096;

/// A store's rows in a file: `layers` x `kv_heads` rows of `row_bytes` per token.
pub struct DiskRows {
    tier: DiskKvTier,
}

impl DiskRows {
    /// Creates the file at `path` (or a new file inside the directory `path`) with room for
    /// `capacity` tokens: the space is allocated now, so a disk too small fails here.
    pub fn create(
        path: &Path,
        layers: usize,
        kv_heads: usize,
        row_bytes: usize,
        capacity: usize,
    ) -> Result<DiskRows> {
        let layout = RowLayout {
            layers,
            kv_heads,
            row_bytes,
            extent_slots: EXTENT_SLOTS.min(capacity.max(1).next_power_of_two()),
        };
        let mut tier = DiskKvTier::create(path, layout)?;
        tier.grow(capacity.max(1))?;
        Ok(DiskRows { tier })
    }

    fn layout(&self) -> &RowLayout {
        self.tier.layout()
    }

    /// Bytes of one token's rows in one layer (every KV head).
    pub fn token_bytes(&self) -> usize {
        self.layout().token_layer_bytes()
    }

    /// Writes tokens `t0 ..` of layer `layer` from `src` (`[token][KV head][row]`, whole tokens).
    pub fn store_tokens(&mut self, layer: usize, t0: usize, src: &[u8]) -> Result<()> {
        let tb = self.token_bytes();
        if !src.len().is_multiple_of(tb) {
            return Err(KernelError::Shape(format!(
                "disk rows: {} bytes is not whole tokens of {tb}",
                src.len()
            )));
        }
        for (i, tok) in src.chunks_exact(tb).enumerate() {
            self.tier.write(layer, slot(t0 + i)?, tok)?;
        }
        Ok(())
    }

    /// Reads tokens `toks` of layer `layer` into `out` in the host slab layout
    /// (`[i][KV head][row]` for `toks[i]`).
    pub fn load_tokens(&self, layer: usize, toks: &[u32], out: &mut [u8]) -> Result<()> {
        let (heads, row) = (self.layout().kv_heads, self.layout().row_bytes);
        if out.len() < toks.len() * heads * row {
            return Err(KernelError::Shape(format!(
                "disk rows: {} bytes for {} tokens of {} bytes",
                out.len(),
                toks.len(),
                heads * row
            )));
        }
        let mut scratch = vec![0u8; toks.len() * row];
        for g in 0..heads {
            self.tier.read(layer, g, toks, &mut scratch)?;
            for (i, r) in scratch.chunks_exact(row).enumerate() {
                out[(i * heads + g) * row..][..row].copy_from_slice(r);
            }
        }
        Ok(())
    }

    /// Reads the misses of one selection of layer `layer` into `out` (`[KV head][stride][row]`):
    /// for head `g`, the first `n_miss[g]` tokens of `miss_tok[g * stride ..]`, entry `m` at
    /// `out[(g * stride + m) * row ..]`. Returns the rows read.
    pub fn load_misses(
        &self,
        layer: usize,
        miss_tok: &[i32],
        n_miss: &[i32],
        stride: usize,
        out: &mut [u8],
    ) -> Result<usize> {
        let (heads, row) = (self.layout().kv_heads, self.layout().row_bytes);
        if n_miss.len() < heads
            || miss_tok.len() < heads * stride
            || out.len() < heads * stride * row
        {
            return Err(KernelError::Shape(
                "disk rows: miss lists or staging too small".into(),
            ));
        }
        // Every head's misses in one batch of reads.
        let mut slots = Vec::with_capacity(heads);
        for g in 0..heads {
            let n = usize::try_from(n_miss[g]).unwrap_or(usize::MAX);
            if n > stride {
                return Err(KernelError::Shape(format!(
                    "disk rows: {} misses listed for a cache of {stride}",
                    n_miss[g]
                )));
            }
            let s = miss_tok[g * stride..][..n]
                .iter()
                .map(|&t| {
                    u32::try_from(t)
                        .map_err(|_| KernelError::Shape(format!("disk rows: miss token {t}")))
                })
                .collect::<Result<Vec<u32>>>()?;
            slots.push(s);
        }
        let total = slots.iter().map(Vec::len).sum();
        let mut reqs: Vec<(usize, &[u32], &mut [u8])> = slots
            .iter()
            .zip(out.chunks_mut(stride * row))
            .enumerate()
            .map(|(g, (s, o))| (g, s.as_slice(), &mut o[..s.len() * row]))
            .collect();
        self.tier.read_heads(layer, &mut reqs)?;
        Ok(total)
    }

    /// Bytes of the file.
    pub fn bytes(&self) -> usize {
        self.tier.bytes()
    }

    /// `disk:PATH (...)` for reports.
    pub fn describe(&self) -> String {
        self.tier.describe()
    }
}

impl super::OffloadKvStore {
    /// Disk tier: writes the `n` new rows of every layer from the pending buffers to the file,
    /// once the device has written them.
    pub(super) fn write_out(&mut self, n: usize) -> Result<()> {
        let Some(disk) = &mut self.disk else {
            return Ok(());
        };
        if n == 0 {
            return Ok(());
        }
        if n > disk.pending_cap {
            return Err(bad(format!(
                "commit of {n} tokens after a reserve of {}",
                disk.pending_cap
            )));
        }
        self.prefetch.device_synchronize()?;
        let bytes = n * disk.rows.token_bytes();
        for (l, lay) in self.layers.iter_mut().enumerate() {
            if let Slab::Pending(p) = &mut lay.slab {
                disk.rows
                    .store_tokens(l, disk.pending_t0, &p.as_mut_slice()?[..bytes])?;
            }
        }
        Ok(())
    }
}

fn slot(t: usize) -> Result<u32> {
    u32::try_from(t)
        .map_err(|_| KernelError::Shape(format!("token {t} past the disk tier's slots")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recognisable byte for (layer, token, head, byte).
    fn byte(l: usize, t: usize, g: usize, b: usize) -> u8 {
        (l * 131 + t * 31 + g * 7 + b) as u8
    }

    #[test]
    fn rows_round_trip_in_both_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let (layers, heads, row, cap) = (3, 4, 64, 5000);
        let mut d = DiskRows::create(dir.path(), layers, heads, row, cap).unwrap();
        assert!(d.bytes() >= layers * heads * row * cap);
        assert!(d.describe().starts_with("disk:"), "{}", d.describe());
        let tb = heads * row;
        // Two calls per layer: a prefill chunk and one decode token.
        for l in 0..layers {
            let img = |t0: usize, n: usize| -> Vec<u8> {
                (0..n * tb)
                    .map(|i| {
                        let (t, g, b) = (t0 + i / tb, i % tb / row, i % row);
                        byte(l, t, g, b)
                    })
                    .collect()
            };
            d.store_tokens(l, 0, &img(0, 4100)).unwrap();
            d.store_tokens(l, 4100, &img(4100, 1)).unwrap();
        }
        assert!(d.store_tokens(0, 0, &[0u8; 3]).is_err(), "partial token");
        // Slab layout, tokens out of order and across extents.
        let toks = [4100u32, 0, 1, 4095, 4096, 2000];
        let mut out = vec![0u8; toks.len() * tb];
        d.load_tokens(2, &toks, &mut out).unwrap();
        for (i, &t) in toks.iter().enumerate() {
            for g in 0..heads {
                for b in 0..row {
                    assert_eq!(out[(i * heads + g) * row + b], byte(2, t as usize, g, b));
                }
            }
        }
        // Miss layout: per head its own list, stride 5.
        let stride = 5;
        let mut miss = vec![-1i32; heads * stride];
        let lists: [&[i32]; 4] = [&[3, 9, 4097], &[], &[4100], &[0, 1, 2, 3, 4]];
        for (g, l) in lists.iter().enumerate() {
            miss[g * stride..][..l.len()].copy_from_slice(l);
        }
        let n_miss: Vec<i32> = lists.iter().map(|l| l.len() as i32).collect();
        let mut stage = vec![0u8; heads * stride * row];
        assert_eq!(
            d.load_misses(1, &miss, &n_miss, stride, &mut stage)
                .unwrap(),
            9
        );
        for (g, l) in lists.iter().enumerate() {
            for (m, &t) in l.iter().enumerate() {
                let at = (g * stride + m) * row;
                assert!((0..row).all(|b| stage[at + b] == byte(1, t as usize, g, b)));
            }
        }
        // Bad lists are errors, not panics.
        let mut too_many = n_miss.clone();
        too_many[0] = stride as i32 + 1;
        assert!(d
            .load_misses(1, &miss, &too_many, stride, &mut stage)
            .is_err());
        let mut negative = miss.clone();
        negative[0] = -3;
        assert!(d
            .load_misses(1, &negative, &n_miss, stride, &mut stage)
            .is_err());
        assert!(d.load_tokens(0, &[1, 2], &mut [0u8; 10]).is_err());
    }

    #[test]
    fn an_unusable_path_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no/such/dir/kv.bin");
        assert!(DiskRows::create(&missing, 1, 1, 64, 10).is_err());
    }
}
