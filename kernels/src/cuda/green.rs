//! SM partitions through green contexts (CUDA 12.4 and later): the row gathers from pinned host
//! memory run on a few SMs of their own and every other kernel on the rest. Off by default.
//!
//! Why it was tried: a gather from host memory keeps thousands of loads waiting on PCIe for
//! microseconds; on an SM it shares with a GEMV block it might slow that block and so the whole
//! GEMV. On the H100 (`bench offload`, 256K, 1/64, 4-bit labels) the prefetch chain never
//! stalled the compute stream, yet the step took 12.7 ms against 9.0 ms with the same chain
//! gathering from device memory. With the gathers on 16 SMs of their own the step took 12.3 ms
//! (64 blocks; 12.7 ms unpartitioned in the same call): sharing SMs is a small part of that
//! slowdown; the host traffic itself is the rest (BENCHMARKS.md, fifth run).
//!
//! Status: measured once (above); those runs crashed (a segfault when a store was dropped)
//! because streams were destroyed while buffers still held them. The fix (streams live as long
//! as the process) has not run on a GPU yet, nor have the offload tests under a partition.
//!
//! `FARSIGHT_GATHER_SMS=N` (a multiple of the device's partition size, 8 on Hopper) makes
//! [`super::CudaBackend::new`] split the SMs: the compute stream and its siblings run on the
//! remainder, and the gathers from host memory on a stream of the N-SM partition. Both green
//! contexts belong to the device's primary context, so memory, modules and events are shared.

use std::sync::Arc;

use cudarc::driver::sys::{self, CUdevResource, CUdevResourceType, CUgreenCtx, CUstream};
use cudarc::driver::{CudaContext, CudaStream};

use super::dev_err;
use crate::backend::Result;
use crate::error::KernelError;

/// Two green contexts over disjoint SM sets of one device. They and their streams live as long
/// as the process (see [`SmSplit::stream`]).
pub(crate) struct SmSplit {
    /// SMs of the gather partition and of the rest.
    pub gather_sms: usize,
    pub rest_sms: usize,
    gather: CUgreenCtx,
    rest: CUgreenCtx,
}

// SAFETY: green-context handles are plain driver handles, usable from any thread.
unsafe impl Send for SmSplit {}
unsafe impl Sync for SmSplit {}

fn check(what: &str, r: sys::CUresult) -> Result<()> {
    r.result().map_err(|e| dev_err(what, e))
}

impl SmSplit {
    /// Splits `ctx`'s device into `gather_sms` SMs and the rest.
    pub fn new(ctx: &Arc<CudaContext>, gather_sms: usize) -> Result<Arc<SmSplit>> {
        ctx.bind_to_thread()
            .map_err(|e| dev_err("binding the context", e))?;
        let dev = ctx.cu_device();
        // SAFETY: plain out-parameters of the driver calls; each result is checked.
        unsafe {
            let mut all: CUdevResource = std::mem::zeroed();
            check(
                "reading the SM resource",
                sys::cuDeviceGetDevResource(
                    dev,
                    &mut all,
                    CUdevResourceType::CU_DEV_RESOURCE_TYPE_SM,
                ),
            )?;
            let total = all.__bindgen_anon_1.sm.smCount as usize;
            let part = all.__bindgen_anon_1.sm.minSmPartitionSize.max(1) as usize;
            if gather_sms == 0 || !gather_sms.is_multiple_of(part) || gather_sms + part > total {
                return Err(KernelError::Device(format!(
                    "FARSIGHT_GATHER_SMS={gather_sms}: a multiple of {part} below {total}"
                )));
            }
            let mut group: CUdevResource = std::mem::zeroed();
            let mut rest: CUdevResource = std::mem::zeroed();
            let mut n = 1u32;
            check(
                "splitting the SMs",
                sys::cuDevSmResourceSplitByCount(
                    &mut group,
                    &mut n,
                    &all,
                    &mut rest,
                    0,
                    gather_sms as u32,
                ),
            )?;
            let gather = green_ctx(dev, &mut group)?;
            let rest_ctx = match green_ctx(dev, &mut rest) {
                Ok(c) => c,
                Err(e) => {
                    let _ = sys::cuGreenCtxDestroy(gather);
                    return Err(e);
                }
            };
            Ok(Arc::new(SmSplit {
                gather_sms: group.__bindgen_anon_1.sm.smCount as usize,
                rest_sms: rest.__bindgen_anon_1.sm.smCount as usize,
                gather,
                rest: rest_ctx,
            }))
        }
    }

    /// A new stream on the gather partition (`gather`) or on the rest, with `priority`.
    pub fn stream(
        self: &Arc<Self>,
        ctx: &Arc<CudaContext>,
        gather: bool,
        priority: i32,
    ) -> Result<Arc<CudaStream>> {
        let g = if gather { self.gather } else { self.rest };
        let mut s: CUstream = std::ptr::null_mut();
        // SAFETY: `g` is a live green context of this split; `s` is an out-parameter.
        unsafe {
            check(
                "creating a green-context stream",
                sys::cuGreenCtxStreamCreate(
                    &mut s,
                    g,
                    sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
                    priority,
                ),
            )?;
        }
        // SAFETY: the stream belongs to the primary context (a green context's streams do) and
        // is never destroyed: cudarc's buffers keep their stream to free on, and may outlive
        // the backend that made them. A backend makes two such streams, once.
        Ok(unsafe { ctx.wrap_borrowed_stream(s) })
    }
}

/// # Safety
/// `res` must be a resource from `cuDeviceGetDevResource` or a split of one.
unsafe fn green_ctx(dev: sys::CUdevice, res: &mut CUdevResource) -> Result<CUgreenCtx> {
    let mut desc: sys::CUdevResourceDesc = std::ptr::null_mut();
    check(
        "describing an SM partition",
        sys::cuDevResourceGenerateDesc(&mut desc, res, 1),
    )?;
    let mut g: CUgreenCtx = std::ptr::null_mut();
    check(
        "creating a green context",
        // The driver asks for the default-stream flag (0 is refused with an invalid value).
        sys::cuGreenCtxCreate(
            &mut g,
            desc,
            dev,
            sys::CUgreenCtxCreate_flags::CU_GREEN_CTX_DEFAULT_STREAM as u32,
        ),
    )?;
    Ok(g)
}
