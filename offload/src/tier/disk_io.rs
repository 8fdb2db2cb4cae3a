//! Batched positional reads and writes for the disk tier: io_uring where the kernel allows it,
//! otherwise `pread`/`pwrite` on a small thread pool.
//!
//! Every request of a batch is aligned (offset, length and buffer) to the O_DIRECT block, and
//! the file length is kept a multiple of it, so a short transfer only happens at end of file.
//! A read past the end of the file yields zeros.

use std::io;
use std::os::fd::RawFd;
use std::sync::OnceLock;

use io_uring::{opcode, types, IoUring};

/// Submission queue entries of a ring; a larger batch is submitted in rounds of this many.
const RING_ENTRIES: u32 = 256;
/// Threads of the pread fallback pool (they block on the disk, not on a core).
const PREAD_THREADS: usize = 8;

/// How a disk tier issues its reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskIo {
    /// One io_uring submission per batch.
    IoUring,
    /// `pread`/`pwrite` on a thread pool (io_uring refused: seccomp, old kernel, policy).
    Pread,
}

impl std::fmt::Display for DiskIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DiskIo::IoUring => "io_uring",
            DiskIo::Pread => "pread",
        })
    }
}

/// The I/O engine of one disk tier.
pub(crate) enum Engine {
    Uring(Box<IoUring>),
    Pread(rayon::ThreadPool),
}

/// Why io_uring was refused, remembered after the first refusal so that later tiers neither
/// retry nor log again.
static URING_REFUSED: OnceLock<String> = OnceLock::new();

/// Sets up a ring, checking that the kernel has the read and write opcodes.
fn setup_ring() -> io::Result<IoUring> {
    let ring = IoUring::new(RING_ENTRIES)?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    if !probe.is_supported(opcode::Read::CODE) || !probe.is_supported(opcode::Write::CODE) {
        return Err(io::Error::other("kernel lacks IORING_OP_READ/WRITE"));
    }
    Ok(ring)
}

impl Engine {
    /// io_uring unless `force_pread` or the kernel refuses it (logged once per process).
    pub fn new(force_pread: bool) -> io::Result<Engine> {
        if !force_pread && URING_REFUSED.get().is_none() {
            match setup_ring() {
                Ok(ring) => return Ok(Engine::Uring(Box::new(ring))),
                Err(e) => {
                    let why = e.to_string();
                    if URING_REFUSED.set(why.clone()).is_ok() {
                        tracing::warn!(
                            "io_uring unavailable ({why}); the disk KV tier uses pread threads"
                        );
                    }
                }
            }
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(PREAD_THREADS)
            .thread_name(|i| format!("farsight-pread-{i}"))
            .build()
            .map_err(io::Error::other)?;
        Ok(Engine::Pread(pool))
    }

    /// Replaces a ring that refused a submission with the pread pool (logged).
    fn fall_back_to_pread(&mut self, why: &io::Error) -> io::Result<()> {
        tracing::warn!("io_uring submission refused ({why}); the disk KV tier switches to pread");
        *self = Engine::new(true)?;
        Ok(())
    }

    /// Which kind this is.
    pub fn kind(&self) -> DiskIo {
        match self {
            Engine::Uring(_) => DiskIo::IoUring,
            Engine::Pread(_) => DiskIo::Pread,
        }
    }

    /// Fills every `(offset, buffer)` from the file, in one submission (or in parallel).
    pub fn read(&mut self, fd: RawFd, reqs: &mut [(u64, &mut [u8])]) -> io::Result<()> {
        match self {
            Engine::Uring(ring) => {
                let entries: Vec<_> = reqs
                    .iter_mut()
                    .map(|(off, buf)| {
                        opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), buf.len() as u32)
                            .offset(*off)
                            .build()
                    })
                    .collect();
                // SAFETY: every entry points into a buffer of `reqs`, borrowed mutably for the
                // whole call; `submit_all` returns only after every taken entry completed.
                let done = match unsafe { submit_all(ring, &entries) } {
                    Ok(done) => done,
                    Err(BatchError::Request(e)) => return Err(e),
                    Err(BatchError::RingBroken(e)) => {
                        self.fall_back_to_pread(&e)?;
                        return self.read(fd, reqs);
                    }
                };
                for ((off, buf), got) in reqs.iter_mut().zip(done) {
                    if got < buf.len() {
                        finish_read(fd, *off, buf, got)?;
                    }
                }
                Ok(())
            }
            Engine::Pread(pool) => {
                if reqs.len() == 1 {
                    return pread_full(fd, reqs[0].0, reqs[0].1);
                }
                use rayon::prelude::*;
                pool.install(|| {
                    reqs.par_iter_mut()
                        .try_for_each(|(off, buf)| pread_full(fd, *off, buf))
                })
            }
        }
    }

    /// Writes every `(offset, buffer)` to the file, in one submission (or in parallel).
    pub fn write(&mut self, fd: RawFd, reqs: &[(u64, &[u8])]) -> io::Result<()> {
        match self {
            Engine::Uring(ring) => {
                let entries: Vec<_> = reqs
                    .iter()
                    .map(|(off, buf)| {
                        opcode::Write::new(types::Fd(fd), buf.as_ptr(), buf.len() as u32)
                            .offset(*off)
                            .build()
                    })
                    .collect();
                // SAFETY: as in `read`; the buffers are only read by the kernel.
                let done = match unsafe { submit_all(ring, &entries) } {
                    Ok(done) => done,
                    Err(BatchError::Request(e)) => return Err(e),
                    Err(BatchError::RingBroken(e)) => {
                        self.fall_back_to_pread(&e)?;
                        return self.write(fd, reqs);
                    }
                };
                for ((off, buf), put) in reqs.iter().zip(done) {
                    if put < buf.len() {
                        // Short (the disk filled up, or a signal): redo from the last whole
                        // block with plain pwrite, which reports the error if there is one.
                        let from = put / super::ALIGN * super::ALIGN;
                        pwrite_full(fd, off + from as u64, &buf[from..])?;
                    }
                }
                Ok(())
            }
            Engine::Pread(pool) => {
                if reqs.len() == 1 {
                    return pwrite_full(fd, reqs[0].0, reqs[0].1);
                }
                use rayon::prelude::*;
                pool.install(|| {
                    reqs.par_iter()
                        .try_for_each(|(off, buf)| pwrite_full(fd, *off, buf))
                })
            }
        }
    }
}

/// Why a batch failed.
enum BatchError {
    /// A request failed (e.g. ENOSPC); every submitted request has completed, the ring is fine.
    Request(io::Error),
    /// The ring refused the submission; the requests it had taken have completed, the others
    /// were never seen by the kernel, and the ring must not be used again.
    RingBroken(io::Error),
}

/// True for `io_uring_enter` errors that mean "try again".
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
    )
}

/// Submits `entries` (their `user_data` is overwritten with their index) in rounds of the ring's
/// size and waits for all of them; returns each entry's transferred byte count.
///
/// # Safety
/// 1. Every buffer an entry points to must stay valid (and, for reads, not otherwise accessed)
///    until this returns. It returns only after every entry the kernel took has completed,
///    whatever the outcome.
unsafe fn submit_all(
    ring: &mut IoUring,
    entries: &[io_uring::squeue::Entry],
) -> Result<Vec<usize>, BatchError> {
    let mut done = vec![0usize; entries.len()];
    let mut failed: Option<io::Error> = None;
    let mut reap = |ring: &mut IoUring, failed: &mut Option<io::Error>| {
        let mut n = 0;
        for cqe in ring.completion() {
            match cqe.result() {
                res if res < 0 => {
                    failed.get_or_insert(io::Error::from_raw_os_error(-res));
                }
                res => done[cqe.user_data() as usize] = res as usize,
            }
            n += 1;
        }
        n
    };
    let mut next = 0;
    while next < entries.len() {
        let mut pushed = 0;
        {
            let mut sq = ring.submission();
            while next + pushed < entries.len() && !sq.is_full() {
                let entry = entries[next + pushed]
                    .clone()
                    .user_data((next + pushed) as u64);
                // SAFETY: the caller keeps the buffers alive until this returns, and this
                // returns only after reaping every entry the kernel took.
                sq.push(&entry).expect("submission queue has room");
                pushed += 1;
            }
        }
        let (mut taken, mut reaped, mut broken) = (0, 0, None);
        while taken < pushed {
            match ring.submit() {
                Ok(0) => {
                    broken = Some(io::Error::other("io_uring took no submission"));
                    break;
                }
                Ok(n) => taken += n,
                Err(e) if is_transient(&e) => {
                    reaped += reap(ring, &mut failed);
                    std::thread::yield_now();
                }
                Err(e) => {
                    broken = Some(e);
                    break;
                }
            }
        }
        while reaped < taken {
            // Wait only: never submit the entries a broken ring did not take.
            let wait = ring.submitter().enter::<libc::sigset_t>(
                0,
                (taken - reaped) as u32,
                io_uring::EnterFlags::GETEVENTS.bits(),
                None,
            );
            match wait {
                Ok(_) => {}
                Err(e) if is_transient(&e) => {}
                // The taken requests still complete; poll for them rather than leave them
                // writing into buffers we are about to release.
                Err(e) => {
                    broken.get_or_insert(e);
                    std::thread::yield_now();
                }
            }
            reaped += reap(ring, &mut failed);
        }
        if let Some(e) = broken {
            return Err(BatchError::RingBroken(e));
        }
        next += pushed;
        if let Some(e) = failed.take() {
            return Err(BatchError::Request(e));
        }
    }
    Ok(done)
}

/// Completes a read that stopped after `got` bytes: retries from the last whole block with
/// `pread` (zeros past end of file).
fn finish_read(fd: RawFd, off: u64, buf: &mut [u8], got: usize) -> io::Result<()> {
    let from = got / super::ALIGN * super::ALIGN;
    pread_full(fd, off + from as u64, &mut buf[from..])
}

/// `pread` until `buf` is full; the part past end of file is zeroed.
pub(crate) fn pread_full(fd: RawFd, off: u64, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes.
        let n = unsafe {
            libc::pread(
                fd,
                rest.as_mut_ptr().cast(),
                rest.len(),
                (off + done as u64) as libc::off_t,
            )
        };
        match n {
            0 => {
                rest.fill(0);
                return Ok(());
            }
            n if n > 0 => done += n as usize,
            _ => {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINTR) {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// `pwrite` until all of `buf` is written.
pub(crate) fn pwrite_full(fd: RawFd, off: u64, buf: &[u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &buf[done..];
        // SAFETY: `rest` is a valid readable buffer of `rest.len()` bytes.
        let n = unsafe {
            libc::pwrite(
                fd,
                rest.as_ptr().cast(),
                rest.len(),
                (off + done as u64) as libc::off_t,
            )
        };
        match n {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "pwrite wrote nothing",
                ))
            }
            n if n > 0 => done += n as usize,
            _ => {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINTR) {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}
