//! Causal attention on a GPU (`kernels/cuda/attention.cu`): forward keeps O only; backward
//! recomputes the scores, one pass per query row (dq) and one per key row (dk, dv).

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{
    CudaSlice, CudaView, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda::CudaDevice;
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, Error, Layout, Result, Shape, Storage, Tensor};

use super::{by_dtype, kernel, output, view, Elem, LaunchErr};
use crate::attention::CausalMask;

const THREADS: u32 = 128;
/// Columns per thread the kernels hold (MAX_COLS in attention.cu).
const MAX_COLS: usize = 4;

/// The shape of one call: batch, query heads, heads per key-value head, query and key lengths,
/// head size.
#[derive(Clone, Copy)]
pub(crate) struct Shape4 {
    pub b: usize,
    pub heads: usize,
    pub rep: usize,
    pub tq: usize,
    pub tk: usize,
    pub d: usize,
}

/// The mask's arrays on the device (a one-element stand-in where absent, with a null flag).
struct DeviceMask {
    key_valid: CudaSlice<u8>,
    segments: CudaSlice<u32>,
    has_key_valid: bool,
    has_segments: bool,
    past: i32,
}

impl DeviceMask {
    fn new(dev: &CudaDevice, m: &CausalMask) -> Result<Self> {
        let key_valid = match &m.key_valid {
            Some(k) => dev.clone_htod(k.as_slice())?,
            None => dev.alloc_zeros::<u8>(1)?,
        };
        let segments = match &m.segments {
            Some(s) => dev.clone_htod(s.as_slice())?,
            None => dev.alloc_zeros::<u32>(1)?,
        };
        Ok(Self {
            key_valid,
            segments,
            has_key_valid: m.key_valid.is_some(),
            has_segments: m.segments.is_some(),
            past: m.past_len as i32,
        })
    }

    /// Pushes `key_valid, segments, past, tq, tk` (null pointers for absent arrays).
    fn push<'a>(&'a self, lb: &mut LaunchArgs<'a>, ints: &'a [i32; 2], null: &'a u64) {
        if self.has_key_valid {
            lb.arg(&self.key_valid);
        } else {
            lb.arg(null);
        }
        if self.has_segments {
            lb.arg(&self.segments);
        } else {
            lb.arg(null);
        }
        lb.arg(&self.past).arg(&ints[0]).arg(&ints[1]);
    }
}

fn check(s: &Shape4) -> Result<()> {
    if s.d > MAX_COLS * THREADS as usize || s.tk > i32::MAX as usize {
        return Err(Error::Msg(format!(
            "fused-attention: head size {} above {} or {} keys: no CUDA kernel",
            s.d,
            MAX_COLS * THREADS as usize,
            s.tk
        )));
    }
    Ok(())
}

fn grid(rows: usize, planes: usize, shared_floats: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, planes as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: (4 * shared_floats) as u32,
    }
}

/// O (q's shape and dtype) from q, k, v.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    mask: &CausalMask,
    s: Shape4,
    q: &CudaStorage,
    ql: &Layout,
    k: &CudaStorage,
    kl: &Layout,
    v: &CudaStorage,
    vl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    check(&s)?;
    let op = "fused-attention";
    let dev = q.device();
    by_dtype!(q.dtype(), op, |T| {
        let (qv, kv, vv) = (
            view::<T>(q, ql, op)?,
            view::<T>(k, kl, op)?,
            view::<T>(v, vl, op)?,
        );
        let mut o = output::<T>(dev, ql.shape().elem_count())?;
        if s.b * s.heads * s.tq > 0 {
            let mut lse = output::<f32>(dev, s.b * s.heads * s.tq)?;
            let m = DeviceMask::new(dev, mask)?;
            let (f, name) = kernel::<T>(dev, "attention", "attn_fwd")?;
            let stream = dev.cuda_stream();
            let (ints, null) = ([s.tq as i32, s.tk as i32], 0u64);
            let (h, r, d) = (s.heads as i32, s.rep as i32, s.d as i32);
            let mut lb = stream.launch_builder(&f);
            lb.arg(&qv).arg(&kv).arg(&vv).arg(&mut o).arg(&mut lse);
            m.push(&mut lb, &ints, &null);
            lb.arg(&h).arg(&r).arg(&d);
            let cfg = grid(s.tq, s.b * s.heads, s.d + THREADS as usize);
            // SAFETY: q, o hold B·H·Tq·D elements, k, v B·Hkv·Tk·D, lse B·H·Tq; the mask arrays
            // are (B × Tk) and (B × Tq) where present (checked by the CPU op's shapes).
            unsafe { lb.launch(cfg) }.launched(&name)?;
        }
        Ok((super::ops::wrap(dev, o), ql.shape().clone()))
    })
}

/// The CUDA storage of a GPU tensor.
fn cuda_of(storage: &Storage) -> Result<&CudaStorage> {
    match storage {
        Storage::Cuda(c) => Ok(c),
        _ => Err(Error::Msg("fused-attention: GPU tensors only".into())),
    }
}

fn tensor_of<T: Elem>(dev: &CudaDevice, s: CudaSlice<T>, shape: &Shape) -> Tensor {
    let storage = Storage::Cuda(super::ops::wrap(dev, s));
    Tensor::from_storage(storage, shape.clone(), BackpropOp::none(), false)
}

/// (dq, dk, dv) from q, k, v, o and dO (all contiguous, on one GPU, one dtype).
pub(crate) fn backward(
    mask: &CausalMask,
    s: Shape4,
    [q, k, v, o, dout]: [&Tensor; 5],
) -> Result<(Tensor, Tensor, Tensor)> {
    check(&s)?;
    let op = "fused-attention-backward";
    let guards = [q, k, v, o, dout].map(|t| t.storage_and_layout());
    let [qs, ks, vs, os, ds] = [0, 1, 2, 3, 4].map(|i| cuda_of(&guards[i].0));
    let (qs, ks, vs, os, ds) = (qs?, ks?, vs?, os?, ds?);
    let [ql, kl, vl, ol, dl] = [0, 1, 2, 3, 4].map(|i| guards[i].1);
    let dev = qs.device().clone();
    let (qshape, kshape) = (q.shape().clone(), k.shape().clone());
    by_dtype!(qs.dtype(), op, |T| {
        let views: [CudaView<'_, T>; 5] = [
            view::<T>(qs, ql, op)?,
            view::<T>(ks, kl, op)?,
            view::<T>(vs, vl, op)?,
            view::<T>(os, ol, op)?,
            view::<T>(ds, dl, op)?,
        ];
        let [qv, kv, vv, ov, dov] = &views;
        let rows = s.b * s.heads * s.tq;
        let empty = rows == 0 || s.tk == 0;
        // Every element is written by the kernels, except when there is nothing to attend.
        let buf = |n: usize| {
            if empty {
                dev.alloc_zeros::<T>(n)
            } else {
                output::<T>(&dev, n)
            }
        };
        let (mut dq, mut dk, mut dv) = (
            buf(qshape.elem_count())?,
            buf(kshape.elem_count())?,
            buf(kshape.elem_count())?,
        );
        if !empty {
            let mut lse = output::<f32>(&dev, rows)?;
            let mut delta = output::<f32>(&dev, rows)?;
            let m = DeviceMask::new(&dev, mask)?;
            let stream = dev.cuda_stream();
            let (ints, null) = ([s.tq as i32, s.tk as i32], 0u64);
            let (h, r, d) = (s.heads as i32, s.rep as i32, s.d as i32);
            let (f, name) = kernel::<T>(&dev, "attention", "attn_bwd_dq")?;
            let mut lb = stream.launch_builder(&f);
            lb.arg(qv).arg(kv).arg(vv).arg(ov).arg(dov);
            lb.arg(&mut dq).arg(&mut lse).arg(&mut delta);
            m.push(&mut lb, &ints, &null);
            lb.arg(&h).arg(&r).arg(&d);
            let cfg = grid(s.tq, s.b * s.heads, 2 * s.d + THREADS as usize);
            // SAFETY: as in `forward`; dq like q; lse and delta one per query row.
            unsafe { lb.launch(cfg) }.launched(&name)?;
            let (f, name) = kernel::<T>(&dev, "attention", "attn_bwd_dkv")?;
            let mut lb = stream.launch_builder(&f);
            lb.arg(qv).arg(kv).arg(vv).arg(dov);
            lb.arg(&mut dk).arg(&mut dv).arg(&lse).arg(&delta);
            m.push(&mut lb, &ints, &null);
            lb.arg(&h).arg(&r).arg(&d);
            let cfg = grid(
                s.tk,
                s.b * (s.heads / s.rep),
                2 * s.d + 2 * THREADS as usize,
            );
            // SAFETY: dk, dv like k; lse and delta were written by the pass above.
            unsafe { lb.launch(cfg) }.launched(&name)?;
        }
        Ok((
            tensor_of(&dev, dq, &qshape),
            tensor_of(&dev, dk, &kshape),
            tensor_of(&dev, dv, &kshape),
        ))
    })
}
