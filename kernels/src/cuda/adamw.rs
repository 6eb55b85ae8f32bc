//! AdamW in place on a GPU: one kernel launch updates the parameter's storage and both moments
//! (`kernels/cuda/adamw.cu`, the CPU kernel's order of operations).

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::PushKernelArg;
use candle_core::{CudaStorage, Error, InplaceOp2, Layout, Result, Storage, Tensor};

use super::{by_dtype, elementwise_grid, kernel, view, LaunchErr};
use crate::adamw::AdamWUpdate;

pub(crate) struct OnDevice {
    pub k: AdamWUpdate,
    pub m: Tensor,
    pub v: Tensor,
}

impl InplaceOp2 for OnDevice {
    fn name(&self) -> &'static str {
        "fused-adamw-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &mut candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        Err(Error::Msg("fused-adamw-cuda: GPU tensors only".into()))
    }

    fn cuda_fwd(
        &self,
        p: &mut CudaStorage,
        pl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> Result<()> {
        let op = self.name();
        let dev = p.device().clone();
        let (ms, ml) = self.m.storage_and_layout();
        let (vs, vl) = self.v.storage_and_layout();
        let (Storage::Cuda(ms), Storage::Cuda(vs)) = (&*ms, &*vs) else {
            return Err(Error::Msg(format!("{op}: moments must be on the GPU")));
        };
        let (m, v) = (view::<f32>(ms, ml, op)?, view::<f32>(vs, vl, op)?);
        let (a, b) = pl
            .contiguous_offsets()
            .ok_or_else(|| Error::Msg(format!("{op}: contiguous parameter")))?;
        let n = b - a;
        if n == 0 {
            return Ok(());
        }
        let k = self.k;
        by_dtype!(g.dtype(), op, |G| {
            let gv = view::<G>(g, gl, op)?;
            let mut pv = p.as_cuda_slice_mut::<f32>()?.slice_mut(a..b);
            let (f, name) = kernel::<G>(&dev, "adamw", "adamw")?;
            let stream = dev.cuda_stream();
            let mut lb = stream.launch_builder(&f);
            let nn = n as u64;
            lb.arg(&mut pv).arg(&gv).arg(&m).arg(&v).arg(&nn);
            lb.arg(&k.step_size)
                .arg(&k.lerp_w)
                .arg(&k.b2)
                .arg(&k.one_minus_b2);
            lb.arg(&k.bc2_sqrt).arg(&k.eps).arg(&k.decay);
            let cfg = candle_core::cuda::cudarc::driver::LaunchConfig {
                grid_dim: (elementwise_grid(n), 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: p, g, m, v each hold n elements on this device; the kernel writes m and v
            // through their views, which the optimizer owns and nothing reads during the step.
            unsafe { lb.launch(cfg) }.launched(&name)?;
            Ok(())
        })
    }
}
