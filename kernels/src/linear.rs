//! y = x · wᵀ for x (…, K) and w (N, K) as one node: forward one `gemm` over all rows, backward
//! dx = dy · w and dw = dyᵀ · x straight into fresh buffers. candle's composition (reshape,
//! transpose view, matmul, reshape) leaves four graph nodes whose gradients its backward
//! each zero-fills and adds; this leaves one.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::Parallelism;

use crate::cpu::{f32s, output};

/// c (m×n, row-major) = a·b; a and b by (slice, row stride, column stride).
fn gemm_into(
    (m, n, k): (usize, usize, usize),
    c: &mut [f32],
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c[..m * n].fill(0.0);
        return;
    }
    assert!(c.len() >= m * n);
    assert!(a.0.len() > (m - 1) * a.1 + (k - 1) * a.2);
    assert!(b.0.len() > (k - 1) * b.1 + (n - 1) * b.2);
    let threads = rayon::current_num_threads();
    let par = if threads > 1 && m * n * k > 1 << 16 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts keep every index gemm touches inside the slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.0.as_ptr(),
            a.2 as isize,
            a.1 as isize,
            b.0.as_ptr(),
            b.2 as isize,
            b.1 as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

pub(crate) struct Linear;

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (f32s(xs, xl, self.name())?, f32s(ws, wl, self.name())?);
        let (n, k) = wl.shape().dims2()?;
        let m = x.len() / k.max(1);
        let mut y = output(m * n);
        gemm_into((m, n, k), &mut y, (x, k, 1), (w, 1, k));
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().expect("x has a last dimension") = n;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = dy.apply_op2_no_bwd(w, &InputGrad)?;
        let dw = dy.apply_op2_no_bwd(x, &WeightGrad)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// dx (…, K) = dy (…, N) · w (N, K).
struct InputGrad;

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "fused-linear-dx"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, w) = (f32s(gs, gl, self.name())?, f32s(ws, wl, self.name())?);
        let (n, k) = wl.shape().dims2()?;
        let m = g.len() / n.max(1);
        let mut dx = output(m * k);
        gemm_into((m, k, n), &mut dx, (g, n, 1), (w, k, 1));
        let mut dims = gl.dims().to_vec();
        *dims.last_mut().expect("dy has a last dimension") = k;
        Ok((CpuStorage::F32(dx), Shape::from(dims)))
    }
}

/// dw (N, K) = dyᵀ (N, M) · x (M, K).
struct WeightGrad;

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "fused-linear-dw"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, x) = (f32s(gs, gl, self.name())?, f32s(xs, xl, self.name())?);
        let n = *gl.dims().last().expect("dy has a last dimension");
        let k = *xl.dims().last().expect("x has a last dimension");
        let m = g.len() / n.max(1);
        let mut dw = output(n * k);
        gemm_into((n, k, m), &mut dw, (g, 1, n), (x, k, 1));
        Ok((CpuStorage::F32(dw), Shape::from((n, k))))
    }
}
