//! A stand-in host tier (one growable buffer) used until the extent-based host tier lands.

use farsight_kernels::Result;

use super::{KvTier, RowLayout};

/// Rows in one `Vec<u8>`, laid out as [`RowLayout::offset`] says.
pub struct PlainTier {
    layout: RowLayout,
    data: Vec<u8>,
    capacity: usize,
}

impl PlainTier {
    pub fn new(layout: RowLayout) -> PlainTier {
        PlainTier { layout, data: Vec::new(), capacity: 0 }
    }
}

impl KvTier for PlainTier {
    fn layout(&self) -> &RowLayout {
        &self.layout
    }
    fn capacity(&self) -> usize {
        self.capacity
    }
    fn grow(&mut self, slots: usize) -> Result<()> {
        if slots > self.capacity {
            let extents = slots.div_ceil(self.layout.extent_slots);
            self.capacity = extents * self.layout.extent_slots;
            self.data.resize(extents * self.layout.extent_bytes(), 0);
        }
        Ok(())
    }
    fn write(&mut self, layer: usize, slot: u32, data: &[u8]) -> Result<()> {
        let rb = self.layout.row_bytes;
        assert_eq!(data.len(), self.layout.kv_heads * rb);
        for h in 0..self.layout.kv_heads {
            let at = self.layout.offset(slot, layer, h);
            self.data[at..at + rb].copy_from_slice(&data[h * rb..(h + 1) * rb]);
        }
        Ok(())
    }
    fn read(&self, layer: usize, head: usize, slots: &[u32], out: &mut [u8]) -> Result<()> {
        let rb = self.layout.row_bytes;
        for (i, &s) in slots.iter().enumerate() {
            let at = self.layout.offset(s, layer, head);
            out[i * rb..(i + 1) * rb].copy_from_slice(&self.data[at..at + rb]);
        }
        Ok(())
    }
    fn bytes(&self) -> usize {
        self.data.len()
    }
    fn describe(&self) -> String {
        "host".into()
    }
}
