//! Stream plumbing of the offloaded decode: [`StreamEvent`]s that order one backend's stream
//! after another's (or time them), the sibling backend on a prefetch stream of the same context,
//! raw-pointer copies and device-wide calls.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaEvent;

use crate::backend::Result;
use crate::cuda::{dev_err, CudaBackend, DevBuf};

/// An event recorded on one backend's stream, for another to wait on.
pub struct StreamEvent(CudaEvent);

impl StreamEvent {
    /// Milliseconds of device time from `start` to this event (both made by
    /// [`CudaBackend::record_timed`]; waits for both to complete).
    pub fn ms_since(&self, start: &StreamEvent) -> Result<f64> {
        start
            .0
            .elapsed_ms(&self.0)
            .map(f64::from)
            .map_err(|e| dev_err("timing events", e))
    }
}

impl CudaBackend {
    /// A backend on a new stream of the same context: pointers, kernels and events are shared,
    /// work on the two streams runs concurrently unless ordered by [`StreamEvent`]s. With `high`,
    /// its stream has the device's greatest priority: the block
    /// scheduler starts its kernels' blocks before pending blocks of normal-priority streams (for
    /// short, latency-critical work such as the prefetch chain that the compute stream waits on).
    pub fn sibling_with_priority(&self, high: bool) -> Result<CudaBackend> {
        let mut gather_stream = None;
        let stream = if let Some(sp) = &self.split {
            let (least, greatest) = cudarc::driver::result::stream::get_priority_range()
                .map_err(|e| dev_err("stream priorities", e))?;
            let s = sp.stream(&self.ctx, false, if high { greatest } else { least })?;
            s.join(&self.stream)
                .map_err(|e| dev_err("ordering a new stream", e))?;
            gather_stream = Some(sp.stream(&self.ctx, true, greatest)?);
            s
        } else if high {
            let (_, greatest) = cudarc::driver::result::stream::get_priority_range()
                .map_err(|e| dev_err("stream priorities", e))?;
            let s = self
                .ctx
                .new_stream_with_priority(greatest)
                .map_err(|e| dev_err("creating a stream", e))?;
            s.join(&self.stream)
                .map_err(|e| dev_err("ordering a new stream", e))?;
            s
        } else {
            self.stream
                .fork()
                .map_err(|e| dev_err("creating a stream", e))?
        };
        let blas = CudaBlas::new(stream.clone()).map_err(|e| dev_err("creating cuBLAS", e))?;
        let funcs: HashMap<_, _> = self.funcs.clone();
        Ok(CudaBackend {
            ctx: Arc::clone(&self.ctx),
            stream,
            blas,
            funcs,
            scratch: Mutex::new(None),
            attn_scratch: Mutex::new(None),
            rope_cache: Mutex::new(None),
            gemv1: std::sync::atomic::AtomicU8::new(self.gemv1() as u8),
            gather_blocks: AtomicUsize::new(self.gather_blocks()),
            attn_chunk: AtomicUsize::new(
                self.attn_chunk.load(std::sync::atomic::Ordering::Relaxed),
            ),
            attn_gqa: AtomicBool::new(self.attn_gqa.load(std::sync::atomic::Ordering::Relaxed)),
            cluster_ok: self.cluster_ok,
            topk_cluster: AtomicBool::new(
                self.topk_cluster.load(std::sync::atomic::Ordering::Relaxed),
            ),
            attn_flash: AtomicBool::new(self.attn_flash.load(std::sync::atomic::Ordering::Relaxed)),
            sm_count: self.sm_count,
            attn_blocks_per_sm: self.attn_blocks_per_sm,
            name: format!("{} (prefetch stream)", self.name),
            arch: self.arch.clone(),
            ptx_from_cache: self.ptx_from_cache,
            split: self.split.clone(),
            gather_stream,
        })
    }

    /// Records the work queued so far with an event that can be timed ([`StreamEvent::ms_since`]).
    pub fn record_timed(&self) -> Result<StreamEvent> {
        self.stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map(StreamEvent)
            .map_err(|e| dev_err("recording an event", e))
    }

    /// Records the work queued so far on this backend's stream.
    pub fn record(&self) -> Result<StreamEvent> {
        self.stream
            .record_event(None)
            .map(StreamEvent)
            .map_err(|e| dev_err("recording an event", e))
    }

    /// Makes this backend's stream wait (on the device) for `e`.
    pub fn wait(&self, e: &StreamEvent) -> Result<()> {
        self.stream
            .wait(&e.0)
            .map_err(|e| dev_err("waiting on an event", e))
    }

    /// Copies `bytes` from `src` to `dst` on this stream (raw addresses: device memory or pinned
    /// host memory, the direction inferred under UVA).
    pub fn copy_ptr(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| dev_err("binding the context", e))?;
        let r =
            unsafe { cudarc::driver::sys::cuMemcpyAsync(dst, src, bytes, self.stream.cu_stream()) };
        r.result().map_err(|e| dev_err("cuMemcpyAsync", e))
    }

    /// Waits for all work on every stream of the device's context.
    pub fn device_synchronize(&self) -> Result<()> {
        self.ctx
            .synchronize()
            .map_err(|e| dev_err("synchronize", e))
    }

    /// Sets a device buffer to zeros.
    pub fn dev_clear<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        b: &mut DevBuf<T>,
    ) -> Result<()> {
        self.stream
            .memset_zeros(&mut b.data)
            .map_err(|e| dev_err("memset", e))
    }

    /// Device memory in use and total (bytes), from the driver.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        let (free, total) =
            cudarc::driver::result::mem_get_info().map_err(|e| dev_err("cuMemGetInfo", e))?;
        Ok((total - free, total))
    }
}
