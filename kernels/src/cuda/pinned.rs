//! Page-locked host memory the GPU reads directly (UVA zero-copy): the offloaded KV slabs.
//!
//! Two ways to get it. `cuMemHostAlloc` (PORTABLE | DEVICEMAP, never write-combined: the CPU reads
//! it too) hands out 4 KiB pages. The alternative maps anonymous memory backed by 2 MiB pages
//! (`MAP_HUGETLB` where the kernel has huge pages reserved, else transparent huge pages asked for
//! with `madvise(MADV_HUGEPAGE)`) and registers it with `cuMemHostRegister` (PORTABLE |
//! DEVICEMAP). A random-row gather touches thousands of distinct pages per layer and step, so
//! the page size sets how much address translation it costs. `FARSIGHT_HOST_PAGES=huge|cuda`
//! picks (see [`HostPages::from_env`]); `huge` falls back to `cuMemHostAlloc` where the mapping
//! or the registration fails.

use std::sync::Arc;

use cudarc::driver::sys::{CUresult, CU_MEMHOSTREGISTER_DEVICEMAP, CU_MEMHOSTREGISTER_PORTABLE};
use cudarc::driver::{CudaContext, PinnedHostSlice};

use super::{dev_err, CudaBackend};
use crate::backend::Result;

const HUGE: usize = 2 << 20;

/// How pinned host slabs are allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostPages {
    /// `cuMemHostAlloc`: 4 KiB pages.
    Cuda,
    /// Anonymous memory on 2 MiB pages, registered with the driver.
    Huge,
}

impl HostPages {
    /// `FARSIGHT_HOST_PAGES=cuda|huge` (default `huge`).
    pub fn from_env() -> HostPages {
        match std::env::var("FARSIGHT_HOST_PAGES").as_deref() {
            Ok("cuda") => HostPages::Cuda,
            _ => HostPages::Huge,
        }
    }
}

/// What backs a [`PinnedBuf`] (reported by benchmarks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinnedKind {
    /// `cuMemHostAlloc`.
    Cuda,
    /// `MAP_HUGETLB` pages, registered.
    HugeTlb,
    /// Transparent huge pages (`MADV_HUGEPAGE`), registered; the kernel may still back parts of
    /// it with 4 KiB pages (see `AnonHugePages` in /proc/meminfo).
    Thp,
}

impl PinnedKind {
    pub fn name(self) -> &'static str {
        match self {
            PinnedKind::Cuda => "cuMemHostAlloc",
            PinnedKind::HugeTlb => "hugetlb+register",
            PinnedKind::Thp => "thp+register",
        }
    }
}

/// An anonymous mapping registered with the driver; unregistered and unmapped on drop.
struct Registered {
    ctx: Arc<CudaContext>,
    /// Start of the mapping (what munmap takes).
    map: *mut u8,
    map_len: usize,
    /// The 2 MiB-aligned start handed out.
    ptr: *mut u8,
    /// The address kernels use.
    dptr: u64,
}

// The mapping is plain memory owned by this value; the raw pointers are not shared elsewhere.
unsafe impl Send for Registered {}
unsafe impl Sync for Registered {}

impl Drop for Registered {
    fn drop(&mut self) {
        // Errors cannot be reported from drop; the mapping is released either way.
        let _ = self.ctx.bind_to_thread();
        unsafe {
            let _ = cudarc::driver::sys::cuMemHostUnregister(self.ptr.cast());
            libc::munmap(self.map.cast(), self.map_len);
        }
    }
}

enum Mem {
    Cuda(PinnedHostSlice<u8>),
    Registered(Registered),
}

/// Page-locked host memory mapped for the device: with UVA its address is usable by kernels as
/// is.
pub struct PinnedBuf {
    mem: Mem,
    len: usize,
    kind: PinnedKind,
}

impl PinnedBuf {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn kind(&self) -> PinnedKind {
        self.kind
    }
    /// The bytes, for the host to fill or read. The caller orders this against device work that
    /// reads the buffer (kernels read it through its address, which no event tracks).
    pub fn as_mut_slice(&mut self) -> Result<&mut [u8]> {
        match &mut self.mem {
            Mem::Cuda(s) => s.as_mut_slice().map_err(|e| dev_err("pinned buffer", e)),
            Mem::Registered(r) => Ok(unsafe { std::slice::from_raw_parts_mut(r.ptr, self.len) }),
        }
    }
    /// The address kernels read it at (UVA: the host address).
    pub fn ptr(&self) -> Result<u64> {
        match &self.mem {
            Mem::Cuda(s) => Ok(s.as_ptr().map_err(|e| dev_err("pinned buffer", e))? as u64),
            Mem::Registered(r) => Ok(r.dptr),
        }
    }
}

/// Maps `len` bytes (a multiple of 2 MiB) on huge pages: `MAP_HUGETLB` if the kernel has them
/// reserved, else an aligned anonymous mapping with `MADV_HUGEPAGE`. Returns (map, map_len,
/// aligned start, kind), or `None` where neither works.
fn map_huge(len: usize) -> Option<(*mut u8, usize, *mut u8, PinnedKind)> {
    use libc::{MAP_ANONYMOUS, MAP_FAILED, MAP_HUGETLB, MAP_PRIVATE, PROT_READ, PROT_WRITE};
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            PROT_READ | PROT_WRITE,
            MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB,
            -1,
            0,
        );
        if p != MAP_FAILED {
            return Some((p.cast(), len, p.cast(), PinnedKind::HugeTlb));
        }
        let map_len = len + HUGE;
        let p = libc::mmap(
            std::ptr::null_mut(),
            map_len,
            PROT_READ | PROT_WRITE,
            MAP_PRIVATE | MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == MAP_FAILED {
            return None;
        }
        let start = (p as usize).next_multiple_of(HUGE) as *mut u8;
        if libc::madvise(start.cast(), len, libc::MADV_HUGEPAGE) != 0 {
            libc::munmap(p, map_len);
            return None;
        }
        // First touch of each 2 MiB-aligned range faults in one huge page where THP allows.
        let mut off = 0;
        while off < len {
            start.add(off).write_volatile(0);
            off += HUGE;
        }
        Some((p.cast(), map_len, start, PinnedKind::Thp))
    }
}

impl CudaBackend {
    /// `bytes` of pinned host memory, PORTABLE | DEVICEMAP (not write-combined), on the pages
    /// [`HostPages::from_env`] asks for.
    pub fn pinned(&self, bytes: usize) -> Result<PinnedBuf> {
        self.pinned_with(bytes, HostPages::from_env())
    }

    /// As [`CudaBackend::pinned`] with the page kind given.
    pub fn pinned_with(&self, bytes: usize, pages: HostPages) -> Result<PinnedBuf> {
        let bytes = bytes.max(1);
        if pages == HostPages::Huge {
            if let Some(b) = self.pinned_huge(bytes)? {
                return Ok(b);
            }
        }
        use cudarc::driver::sys::{CU_MEMHOSTALLOC_DEVICEMAP, CU_MEMHOSTALLOC_PORTABLE};
        let data = unsafe {
            self.ctx.alloc_pinned_with_flags::<u8>(
                bytes,
                CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP,
            )
        }
        .map_err(|e| self.alloc_err(e, "pinned host buffer", bytes))?;
        Ok(PinnedBuf {
            mem: Mem::Cuda(data),
            len: bytes,
            kind: PinnedKind::Cuda,
        })
    }

    /// Huge-page memory registered with the driver, or `None` where the mapping or the
    /// registration is refused (the caller falls back to `cuMemHostAlloc`).
    fn pinned_huge(&self, bytes: usize) -> Result<Option<PinnedBuf>> {
        let len = bytes.next_multiple_of(HUGE);
        let Some((map, map_len, ptr, kind)) = map_huge(len) else {
            return Ok(None);
        };
        self.ctx
            .bind_to_thread()
            .map_err(|e| dev_err("bind context", e))?;
        let flags = CU_MEMHOSTREGISTER_PORTABLE | CU_MEMHOSTREGISTER_DEVICEMAP;
        let rc = unsafe { cudarc::driver::sys::cuMemHostRegister_v2(ptr.cast(), len, flags) };
        if rc != CUresult::CUDA_SUCCESS {
            unsafe { libc::munmap(map.cast(), map_len) };
            return Ok(None);
        }
        // With unified addressing the device address is the host address; ask rather than assume.
        let mut dptr = 0;
        let rc =
            unsafe { cudarc::driver::sys::cuMemHostGetDevicePointer_v2(&mut dptr, ptr.cast(), 0) };
        let reg = Registered {
            ctx: self.ctx.clone(),
            map,
            map_len,
            ptr,
            dptr,
        };
        if rc != CUresult::CUDA_SUCCESS {
            return Err(dev_err(
                "cuMemHostGetDevicePointer",
                cudarc::driver::DriverError(rc),
            ));
        }
        Ok(Some(PinnedBuf {
            mem: Mem::Registered(reg),
            len: bytes,
            kind,
        }))
    }
}
