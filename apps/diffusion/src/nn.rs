//! The layers the diffusion models share, on the kernels crate's ops (every one with a
//! backward, so every parameter trains): linear with bias, LayerNorm, GroupNorm, attention,
//! the GELU family, 2-D convolution.

use candle_core::Tensor;
use colossal_core::params::Params;
use colossal_kernels::{CausalMask, Kernels};

use crate::Result;

/// `x · Wᵀ + b` for the module at `prefix` (`{prefix}.weight`, `{prefix}.bias` if present).
pub fn linear(p: &Params, prefix: &str, x: &Tensor, k: Kernels) -> Result<Tensor> {
    let y = k.linear(x, p.get(&format!("{prefix}.weight"))?)?;
    Ok(match p.get(&format!("{prefix}.bias")) {
        Ok(b) => y.broadcast_add(b)?,
        Err(_) => y,
    })
}

/// `torch.nn.LayerNorm` over the last dimension, module at `prefix`.
pub fn layer_norm(p: &Params, prefix: &str, x: &Tensor, eps: f64, k: Kernels) -> Result<Tensor> {
    let (w, b) = (
        p.get(&format!("{prefix}.weight"))?,
        p.get(&format!("{prefix}.bias"))?,
    );
    Ok(k.layer_norm(x, w, b, eps)?)
}

/// `torch.nn.GroupNorm(groups, C)` of x (N, C, …), module at `prefix`.
pub fn group_norm(
    p: &Params,
    prefix: &str,
    x: &Tensor,
    groups: usize,
    eps: f64,
    k: Kernels,
) -> Result<Tensor> {
    let (w, b) = (
        p.get(&format!("{prefix}.weight"))?,
        p.get(&format!("{prefix}.bias"))?,
    );
    Ok(k.group_norm(x, groups, w, b, eps)?)
}

/// Multi-head attention of q (B, H, Tq, D), already scaled, over k, v (B, H, Tk, D); causal
/// through the fused kernel (no T × T kept), else the softmax of the full scores.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    kern: Kernels,
) -> Result<Tensor> {
    if causal {
        if let Some(o) = kern.attention(q, k, v, &CausalMask::default())? {
            return Ok(o);
        }
        let (tq, tk) = (q.dim(2)?, k.dim(2)?);
        let mask: Vec<f32> = (0..tq)
            .flat_map(|i| (0..tk).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (tq, tk), q.device())?.to_dtype(q.dtype())?;
        let s = q.matmul(&k.t()?)?.broadcast_add(&mask)?;
        return Ok(kern.softmax(&s)?.matmul(v)?);
    }
    let s = q.contiguous()?.matmul(&k.t()?.contiguous()?)?;
    Ok(kern.softmax(&s)?.matmul(&v.contiguous()?)?)
}

/// (B, T, H·D) → (B, H, T, D).
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    Ok(x.reshape((b, t, heads, c / heads))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// (B, H, T, D) → (B, T, H·D).
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    Ok(x.transpose(1, 2)?.reshape((b, t, h * d))?)
}

/// CLIP's `quick_gelu`: x · σ(1.702 x).
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    let sig = (x.affine(-1.702, 0.0)?.exp()? + 1.0)?.recip()?;
    Ok((x * sig)?)
}

/// The activation a config names (`hidden_act`, `act_fn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    QuickGelu,
    /// Exact (erf) GELU.
    Gelu,
    Silu,
}

impl Activation {
    pub fn parse(name: &str, field: &str) -> std::result::Result<Self, String> {
        match name {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::Gelu),
            "silu" | "swish" => Ok(Self::Silu),
            other => Err(format!(
                "{field} = \"{other}\" is not implemented (quick_gelu, gelu, silu)"
            )),
        }
    }

    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::QuickGelu => quick_gelu(x)?,
            Self::Gelu => x.gelu_erf()?,
            Self::Silu => x.silu()?,
        })
    }
}

/// 2-D convolution of x (N, C, H, W) by the module at `prefix` (weight (O, C, kh, kw), bias
/// (O)), square `padding` and `stride`.
pub fn conv2d(
    p: &Params,
    prefix: &str,
    x: &Tensor,
    stride: usize,
    padding: usize,
    k: Kernels,
) -> Result<Tensor> {
    let w = p.get(&format!("{prefix}.weight"))?;
    let y = k.conv2d(x, w, padding, stride)?;
    Ok(match p.get(&format!("{prefix}.bias")) {
        Ok(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?,
        Err(_) => y,
    })
}
