//! Launch wrapper of the sampling kernel (`kernels/sample.cu`): one block per logits row picks
//! that row's token on the device (greedy, or temperature + top-k + top-p with the caller's
//! draw), so only one id per row crosses to the host.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{dev_err, CudaBackend, CudaTensor};
use crate::backend::{checks, Result};
use crate::sample::SampleSpec;

/// Threads per row (`SAMPLE_THREADS` in `sample.cu`).
const THREADS: u32 = 1024;

/// One row's spec as the kernel reads it (`SampleSpecDev` in `sample.cu`).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct DevSpec {
    temperature: f32,
    top_k: u32,
    top_p: f32,
    pad: u32,
    u: f64,
}

impl CudaBackend {
    pub(super) fn sample_rows_impl(
        &self,
        logits: &CudaTensor,
        specs: &[SampleSpec],
    ) -> Result<Vec<u32>> {
        checks::sample_rows(logits.rows, logits.cols, specs)?;
        if specs.is_empty() {
            return Ok(Vec::new());
        }
        let dev: Vec<DevSpec> = specs
            .iter()
            .map(|s| DevSpec {
                temperature: s.temperature,
                top_k: s.top_k,
                top_p: s.top_p,
                pad: 0,
                u: s.u,
            })
            .collect();
        let spec_buf = self.upload(bytemuck::cast_slice::<DevSpec, u8>(&dev), "sample specs")?;
        let mut ids = self.alloc::<u32>(specs.len(), "sampled ids")?;
        let n = logits.cols as i32; // checked: 1 ..= 2^30
        let name = "sample_rows";
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&logits.data).arg(&n).arg(&spec_buf).arg(&mut ids);
        let cfg = LaunchConfig {
            grid_dim: (specs.len() as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.map_err(Self::launch_err(name))?;
        let out = self
            .stream
            .clone_dtoh(&ids)
            .map_err(|e| dev_err("sample_rows read", e))?;
        self.synchronize()?;
        Ok(out)
    }
}
