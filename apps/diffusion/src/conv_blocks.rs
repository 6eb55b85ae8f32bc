//! Convolutional pieces the UNet and the VAE share, as diffusers defines them:
//! `ResnetBlock2D` (with or without a time embedding), `Downsample2D`, `Upsample2D`.

use candle_core::Tensor;
use colossal_core::params::Params;
use colossal_kernels::Kernels;

use crate::nn::{self, Activation};
use crate::Result;

/// GroupNorm settings of a block.
#[derive(Clone, Copy, Debug)]
pub struct Groups {
    pub groups: usize,
    pub eps: f64,
}

/// `ResnetBlock2D`: norm → act → conv, plus the projected time embedding when there is one,
/// norm → act → conv, added to the (1×1-projected when the width changes) input, divided by
/// `scale` (the output scale factor).
#[allow(clippy::too_many_arguments)]
pub fn resnet(
    p: &Params,
    k: Kernels,
    act: Activation,
    prefix: &str,
    x: &Tensor,
    temb: Option<&Tensor>,
    g: Groups,
    scale: f64,
) -> Result<Tensor> {
    let n = |s: &str| format!("{prefix}.{s}");
    let h = nn::group_norm(p, &n("norm1"), x, g.groups, g.eps, k)?;
    let mut h = nn::conv2d(p, &n("conv1"), &act.apply(&h)?, 1, 1, k)?;
    if let Some(temb) = temb {
        let t = nn::linear(p, &n("time_emb_proj"), &act.apply(temb)?, k)?;
        h = h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?;
    }
    let h = nn::group_norm(p, &n("norm2"), &h, g.groups, g.eps, k)?;
    let h = nn::conv2d(p, &n("conv2"), &act.apply(&h)?, 1, 1, k)?;
    let x = if p.get(&n("conv_shortcut.weight")).is_ok() {
        nn::conv2d(p, &n("conv_shortcut"), x, 1, 0, k)?
    } else {
        x.clone()
    };
    let out = (x + h)?;
    Ok(if scale == 1.0 {
        out
    } else {
        out.affine(1.0 / scale, 0.0)?
    })
}

/// `Downsample2D`: a stride-2 3×3 convolution; padding 0 pads right and bottom by one first.
pub fn downsample(
    p: &Params,
    prefix: &str,
    x: &Tensor,
    padding: usize,
    k: Kernels,
) -> Result<Tensor> {
    let x = if padding == 0 {
        x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?
    } else {
        x.clone()
    };
    nn::conv2d(p, &format!("{prefix}.conv"), &x, 2, padding, k)
}

/// `Upsample2D`: nearest-neighbour to twice the size, then a 3×3 convolution.
pub fn upsample(p: &Params, prefix: &str, x: &Tensor, k: Kernels) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let up = x.upsample_nearest2d(2 * h, 2 * w)?;
    nn::conv2d(p, &format!("{prefix}.conv"), &up, 1, 1, k)
}

/// Shapes of a ResNet block's parameters (`tdim`: the time embedding's width, if any).
pub fn resnet_shapes(
    out: &mut Vec<(String, Vec<usize>)>,
    prefix: &str,
    cin: usize,
    cout: usize,
    tdim: Option<usize>,
) {
    let mut add = |s: &str, shape: Vec<usize>| out.push((format!("{prefix}.{s}"), shape));
    add("norm1.weight", vec![cin]);
    add("norm1.bias", vec![cin]);
    add("conv1.weight", vec![cout, cin, 3, 3]);
    add("conv1.bias", vec![cout]);
    if let Some(tdim) = tdim {
        add("time_emb_proj.weight", vec![cout, tdim]);
        add("time_emb_proj.bias", vec![cout]);
    }
    add("norm2.weight", vec![cout]);
    add("norm2.bias", vec![cout]);
    add("conv2.weight", vec![cout, cout, 3, 3]);
    add("conv2.bias", vec![cout]);
    if cin != cout {
        add("conv_shortcut.weight", vec![cout, cin, 1, 1]);
        add("conv_shortcut.bias", vec![cout]);
    }
}

/// Shapes of a 3×3 convolution with bias.
pub fn conv_shapes(
    out: &mut Vec<(String, Vec<usize>)>,
    prefix: &str,
    cin: usize,
    cout: usize,
    k: usize,
) {
    out.push((format!("{prefix}.weight"), vec![cout, cin, k, k]));
    out.push((format!("{prefix}.bias"), vec![cout]));
}
