//! The plain KV cache: per layer, one K and one V buffer of `capacity x kv_width` rows in
//! backend memory, grown geometrically (so appending `T` tokens one by one costs `O(T)` copies).

use farsight_kernels::{Backend, CausalAttn, DType, KernelError, Result};

use crate::KvStore;

/// Dense per-layer K/V rows in backend memory.
pub struct DenseKvCache<B: Backend> {
    /// `layers[l] = (K, V)`; both `capacity x kv_width` in `dtype`.
    layers: Vec<(B::Cache, B::Cache)>,
    /// Committed tokens; rows `len..capacity` are scratch until committed.
    len: usize,
    /// Rows every layer's buffers can hold.
    capacity: usize,
    kv_width: usize,
    dtype: DType,
    /// Largest capacity ever allowed (the model's context length).
    max_tokens: usize,
}

impl<B: Backend> DenseKvCache<B> {
    /// An empty cache for `layers` layers of `kv_width` values per token (K and V each), able to
    /// grow to `max_tokens` tokens.
    pub fn new(
        backend: &B,
        layers: usize,
        kv_width: usize,
        dtype: DType,
        max_tokens: usize,
    ) -> Result<Self> {
        let capacity = 64.min(max_tokens.max(1));
        let layers = (0..layers)
            .map(|_| {
                Ok((
                    backend.cache(capacity, kv_width, dtype)?,
                    backend.cache(capacity, kv_width, dtype)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DenseKvCache {
            layers,
            len: 0,
            capacity,
            kv_width,
            dtype,
            max_tokens,
        })
    }

    /// The KV element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Layer `layer`'s K and V buffers (rows `0 .. len()` committed).
    pub fn layer(&self, layer: usize) -> (&B::Cache, &B::Cache) {
        let (k, v) = &self.layers[layer];
        (k, v)
    }
}

impl<B: Backend> KvStore<B> for DenseKvCache<B> {
    fn len(&self) -> usize {
        self.len
    }

    fn reserve(&mut self, backend: &B, n: usize) -> Result<()> {
        let need = self.len + n;
        if need > self.max_tokens {
            return Err(KernelError::Shape(format!(
                "KV cache holds at most {} tokens; {} requested",
                self.max_tokens, need
            )));
        }
        if need > self.capacity {
            let cap = need.max(self.capacity * 2).min(self.max_tokens);
            for (k, v) in &mut self.layers {
                backend.cache_grow(k, cap)?;
                backend.cache_grow(v, cap)?;
            }
            self.capacity = cap;
        }
        Ok(())
    }

    fn write(
        &mut self,
        backend: &B,
        layer: usize,
        src: &B::Tensor,
        src_row0: usize,
        k_col0: usize,
        v_col0: usize,
        n: usize,
    ) -> Result<()> {
        if self.len + n > self.capacity {
            return Err(KernelError::Shape(format!(
                "write of {n} rows after {} without reserve (capacity {})",
                self.len, self.capacity
            )));
        }
        let (k, v) = &mut self.layers[layer];
        backend.cache_write(k, self.len, src, src_row0, k_col0, n)?;
        backend.cache_write(v, self.len, src, src_row0, v_col0, n)?;
        Ok(())
    }

    fn commit(&mut self, n: usize) {
        assert!(
            self.len + n <= self.capacity,
            "commit past the reserved rows"
        );
        self.len += n;
    }

    fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    fn attend(
        &self,
        backend: &B,
        layer: usize,
        args: &CausalAttn,
        q: &B::Tensor,
        out: &mut B::Tensor,
    ) -> Result<()> {
        if args.n_past != self.len {
            return Err(KernelError::Shape(format!(
                "attention after {} tokens, cache holds {}",
                args.n_past, self.len
            )));
        }
        let (k, v) = &self.layers[layer];
        backend.attention(args, q, k, v, out)
    }

    fn bytes(&self) -> usize {
        self.layers.len() * 2 * self.capacity * self.kv_width * self.dtype.size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use farsight_kernels::cpu::CpuBackend;

    #[test]
    fn grows_keeps_rows_and_refuses_past_max() {
        let be = CpuBackend::new(1).unwrap();
        let mut c = DenseKvCache::new(&be, 2, 2, DType::F32, 200).unwrap();
        let mut src = be.tensor(100, 4).unwrap();
        for (i, x) in src.data.iter_mut().enumerate() {
            *x = i as f32;
        }
        c.reserve(&be, 100).unwrap();
        for l in 0..2 {
            c.write(&be, l, &src, 0, 0, 2, 100).unwrap();
        }
        c.commit(100);
        c.reserve(&be, 50).unwrap();
        let (k, v) = c.layer(1);
        assert!(k.capacity >= 150);
        match (&k.data, &v.data) {
            (farsight_kernels::cpu::Store::F32(k), farsight_kernels::cpu::Store::F32(v)) => {
                assert_eq!(&k[198..200], &[396.0, 397.0]); // row 99, K columns 0..2
                assert_eq!(&v[198..200], &[398.0, 399.0]); // row 99, V columns 2..4
            }
            _ => panic!("f32 cache expected"),
        }
        assert!(c.reserve(&be, 101).is_err());
        c.truncate(10);
        assert_eq!(c.len(), 10);
    }
}
