//! KV rows in host memory.
//!
//! Each extent is its own page-aligned allocation ([`alloc_extent`]), so growing never moves the
//! rows already stored (a reader's pointers and later pinned registrations stay valid). A read is
//! a memcpy gather; a run of consecutive slots within one extent is one copy.

use farsight_kernels::{KernelError, Result};

use super::aligned::AlignedBuf;
use super::{check_read, check_write, slot_runs, KvTier, RowLayout};

/// KV rows in host memory, one allocation per extent.
#[derive(Debug)]
pub struct HostKvTier {
    layout: RowLayout,
    /// `extents[e]` holds slots `e * extent_slots ..`; each is `layout.extent_bytes()` long.
    extents: Vec<AlignedBuf>,
}

/// Allocates one extent's zeroed, aligned memory (the place to swap in pinned host memory).
fn alloc_extent(bytes: usize) -> Result<AlignedBuf> {
    AlignedBuf::zeroed(bytes).ok_or_else(|| KernelError::OutOfMemory {
        device: "host".into(),
        what: format!("KV tier extent of {bytes} bytes"),
    })
}

impl HostKvTier {
    /// An empty tier (no extent allocated until [`KvTier::grow`]).
    ///
    /// # Panics
    /// When a field of `layout` is zero.
    pub fn new(layout: RowLayout) -> HostKvTier {
        if let Err(e) = layout.validate() {
            panic!("HostKvTier::new: {e}");
        }
        HostKvTier {
            layout,
            extents: Vec::new(),
        }
    }

    /// Byte offset of row (`slot`, `layer`, `head`) inside its extent, and the extent index.
    fn locate(&self, slot: u32, layer: usize, head: usize) -> (usize, usize) {
        let extent_bytes = self.layout.extent_bytes();
        let at = self.layout.offset(slot, layer, head);
        (at / extent_bytes, at % extent_bytes)
    }
}

impl KvTier for HostKvTier {
    fn layout(&self) -> &RowLayout {
        &self.layout
    }

    fn capacity(&self) -> usize {
        self.extents.len() * self.layout.extent_slots
    }

    fn grow(&mut self, slots: usize) -> Result<()> {
        let extents = slots.div_ceil(self.layout.extent_slots);
        while self.extents.len() < extents {
            self.extents.push(alloc_extent(self.layout.extent_bytes())?);
        }
        Ok(())
    }

    fn write(&mut self, layer: usize, slot: u32, data: &[u8]) -> Result<()> {
        check_write(&self.layout, self.capacity(), layer, slot, data)?;
        let row = self.layout.row_bytes;
        for (head, src) in data.chunks_exact(row).enumerate() {
            let (extent, at) = self.locate(slot, layer, head);
            self.extents[extent].as_mut_slice()[at..at + row].copy_from_slice(src);
        }
        Ok(())
    }

    fn read(&self, layer: usize, head: usize, slots: &[u32], out: &mut [u8]) -> Result<()> {
        check_read(&self.layout, self.capacity(), layer, head, slots, out)?;
        let row = self.layout.row_bytes;
        for run in slot_runs(slots, self.layout.extent_slots) {
            let (extent, at) = self.locate(slots[run.first], layer, head);
            let bytes = run.len * row;
            out[run.first * row..][..bytes]
                .copy_from_slice(&self.extents[extent].as_slice()[at..at + bytes]);
        }
        Ok(())
    }

    fn bytes(&self) -> usize {
        self.extents.len() * self.layout.extent_bytes()
    }

    fn describe(&self) -> String {
        "host".into()
    }
}
