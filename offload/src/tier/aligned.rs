//! Page-aligned, zeroed byte buffers: host tier extents and the disk tier's O_DIRECT buffers.
//!
//! All of this module's `unsafe` is here. On a CUDA machine the host extents will become pinned
//! allocations: [`AlignedBuf::zeroed`] is the one place to swap.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Alignment of every buffer: a page, which is also every O_DIRECT block size in use.
pub const ALIGN: usize = 4096;

/// A zeroed heap buffer aligned to [`ALIGN`], fixed size, freed on drop.
pub struct AlignedBuf {
    /// Start of the allocation; valid for `len` bytes (dangling and unused when `len == 0`).
    ptr: NonNull<u8>,
    /// Bytes usable; the allocation is exactly `len` bytes at [`ALIGN`].
    len: usize,
}

// SAFETY: the buffer is uniquely owned memory with no thread affinity; shared access only hands
// out `&[u8]`, mutation needs `&mut self`.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes, or `None` when the allocator refuses (or `len` is too
    /// large for a `Layout`).
    pub fn zeroed(len: usize) -> Option<AlignedBuf> {
        if len == 0 {
            return Some(AlignedBuf {
                ptr: NonNull::dangling(),
                len: 0,
            });
        }
        let layout = Layout::from_size_align(len, ALIGN).ok()?;
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        NonNull::new(ptr).map(|ptr| AlignedBuf { ptr, len })
    }

    /// Bytes in the buffer.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` initialised (zeroed at allocation) bytes, or dangling
        // and aligned with `len == 0`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: allocated in `zeroed` with exactly this layout (it was valid then).
            unsafe {
                alloc::dealloc(
                    self.ptr.as_ptr(),
                    Layout::from_size_align_unchecked(self.len, ALIGN),
                )
            };
        }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_zeroed() {
        for len in [0, 1, 4096, 10_000] {
            let b = AlignedBuf::zeroed(len).unwrap();
            assert_eq!(b.len(), len);
            if len > 0 {
                assert_eq!(b.as_slice().as_ptr() as usize % ALIGN, 0);
            }
            assert!(b.as_slice().iter().all(|&x| x == 0));
        }
    }
}
