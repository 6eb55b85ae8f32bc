//! AdamW's element update, exactly as `torch.optim.AdamW(foreach=False)` computes it (the same
//! operations in the same order, so the fused update is bit-identical to the scalar loop),
//! multi-threaded over chunks and vectorised; [`AdamWUpdate::apply_in_place`] updates a
//! parameter tensor's own storage, reading its gradient where it lies — no copies.

use std::sync::Mutex;

use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Result, Tensor};
use rayon::prelude::*;

use crate::cpu::f32s;
use crate::simd_fn;

const GRAIN: usize = 1 << 15;

/// One step's constants: `step_size = −lr / (1 − β1^t)`, `bc2_sqrt = √(1 − β2^t)`, and the
/// decoupled decay factor `1 − lr·wd` (1 where the parameter is not decayed).
#[derive(Clone, Copy, Debug)]
pub struct AdamWUpdate {
    pub step_size: f32,
    pub lerp_w: f32,
    pub b2: f32,
    pub one_minus_b2: f32,
    pub bc2_sqrt: f32,
    pub eps: f32,
    pub decay: f32,
}

/// torch's `lerp`: `a + w (b - a)` for |w| < 0.5, else `b - (b - a)(1 - w)`.
#[inline(always)]
fn lerp(a: f32, b: f32, w: f32) -> f32 {
    if w.abs() < 0.5 {
        a + w * (b - a)
    } else {
        b - (b - a) * (1.0 - w)
    }
}

/// The update, element by element, in torch's order of operations.
#[inline(always)]
fn update(k: &AdamWUpdate, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    for i in 0..p.len() {
        p[i] *= k.decay;
        m[i] = lerp(m[i], g[i], k.lerp_w);
        v[i] = v[i] * k.b2 + k.one_minus_b2 * g[i] * g[i];
        let denom = v[i].sqrt() / k.bc2_sqrt + k.eps;
        p[i] += k.step_size * (m[i] / denom);
    }
}

simd_fn! {
    fn chunk(k: &AdamWUpdate, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        update(k, p, g, m, v)
    }
}

impl AdamWUpdate {
    /// Updates `p`, `m`, `v` in place from gradient `g`, one element at a time in one
    /// vectorised pass per thread.
    pub fn apply(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        assert!(g.len() == p.len() && m.len() == p.len() && v.len() == p.len());
        p.par_chunks_mut(GRAIN)
            .zip(g.par_chunks(GRAIN))
            .zip(m.par_chunks_mut(GRAIN).zip(v.par_chunks_mut(GRAIN)))
            .for_each(|((p, g), (m, v))| chunk(self, p, g, m, v));
    }

    /// The loop `apply` vectorises and threads, compiled for the baseline and run on one
    /// thread (the reference `apply` is checked against).
    pub fn apply_scalar(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        update(self, p, g, m, v)
    }

    /// Updates the storage of `param` (f32 on the CPU) in place from `grad`; `false` (nothing
    /// done) where it does not apply and the caller must update by copy.
    pub fn apply_in_place(
        &self,
        param: &Tensor,
        grad: &Tensor,
        m: &mut [f32],
        v: &mut [f32],
    ) -> Result<bool> {
        let fits = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu() && t.is_contiguous();
        if !fits(param) || !fits(grad) || param.elem_count() != grad.elem_count() {
            return Ok(false);
        }
        let op = InPlace {
            k: *self,
            moments: Mutex::new((m, v)),
        };
        param.inplace_op2(grad, &op)?;
        Ok(true)
    }

    /// The update on a GPU by one CUDA kernel, in place: `param`, `m`, `v` f32 and `grad` f32 or
    /// bf16, all contiguous with as many elements on one device. `false` (nothing done) where it
    /// does not apply — not a GPU, or a build without the `cuda` feature.
    pub fn apply_on_device(
        &self,
        param: &Tensor,
        grad: &Tensor,
        m: &Tensor,
        v: &Tensor,
    ) -> Result<bool> {
        #[cfg(feature = "cuda")]
        {
            let n = param.elem_count();
            let fits = param.device().is_cuda()
                && [grad, m, v].iter().all(|t| {
                    t.elem_count() == n
                        && t.is_contiguous()
                        && t.device().same_device(param.device())
                })
                && [param, m, v].iter().all(|t| t.dtype() == DType::F32)
                && matches!(grad.dtype(), DType::F32 | DType::BF16)
                && param.is_contiguous();
            if !fits {
                return Ok(false);
            }
            let op = crate::cuda::adamw::OnDevice {
                k: *self,
                m: m.clone(),
                v: v.clone(),
            };
            param.inplace_op2(grad, &op)?;
            Ok(true)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (param, grad, m, v);
            Ok(false)
        }
    }
}

struct InPlace<'a> {
    k: AdamWUpdate,
    moments: Mutex<(&'a mut [f32], &'a mut [f32])>,
}

impl InplaceOp2 for InPlace<'_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(
        &self,
        ps: &mut CpuStorage,
        pl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<()> {
        let g = f32s(gs, gl, self.name())?;
        let CpuStorage::F32(p) = ps else {
            candle_core::bail!("fused-adamw: f32 parameters only")
        };
        let (a, b) = pl
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("fused-adamw: contiguous parameter".into()))?;
        let mut guard = self.moments.lock().expect("moments lock");
        let (m, v) = &mut *guard;
        self.k.apply(&mut p[a..b], g, m, v);
        Ok(())
    }
}
