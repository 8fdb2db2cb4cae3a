//! KV rows in one file, read with O_DIRECT through io_uring.
//!
//! **File.** `disk:PATH` names the file, or a directory to create a uniquely named file in. The
//! file must not exist (an existing file is never overwritten), is created with the tier and
//! removed when the tier is dropped (a crash leaves it behind). Its length is always whole
//! extents rounded up to the block ([`ALIGN`]); [`KvTier::grow`] preallocates with `fallocate`
//! (`ftruncate` where unsupported) so a full disk shows up when the tier grows, as an error that
//! says so.
//!
//! **O_DIRECT** (set with `fcntl` after creating the file) keeps the rows out of the page cache:
//! the tier exists to hold what does not fit in memory. A filesystem that refuses it (EINVAL)
//! gets buffered I/O instead, with one warning per process; `describe()` then adds `buffered`.
//! Every request is block-aligned either way, so both modes share one code path.
//!
//! **Reads** coalesce consecutive slots, round each run out to whole blocks, merge overlapping
//! or nearby blocks, and issue every resulting range of one `read` call in one io_uring
//! submission (into an aligned bounce buffer), then copy the wanted bytes out. Where io_uring is
//! refused (ENOSYS, EPERM under seccomp) a pool of `pread` threads does the same
//! ([`DiskIo::Pread`]); `FARSIGHT_DISK_IO=pread` or [`DiskOptions::force_pread`] force it.
//!
//! **Writes** go to a write-back cache of whole blocks. A block enters it zeroed if it was never
//! written to the file, otherwise read from the file (read-modify-write: what reusing an evicted
//! slot causes). When the cache holds [`DiskOptions::write_back_bytes`], every dirty block is
//! written out (sorted, consecutive blocks as one write) and the cache emptied. Reads take a
//! block from the cache when it is there, so a read always sees every earlier write.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use farsight_kernels::{KernelError, Result};

use super::aligned::{AlignedBuf, ALIGN};
pub use super::disk_io::DiskIo;
use super::disk_io::Engine;
use super::{check_read, check_write, slot_runs, KvTier, RowLayout};

/// Blocks between two needed ranges that a read fetches anyway to make one request of them
/// (an extra 4 KiB costs less than another request on any SSD).
const MERGE_GAP_BLOCKS: u64 = 1;
/// Default write-back cache size.
const DEFAULT_WRITE_BACK_BYTES: usize = 8 << 20;

/// Set once the first refusal of O_DIRECT has been logged.
static WARNED_NO_DIRECT: AtomicBool = AtomicBool::new(false);
/// Numbers the files created inside a directory.
static FILE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// How a [`DiskKvTier`] does its I/O.
#[derive(Clone, Debug)]
pub struct DiskOptions {
    /// Use `pread` threads even where io_uring works (tests, comparisons).
    pub force_pread: bool,
    /// Do not ask for O_DIRECT (use the page cache).
    pub buffered: bool,
    /// Dirty bytes the write-back cache holds before it writes them out.
    pub write_back_bytes: usize,
}

impl Default for DiskOptions {
    /// io_uring and O_DIRECT where available, 8 MiB write-back; `FARSIGHT_DISK_IO=pread` in the
    /// environment sets `force_pread`.
    fn default() -> Self {
        DiskOptions {
            force_pread: std::env::var("FARSIGHT_DISK_IO").is_ok_and(|v| v == "pread"),
            buffered: false,
            write_back_bytes: DEFAULT_WRITE_BACK_BYTES,
        }
    }
}

/// Dirty blocks not yet written to the file.
struct WriteBack {
    /// `max_blocks` blocks; slab block `i` holds file block `blocks[i]` for `i < blocks.len()`.
    slab: AlignedBuf,
    /// File block of each used slab block (no duplicates).
    blocks: Vec<u64>,
    /// Inverse of `blocks`: file block -> slab block.
    index: HashMap<u64, usize>,
    /// Slab capacity in blocks (at least what one `write` call touches).
    max_blocks: usize,
}

impl WriteBack {
    fn get(&self, block: u64) -> Option<&[u8]> {
        self.index
            .get(&block)
            .map(|&i| &self.slab.as_slice()[i * ALIGN..][..ALIGN])
    }
}

/// State a read needs exclusively: the I/O engine and the bounce buffer.
struct IoState {
    engine: Engine,
    /// Aligned landing area for reads; grows to the largest batch seen.
    bounce: AlignedBuf,
}

/// KV rows in a file (see the module doc).
pub struct DiskKvTier {
    layout: RowLayout,
    /// The file (created by this tier; removed on drop).
    path: PathBuf,
    file: File,
    /// Whether the file is open with O_DIRECT.
    direct: bool,
    /// Slots addressable: whole extents.
    capacity: usize,
    /// File length in bytes: `capacity` slots' extents rounded up to [`ALIGN`].
    file_len: u64,
    /// Bit `b` set when block `b` has been written to the file (else it reads as zeros).
    written: Vec<u64>,
    cache: WriteBack,
    /// Staging for flushes: dirty blocks in file order (allocated on the first flush).
    staging: Option<AlignedBuf>,
    io: Mutex<IoState>,
    /// File read requests issued by [`KvTier::read`] so far.
    read_requests: AtomicU64,
    /// Bytes those requests read (whole blocks, so at least the rows asked for).
    read_bytes: AtomicU64,
}

/// An I/O error naming the file, with ENOSPC, EDQUOT and EFBIG spelled out.
fn io_error(path: &Path, what: String, e: io::Error) -> KernelError {
    let what = match e.raw_os_error() {
        Some(libc::ENOSPC) => format!("{what}: the disk is full"),
        Some(libc::EDQUOT) => format!("{what}: the disk quota is exhausted"),
        Some(libc::EFBIG) => format!("{what}: the file size limit is reached"),
        _ => what,
    };
    KernelError::Io {
        path: path.to_path_buf(),
        what,
        source: e,
    }
}

fn alloc(bytes: usize, what: &str) -> Result<AlignedBuf> {
    AlignedBuf::zeroed(bytes).ok_or_else(|| KernelError::OutOfMemory {
        device: "host".into(),
        what: format!("{what} of {bytes} bytes"),
    })
}

impl DiskKvTier {
    /// Creates the tier's file at `path` (or inside it, if it is a directory), with
    /// [`DiskOptions::default`].
    pub fn create(path: impl AsRef<Path>, layout: RowLayout) -> Result<DiskKvTier> {
        Self::create_with(path, layout, DiskOptions::default())
    }

    /// Like [`DiskKvTier::create`], with explicit options.
    pub fn create_with(
        path: impl AsRef<Path>,
        layout: RowLayout,
        options: DiskOptions,
    ) -> Result<DiskKvTier> {
        layout.validate()?;
        let path = path.as_ref();
        let path = if path.is_dir() {
            let n = FILE_COUNTER.fetch_add(1, Ordering::Relaxed);
            path.join(format!("farsight-kv-{}-{n}.bin", std::process::id()))
        } else {
            path.to_path_buf()
        };
        let row_blocks = layout.row_bytes.div_ceil(ALIGN) + 1;
        let max_blocks = (options.write_back_bytes / ALIGN)
            .max(layout.kv_heads * row_blocks)
            .max(1);
        let cache = WriteBack {
            slab: alloc(max_blocks * ALIGN, "KV write-back cache")?,
            blocks: Vec::with_capacity(max_blocks),
            index: HashMap::with_capacity(max_blocks),
            max_blocks,
        };
        let engine = Engine::new(options.force_pread)
            .map_err(|e| io_error(&path, "cannot start the I/O engine".into(), e))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| io_error(&path, "cannot create the KV file".into(), e))?;
        // From here on the tier owns the file: its Drop removes it.
        let mut tier = DiskKvTier {
            layout,
            path,
            file,
            direct: false,
            capacity: 0,
            file_len: 0,
            written: Vec::new(),
            cache,
            staging: None,
            io: Mutex::new(IoState {
                engine,
                bounce: AlignedBuf::zeroed(0).expect("empty"),
            }),
            read_requests: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
        };
        if !options.buffered {
            tier.direct = tier.set_direct()?;
        }
        Ok(tier)
    }

    /// Turns on O_DIRECT; `false` (and one warning per process) when the filesystem refuses.
    fn set_direct(&self) -> Result<bool> {
        let fd = self.fd();
        // SAFETY: fcntl on a descriptor we own; no pointers involved.
        let ok = unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_DIRECT) == 0
        };
        if ok {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(io_error(&self.path, "cannot set O_DIRECT".into(), e));
        }
        if !WARNED_NO_DIRECT.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "{}: the filesystem refuses O_DIRECT; the disk KV tier goes through the page cache",
                self.path.display()
            );
        }
        Ok(false)
    }

    /// The file holding the rows.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How reads and writes are issued.
    pub fn io_kind(&self) -> DiskIo {
        self.io
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .engine
            .kind()
    }

    /// File read requests and bytes read by [`KvTier::read`] so far (rows served from the
    /// write-back cache are not counted).
    pub fn read_counters(&self) -> (u64, u64) {
        (
            self.read_requests.load(Ordering::Relaxed),
            self.read_bytes.load(Ordering::Relaxed),
        )
    }

    /// Whether the file is open with O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Writes every dirty block to the file and empties the write-back cache.
    pub fn flush(&mut self) -> Result<()> {
        let cache = &mut self.cache;
        if cache.blocks.is_empty() {
            return Ok(());
        }
        let staging = match &mut self.staging {
            Some(s) => s,
            None => self
                .staging
                .insert(alloc(cache.max_blocks * ALIGN, "KV flush staging")?),
        };
        let mut order: Vec<(u64, usize)> = cache
            .blocks
            .iter()
            .enumerate()
            .map(|(i, &b)| (b, i))
            .collect();
        order.sort_unstable();
        let (slab, out) = (cache.slab.as_slice(), staging.as_mut_slice());
        for (k, &(_, i)) in order.iter().enumerate() {
            out[k * ALIGN..][..ALIGN].copy_from_slice(&slab[i * ALIGN..][..ALIGN]);
        }
        // One request per run of consecutive blocks.
        let mut reqs: Vec<(u64, &[u8])> = Vec::new();
        let mut k = 0;
        while k < order.len() {
            let mut end = k + 1;
            while end < order.len() && order[end].0 == order[end - 1].0 + 1 {
                end += 1;
            }
            reqs.push((order[k].0 * ALIGN as u64, &out[k * ALIGN..end * ALIGN]));
            k = end;
        }
        let fd = self.file.as_raw_fd();
        let state = self.io.get_mut().unwrap_or_else(|p| p.into_inner());
        state
            .engine
            .write(fd, &reqs)
            .map_err(|e| io_error(&self.path, format!("writing {} KV blocks", order.len()), e))?;
        for &(block, _) in &order {
            self.written[(block / 64) as usize] |= 1 << (block % 64);
        }
        cache.blocks.clear();
        cache.index.clear();
        Ok(())
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn was_written(&self, block: u64) -> bool {
        self.written[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    /// Puts `blocks` (none of them cached yet) into the write-back cache: zeros for a block
    /// never written, else its content read from the file (all such reads in one batch).
    fn load_blocks(&mut self, blocks: &[u64]) -> Result<()> {
        let cache = &mut self.cache;
        let base = cache.blocks.len();
        debug_assert!(base + blocks.len() <= cache.max_blocks);
        let slab = &mut cache.slab.as_mut_slice()[base * ALIGN..(base + blocks.len()) * ALIGN];
        let mut reqs: Vec<(u64, &mut [u8])> = Vec::new();
        for (&block, buf) in blocks.iter().zip(slab.chunks_exact_mut(ALIGN)) {
            if self.written[(block / 64) as usize] & (1 << (block % 64)) != 0 {
                reqs.push((block * ALIGN as u64, buf));
            } else {
                buf.fill(0);
            }
        }
        if !reqs.is_empty() {
            let fd = self.file.as_raw_fd();
            let state = self.io.get_mut().unwrap_or_else(|p| p.into_inner());
            let n = reqs.len();
            state.engine.read(fd, &mut reqs).map_err(|e| {
                io_error(
                    &self.path,
                    format!("reading {n} KV blocks to update them"),
                    e,
                )
            })?;
        }
        for (i, &block) in blocks.iter().enumerate() {
            cache.blocks.push(block);
            cache.index.insert(block, base + i);
        }
        Ok(())
    }
}

/// A part of a requested row that has to come from the file: `len` bytes at `in_block` of
/// file block `block`, for output byte `out_at`.
struct Piece {
    /// Which request of the batch, and where in its output.
    req: usize,
    out_at: usize,
    block: u64,
    in_block: usize,
    len: usize,
}

impl KvTier for DiskKvTier {
    fn layout(&self) -> &RowLayout {
        &self.layout
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn grow(&mut self, slots: usize) -> Result<()> {
        let extents = slots.div_ceil(self.layout.extent_slots);
        let capacity = extents * self.layout.extent_slots;
        if capacity <= self.capacity {
            return Ok(());
        }
        let len = ((extents * self.layout.extent_bytes()).div_ceil(ALIGN) * ALIGN) as u64;
        let fd = self.fd();
        let grow = len - self.file_len;
        // SAFETY: plain syscalls on a descriptor we own.
        let mut rc =
            unsafe { libc::fallocate(fd, 0, self.file_len as libc::off_t, grow as libc::off_t) };
        if rc != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) {
            // SAFETY: as above.
            rc = unsafe { libc::ftruncate(fd, len as libc::off_t) };
        }
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(io_error(
                &self.path,
                format!("cannot grow the KV file to {len} bytes ({slots} slots)"),
                e,
            ));
        }
        self.file_len = len;
        self.capacity = capacity;
        self.written
            .resize((len / ALIGN as u64).div_ceil(64) as usize, 0);
        Ok(())
    }

    fn write(&mut self, layer: usize, slot: u32, data: &[u8]) -> Result<()> {
        check_write(&self.layout, self.capacity, layer, slot, data)?;
        let row = self.layout.row_bytes;
        let touched = |tier: &DiskKvTier| {
            let mut missing = Vec::new();
            for head in 0..tier.layout.kv_heads {
                let off = tier.layout.offset(slot, layer, head) as u64;
                for block in off / ALIGN as u64..=(off + row as u64 - 1) / ALIGN as u64 {
                    if !tier.cache.index.contains_key(&block) && !missing.contains(&block) {
                        missing.push(block);
                    }
                }
            }
            missing
        };
        let mut missing = touched(self);
        if self.cache.blocks.len() + missing.len() > self.cache.max_blocks {
            self.flush()?;
            missing = touched(self);
        }
        self.load_blocks(&missing)?;
        let cache = &mut self.cache;
        for (head, mut src) in data.chunks_exact(row).enumerate() {
            let mut off = self.layout.offset(slot, layer, head) as u64;
            while !src.is_empty() {
                let (block, in_block) = (off / ALIGN as u64, (off % ALIGN as u64) as usize);
                let n = src.len().min(ALIGN - in_block);
                let i = cache.index[&block];
                cache.slab.as_mut_slice()[i * ALIGN + in_block..][..n].copy_from_slice(&src[..n]);
                src = &src[n..];
                off += n as u64;
            }
        }
        Ok(())
    }

    fn read(&self, layer: usize, head: usize, slots: &[u32], out: &mut [u8]) -> Result<()> {
        self.read_heads(layer, &mut [(head, slots, out)])
    }

    /// One io_uring submission for every head's rows (the blocks of all requests fetched
    /// together, neighbours merged), instead of one round trip to the disk per head.
    fn read_heads(&self, layer: usize, reqs: &mut [(usize, &[u32], &mut [u8])]) -> Result<()> {
        let row = self.layout.row_bytes;
        // Split the runs into per-block pieces; pieces of cached blocks are copied at once.
        let mut pieces = Vec::new();
        let mut rows = 0;
        for (req, (head, slots, out)) in reqs.iter_mut().enumerate() {
            let (head, slots) = (*head, *slots);
            check_read(&self.layout, self.capacity, layer, head, slots, out)?;
            rows += slots.len();
            for run in slot_runs(slots, self.layout.extent_slots) {
                let mut off = self.layout.offset(slots[run.first], layer, head) as u64;
                let mut out_at = run.first * row;
                let end = out_at + run.len * row;
                while out_at < end {
                    let (block, in_block) = (off / ALIGN as u64, (off % ALIGN as u64) as usize);
                    let len = (end - out_at).min(ALIGN - in_block);
                    match self.cache.get(block) {
                        Some(b) => out[out_at..][..len].copy_from_slice(&b[in_block..][..len]),
                        None if !self.was_written(block) => out[out_at..][..len].fill(0),
                        None => pieces.push(Piece {
                            req,
                            out_at,
                            block,
                            in_block,
                            len,
                        }),
                    }
                    out_at += len;
                    off += len as u64;
                }
            }
        }
        if pieces.is_empty() {
            return Ok(());
        }
        // The blocks to fetch, as ranges (first block, blocks, bounce offset).
        let mut blocks: Vec<u64> = pieces.iter().map(|p| p.block).collect();
        blocks.sort_unstable();
        blocks.dedup();
        let mut ranges: Vec<(u64, u64, usize)> = Vec::new();
        let mut bounce_len = 0;
        for &b in &blocks {
            match ranges.last_mut() {
                Some((first, n, _)) if b <= *first + *n + MERGE_GAP_BLOCKS => {
                    let grown = b + 1 - *first;
                    bounce_len += (grown - *n) as usize * ALIGN;
                    *n = grown;
                }
                _ => {
                    ranges.push((b, 1, bounce_len));
                    bounce_len += ALIGN;
                }
            }
        }
        let mut state = self.io.lock().unwrap_or_else(|p| p.into_inner());
        let state = &mut *state;
        if state.bounce.len() < bounce_len {
            state.bounce = alloc(bounce_len.next_power_of_two(), "KV read bounce buffer")?;
        }
        let mut io: Vec<(u64, &mut [u8])> = Vec::with_capacity(ranges.len());
        let mut rest = &mut state.bounce.as_mut_slice()[..bounce_len];
        for &(first, n, _) in &ranges {
            let (buf, tail) = rest.split_at_mut(n as usize * ALIGN);
            io.push((first * ALIGN as u64, buf));
            rest = tail;
        }
        state.engine.read(self.fd(), &mut io).map_err(|e| {
            io_error(
                &self.path,
                format!("reading {rows} KV rows of layer {layer}"),
                e,
            )
        })?;
        self.read_requests
            .fetch_add(ranges.len() as u64, Ordering::Relaxed);
        self.read_bytes
            .fetch_add(bounce_len as u64, Ordering::Relaxed);
        let bounce = state.bounce.as_slice();
        for p in &pieces {
            let r = ranges.partition_point(|&(first, _, _)| first <= p.block) - 1;
            let (first, _, at) = ranges[r];
            let src = at + (p.block - first) as usize * ALIGN + p.in_block;
            reqs[p.req].2[p.out_at..][..p.len].copy_from_slice(&bounce[src..][..p.len]);
        }
        Ok(())
    }

    fn bytes(&self) -> usize {
        self.file_len as usize
    }

    fn in_memory(&self) -> bool {
        false
    }

    fn describe(&self) -> String {
        let buffered = if self.direct { "" } else { ", buffered" };
        format!(
            "disk:{} ({}{buffered})",
            self.path.display(),
            self.io_kind()
        )
    }
}

impl Drop for DiskKvTier {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!("cannot remove the KV file {}: {e}", self.path.display());
            }
        }
    }
}

impl std::fmt::Debug for DiskKvTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskKvTier")
            .field("path", &self.path)
            .field("layout", &self.layout)
            .field("capacity", &self.capacity)
            .field("direct", &self.direct)
            .finish()
    }
}
