//! The label cache: for every (layer, KV head) and token slot, the post-RoPE key restricted to
//! the head's label channels - the only per-token state that sparse selection reads for every
//! token. f16 values, or 4-bit codes with a per-row minimum and scale (the Double Sparsity
//! paper's finding: 4-bit labels with twice the channels beat 16-bit ones at equal bytes).
//!
//! Scoring is linear in the query, so the group's query heads are summed first and each token
//! costs one `r`-long dot product per KV head.

use half::f16;

use super::config::LabelBits;

/// Labels of every token slot for every (layer, KV head).
pub struct LabelCache {
    bits: LabelBits,
    /// Channels per label (`r`).
    r: usize,
    kv_heads: usize,
    /// Bytes per slot in one (layer, head) table.
    stride: usize,
    /// `tables[layer * kv_heads + head]`: `capacity * stride` bytes.
    tables: Vec<Vec<u8>>,
    /// Slots every table can hold.
    capacity: usize,
}

impl LabelCache {
    /// An empty cache of `r`-channel labels.
    pub fn new(layers: usize, kv_heads: usize, r: usize, bits: LabelBits) -> LabelCache {
        let stride = match bits {
            LabelBits::B16 => 2 * r,
            // f16 minimum, f16 scale, then two codes per byte.
            LabelBits::B4 => 4 + r.div_ceil(2),
        };
        LabelCache {
            bits,
            r,
            kv_heads,
            stride,
            tables: vec![Vec::new(); layers * kv_heads],
            capacity: 0,
        }
    }

    /// Channels per label.
    pub fn channels(&self) -> usize {
        self.r
    }

    /// Makes room for slots `0 .. slots`.
    pub fn grow(&mut self, slots: usize) {
        self.grow_capped(slots, usize::MAX);
    }

    /// Makes room for slots `0 .. slots`, growing (doubling) to at most `limit` slots.
    pub fn grow_capped(&mut self, slots: usize, limit: usize) {
        if slots > self.capacity {
            let cap = slots.max((self.capacity * 2).max(64).min(limit));
            for t in &mut self.tables {
                t.resize(cap * self.stride, 0);
            }
            self.capacity = cap;
        }
    }

    /// Stores the label of `slot` in (`layer`, `head`): `values` holds the `r` channel values.
    pub fn write(&mut self, layer: usize, head: usize, slot: u32, values: &[f32]) {
        assert_eq!(
            values.len(),
            self.r,
            "label of {} channels, cache has {}",
            values.len(),
            self.r
        );
        assert!(
            (slot as usize) < self.capacity,
            "label slot {slot} past capacity {}",
            self.capacity
        );
        let row = &mut self.tables[layer * self.kv_heads + head][slot as usize * self.stride..]
            [..self.stride];
        match self.bits {
            LabelBits::B16 => {
                for (c, &v) in values.iter().enumerate() {
                    row[2 * c..2 * c + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
                }
            }
            LabelBits::B4 => {
                let lo = values.iter().cloned().fold(f32::INFINITY, f32::min);
                let hi = values.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let lo16 = f16::from_f32(lo);
                let scale16 = f16::from_f32((hi - lo) / 15.0);
                let (lo, scale) = (lo16.to_f32(), scale16.to_f32());
                row[0..2].copy_from_slice(&lo16.to_le_bytes());
                row[2..4].copy_from_slice(&scale16.to_le_bytes());
                row[4..].fill(0);
                for (c, &v) in values.iter().enumerate() {
                    let q = if scale > 0.0 {
                        ((v - lo) / scale).round().clamp(0.0, 15.0) as u8
                    } else {
                        0
                    };
                    row[4 + c / 2] |= q << (4 * (c % 2));
                }
            }
        }
    }

    /// The stored (dequantised) label of `slot`.
    pub fn read(&self, layer: usize, head: usize, slot: u32) -> Vec<f32> {
        let row = &self.tables[layer * self.kv_heads + head][slot as usize * self.stride..]
            [..self.stride];
        match self.bits {
            LabelBits::B16 => (0..self.r)
                .map(|c| f16::from_le_bytes([row[2 * c], row[2 * c + 1]]).to_f32())
                .collect(),
            LabelBits::B4 => {
                let lo = f16::from_le_bytes([row[0], row[1]]).to_f32();
                let scale = f16::from_le_bytes([row[2], row[3]]).to_f32();
                (0..self.r)
                    .map(|c| lo + scale * ((row[4 + c / 2] >> (4 * (c % 2))) & 15) as f32)
                    .collect()
            }
        }
    }

    /// The stored bytes of `slot`'s label: f16 values (little-endian), or for 4-bit labels the
    /// f16 minimum, the f16 scale, then `ceil(r / 2)` bytes of codes (channel `2j` in the low
    /// nibble of byte `j`). The GPU store keeps the same bytes (`kernels/labels.cu`).
    pub fn row_bytes(&self, layer: usize, head: usize, slot: u32) -> &[u8] {
        &self.tables[layer * self.kv_heads + head][slot as usize * self.stride..][..self.stride]
    }

    /// `out[i] = q . label(slots[i])` in (`layer`, `head`), `q` holding `r` values.
    pub fn score(&self, layer: usize, head: usize, q: &[f32], slots: &[u32], out: &mut Vec<f32>) {
        assert_eq!(q.len(), self.r);
        let table = &self.tables[layer * self.kv_heads + head];
        out.clear();
        out.reserve(slots.len());
        match self.bits {
            LabelBits::B16 => {
                let r = self.r;
                for &s in slots {
                    let row = &table[s as usize * self.stride..][..self.stride];
                    let mut acc = 0.0f32;
                    for c in 0..r {
                        acc += q[c] * f16::from_le_bytes([row[2 * c], row[2 * c + 1]]).to_f32();
                    }
                    out.push(acc);
                }
            }
            LabelBits::B4 => {
                let qsum: f32 = q.iter().sum();
                for &s in slots {
                    let row = &table[s as usize * self.stride..][..self.stride];
                    let lo = f16::from_le_bytes([row[0], row[1]]).to_f32();
                    let scale = f16::from_le_bytes([row[2], row[3]]).to_f32();
                    let mut acc = 0.0f32;
                    for (c, &qc) in q.iter().enumerate() {
                        acc += qc * ((row[4 + c / 2] >> (4 * (c % 2))) & 15) as f32;
                    }
                    out.push(lo * qsum + scale * acc);
                }
            }
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.tables.len() * self.capacity * self.stride
    }

    /// Bytes per token (every layer and KV head).
    pub fn bytes_per_token(&self) -> usize {
        self.tables.len() * self.stride
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_labels_round_trip_and_score() {
        let mut c = LabelCache::new(2, 3, 4, LabelBits::B16);
        c.grow(10);
        c.write(1, 2, 7, &[1.0, -2.0, 0.5, 3.0]);
        assert_eq!(c.read(1, 2, 7), vec![1.0, -2.0, 0.5, 3.0]);
        let mut out = Vec::new();
        c.score(1, 2, &[1.0, 1.0, 2.0, 0.0], &[7, 0], &mut out);
        assert_eq!(out, vec![0.0, 0.0]);
        c.score(1, 2, &[1.0, 0.0, 0.0, 1.0], &[7], &mut out);
        assert_eq!(out, vec![4.0]);
    }

    #[test]
    fn four_bit_labels_are_within_half_a_step() {
        let mut c = LabelCache::new(1, 1, 7, LabelBits::B4);
        c.grow(3);
        let v = [0.3, -1.7, 2.2, 0.0, 1.1, -0.4, 0.9];
        c.write(0, 0, 2, &v);
        let back = c.read(0, 0, 2);
        let step = (2.2 - -1.7) / 15.0;
        for (a, b) in v.iter().zip(&back) {
            assert!((a - b).abs() <= step * 0.51 + 1e-3, "{a} vs {b}");
        }
        let q = [0.5, -1.0, 2.0, 1.0, 0.0, 3.0, -2.0];
        let mut out = Vec::new();
        c.score(0, 0, &q, &[2], &mut out);
        let want: f32 = q.iter().zip(&back).map(|(a, b)| a * b).sum();
        assert!((out[0] - want).abs() < 1e-3, "{} vs {want}", out[0]);
        // A constant row has zero scale and stays exact.
        c.write(0, 0, 1, &[0.25; 7]);
        assert_eq!(c.read(0, 0, 1), vec![0.25; 7]);
    }

    #[test]
    fn four_bit_row_bytes_layout() {
        // lo 0, hi 15: scale 1, codes = the values (halves rounded away from zero).
        let mut c = LabelCache::new(1, 1, 5, LabelBits::B4);
        c.grow(1);
        c.write(0, 0, 0, &[0.0, 15.0, 2.5, 7.49, 0.5]);
        let row = c.row_bytes(0, 0, 0);
        assert_eq!(row.len(), 4 + 3);
        assert_eq!(&row[0..2], &f16::from_f32(0.0).to_le_bytes());
        assert_eq!(&row[2..4], &f16::from_f32(1.0).to_le_bytes());
        assert_eq!(&row[4..], &[0xf0, 0x73, 0x01]);
        let mut f = LabelCache::new(1, 1, 2, LabelBits::B16);
        f.grow(1);
        f.write(0, 0, 0, &[1.0, -2.0]);
        assert_eq!(f.row_bytes(0, 0, 0), &[0x00, 0x3c, 0x00, 0xc0]);
    }

    #[test]
    fn growth_keeps_labels() {
        let mut c = LabelCache::new(1, 2, 2, LabelBits::B16);
        c.grow(1);
        c.write(0, 1, 0, &[5.0, 6.0]);
        c.grow(1000);
        assert_eq!(c.read(0, 1, 0), vec![5.0, 6.0]);
        assert_eq!(c.bytes_per_token(), 2 * 2 * 2);
    }
}
