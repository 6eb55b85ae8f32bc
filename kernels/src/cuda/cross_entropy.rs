//! Cross-entropy over logits on a GPU (`kernels/cuda/cross_entropy.cu`): the summed loss in
//! f32, and its gradient with each row's log-sum-exp recomputed (no state between the passes);
//! under a vocabulary split, the row statistics completed over the group on the host.

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::PushKernelArg;
use candle_core::{CudaStorage, Layout, Result, Shape};

use super::{by_dtype, kernel, load, output, per_row, view, LaunchErr};
use crate::cross_entropy::VocabSplit;

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

/// Under a vocabulary split: the summed loss (f32 scalar) and each row's log-sum-exp over the
/// whole vocabulary, for backward. `local` is each row's target column on this rank or −1;
/// `counted` marks the rows whose target is not ignored. The row statistics (rows floats, not
/// the logits) go to the host for the group's reductions, as on the CPU.
pub(crate) fn split_forward(
    local: &[i64],
    counted: &[bool],
    split: &VocabSplit,
    x: &CudaStorage,
    xl: &Layout,
) -> Result<(CudaStorage, Shape, Vec<f32>)> {
    let op = "fused-cross-entropy";
    let dev = x.device();
    let (rows, v) = xl.shape().dims2()?;
    by_dtype!(x.dtype(), op, |T| {
        let xv = view::<T>(x, xl, op)?;
        let stream = dev.cuda_stream();
        let vi = v as i32;
        let mut m_dev = output::<f32>(dev, rows.max(1))?;
        if rows > 0 {
            let (f, name) = kernel::<T>(dev, "cross_entropy", "ce_split_max")?;
            let mut lb = stream.launch_builder(&f);
            lb.arg(&xv).arg(&vi).arg(&mut m_dev);
            // SAFETY: x holds rows · v elements and m one per row.
            unsafe { lb.launch(per_row(rows)) }.launched(&name)?;
        }
        let mut m = dev.clone_dtoh(&m_dev)?;
        m.truncate(rows);
        (split.all_max)(&mut m)?;
        let mut both = vec![0f32; 2 * rows];
        if rows > 0 {
            let m_dev = dev.clone_htod(&m)?;
            let local_dev = dev.clone_htod(local)?;
            let mut sum = output::<f32>(dev, rows)?;
            let mut picked = output::<f32>(dev, rows)?;
            let (f, name) = kernel::<T>(dev, "cross_entropy", "ce_split_stats")?;
            let mut lb = stream.launch_builder(&f);
            lb.arg(&xv)
                .arg(&local_dev)
                .arg(&m_dev)
                .arg(&vi)
                .arg(&mut sum)
                .arg(&mut picked);
            // SAFETY: as above; local, m, sum and picked hold one value per row, and every
            // local column is −1 or below v (the caller maps targets to this rank's columns).
            unsafe { lb.launch(per_row(rows)) }.launched(&name)?;
            both[..rows].copy_from_slice(&dev.clone_dtoh(&sum)?);
            both[rows..].copy_from_slice(&dev.clone_dtoh(&picked)?);
        }
        (split.all_sum)(&mut both)?;
        let (s, p) = both.split_at(rows);
        let lse: Vec<f32> = m.iter().zip(s).map(|(m, s)| m + s.ln()).collect();
        let total: f64 = (0..rows)
            .filter(|&r| counted[r])
            .map(|r| (lse[r] - p[r]) as f64)
            .sum();
        let total = dev.clone_htod(&[total as f32])?;
        Ok((super::ops::wrap(dev, total), Shape::from(()), lse))
    })
}

/// Under a vocabulary split: dx = scale · (e^(x − lse) − onehot(local)) with the forward
/// pass's log-sum-exps, `scale` per row (g, or 0 on ignored rows); x's dtype.
pub(crate) fn split_grad(
    local: &[i64],
    lse: &[f32],
    scale: &[f32],
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
            let local_dev = dev.clone_htod(local)?;
            let lse_dev = dev.clone_htod(lse)?;
            let scale_dev = dev.clone_htod(scale)?;
            let (f, name) = kernel::<T>(dev, "cross_entropy", "ce_split_grad")?;
            let stream = dev.cuda_stream();
            let vi = v as i32;
            let mut lb = stream.launch_builder(&f);
            lb.arg(&xv)
                .arg(&local_dev)
                .arg(&lse_dev)
                .arg(&scale_dev)
                .arg(&vi)
                .arg(&mut dx);
            // SAFETY: x and dx hold rows · v elements; local, lse and scale one per row, every
            // local column −1 or below v.
            unsafe { lb.launch(per_row(rows)) }.launched(&name)?;
        }
        Ok((super::ops::wrap(dev, dx), xl.shape().clone()))
    })
}
