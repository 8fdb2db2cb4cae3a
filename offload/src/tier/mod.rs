//! Tiers that hold KV rows off the compute device: host memory and disk.
//!
//! **Row granularity.** A row is one (layer, token, KV head): that head's K then V
//! (`2 * head_dim` elements of the KV dtype). Double Sparsity selects tokens per KV head, so a
//! fetched row is entirely useful; a row per (layer, token) holding every head would move up to
//! `kv_heads` times the bytes a GQA selection needs.
//!
//! **Slots.** A token owns one slot (from [`crate::SlotPool`]) for its whole life; the slot
//! addresses that token's rows in every (layer, head). Freeing a token frees all of them at once
//! (what eviction needs).
//!
//! **Layout.** Storage grows in extents of [`RowLayout::extent_slots`] slots. Inside an extent,
//! rows are grouped by (layer, head) and then by slot, so consecutive tokens of one (layer, head)
//! are contiguous: a recent window, a sink block or a cluster of selected tokens is one run of
//! bytes (what disk reads and PCIe gathers want).

mod plain;

pub use plain::PlainTier;

use farsight_kernels::Result;

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
    /// Bytes the tier holds (allocated memory or file size).
    fn bytes(&self) -> usize;
    /// Short description for reports (`host`, `disk:/path (io_uring)`).
    fn describe(&self) -> String;
}
