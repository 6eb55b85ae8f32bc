//! `UNet2DConditionModel` (diffusers), SD 1.x/2.x layouts: timestep embedding, `conv_in`,
//! down levels (ResNet blocks, spatial transformers, a stride-2 downsampler), the middle
//! (ResNet, transformer, ResNet), up levels that concatenate the matching down activation
//! (the skip) before each ResNet block and upsample, then norm → act → `conv_out`.
//! Parameter names are the checkpoint's.

mod blocks;
mod config;
mod family;

pub use blocks::timestep_features;
pub use config::{DownKind, PerBlock, UNetConfig, UpKind};
pub use family::{Text, UNetCtx};

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use colossal_core::params::Params;
use colossal_kernels::Kernels;

use crate::clip::ClipTextModel;
use crate::conv_blocks::resnet_shapes;
use blocks::{transformer_shapes, Ctx};

use crate::nn::{self, Activation};
use crate::{Error, Result};

/// Where a jointly trained text encoder's parameters are named.
pub const TEXT_PREFIX: &str = "text_encoder.";

#[derive(Clone, Debug)]
pub struct UNet {
    pub cfg: UNetConfig,
    act: Activation,
    down: Vec<DownKind>,
    up: Vec<UpKind>,
    pub kernels: Kernels,
    /// LoRA adapters on the spatial transformers' linears (pairs in the parameters).
    pub lora: Option<std::sync::Arc<colossal_core::lora::Adapters>>,
    /// The text encoder, when it trains with the UNet (DreamBooth's `--train_text_encoder`):
    /// its layers are this family's first blocks, its hidden states a stream every
    /// cross-attention reads, its parameters named `text_encoder.…` beside the UNet's.
    pub text_encoder: Option<ClipTextModel>,
}

impl UNet {
    pub fn new(cfg: UNetConfig) -> Result<Self> {
        cfg.validate().map_err(Error::Config)?;
        let act = Activation::parse(&cfg.act_fn, "act_fn").map_err(Error::Config)?;
        let down = cfg.down_kinds().map_err(Error::Config)?;
        let up = cfg.up_kinds().map_err(Error::Config)?;
        Ok(Self {
            cfg,
            act,
            down,
            up,
            kernels: Kernels::default(),
            lora: None,
            text_encoder: None,
        })
    }

    /// This UNet training `clip` with it (as the family's first blocks).
    pub fn with_text_encoder(self, mut clip: ClipTextModel) -> Self {
        clip.prefix = TEXT_PREFIX.into();
        clip.lora = self.lora.clone();
        Self {
            text_encoder: Some(clip),
            ..self
        }
    }

    /// The diffusers `UNet2DConditionModel` alone: no text encoder, no adapters (what `unet/`
    /// and the EMA folder hold).
    pub fn denoiser(&self) -> Self {
        Self {
            lora: None,
            text_encoder: None,
            ..self.clone()
        }
    }

    /// How many blocks the text encoder takes before the UNet's (embeddings, then a block per
    /// layer).
    fn text_blocks(&self) -> usize {
        self.text_encoder
            .as_ref()
            .map_or(0, |c| 1 + c.cfg.num_hidden_layers)
    }

    /// The model and its weights from a `unet/` folder (`config.json`,
    /// `diffusion_pytorch_model.safetensors`).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<(Self, Params)> {
        let read = |f: &Path| Self::new(UNetConfig::from_file(f)?);
        let file = "diffusion_pytorch_model.safetensors";
        crate::weights::load_folder(dir, file, read, Self::param_shapes, dtype, device)
    }

    fn levels(&self) -> usize {
        self.cfg.block_out_channels.len()
    }

    /// Input channels of up level `i`'s ResNet `j` (the running width plus its skip's).
    fn up_resnet_in(&self, i: usize, j: usize) -> usize {
        let rev: Vec<usize> = self.cfg.block_out_channels.iter().rev().copied().collect();
        let n = rev.len();
        let out = rev[i];
        let prev = if i == 0 { rev[0] } else { rev[i - 1] };
        let skip = if j == self.cfg.layers_per_block {
            rev[(i + 1).min(n - 1)]
        } else {
            out
        };
        (if j == 0 { prev } else { out }) + skip
    }

    /// Every parameter's name and shape: the diffusers UNet's (a jointly trained text
    /// encoder's are the family's: `ModelFamily::param_specs`).
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let c = &self.cfg;
        let boc = &c.block_out_channels;
        let (n, tdim, lpb) = (self.levels(), c.time_dim(), c.layers_per_block);
        let lin = c.use_linear_projection;
        let mut out: Vec<(String, Vec<usize>)> = vec![
            ("time_embedding.linear_1.weight".into(), vec![tdim, boc[0]]),
            ("time_embedding.linear_1.bias".into(), vec![tdim]),
            ("time_embedding.linear_2.weight".into(), vec![tdim, tdim]),
            ("time_embedding.linear_2.bias".into(), vec![tdim]),
            ("conv_in.weight".into(), vec![boc[0], c.in_channels, 3, 3]),
            ("conv_in.bias".into(), vec![boc[0]]),
        ];
        for (i, kind) in self.down.iter().enumerate() {
            let cin = if i == 0 { boc[0] } else { boc[i - 1] };
            for j in 0..lpb {
                let p = format!("down_blocks.{i}.resnets.{j}");
                resnet_shapes(
                    &mut out,
                    &p,
                    if j == 0 { cin } else { boc[i] },
                    boc[i],
                    Some(tdim),
                );
                if *kind == DownKind::CrossAttn {
                    let p = format!("down_blocks.{i}.attentions.{j}");
                    let layers = c.transformer_layers_per_block.get(i);
                    transformer_shapes(&mut out, &p, boc[i], c.cross_attention_dim, layers, lin);
                }
            }
            if i + 1 < n {
                out.push((
                    format!("down_blocks.{i}.downsamplers.0.conv.weight"),
                    vec![boc[i], boc[i], 3, 3],
                ));
                out.push((
                    format!("down_blocks.{i}.downsamplers.0.conv.bias"),
                    vec![boc[i]],
                ));
            }
        }
        let mid = boc[n - 1];
        resnet_shapes(&mut out, "mid_block.resnets.0", mid, mid, Some(tdim));
        let layers = c.transformer_layers_per_block.get(n - 1);
        transformer_shapes(
            &mut out,
            "mid_block.attentions.0",
            mid,
            c.cross_attention_dim,
            layers,
            lin,
        );
        resnet_shapes(&mut out, "mid_block.resnets.1", mid, mid, Some(tdim));
        for (i, kind) in self.up.iter().enumerate() {
            let ch = boc[n - 1 - i];
            for j in 0..=lpb {
                let p = format!("up_blocks.{i}.resnets.{j}");
                resnet_shapes(&mut out, &p, self.up_resnet_in(i, j), ch, Some(tdim));
                if *kind == UpKind::CrossAttn {
                    let p = format!("up_blocks.{i}.attentions.{j}");
                    let layers = c.transformer_layers_per_block.get(n - 1 - i);
                    transformer_shapes(&mut out, &p, ch, c.cross_attention_dim, layers, lin);
                }
            }
            if i + 1 < n {
                out.push((
                    format!("up_blocks.{i}.upsamplers.0.conv.weight"),
                    vec![ch, ch, 3, 3],
                ));
                out.push((format!("up_blocks.{i}.upsamplers.0.conv.bias"), vec![ch]));
            }
        }
        out.extend([
            ("conv_norm_out.weight".into(), vec![boc[0]]),
            ("conv_norm_out.bias".into(), vec![boc[0]]),
            ("conv_out.weight".into(), vec![c.out_channels, boc[0], 3, 3]),
            ("conv_out.bias".into(), vec![c.out_channels]),
        ]);
        out
    }

    /// The time embedding (B, 4·C₀) of per-sample timesteps.
    pub fn time_embedding(
        &self,
        p: &Params,
        t: &[f64],
        device: &Device,
        dtype: DType,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let f = timestep_features(
            t,
            c.block_out_channels[0],
            c.flip_sin_to_cos,
            c.freq_shift,
            device,
        )?
        .to_dtype(dtype)?;
        let h = nn::linear(p, "time_embedding.linear_1", &f, self.kernels)?;
        nn::linear(
            p,
            "time_embedding.linear_2",
            &self.act.apply(&h)?,
            self.kernels,
        )
    }

    /// The model's prediction (B, out, H, W) for `x` (B, in, H, W) at per-sample timesteps
    /// `t`, conditioned on `text` (B, S, cross_attention_dim): the UNet's blocks in order (a
    /// text encoder it carries is not run: `text` is its output).
    pub fn forward(&self, p: &Params, x: &Tensor, t: &[f64], text: &Tensor) -> Result<Tensor> {
        use colossal_core::exec::{Acts, BlockModel};
        let ctx = UNetCtx {
            text: Text::Hidden(text.clone()),
            t: t.to_vec(),
        };
        let mut acts = Acts::one("x", x.clone());
        for b in self.text_blocks()..self.num_blocks() {
            acts = self.block_forward(b, p, &acts, &ctx)?;
        }
        Ok(acts.take("pred")?)
    }

    fn ctx<'a>(&'a self, p: &'a Params) -> Ctx<'a> {
        Ctx {
            p,
            k: self.kernels,
            cfg: &self.cfg,
            act: self.act,
            lora: self.lora.as_deref(),
        }
    }
}
