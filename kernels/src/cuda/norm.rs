//! LayerNorm / GroupNorm on a GPU (`kernels/cuda/norm.cu`), for the CPU op's `Grouping`.

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::{CudaStorage, Layout, Result, Shape};

use super::{by_dtype, kernel, output, per_row, view, LaunchErr, THREADS};
use crate::norm::Grouping;

fn ints(g: &Grouping) -> (i32, i32, i32) {
    (g.groups as i32, g.per_group as i32, g.spatial as i32)
}

pub(crate) fn forward(
    gr: &Grouping,
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    b: &CudaStorage,
    bl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let op = "fused-norm";
    let dev = x.device();
    let n = xl.shape().elem_count();
    let rows = n / (gr.per_group * gr.spatial).max(1);
    by_dtype!(x.dtype(), op, |T| {
        let (xv, wv, bv) = (
            view::<T>(x, xl, op)?,
            view::<T>(w, wl, op)?,
            view::<T>(b, bl, op)?,
        );
        let mut y = output::<T>(dev, n)?;
        if rows > 0 {
            let (f, name) = kernel::<T>(dev, "norm", "norm_fwd")?;
            let stream = dev.cuda_stream();
            let mut lb = stream.launch_builder(&f);
            let (g, pg, s) = ints(gr);
            lb.arg(&xv).arg(&wv).arg(&bv).arg(&mut y);
            lb.arg(&g).arg(&pg).arg(&s).arg(&gr.eps);
            // SAFETY: x and y hold rows · per_group · spatial elements, w and b one per channel.
            unsafe { lb.launch(per_row(rows)) }.launched(&name)?;
        }
        Ok((super::ops::wrap(dev, y), xl.shape().clone()))
    })
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn dx(
    gr: &Grouping,
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let op = "fused-norm-dx";
    let dev = x.device();
    let n = xl.shape().elem_count();
    let rows = n / (gr.per_group * gr.spatial).max(1);
    by_dtype!(x.dtype(), op, |T| {
        let (xv, wv, gv) = (
            view::<T>(x, xl, op)?,
            view::<T>(w, wl, op)?,
            view::<T>(g, gl, op)?,
        );
        let mut dx = output::<T>(dev, n)?;
        if rows > 0 {
            let (f, name) = kernel::<T>(dev, "norm", "norm_dx")?;
            let stream = dev.cuda_stream();
            let mut lb = stream.launch_builder(&f);
            let (gi, pg, s) = ints(gr);
            lb.arg(&xv).arg(&wv).arg(&gv).arg(&mut dx);
            lb.arg(&gi).arg(&pg).arg(&s).arg(&gr.eps);
            // SAFETY: as in `forward`; g and dx hold as many elements as x.
            unsafe { lb.launch(per_row(rows)) }.launched(&name)?;
        }
        Ok((super::ops::wrap(dev, dx), xl.shape().clone()))
    })
}

/// (2, C) f32: Σ g·x̂ per channel, then Σ g.
pub(crate) fn dw_db(
    gr: &Grouping,
    x: &CudaStorage,
    xl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let op = "fused-norm-dwdb";
    let dev = x.device();
    let m = gr.per_group * gr.spatial;
    let rows = xl.shape().elem_count() / m.max(1);
    let channels = gr.groups * gr.per_group;
    by_dtype!(x.dtype(), op, |T| {
        let (xv, gv) = (view::<T>(x, xl, op)?, view::<T>(g, gl, op)?);
        let mut out = dev.alloc_zeros::<f32>(2 * channels)?;
        if rows > 0 {
            let stream = dev.cuda_stream();
            let mut stats = output::<f32>(dev, 2 * rows)?;
            let (f, name) = kernel::<T>(dev, "norm", "norm_stats")?;
            let mi = m as i32;
            let mut lb = stream.launch_builder(&f);
            lb.arg(&xv).arg(&mut stats).arg(&mi).arg(&gr.eps);
            // SAFETY: x holds rows · m elements, stats two per row.
            unsafe { lb.launch(per_row(rows)) }.launched(&name)?;
            const PER_BLOCK: usize = 16;
            let batches = rows / gr.groups;
            let (f, name) = kernel::<T>(dev, "norm", "norm_dwdb")?;
            let (gi, pg, s) = ints(gr);
            let (bi, pb) = (batches as i32, PER_BLOCK as i32);
            let cfg = LaunchConfig {
                grid_dim: (
                    channels.div_ceil(THREADS as usize) as u32,
                    batches.div_ceil(PER_BLOCK).max(1) as u32,
                    1,
                ),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut lb = stream.launch_builder(&f);
            lb.arg(&xv).arg(&gv).arg(&stats).arg(&mut out);
            lb.arg(&bi).arg(&gi).arg(&pg).arg(&s).arg(&pb);
            // SAFETY: threads past the last channel return at once; rows are n·groups + group
            // for n below `batches`, all inside x, g and stats.
            unsafe { lb.launch(cfg) }.launched(&name)?;
        }
        Ok((super::ops::wrap(dev, out), Shape::from((2, channels))))
    })
}
