//! GPU bodies for our custom ops, written with tensors: a custom op sees storages, while the
//! collectives and products it wraps take tensors. Each crossing copies the view once on the
//! device (no host round trip).

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, Layout, Shape, Storage, Tensor};

/// A fresh contiguous copy of the strided view `l` of `s`.
fn contiguous_copy(s: &CudaStorage, l: &Layout) -> candle_core::Result<CudaStorage> {
    // SAFETY: every element of the new buffer is written by the strided copy just below.
    let mut dst = unsafe { s.device().alloc_uninit(l.shape(), s.dtype())? };
    s.copy_strided_src(&mut dst, 0, l)?;
    Ok(dst)
}

/// A tensor (no gradient history) over a copy of a custom op's GPU input.
pub(crate) fn tensor_of(s: &CudaStorage, l: &Layout) -> candle_core::Result<Tensor> {
    let copy = contiguous_copy(s, l)?;
    Ok(Tensor::from_storage(
        Storage::Cuda(copy),
        l.shape().clone(),
        BackpropOp::none(),
        false,
    ))
}

/// A custom op's GPU output, from the tensor that holds it.
pub(crate) fn storage_of(t: &Tensor) -> candle_core::Result<(CudaStorage, Shape)> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cuda(s) => Ok((contiguous_copy(s, layout)?, layout.shape().clone())),
        _ => candle_core::bail!("custom op: a GPU op's result is not on the GPU"),
    }
}
