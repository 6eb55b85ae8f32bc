//! Rotary embedding as Hugging Face's `rotate_half`: for x (B, H, T, D) and cos, sin (B or 1,
//! T, D), y = x · cos + rotate_half(x) · sin with rotate_half(x) = (−x₂, x₁). Backward is the
//! transposed rotation: dx₁ = g₁·cos₁ + g₂·sin₂, dx₂ = g₂·cos₂ − g₁·sin₁ (no gradient for the
//! tables, which are constants of the positions).

use candle_core::{CpuStorage, CustomOp3, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{f32s, output};
use crate::simd_fn;

simd_fn! {
    /// One (b, h) plane of T rows of width D.
    fn plane(x: &[f32], cos: &[f32], sin: &[f32], d: usize, inverse: bool, y: &mut [f32]) {
        let h = d / 2;
        for (((xr, yr), c), s) in x
            .chunks_exact(d)
            .zip(y.chunks_exact_mut(d))
            .zip(cos.chunks_exact(d))
            .zip(sin.chunks_exact(d))
        {
            let (x1, x2) = xr.split_at(h);
            let (y1, y2) = yr.split_at_mut(h);
            if inverse {
                for i in 0..h {
                    y1[i] = x1[i] * c[i] + x2[i] * s[h + i];
                    y2[i] = x2[i] * c[h + i] - x1[i] * s[i];
                }
            } else {
                for i in 0..h {
                    y1[i] = x1[i] * c[i] - x2[i] * s[i];
                    y2[i] = x2[i] * c[h + i] + x1[i] * s[h + i];
                }
            }
        }
    }
}

/// x (B, H, T, D) needs tables (B or 1, T, D) of even D.
fn check_shapes(xl: &Layout, cl: &Layout, sl: &Layout) -> Result<()> {
    let (b, _, t, d) = xl.shape().dims4()?;
    let (cb, ct, cd) = cl.shape().dims3()?;
    if (cb != b && cb != 1) || ct != t || cd != d || d % 2 != 0 || sl.shape() != cl.shape() {
        return Err(Error::Msg(format!(
            "rotary: x {:?} needs cos/sin ({b} or 1, {t}, {d}) with even {d}, got {:?}",
            xl.dims(),
            cl.dims()
        )));
    }
    Ok(())
}

/// `inverse`: the transposed rotation (the backward pass).
pub(crate) struct Rotary {
    pub inverse: bool,
}

impl CustomOp3 for Rotary {
    fn name(&self) -> &'static str {
        "fused-rotary"
    }

    cuda_fwd!(|self, xs, xl, cs, cl, ss, sl| {
        check_shapes(xl, cl, sl)?;
        crate::cuda::ops::rotary(xs, xl, cs, cl, ss, sl, self.inverse)
    });

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = self.name();
        let (x, cos, sin) = (f32s(xs, xl, n)?, f32s(cs, cl, n)?, f32s(ss, sl, n)?);
        check_shapes(xl, cl, sl)?;
        let (_, heads, t, d) = xl.shape().dims4()?;
        let cb = cl.dims()[0];
        let mut y = output(x.len());
        let plane_len = t * d;
        y.par_chunks_mut(plane_len)
            .zip(x.par_chunks(plane_len))
            .enumerate()
            .for_each(|(p, (y, x))| {
                let bi = if cb == 1 { 0 } else { p / heads };
                let table = bi * plane_len..(bi + 1) * plane_len;
                plane(x, &cos[table.clone()], &sin[table], d, self.inverse, y)
            });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let inverse = Rotary {
            inverse: !self.inverse,
        };
        let dx = g.contiguous()?.apply_op3_no_bwd(cos, sin, &inverse)?;
        Ok((Some(dx), None, None))
    }
}
