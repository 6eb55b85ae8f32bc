//! `AutoencoderKL` (diffusers): the encoder (ResNet levels with stride-2 downsamplers, a
//! middle with one single-head self-attention, norm → act → conv to 2·latent channels, then
//! `quant_conv`) gives a diagonal Gaussian posterior; the decoder (`post_quant_conv`, middle,
//! upsampling ResNet levels) maps latents back to images. `scaling_factor` (and
//! `shift_factor`) convert between posterior samples and the UNet's latents.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use colossal_core::params::Params;
use colossal_kernels::Kernels;
use serde::Deserialize;
use serde_json::Value;

use crate::conv_blocks::{self, conv_shapes, resnet_shapes, Groups};
use crate::nn::{self, Activation};
use crate::{Error, Result};

/// The VAE's norms all use this eps (diffusers fixes it).
const EPS: f64 = 1e-6;

fn d_scale() -> f64 {
    0.18215
}

#[derive(Clone, Debug, Deserialize)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "crate::config_keys::defaults::one")]
    pub layers_per_block: usize,
    pub latent_channels: usize,
    #[serde(default = "crate::config_keys::defaults::groups")]
    pub norm_num_groups: usize,
    #[serde(default = "crate::config_keys::defaults::silu")]
    pub act_fn: String,
    #[serde(default = "d_scale")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "crate::config_keys::defaults::yes")]
    pub use_quant_conv: bool,
    #[serde(default = "crate::config_keys::defaults::yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "crate::config_keys::defaults::yes")]
    pub mid_block_add_attention: bool,
}

const KNOWN: [&str; 19] = [
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "in_channels",
    "out_channels",
    "block_out_channels",
    "down_block_types",
    "up_block_types",
    "layers_per_block",
    "latent_channels",
    "norm_num_groups",
    "act_fn",
    "scaling_factor",
    "shift_factor",
    "use_quant_conv",
    "use_post_quant_conv",
    "mid_block_add_attention",
    "sample_size",
    // Inference-time dtype advice; training here is f32.
    "force_upcast",
];

impl VaeConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::config_keys::read(path, Self::from_json)
    }

    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        // Per-channel latent statistics (SDXL-era VAEs) are not implemented.
        let fixed = [("latents_mean", "null"), ("latents_std", "null")];
        let v = crate::config_keys::checked(text, "AutoencoderKL", &KNOWN, &fixed)?;
        let cfg: Self = serde_json::from_value(Value::Object(v)).map_err(|e| e.to_string())?;
        let n = cfg.block_out_channels.len();
        if n == 0 || cfg.down_block_types.len() != n || cfg.up_block_types.len() != n {
            return Err(
                "block_out_channels, down_block_types and up_block_types need one entry per level"
                    .into(),
            );
        }
        if let Some(t) = cfg
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            return Err(format!("down_block_types: `{t}` is not implemented"));
        }
        if let Some(t) = cfg.up_block_types.iter().find(|t| *t != "UpDecoderBlock2D") {
            return Err(format!("up_block_types: `{t}` is not implemented"));
        }
        Activation::parse(&cfg.act_fn, "act_fn")?;
        Ok(cfg)
    }
}

/// The encoder's output: a diagonal Gaussian over latents.
#[derive(Clone, Debug)]
pub struct Posterior {
    pub mean: Tensor,
    /// Clamped to [−30, 20], as diffusers does.
    pub logvar: Tensor,
    pub std: Tensor,
}

impl Posterior {
    /// mean + std · noise.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        Ok((&self.mean + (&self.std * noise)?)?)
    }
}

#[derive(Clone, Debug)]
pub struct Vae {
    pub cfg: VaeConfig,
    act: Activation,
    pub kernels: Kernels,
}

impl Vae {
    pub fn new(cfg: VaeConfig) -> Result<Self> {
        let act = Activation::parse(&cfg.act_fn, "act_fn").map_err(Error::Config)?;
        Ok(Self {
            cfg,
            act,
            kernels: Kernels::default(),
        })
    }

    /// The model and its weights from a `vae/` folder.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<(Self, Params)> {
        let read = |f: &Path| Self::new(VaeConfig::from_file(f)?);
        let file = "diffusion_pytorch_model.safetensors";
        crate::weights::load_folder(dir, file, read, Self::param_shapes, dtype, device)
    }

    fn groups(&self) -> Groups {
        Groups {
            groups: self.cfg.norm_num_groups,
            eps: EPS,
        }
    }

    fn mid_shapes(&self, out: &mut Vec<(String, Vec<usize>)>, prefix: &str, c: usize) {
        resnet_shapes(out, &format!("{prefix}.resnets.0"), c, c, None);
        if self.cfg.mid_block_add_attention {
            let a = format!("{prefix}.attentions.0");
            out.push((format!("{a}.group_norm.weight"), vec![c]));
            out.push((format!("{a}.group_norm.bias"), vec![c]));
            for proj in ["to_q", "to_k", "to_v", "to_out.0"] {
                out.push((format!("{a}.{proj}.weight"), vec![c, c]));
                out.push((format!("{a}.{proj}.bias"), vec![c]));
            }
        }
        resnet_shapes(out, &format!("{prefix}.resnets.1"), c, c, None);
    }

    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let c = &self.cfg;
        let boc = &c.block_out_channels;
        let (n, lpb, z) = (boc.len(), c.layers_per_block, c.latent_channels);
        let mut out = Vec::new();
        conv_shapes(&mut out, "encoder.conv_in", c.in_channels, boc[0], 3);
        for i in 0..n {
            let cin = if i == 0 { boc[0] } else { boc[i - 1] };
            for j in 0..lpb {
                let p = format!("encoder.down_blocks.{i}.resnets.{j}");
                resnet_shapes(
                    &mut out,
                    &p,
                    if j == 0 { cin } else { boc[i] },
                    boc[i],
                    None,
                );
            }
            if i + 1 < n {
                let p = format!("encoder.down_blocks.{i}.downsamplers.0.conv");
                conv_shapes(&mut out, &p, boc[i], boc[i], 3);
            }
        }
        self.mid_shapes(&mut out, "encoder.mid_block", boc[n - 1]);
        out.push(("encoder.conv_norm_out.weight".into(), vec![boc[n - 1]]));
        out.push(("encoder.conv_norm_out.bias".into(), vec![boc[n - 1]]));
        conv_shapes(&mut out, "encoder.conv_out", boc[n - 1], 2 * z, 3);
        if c.use_quant_conv {
            conv_shapes(&mut out, "quant_conv", 2 * z, 2 * z, 1);
        }
        if c.use_post_quant_conv {
            conv_shapes(&mut out, "post_quant_conv", z, z, 1);
        }
        conv_shapes(&mut out, "decoder.conv_in", z, boc[n - 1], 3);
        self.mid_shapes(&mut out, "decoder.mid_block", boc[n - 1]);
        let mut prev = boc[n - 1];
        for i in 0..n {
            let ch = boc[n - 1 - i];
            for j in 0..=lpb {
                let p = format!("decoder.up_blocks.{i}.resnets.{j}");
                resnet_shapes(&mut out, &p, if j == 0 { prev } else { ch }, ch, None);
            }
            if i + 1 < n {
                conv_shapes(
                    &mut out,
                    &format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                    ch,
                    ch,
                    3,
                );
            }
            prev = ch;
        }
        out.push(("decoder.conv_norm_out.weight".into(), vec![boc[0]]));
        out.push(("decoder.conv_norm_out.bias".into(), vec![boc[0]]));
        conv_shapes(&mut out, "decoder.conv_out", boc[0], c.out_channels, 3);
        out
    }

    /// The middle: ResNet, single-head self-attention over all positions (with its own
    /// GroupNorm and a residual), ResNet.
    fn mid(&self, p: &Params, prefix: &str, x: &Tensor) -> Result<Tensor> {
        let (k, act, g) = (self.kernels, self.act, self.groups());
        let h = conv_blocks::resnet(p, k, act, &format!("{prefix}.resnets.0"), x, None, g, 1.0)?;
        let h = if self.cfg.mid_block_add_attention {
            let a = format!("{prefix}.attentions.0");
            let (b, c, hh, ww) = h.dims4()?;
            let n = nn::group_norm(p, &format!("{a}.group_norm"), &h, g.groups, EPS, k)?;
            let tokens = n.reshape((b, c, hh * ww))?.transpose(1, 2)?.contiguous()?;
            let q = nn::linear(p, &format!("{a}.to_q"), &tokens, k)?
                .affine(1.0 / (c as f64).sqrt(), 0.0)?;
            let kk = nn::linear(p, &format!("{a}.to_k"), &tokens, k)?;
            let v = nn::linear(p, &format!("{a}.to_v"), &tokens, k)?;
            let o = nn::attention(
                &q.unsqueeze(1)?,
                &kk.unsqueeze(1)?,
                &v.unsqueeze(1)?,
                false,
                k,
            )?;
            let o = nn::linear(p, &format!("{a}.to_out.0"), &o.squeeze(1)?, k)?;
            let o = o.transpose(1, 2)?.reshape((b, c, hh, ww))?;
            (o + h)?
        } else {
            h
        };
        conv_blocks::resnet(p, k, act, &format!("{prefix}.resnets.1"), &h, None, g, 1.0)
    }

    /// The posterior of images `x` (B, in, H, W) in [−1, 1].
    pub fn encode(&self, p: &Params, x: &Tensor) -> Result<Posterior> {
        let (k, act, g) = (self.kernels, self.act, self.groups());
        let n = self.cfg.block_out_channels.len();
        let mut h = nn::conv2d(p, "encoder.conv_in", x, 1, 1, k)?;
        for i in 0..n {
            for j in 0..self.cfg.layers_per_block {
                let prefix = format!("encoder.down_blocks.{i}.resnets.{j}");
                h = conv_blocks::resnet(p, k, act, &prefix, &h, None, g, 1.0)?;
            }
            if i + 1 < n {
                h = conv_blocks::downsample(
                    p,
                    &format!("encoder.down_blocks.{i}.downsamplers.0"),
                    &h,
                    0,
                    k,
                )?;
            }
        }
        let h = self.mid(p, "encoder.mid_block", &h)?;
        let h = nn::group_norm(p, "encoder.conv_norm_out", &h, g.groups, EPS, k)?;
        let mut h = nn::conv2d(p, "encoder.conv_out", &act.apply(&h)?, 1, 1, k)?;
        if self.cfg.use_quant_conv {
            h = nn::conv2d(p, "quant_conv", &h, 1, 0, k)?;
        }
        let z = self.cfg.latent_channels;
        let mean = h.narrow(1, 0, z)?;
        let logvar = h.narrow(1, z, z)?.clamp(-30f32, 20f32)?;
        let std = logvar.affine(0.5, 0.0)?.exp()?;
        Ok(Posterior { mean, logvar, std })
    }

    /// Images (B, out, H, W) from posterior-scale latents `z` (not multiplied by the scaling
    /// factor: see [`Self::to_model_latents`]).
    pub fn decode(&self, p: &Params, z: &Tensor) -> Result<Tensor> {
        let (k, act, g) = (self.kernels, self.act, self.groups());
        let n = self.cfg.block_out_channels.len();
        let z = if self.cfg.use_post_quant_conv {
            nn::conv2d(p, "post_quant_conv", z, 1, 0, k)?
        } else {
            z.clone()
        };
        let mut h = nn::conv2d(p, "decoder.conv_in", &z, 1, 1, k)?;
        h = self.mid(p, "decoder.mid_block", &h)?;
        for i in 0..n {
            for j in 0..=self.cfg.layers_per_block {
                let prefix = format!("decoder.up_blocks.{i}.resnets.{j}");
                h = conv_blocks::resnet(p, k, act, &prefix, &h, None, g, 1.0)?;
            }
            if i + 1 < n {
                h = conv_blocks::upsample(
                    p,
                    &format!("decoder.up_blocks.{i}.upsamplers.0"),
                    &h,
                    k,
                )?;
            }
        }
        let h = nn::group_norm(p, "decoder.conv_norm_out", &h, g.groups, EPS, k)?;
        nn::conv2d(p, "decoder.conv_out", &act.apply(&h)?, 1, 1, k)
    }

    /// Posterior samples → the UNet's latents: (z − shift) · scaling_factor.
    pub fn to_model_latents(&self, z: &Tensor) -> Result<Tensor> {
        let shift = self.cfg.shift_factor.unwrap_or(0.0);
        Ok(z.affine(self.cfg.scaling_factor, -shift * self.cfg.scaling_factor)?)
    }

    /// The UNet's latents → posterior scale: z / scaling_factor + shift.
    pub fn from_model_latents(&self, z: &Tensor) -> Result<Tensor> {
        let shift = self.cfg.shift_factor.unwrap_or(0.0);
        Ok(z.affine(1.0 / self.cfg.scaling_factor, shift)?)
    }
}
