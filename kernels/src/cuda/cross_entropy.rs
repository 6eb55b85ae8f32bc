//! Cross-entropy over logits on a GPU (`kernels/cuda/cross_entropy.cu`): the summed loss in
//! f32, and its gradient with each row's log-sum-exp recomputed (no state between the passes).

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::PushKernelArg;
use candle_core::{CudaStorage, Layout, Result, Shape};

use super::{by_dtype, kernel, load, output, per_row, view, LaunchErr};

/// Σ over rows not `ignore` of log Σ e^x − x[target] (a scalar, f32). Targets are checked by
/// the caller.
pub(crate) fn forward(
    targets: &[i64],
    ignore: i64,
    x: &CudaStorage,
    xl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let op = "fused-cross-entropy";
    let dev = x.device();
    let (rows, v) = xl.shape().dims2()?;
    by_dtype!(x.dtype(), op, |T| {
        let xv = view::<T>(x, xl, op)?;
        let mut total = dev.alloc_zeros::<f32>(1)?;
        if rows > 0 {
            let t = dev.clone_htod(targets)?;
            let mut loss = output::<f32>(dev, rows)?;
            let stream = dev.cuda_stream();
            let (f, name) = kernel::<T>(dev, "cross_entropy", "ce_rows")?;
            let vi = v as i32;
            let mut lb = stream.launch_builder(&f);
            lb.arg(&xv).arg(&t).arg(&ignore).arg(&vi).arg(&mut loss);
            // SAFETY: x holds rows · v elements, targets and loss one per row; every target not
            // `ignore` is a column below v (checked by the caller).
            unsafe { lb.launch(per_row(rows)) }.launched(&name)?;
            let f = load(dev, "cross_entropy", "ce_sum")?;
            let n = rows as u64;
            let mut lb = stream.launch_builder(&f);
            lb.arg(&loss).arg(&n).arg(&mut total);
            // SAFETY: loss holds n values; one block writes total[0].
            unsafe { lb.launch(per_row(1)) }.launched("ce_sum")?;
        }
        Ok((super::ops::wrap(dev, total), Shape::from(())))
    })
}

/// dx = g · (softmax(x) − onehot(target)), 0 on ignored rows; x's dtype.
pub(crate) fn grad(
    targets: &[i64],
    ignore: i64,
    g: f32,
    x: &CudaStorage,
    xl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let op = "fused-cross-entropy-grad";
    let dev = x.device();
    let (rows, v) = xl.shape().dims2()?;
    by_dtype!(x.dtype(), op, |T| {
        let xv = view::<T>(x, xl, op)?;
        let mut dx = output::<T>(dev, rows * v)?;
        if rows > 0 {
            let t = dev.clone_htod(targets)?;
            let (f, name) = kernel::<T>(dev, "cross_entropy", "ce_grad")?;
            let stream = dev.cuda_stream();
            let vi = v as i32;
            let mut lb = stream.launch_builder(&f);
            lb.arg(&xv)
                .arg(&t)
                .arg(&ignore)
                .arg(&vi)
                .arg(&g)
                .arg(&mut dx);
            // SAFETY: as in `forward`; dx holds rows · v elements.
            unsafe { lb.launch(per_row(rows)) }.launched(&name)?;
        }
        Ok((super::ops::wrap(dev, dx), xl.shape().clone()))
    })
}
