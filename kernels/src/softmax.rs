//! Softmax over the last dimension, y = e^(x − max) / Σ e^(x − max), one pass to the max and
//! one to exponentiate, sum and scale; backward dx = y · (g − Σ g·y) from the saved output.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{dot, f32s, max, output, sum};
use crate::simd::{exp, rows_per_task};
use crate::simd_fn;

const GRAIN: usize = 1 << 14;

simd_fn! {
    fn forward_rows(x: &[f32], d: usize, y: &mut [f32]) {
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let m = max(xr);
            for i in 0..d {
                yr[i] = exp(xr[i] - m);
            }
            let inv = 1.0 / sum(yr);
            for v in yr.iter_mut() {
                *v *= inv;
            }
        }
    }
}

simd_fn! {
    fn backward_rows(y: &[f32], g: &[f32], d: usize, dx: &mut [f32]) {
        for ((yr, gr), dr) in y.chunks_exact(d).zip(g.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
            let c = dot(gr, yr);
            for i in 0..d {
                dr[i] = yr[i] * (gr[i] - c);
            }
        }
    }
}

pub(crate) struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    cuda_fwd!(|self, a, al| { crate::cuda::ops::softmax(a, al) });

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, self.name())?;
        let d = l.dims().last().copied().unwrap_or(1);
        let mut y = output(x.len());
        let chunk = rows_per_task(x.len() / d.max(1), d, GRAIN) * d;
        if chunk > 0 {
            y.par_chunks_mut(chunk)
                .zip(x.par_chunks(chunk))
                .for_each(|(y, x)| forward_rows(x, d, y));
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxGrad)?))
    }
}

struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
    }

    cuda_fwd!(|self, a, al, b, bl| { crate::cuda::ops::softmax_grad(a, al, b, bl) });

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, g) = (f32s(ys, yl, self.name())?, f32s(gs, gl, self.name())?);
        let d = yl.dims().last().copied().unwrap_or(1);
        let mut dx = output(y.len());
        let chunk = rows_per_task(y.len() / d.max(1), d, GRAIN) * d;
        if chunk > 0 {
            dx.par_chunks_mut(chunk)
                .zip(y.par_chunks(chunk).zip(g.par_chunks(chunk)))
                .for_each(|(dx, (y, g))| backward_rows(y, g, d, dx));
        }
        Ok((CpuStorage::F32(dx), yl.shape().clone()))
    }
}
