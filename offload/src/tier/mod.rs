//! Tiers that hold KV rows off the compute device: host memory and disk.
//!
//! **Row granularity.** A row is one (layer, token, KV head): that head's K then V
//! (`2 * head_dim` elements of the KV dtype). Double Sparsity selects tokens per KV head, so a
//! fetched row is entirely useful; a row per (layer, token) holding every head would move up to
//! `kv_heads` times the bytes a GQA selection needs.
//!
//! Measured (`cargo bench -p farsight-offload --bench gather`, BENCHMARKS.md; k = T/16 of
//! T = 8192 per KV head): per layer, Llama-3.1-8B moves 2.0 MiB instead of 12.9 MiB (8 heads'
//! union covers 40% of tokens) and the host gather takes 0.17 ms instead of 3.7 ms; SmolLM2-135M
//! 0.38 vs 1.05 MiB. On disk the 4 KiB block hides the difference for uniformly random
//! selections (both layouts read ~16 MiB of blocks for Llama) but not for clustered ones (2.0 vs
//! 12.8 MiB, 9 vs 27 ms): disk gathers need selection locality, and rows grouped per head keep it.
//!
//! **Slots.** A token owns one slot (from [`crate::SlotPool`]) for its whole life; the slot
//! addresses that token's rows in every (layer, head). Freeing a token frees all of them at once
//! (what eviction needs).
//!
//! **Layout.** Storage grows in extents of [`RowLayout::extent_slots`] slots. Inside an extent,
//! rows are grouped by (layer, head) and then by slot, so consecutive tokens of one (layer, head)
//! are contiguous: a recent window, a sink block or a cluster of selected tokens is one run of
//! bytes (what disk reads and PCIe gathers want).

mod aligned;
#[cfg(target_os = "linux")]
mod disk;
#[cfg(target_os = "linux")]
mod disk_io;
mod host;
#[cfg(test)]
mod tests;

pub use aligned::{AlignedBuf, ALIGN};
#[cfg(target_os = "linux")]
pub use disk::{DiskIo, DiskKvTier, DiskOptions};
pub use host::HostKvTier;

use std::path::PathBuf;
use std::str::FromStr;

use farsight_kernels::{KernelError, Result};

/// Shape of the rows a tier stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowLayout {
    pub layers: usize,
    pub kv_heads: usize,
    /// Bytes of one row: one head's K and V (`2 * head_dim * dtype size`).
    pub row_bytes: usize,
    /// Slots per extent (the unit of growth).
    pub extent_slots: usize,
}

impl RowLayout {
    /// Bytes of one extent.
    pub fn extent_bytes(&self) -> usize {
        self.extent_slots * self.layers * self.kv_heads * self.row_bytes
    }

    /// Bytes of one token's rows in one layer (`kv_heads * row_bytes`: what
    /// [`KvTier::write`] takes).
    pub fn token_layer_bytes(&self) -> usize {
        self.kv_heads * self.row_bytes
    }

    /// Fails when a field is zero (a layout no tier can store).
    pub fn validate(&self) -> Result<()> {
        if self.layers == 0 || self.kv_heads == 0 || self.row_bytes == 0 || self.extent_slots == 0 {
            return Err(KernelError::Shape(format!(
                "RowLayout with a zero field: {self:?}"
            )));
        }
        Ok(())
    }

    /// Byte offset of row (`slot`, `layer`, `head`) from the start of the tier.
    pub fn offset(&self, slot: u32, layer: usize, head: usize) -> usize {
        let slot = slot as usize;
        let (extent, within) = (slot / self.extent_slots, slot % self.extent_slots);
        extent * self.extent_bytes()
            + ((layer * self.kv_heads + head) * self.extent_slots + within) * self.row_bytes
    }
}

/// Storage for KV rows addressed by slot.
///
/// Writes and reads may be issued from one thread at a time (`&mut self` for writes); a read
/// must see every write that returned before it.
pub trait KvTier: Send + Sync {
    /// The row shape.
    fn layout(&self) -> &RowLayout;
    /// Slots the tier can address now.
    fn capacity(&self) -> usize;
    /// Grows the tier to address at least `slots` slots (whole extents). Never shrinks.
    fn grow(&mut self, slots: usize) -> Result<()>;
    /// Writes layer `layer`'s rows of one token: `data` is `kv_heads * row_bytes` bytes, head
    /// after head.
    fn write(&mut self, layer: usize, slot: u32, data: &[u8]) -> Result<()>;
    /// Reads the rows of (`layer`, `head`) for `slots` into `out` (`slots.len() * row_bytes`
    /// bytes, in the order given).
    fn read(&self, layer: usize, head: usize, slots: &[u32], out: &mut [u8]) -> Result<()>;
    /// [`Self::read`] for several heads of one layer: `(head, slots, out)` each. Tiers that
    /// pay a round trip per read (the disk) do them in one.
    fn read_heads(&self, layer: usize, reqs: &mut [(usize, &[u32], &mut [u8])]) -> Result<()> {
        for (head, slots, out) in reqs.iter_mut() {
            self.read(layer, *head, slots, out)?;
        }
        Ok(())
    }
    /// Bytes the tier holds (allocated memory or file size).
    fn bytes(&self) -> usize;
    /// Short description for reports (`host`, `disk:/path (io_uring)`).
    fn describe(&self) -> String;
    /// Whether reads are memory copies (a row cache in front would only duplicate them).
    fn in_memory(&self) -> bool {
        true
    }
}

/// Checks a [`KvTier::write`] call against the layout and the capacity.
pub(crate) fn check_write(
    layout: &RowLayout,
    capacity: usize,
    layer: usize,
    slot: u32,
    data: &[u8],
) -> Result<()> {
    if layer >= layout.layers || slot as usize >= capacity {
        return Err(KernelError::Shape(format!(
            "KV tier write: layer {layer} slot {slot} outside {} layers x {capacity} slots",
            layout.layers
        )));
    }
    if data.len() != layout.token_layer_bytes() {
        return Err(KernelError::Shape(format!(
            "KV tier write: {} bytes for one token and layer, expected {} ({} heads x {} bytes)",
            data.len(),
            layout.token_layer_bytes(),
            layout.kv_heads,
            layout.row_bytes
        )));
    }
    Ok(())
}

/// Checks a [`KvTier::read`] call against the layout and the capacity.
pub(crate) fn check_read(
    layout: &RowLayout,
    capacity: usize,
    layer: usize,
    head: usize,
    slots: &[u32],
    out: &[u8],
) -> Result<()> {
    if layer >= layout.layers || head >= layout.kv_heads {
        return Err(KernelError::Shape(format!(
            "KV tier read: layer {layer} head {head} outside {} layers x {} heads",
            layout.layers, layout.kv_heads
        )));
    }
    if out.len() != slots.len() * layout.row_bytes {
        return Err(KernelError::Shape(format!(
            "KV tier read: {} bytes of output for {} rows of {} bytes",
            out.len(),
            slots.len(),
            layout.row_bytes
        )));
    }
    if let Some(&bad) = slots.iter().find(|&&s| s as usize >= capacity) {
        return Err(KernelError::Shape(format!(
            "KV tier read: slot {bad} outside the {capacity} slots the tier holds"
        )));
    }
    Ok(())
}

/// A run of requested rows that are contiguous in the tier: `slots[first .. first + len]` are
/// consecutive slot numbers inside one extent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SlotRun {
    /// Index into the requested `slots` (and, times `row_bytes`, into the output).
    pub first: usize,
    /// Rows in the run.
    pub len: usize,
}

/// Splits `slots` into maximal runs of consecutive slots within one extent (in request order).
pub(crate) fn slot_runs(slots: &[u32], extent_slots: usize) -> impl Iterator<Item = SlotRun> + '_ {
    let mut first = 0;
    std::iter::from_fn(move || {
        if first >= slots.len() {
            return None;
        }
        let start = first;
        let mut end = start + 1;
        while end < slots.len()
            && slots[end] as usize == slots[end - 1] as usize + 1
            && slots[end] as usize / extent_slots == slots[start] as usize / extent_slots
        {
            end += 1;
        }
        first = end;
        Some(SlotRun {
            first: start,
            len: end - start,
        })
    })
}

/// Where a KV store keeps its rows, as given on the command line: `host` or `disk:PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvStoreSpec {
    /// Host memory ([`HostKvTier`]).
    Host,
    /// A file at PATH, or in PATH if it is a directory ([`DiskKvTier`]).
    Disk(PathBuf),
}

/// A KV store spec that is neither `host` nor `disk:PATH`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown KV store `{0}`: expected `host` or `disk:PATH` (e.g. `disk:/mnt/nvme/kv`)")]
pub struct ParseKvStoreSpecError(pub String);

impl FromStr for KvStoreSpec {
    type Err = ParseKvStoreSpecError;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.split_once(':') {
            None if s == "host" => Ok(KvStoreSpec::Host),
            Some(("disk", path)) if !path.is_empty() => Ok(KvStoreSpec::Disk(PathBuf::from(path))),
            _ => Err(ParseKvStoreSpecError(s.to_string())),
        }
    }
}

impl std::fmt::Display for KvStoreSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvStoreSpec::Host => write!(f, "host"),
            KvStoreSpec::Disk(path) => write!(f, "disk:{}", path.display()),
        }
    }
}

impl KvStoreSpec {
    /// Opens an empty tier of this kind for rows of `layout`.
    pub fn open(&self, layout: RowLayout) -> Result<Box<dyn KvTier>> {
        layout.validate()?;
        match self {
            KvStoreSpec::Host => Ok(Box::new(HostKvTier::new(layout))),
            #[cfg(target_os = "linux")]
            KvStoreSpec::Disk(path) => Ok(Box::new(DiskKvTier::create(path, layout)?)),
            #[cfg(not(target_os = "linux"))]
            KvStoreSpec::Disk(path) => Err(KernelError::Device(format!(
                "the disk KV tier ({}) needs Linux (O_DIRECT, io_uring)",
                path.display()
            ))),
        }
    }
}
