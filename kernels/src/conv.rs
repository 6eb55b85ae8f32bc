//! 2-D convolution (groups 1, dilation 1) as im2col + gemm, forward and backward. Per image:
//! the patches matrix P (C·kh·kw × Ho·Wo) is gathered once per pass, then y = W·P,
//! dW += dY·Pᵀ and dP = Wᵀ·dY scattered back into dX (col2im). Images run in parallel, each
//! with its own patch buffer and single-threaded products; dW sums per-thread partials.
//! candle's own backward takes dX by a direct-loop `conv_transpose2d` and gathers patches with
//! scalar loops — most of a small UNet's training step.

use candle_core::{CpuStorage, CustomOp2, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{f32s, output};
use crate::matmul::matmul;

#[derive(Clone, Copy, Debug)]
pub(crate) struct Conv2d {
    pub padding: usize,
    pub stride: usize,
}

/// One call's sizes.
#[derive(Clone, Copy)]
struct Geo {
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    ho: usize,
    wo: usize,
    s: usize,
    p: usize,
}

impl Geo {
    fn new(x: &[usize], w: &[usize], s: usize, p: usize) -> Result<Self> {
        let bad = || Error::Msg(format!("conv2d: x {x:?}, w {w:?}, stride {s}, padding {p}"));
        let (&[_, c, h, wd], &[o, wc, kh, kw]) = (x, w) else {
            return Err(bad());
        };
        if wc != c || s == 0 || h + 2 * p < kh || wd + 2 * p < kw {
            return Err(bad());
        }
        let (ho, wo) = ((h + 2 * p - kh) / s + 1, (wd + 2 * p - kw) / s + 1);
        Ok(Self {
            c,
            h,
            w: wd,
            o,
            kh,
            kw,
            ho,
            wo,
            s,
            p,
        })
    }

    fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }

    fn n(&self) -> usize {
        self.ho * self.wo
    }

    /// The output columns `lo..hi` whose input column `ow·s + j − p` (kernel column `j`) lies
    /// inside the image; the others read padding.
    #[inline]
    fn valid_cols(&self, j: usize) -> (usize, usize) {
        let lo = self.p.saturating_sub(j).div_ceil(self.s);
        // ow·s + j − p ≤ w − 1  ⇔  ow ≤ (w − 1 + p − j) / s
        let hi = match (self.w + self.p).checked_sub(j + 1) {
            Some(m) => (m / self.s + 1).min(self.wo),
            None => 0,
        };
        (lo.min(hi), hi)
    }

    #[inline]
    fn row(&self, o: usize, i: usize) -> Option<usize> {
        (o * self.s + i).checked_sub(self.p).filter(|&v| v < self.h)
    }

    /// P (k × n) of one image x (c × h × w).
    fn im2col(&self, x: &[f32], cols: &mut [f32]) {
        let n = self.n();
        for c in 0..self.c {
            for i in 0..self.kh {
                for j in 0..self.kw {
                    let r = (c * self.kh + i) * self.kw + j;
                    let dst = &mut cols[r * n..(r + 1) * n];
                    for oh in 0..self.ho {
                        let out = &mut dst[oh * self.wo..(oh + 1) * self.wo];
                        let Some(ih) = self.row(oh, i) else {
                            out.fill(0.0);
                            continue;
                        };
                        let src = &x[(c * self.h + ih) * self.w..(c * self.h + ih + 1) * self.w];
                        let (lo, hi) = self.valid_cols(j);
                        out[..lo].fill(0.0);
                        out[hi..].fill(0.0);
                        if self.s == 1 {
                            // Contiguous: one copy of the row's valid part.
                            out[lo..hi].copy_from_slice(&src[lo + j - self.p..hi + j - self.p]);
                        } else {
                            for (ow, v) in out[lo..hi].iter_mut().enumerate() {
                                *v = src[(lo + ow) * self.s + j - self.p];
                            }
                        }
                    }
                }
            }
        }
    }

    /// dx (c × h × w) += the patches' gradients dP (k × n), each added where it was gathered.
    fn col2im(&self, dcols: &[f32], dx: &mut [f32]) {
        let n = self.n();
        for c in 0..self.c {
            for i in 0..self.kh {
                for j in 0..self.kw {
                    let r = (c * self.kh + i) * self.kw + j;
                    let src = &dcols[r * n..(r + 1) * n];
                    for oh in 0..self.ho {
                        let Some(ih) = self.row(oh, i) else { continue };
                        let row =
                            &mut dx[(c * self.h + ih) * self.w..(c * self.h + ih + 1) * self.w];
                        let (lo, hi) = self.valid_cols(j);
                        let g = &src[oh * self.wo + lo..oh * self.wo + hi];
                        if self.s == 1 {
                            let dst = &mut row[lo + j - self.p..hi + j - self.p];
                            dst.iter_mut().zip(g).for_each(|(d, v)| *d += v);
                        } else {
                            for (ow, &v) in g.iter().enumerate() {
                                row[(lo + ow) * self.s + j - self.p] += v;
                            }
                        }
                    }
                }
            }
        }
    }
}

impl Conv2d {
    /// Whether this kernel takes the call (else candle's conv2d runs).
    pub(crate) fn fits(&self, x: &Tensor, w: &Tensor) -> bool {
        Geo::new(x.dims(), w.dims(), self.stride, self.padding).is_ok()
    }
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "fused-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (f32s(xs, xl, self.name())?, f32s(ws, wl, self.name())?);
        let g = Geo::new(xl.dims(), wl.dims(), self.stride, self.padding)?;
        let (k, n, b) = (g.k(), g.n(), xl.dims()[0]);
        let mut y = output(b * g.o * n);
        y.par_chunks_mut((g.o * n).max(1))
            .zip(x.par_chunks((g.c * g.h * g.w).max(1)))
            .for_each_init(
                || output(k * n),
                |cols, (y, x)| {
                    g.im2col(x, cols);
                    matmul((g.o, n, k), y, n, false, (w, k, 1), (cols, n, 1), false);
                },
            );
        Ok((CpuStorage::F32(y), Shape::from((b, g.o, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = g.apply_op2_no_bwd(
            w,
            &InputGrad {
                conv: *self,
                x: x.dims().to_vec(),
            },
        )?;
        let dw = x.apply_op2_no_bwd(
            &g,
            &WeightGrad {
                conv: *self,
                w: w.dims().to_vec(),
            },
        )?;
        Ok((Some(dx), Some(dw)))
    }
}

/// dX from (dY, W): per image dP = Wᵀ·dY, then col2im.
struct InputGrad {
    conv: Conv2d,
    x: Vec<usize>,
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "fused-conv2d-dx"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (dy, w) = (f32s(gs, gl, self.name())?, f32s(ws, wl, self.name())?);
        let g = Geo::new(&self.x, wl.dims(), self.conv.stride, self.conv.padding)?;
        let (k, n, b) = (g.k(), g.n(), self.x[0]);
        // col2im adds into every element, so dx starts at zero.
        let mut dx = vec![0f32; b * g.c * g.h * g.w];
        dx.par_chunks_mut((g.c * g.h * g.w).max(1))
            .zip(dy.par_chunks((g.o * n).max(1)))
            .for_each_init(
                || output(k * n),
                |dcols, (dx, dy)| {
                    matmul((k, n, g.o), dcols, n, false, (w, 1, k), (dy, n, 1), false);
                    g.col2im(dcols, dx);
                },
            );
        Ok((CpuStorage::F32(dx), Shape::from(self.x.clone())))
    }
}

/// dW from (X, dY): Σ over images of dY·Pᵀ, per-thread partial sums.
struct WeightGrad {
    conv: Conv2d,
    w: Vec<usize>,
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "fused-conv2d-dw"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, dy) = (f32s(xs, xl, self.name())?, f32s(gs, gl, self.name())?);
        let g = Geo::new(xl.dims(), &self.w, self.conv.stride, self.conv.padding)?;
        let (k, n) = (g.k(), g.n());
        let zero = || (vec![0f32; g.o * k], output(k * n));
        let (dw, _) = x
            .par_chunks((g.c * g.h * g.w).max(1))
            .zip(dy.par_chunks((g.o * n).max(1)))
            .fold(zero, |(mut dw, mut cols), (x, dy)| {
                g.im2col(x, &mut cols);
                matmul(
                    (g.o, k, n),
                    &mut dw,
                    k,
                    true,
                    (dy, n, 1),
                    (&cols, 1, n),
                    false,
                );
                (dw, cols)
            })
            .reduce(zero, |(mut a, c), (b, _)| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                (a, c)
            });
        Ok((CpuStorage::F32(dw), Shape::from(self.w.clone())))
    }
}
