//! y = x · wᵀ for x (…, K) and w (N, K) as one node: forward one `gemm` over all rows, backward
//! dx = dy · w and dw = dyᵀ · x straight into fresh buffers. candle's composition (reshape,
//! transpose view, matmul, reshape) leaves four graph nodes whose gradients its backward
//! each zero-fills and adds; this leaves one.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use crate::cpu::{f32s, output};
use crate::matmul::{matmul, Operand};

/// c (m×n, row-major) = a·b over all of rayon's threads.
fn gemm_into(dims: (usize, usize, usize), c: &mut [f32], a: Operand<'_>, b: Operand<'_>) {
    matmul(dims, c, dims.1, false, a, b, true)
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
