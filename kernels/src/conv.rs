//! 2-D convolution (groups 1, dilation 1) whose input gradient is a convolution too. candle's
//! backward takes it by `conv_transpose2d`, whose CPU kernel is a direct loop — measured at
//! about 40% of a small UNet's training step — while a convolution runs as im2col + gemm. The
//! transposed convolution equals a convolution of the output gradient, spread by the stride
//! (zeros between its elements) and padded by k − 1 − p (plus the rows the forward's stride
//! dropped), with the kernel flipped and its channel axes swapped. The forward and the weight
//! gradient are candle's own (im2col).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use crate::cpu::f32s;

pub(crate) struct Conv2d {
    pub padding: usize,
    pub stride: usize,
}

/// `g` with `s − 1` zeros between neighbours along `dim` (2 or 3) and `extra` zeros after.
fn spread(g: &Tensor, dim: usize, s: usize, extra: usize) -> Result<Tensor> {
    let g = if s > 1 {
        let n = g.dim(dim)?;
        let x = g.unsqueeze(dim + 1)?;
        let mut parts = vec![x.clone()];
        parts.extend(std::iter::repeat_n(x.zeros_like()?, s - 1));
        let mut dims = g.dims().to_vec();
        dims[dim] = n * s;
        Tensor::cat(&parts, dim + 1)?
            .reshape(dims)?
            .narrow(dim, 0, (n - 1) * s + 1)?
    } else {
        g.clone()
    };
    g.pad_with_zeros(dim, 0, extra)
}

impl Conv2d {
    /// d(loss)/d(input) of shape `x_dims` from the output gradient `g`.
    pub(crate) fn input_grad(&self, g: &Tensor, w: &Tensor, x_dims: &[usize]) -> Result<Tensor> {
        let (p, s) = (self.padding, self.stride);
        let (k_h, k_w) = (w.dim(2)?, w.dim(3)?);
        // Output size of the transposed convolution without output padding, per axis.
        let natural = |gn: usize, k: usize| (gn - 1) * s + k - 2 * p;
        let extra_h = x_dims[2] - natural(g.dim(2)?, k_h);
        let extra_w = x_dims[3] - natural(g.dim(3)?, k_w);
        let g = spread(&spread(g, 2, s, extra_h)?, 3, s, extra_w)?;
        let g = g
            .pad_with_zeros(2, k_h - 1 - p, k_h - 1 - p)?
            .pad_with_zeros(3, k_w - 1 - p, k_w - 1 - p)?;
        let wt = w.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
        g.contiguous()?.conv2d(&wt, 0, 1, 1, 1)
    }

    /// Whether [`Self::input_grad`] applies: padding at most k − 1 on both axes.
    pub(crate) fn fits(&self, w: &Tensor) -> bool {
        let k = w.dims();
        k.len() == 4 && self.padding < k[2] && self.padding < k[3] && self.stride > 0
    }
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "conv2d-conv-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = self.name();
        let x = Tensor::from_slice(f32s(xs, xl, n)?, xl.shape(), &candle_core::Device::Cpu)?;
        let w = Tensor::from_slice(f32s(ws, wl, n)?, wl.shape(), &candle_core::Device::Cpu)?;
        let y = x.conv2d(&w, self.padding, self.stride, 1, 1)?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1()?), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = self.input_grad(g, w, x.dims())?;
        // candle's weight gradient: a convolution of the input by the output gradient.
        let (k_h, k_w) = (w.dim(2)?, w.dim(3)?);
        let dw = x
            .transpose(0, 1)?
            .conv2d(&g.transpose(0, 1)?, self.padding, 1, self.stride, 1)?
            .transpose(0, 1)?;
        let dw = dw.narrow(2, 0, k_h)?.narrow(3, 0, k_w)?;
        Ok((Some(dx), Some(dw)))
    }
}
