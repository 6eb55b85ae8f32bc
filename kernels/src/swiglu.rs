//! SwiGLU's gate: y = silu(gate) · up = gate · σ(gate) · up, one pass forward; backward one
//! pass giving both gradients (packed as (2, …) so each half is contiguous):
//! d_up = g · silu(gate), d_gate = g · up · σ(gate) · (1 + gate · (1 − σ(gate))).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{f32s, output};
use crate::simd::sigmoid;
use crate::simd_fn;

const GRAIN: usize = 1 << 15;

simd_fn! {
    fn forward_chunk(a: &[f32], b: &[f32], y: &mut [f32]) {
        for i in 0..y.len() {
            y[i] = a[i] * sigmoid(a[i]) * b[i];
        }
    }
}

simd_fn! {
    fn backward_chunk(a: &[f32], b: &[f32], g: &[f32], da: &mut [f32], db: &mut [f32]) {
        for i in 0..g.len() {
            let s = sigmoid(a[i]);
            let silu = a[i] * s;
            db[i] = g[i] * silu;
            da[i] = g[i] * b[i] * s * (1.0 + a[i] * (1.0 - s));
        }
    }
}

pub(crate) struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    cuda_fwd!(|self, a, al, b, bl| { crate::cuda::ops::swiglu(a, al, b, bl) });

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (f32s(a, al, self.name())?, f32s(b, bl, self.name())?);
        let mut y = output(a.len());
        y.par_chunks_mut(GRAIN)
            .zip(a.par_chunks(GRAIN).zip(b.par_chunks(GRAIN)))
            .for_each(|(y, (a, b))| forward_chunk(a, b, y));
        Ok((CpuStorage::F32(y), al.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = a.apply_op3_no_bwd(b, &g.contiguous()?, &SwiGluGrad)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

struct SwiGluGrad;

impl CustomOp3 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "fused-swiglu-grad"
    }

    cuda_fwd!(|self, a, al, b, bl, c, cl| { crate::cuda::ops::swiglu_grad(a, al, b, bl, c, cl) });

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = self.name();
        let (a, b, g) = (f32s(a, al, n)?, f32s(b, bl, n)?, f32s(g, gl, n)?);
        let mut out = output(2 * a.len());
        let (da, db) = out.split_at_mut(a.len());
        da.par_chunks_mut(GRAIN)
            .zip(db.par_chunks_mut(GRAIN))
            .zip(
                a.par_chunks(GRAIN)
                    .zip(b.par_chunks(GRAIN))
                    .zip(g.par_chunks(GRAIN)),
            )
            .for_each(|((da, db), ((a, b), g))| backward_chunk(a, b, g, da, db));
        let mut dims = vec![2];
        dims.extend_from_slice(al.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}
