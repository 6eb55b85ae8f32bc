//! RMSNorm as Hugging Face's LlamaRMSNorm: y = w · x / sqrt(mean(x²) + eps), over the last
//! dimension. Forward is one pass per row; backward recomputes each row's 1/rms (cheaper than
//! storing it) and gives dx in one pass and dw as a per-thread partial sum over rows.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{dot, f32s, output};
use crate::simd::rows_per_task;
use crate::simd_fn;

const GRAIN: usize = 1 << 14;

#[inline(always)]
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    1.0 / (dot(x, x) / x.len() as f32 + eps).sqrt()
}

simd_fn! {
    fn forward_rows(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
        let d = w.len();
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let r = inv_rms(xr, eps);
            for i in 0..d {
                yr[i] = xr[i] * r * w[i];
            }
        }
    }
}

simd_fn! {
    fn dx_rows(x: &[f32], w: &[f32], g: &[f32], eps: f32, dx: &mut [f32]) {
        let d = w.len();
        for ((xr, gr), dr) in x.chunks_exact(d).zip(g.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
            let r = inv_rms(xr, eps);
            // dx = r · (g·w − x̂ · mean(g·w·x̂)), x̂ = r·x.
            for i in 0..d {
                dr[i] = gr[i] * w[i];
            }
            let c = dot(dr, xr) * r / d as f32;
            for i in 0..d {
                dr[i] = r * (dr[i] - xr[i] * r * c);
            }
        }
    }
}

simd_fn! {
    fn dw_rows(x: &[f32], g: &[f32], eps: f32, dw: &mut [f32]) {
        let d = dw.len();
        for (xr, gr) in x.chunks_exact(d).zip(g.chunks_exact(d)) {
            let r = inv_rms(xr, eps);
            for i in 0..d {
                dw[i] += gr[i] * xr[i] * r;
            }
        }
    }
}

pub(crate) struct RmsNorm {
    pub eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    cuda_fwd!(|self, a, al, b, bl| { crate::cuda::ops::rms_norm(a, al, b, bl, self.eps) });

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (f32s(xs, xl, self.name())?, f32s(ws, wl, self.name())?);
        let d = w.len();
        let mut y = output(x.len());
        let chunk = rows_per_task(x.len() / d, d, GRAIN) * d;
        y.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .for_each(|(y, x)| forward_rows(x, w, self.eps, y));
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &g, &RmsNormDx { eps: self.eps })?;
        let dw = x.apply_op2_no_bwd(
            &g,
            &RmsNormDw {
                eps: self.eps,
                d: w.elem_count(),
            },
        )?;
        // The GPU kernel sums dw in f32 whatever the weight's dtype.
        Ok((Some(dx), Some(dw.to_dtype(w.dtype())?)))
    }
}

struct RmsNormDx {
    eps: f32,
}

impl CustomOp3 for RmsNormDx {
    fn name(&self) -> &'static str {
        "fused-rms-norm-dx"
    }

    cuda_fwd!(|self, a, al, b, bl, c, cl| {
        crate::cuda::ops::rms_norm_dx(a, al, b, bl, c, cl, self.eps)
    });

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = self.name();
        let (x, w, g) = (f32s(xs, xl, n)?, f32s(ws, wl, n)?, f32s(gs, gl, n)?);
        let d = w.len();
        let mut dx = output(x.len());
        let chunk = rows_per_task(x.len() / d, d, GRAIN) * d;
        dx.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
            .for_each(|(dx, (x, g))| dx_rows(x, w, g, self.eps, dx));
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

struct RmsNormDw {
    eps: f32,
    d: usize,
}

impl CustomOp2 for RmsNormDw {
    fn name(&self) -> &'static str {
        "fused-rms-norm-dw"
    }

    cuda_fwd!(|self, a, al, b, bl| { crate::cuda::ops::rms_norm_dw(a, al, b, bl, self.eps) });

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (f32s(xs, xl, self.name())?, f32s(gs, gl, self.name())?);
        let d = self.d;
        let chunk = rows_per_task(x.len() / d, d, GRAIN) * d;
        let dw = x
            .par_chunks(chunk)
            .zip(g.par_chunks(chunk))
            .fold(
                || vec![0f32; d],
                |mut acc, (x, g)| {
                    dw_rows(x, g, self.eps, &mut acc);
                    acc
                },
            )
            .reduce(
                || vec![0f32; d],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    a
                },
            );
        Ok((CpuStorage::F32(dw), Shape::from(d)))
    }
}
