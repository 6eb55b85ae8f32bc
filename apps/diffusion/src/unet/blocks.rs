//! The UNet's pieces as diffusers defines them: the ResNet block with its time embedding,
//! the spatial transformer (`Transformer2DModel` of `BasicTransformerBlock`s: self-attention,
//! cross-attention on the text, GEGLU feed-forward), down- and up-samplers, and the
//! sinusoidal timestep features. Each is a function of the parameters under a path prefix.

use candle_core::{Device, Tensor};
use colossal_core::params::Params;
use colossal_kernels::Kernels;

use super::UNetConfig;
use crate::conv_blocks::{self, Groups};
use crate::nn::{self, Activation};
use crate::Result;

/// What every block reads: the parameters, the kernels and the config.
pub struct Ctx<'a> {
    pub p: &'a Params,
    pub k: Kernels,
    pub cfg: &'a UNetConfig,
    pub act: Activation,
    pub lora: Option<&'a colossal_core::lora::Adapters>,
}

/// `Transformer2DModel`'s GroupNorm eps (fixed in diffusers).
const TRANSFORMER_NORM_EPS: f64 = 1e-6;
/// `BasicTransformerBlock`'s LayerNorm eps.
const BLOCK_NORM_EPS: f64 = 1e-5;

/// Sinusoidal features (B, dim) of timesteps `t`, as diffusers' `get_timestep_embedding`
/// (frequencies exp(−ln(10⁴)·i/(half − shift)), cos first when flipped).
pub fn timestep_features(
    t: &[f64],
    dim: usize,
    flip_sin_to_cos: bool,
    shift: f64,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((-(10000f64.ln() as f32) * i as f32) / (half as f32 - shift as f32)).exp())
        .collect();
    let mut rows = Vec::with_capacity(t.len() * dim);
    for &ts in t {
        let args: Vec<f32> = freqs.iter().map(|&f| ts as f32 * f).collect();
        let (sin, cos): (Vec<f32>, Vec<f32>) = args.iter().map(|a| (a.sin(), a.cos())).unzip();
        let (first, second) = if flip_sin_to_cos {
            (cos, sin)
        } else {
            (sin, cos)
        };
        rows.extend(first);
        rows.extend(second);
        rows.extend(std::iter::repeat_n(0.0, dim - 2 * half));
    }
    Ok(Tensor::from_vec(rows, (t.len(), dim), device)?)
}

impl Ctx<'_> {
    fn groups(&self) -> usize {
        self.cfg.norm_num_groups
    }

    /// A transformer's Linear at `prefix`, with its LoRA term where it has an adapter.
    fn linear(&self, prefix: &str, x: &Tensor) -> Result<Tensor> {
        let y = nn::linear(self.p, prefix, x, self.k)?;
        Ok(match self.lora {
            Some(l) => l.add_term(self.p, &format!("{prefix}.weight"), x, y, self.k)?,
            None => y,
        })
    }

    /// `ResnetBlock2D` with the time embedding.
    pub fn resnet(&self, prefix: &str, x: &Tensor, temb: &Tensor, scale: f64) -> Result<Tensor> {
        let g = Groups {
            groups: self.groups(),
            eps: self.cfg.norm_eps,
        };
        conv_blocks::resnet(self.p, self.k, self.act, prefix, x, Some(temb), g, scale)
    }

    /// Multi-head attention of `x` (B, T, C) over `ctx` (itself when `None`).
    fn attention(
        &self,
        prefix: &str,
        x: &Tensor,
        ctx: Option<&Tensor>,
        heads: usize,
    ) -> Result<Tensor> {
        let k = self.k;
        let n = |s: &str| format!("{prefix}.{s}");
        let ctx = ctx.unwrap_or(x);
        let c = x.dim(2)?;
        let scale = 1.0 / ((c / heads) as f64).sqrt();
        let q = self.linear(&n("to_q"), x)?.affine(scale, 0.0)?;
        let kk = self.linear(&n("to_k"), ctx)?;
        let v = self.linear(&n("to_v"), ctx)?;
        let o = nn::attention(
            &nn::split_heads(&q, heads)?,
            &nn::split_heads(&kk, heads)?,
            &nn::split_heads(&v, heads)?,
            false,
            k,
        )?;
        self.linear(&n("to_out.0"), &nn::merge_heads(&o)?)
    }

    /// `BasicTransformerBlock`: pre-LayerNorm self-attention, cross-attention, GEGLU.
    fn transformer_block(
        &self,
        prefix: &str,
        x: &Tensor,
        text: &Tensor,
        heads: usize,
    ) -> Result<Tensor> {
        let (p, k) = (self.p, self.k);
        let n = |s: &str| format!("{prefix}.{s}");
        let h = nn::layer_norm(p, &n("norm1"), x, BLOCK_NORM_EPS, k)?;
        let x = (x + self.attention(&n("attn1"), &h, None, heads)?)?;
        let h = nn::layer_norm(p, &n("norm2"), &x, BLOCK_NORM_EPS, k)?;
        let x = (&x + self.attention(&n("attn2"), &h, Some(text), heads)?)?;
        let h = nn::layer_norm(p, &n("norm3"), &x, BLOCK_NORM_EPS, k)?;
        let proj = self.linear(&n("ff.net.0.proj"), &h)?;
        let inner = proj.dim(2)? / 2;
        let geglu = (proj.narrow(2, 0, inner)? * proj.narrow(2, inner, inner)?.gelu_erf()?)?;
        Ok((x + self.linear(&n("ff.net.2"), &geglu)?)?)
    }

    /// `Transformer2DModel`: GroupNorm, project in (1×1 conv, or linear after flattening),
    /// `layers` transformer blocks over the H·W positions, project out, plus the input.
    pub fn transformer(
        &self,
        prefix: &str,
        x: &Tensor,
        text: &Tensor,
        heads: usize,
        layers: usize,
    ) -> Result<Tensor> {
        let (p, k) = (self.p, self.k);
        let n = |s: &str| format!("{prefix}.{s}");
        let (b, c, hh, ww) = x.dims4()?;
        let h = nn::group_norm(p, &n("norm"), x, self.groups(), TRANSFORMER_NORM_EPS, k)?;
        let tokens = |t: &Tensor| -> Result<Tensor> {
            Ok(t.permute((0, 2, 3, 1))?.reshape((b, hh * ww, c))?)
        };
        let image = |t: &Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, hh, ww, c))?
                .permute((0, 3, 1, 2))?
                .contiguous()?)
        };
        let linear_proj = self.cfg.use_linear_projection;
        let mut h = if linear_proj {
            self.linear(&n("proj_in"), &tokens(&h)?)?
        } else {
            tokens(&nn::conv2d(p, &n("proj_in"), &h, 1, 0, k)?)?
        };
        for j in 0..layers {
            h = self.transformer_block(&n(&format!("transformer_blocks.{j}")), &h, text, heads)?;
        }
        let h = if linear_proj {
            image(&self.linear(&n("proj_out"), &h)?)?
        } else {
            nn::conv2d(p, &n("proj_out"), &image(&h)?, 1, 0, k)?
        };
        Ok((h + x)?)
    }
}

/// Shapes of a spatial transformer's parameters.
pub fn transformer_shapes(
    out: &mut Vec<(String, Vec<usize>)>,
    prefix: &str,
    c: usize,
    cross: usize,
    layers: usize,
    linear_proj: bool,
) {
    let mut add = |s: &str, shape: Vec<usize>| out.push((format!("{prefix}.{s}"), shape));
    add("norm.weight", vec![c]);
    add("norm.bias", vec![c]);
    let proj = if linear_proj {
        vec![c, c]
    } else {
        vec![c, c, 1, 1]
    };
    for io in ["proj_in", "proj_out"] {
        add(&format!("{io}.weight"), proj.clone());
        add(&format!("{io}.bias"), vec![c]);
    }
    for j in 0..layers {
        let b = |s: &str| format!("transformer_blocks.{j}.{s}");
        for norm in ["norm1", "norm2", "norm3"] {
            add(&b(&format!("{norm}.weight")), vec![c]);
            add(&b(&format!("{norm}.bias")), vec![c]);
        }
        for (attn, kv) in [("attn1", c), ("attn2", cross)] {
            add(&b(&format!("{attn}.to_q.weight")), vec![c, c]);
            add(&b(&format!("{attn}.to_k.weight")), vec![c, kv]);
            add(&b(&format!("{attn}.to_v.weight")), vec![c, kv]);
            add(&b(&format!("{attn}.to_out.0.weight")), vec![c, c]);
            add(&b(&format!("{attn}.to_out.0.bias")), vec![c]);
        }
        add(&b("ff.net.0.proj.weight"), vec![8 * c, c]);
        add(&b("ff.net.0.proj.bias"), vec![8 * c]);
        add(&b("ff.net.2.weight"), vec![c, 4 * c]);
        add(&b("ff.net.2.bias"), vec![c]);
    }
}
