//! The fused ops' GPU bodies: each checks what its CPU body checks, allocates its output
//! without zero-filling (every element is written), and launches its kernel on the device's
//! stream.

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda::CudaDevice;
use candle_core::{CudaStorage, Error, Layout, Result, Shape};

use super::{by_dtype, elementwise_grid, kernel, output, per_row, view, Elem, LaunchErr, THREADS};

fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (elementwise_grid(n), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(crate) fn wrap<T: Elem>(
    dev: &CudaDevice,
    s: candle_core::cuda::cudarc::driver::CudaSlice<T>,
) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(s, dev.clone())
}

/// The row width of `x` for a per-row kernel (the last dimension), and the row count.
fn rows_of(l: &Layout, op: &str) -> Result<(usize, usize)> {
    let d = l.dims().last().copied().unwrap_or(0);
    if d == 0 || d > i32::MAX as usize {
        return Err(Error::Msg(format!(
            "{op}: rows of width {d} are not supported"
        )));
    }
    Ok((l.shape().elem_count() / d, d))
}

pub(crate) fn rms_norm(
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let op = "fused-rms-norm";
    let dev = x.device();
    let (rows, d) = rows_of(xl, op)?;
    by_dtype!(x.dtype(), op, |T| {
        let (xv, wv) = (view::<T>(x, xl, op)?, view::<T>(w, wl, op)?);
        let mut y = output::<T>(dev, rows * d)?;
        if rows > 0 {
            let (f, name) = kernel::<T>(dev, "rms_norm", "rms_norm_fwd")?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let di = d as i32;
            b.arg(&xv).arg(&wv).arg(&mut y).arg(&di).arg(&eps);
            // SAFETY: the arguments match the kernel's signature; every buffer holds rows·d
            // (x, y) or d (w) elements.
            unsafe { b.launch(per_row(rows)) }.launched(&name)?;
        }
        Ok((wrap(dev, y), xl.shape().clone()))
    })
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn rms_norm_dx(
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let op = "fused-rms-norm-dx";
    let dev = x.device();
    let (rows, d) = rows_of(xl, op)?;
    by_dtype!(x.dtype(), op, |T| {
        let (xv, wv, gv) = (
            view::<T>(x, xl, op)?,
            view::<T>(w, wl, op)?,
            view::<T>(g, gl, op)?,
        );
        let mut dx = output::<T>(dev, rows * d)?;
        if rows > 0 {
            let (f, name) = kernel::<T>(dev, "rms_norm", "rms_norm_dx")?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let di = d as i32;
            b.arg(&xv).arg(&wv).arg(&gv).arg(&mut dx).arg(&di).arg(&eps);
            // SAFETY: as in `rms_norm`; g and dx hold rows·d elements.
            unsafe { b.launch(per_row(rows)) }.launched(&name)?;
        }
        Ok((wrap(dev, dx), xl.shape().clone()))
    })
}

/// dw (f32, d) = Σ over rows of g · x · (1/rms of the row).
pub(crate) fn rms_norm_dw(
    x: &CudaStorage,
    xl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let op = "fused-rms-norm-dw";
    let dev = x.device();
    let (rows, d) = rows_of(xl, op)?;
    by_dtype!(x.dtype(), op, |T| {
        let (xv, gv) = (view::<T>(x, xl, op)?, view::<T>(g, gl, op)?);
        let mut dw = dev.alloc_zeros::<f32>(d)?;
        if rows > 0 {
            let mut inv = output::<f32>(dev, rows)?;
            let stream = dev.cuda_stream();
            let (f, name) = kernel::<T>(dev, "rms_norm", "rms_norm_inv")?;
            let di = d as i32;
            let mut b = stream.launch_builder(&f);
            b.arg(&xv).arg(&mut inv).arg(&di).arg(&eps);
            // SAFETY: x holds rows·d elements, inv one per row.
            unsafe { b.launch(per_row(rows)) }.launched(&name)?;
            const ROWS_PER_BLOCK: usize = 64;
            let (f, name) = kernel::<T>(dev, "rms_norm", "rms_norm_dw")?;
            let (ri, rpb) = (rows as i32, ROWS_PER_BLOCK as i32);
            let cfg = LaunchConfig {
                grid_dim: (
                    d.div_ceil(THREADS as usize) as u32,
                    rows.div_ceil(ROWS_PER_BLOCK) as u32,
                    1,
                ),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = stream.launch_builder(&f);
            b.arg(&xv)
                .arg(&gv)
                .arg(&inv)
                .arg(&mut dw)
                .arg(&ri)
                .arg(&di)
                .arg(&rpb);
            // SAFETY: threads past column d return at once; every row index is below `rows`.
            unsafe { b.launch(cfg) }.launched(&name)?;
        }
        Ok((wrap(dev, dw), Shape::from(d)))
    })
}

pub(crate) fn softmax(x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
    let op = "fused-softmax";
    let dev = x.device();
    let (rows, d) = rows_of(xl, op)?;
    by_dtype!(x.dtype(), op, |T| {
        let xv = view::<T>(x, xl, op)?;
        let mut y = output::<T>(dev, rows * d)?;
        if rows > 0 {
            let (f, name) = kernel::<T>(dev, "softmax", "softmax_fwd")?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let di = d as i32;
            b.arg(&xv).arg(&mut y).arg(&di);
            // SAFETY: x and y hold rows·d elements.
            unsafe { b.launch(per_row(rows)) }.launched(&name)?;
        }
        Ok((wrap(dev, y), xl.shape().clone()))
    })
}

pub(crate) fn softmax_grad(
    y: &CudaStorage,
    yl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let op = "fused-softmax-grad";
    let dev = y.device();
    let (rows, d) = rows_of(yl, op)?;
    by_dtype!(y.dtype(), op, |T| {
        let (yv, gv) = (view::<T>(y, yl, op)?, view::<T>(g, gl, op)?);
        let mut dx = output::<T>(dev, rows * d)?;
        if rows > 0 {
            let (f, name) = kernel::<T>(dev, "softmax", "softmax_bwd")?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let di = d as i32;
            b.arg(&yv).arg(&gv).arg(&mut dx).arg(&di);
            // SAFETY: y, g and dx hold rows·d elements.
            unsafe { b.launch(per_row(rows)) }.launched(&name)?;
        }
        Ok((wrap(dev, dx), yl.shape().clone()))
    })
}

pub(crate) fn swiglu(
    a: &CudaStorage,
    al: &Layout,
    b_: &CudaStorage,
    bl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let op = "fused-swiglu";
    let dev = a.device();
    let n = al.shape().elem_count();
    by_dtype!(a.dtype(), op, |T| {
        let (av, bv) = (view::<T>(a, al, op)?, view::<T>(b_, bl, op)?);
        let mut y = output::<T>(dev, n)?;
        if n > 0 {
            let (f, name) = kernel::<T>(dev, "swiglu", "swiglu_fwd")?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let nn = n as u64;
            b.arg(&av).arg(&bv).arg(&mut y).arg(&nn);
            // SAFETY: a, b and y hold n elements; the kernel's loop stops at n.
            unsafe { b.launch(elementwise(n)) }.launched(&name)?;
        }
        Ok((wrap(dev, y), al.shape().clone()))
    })
}

/// Both gradients, packed (2, …): d_gate then d_up.
pub(crate) fn swiglu_grad(
    a: &CudaStorage,
    al: &Layout,
    b_: &CudaStorage,
    bl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let op = "fused-swiglu-grad";
    let dev = a.device();
    let n = al.shape().elem_count();
    by_dtype!(a.dtype(), op, |T| {
        let (av, bv, gv) = (
            view::<T>(a, al, op)?,
            view::<T>(b_, bl, op)?,
            view::<T>(g, gl, op)?,
        );
        let mut out = output::<T>(dev, 2 * n)?;
        if n > 0 {
            let (f, name) = kernel::<T>(dev, "swiglu", "swiglu_bwd")?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let nn = n as u64;
            b.arg(&av).arg(&bv).arg(&gv).arg(&mut out).arg(&nn);
            // SAFETY: a, b, g hold n elements and out 2n.
            unsafe { b.launch(elementwise(n)) }.launched(&name)?;
        }
        let mut dims = vec![2];
        dims.extend_from_slice(al.dims());
        Ok((wrap(dev, out), Shape::from(dims)))
    })
}

/// Rotary embedding of x (B, H, T, D) with tables (B or 1, T, D); shapes checked by the caller.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rotary(
    x: &CudaStorage,
    xl: &Layout,
    cos: &CudaStorage,
    cl: &Layout,
    sin: &CudaStorage,
    sl: &Layout,
    inverse: bool,
) -> Result<(CudaStorage, Shape)> {
    let op = "fused-rotary";
    let dev = x.device();
    let (_, heads, t, d) = xl.shape().dims4()?;
    let (cb, _, _) = cl.shape().dims3()?;
    let n = xl.shape().elem_count();
    by_dtype!(x.dtype(), op, |T| {
        let (xv, cv, sv) = (
            view::<T>(x, xl, op)?,
            view::<T>(cos, cl, op)?,
            view::<T>(sin, sl, op)?,
        );
        let mut y = output::<T>(dev, n)?;
        let pairs = n / 2;
        if pairs > 0 {
            let (f, name) = kernel::<T>(dev, "rotary", "rotary")?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let (hi, ti, di, cbi) = (heads as i32, t as i32, d as i32, cb as i32);
            let (inv, np) = (inverse as i32, pairs as u64);
            b.arg(&xv).arg(&cv).arg(&sv).arg(&mut y);
            b.arg(&hi).arg(&ti).arg(&di).arg(&cbi).arg(&inv).arg(&np);
            // SAFETY: x and y hold B·H·T·D elements, the tables cb·T·D; the loop stops at
            // `pairs`.
            unsafe { b.launch(elementwise(pairs)) }.launched(&name)?;
        }
        Ok((wrap(dev, y), xl.shape().clone()))
    })
}
