//! The UNet as blocks for the engine and as a model family: a stem (time embedding,
//! `conv_in`), one block per down level, the middle, one block per up level, and the output
//! head. Between blocks travel the running activation `h`, the time embedding `temb` (every
//! ResNet reads it) and the skips `skip.k` each down level stashes for the up level that
//! concatenates them; the noisy latents `x` take no gradient. The text conditioning and the
//! timesteps are the per-batch context.

use std::path::Path;

use candle_core::{DType, Tensor};
use colossal_core::exec::{Acts, BlockModel};
use colossal_core::lora::{Adapters, LoraConfig, Site};
use colossal_core::models::{Init, ModelFamily, ParamSpec};
use colossal_core::parallel::plan::TpPlan;
use colossal_core::params::Params;

use super::{DownKind, UNet, UNetConfig, UpKind};
use crate::conv_blocks;
use crate::nn;

/// Per-batch inputs every block reads.
#[derive(Clone, Debug)]
pub struct UNetCtx {
    /// Text hidden states (B, S, cross_attention_dim), no gradient.
    pub text: Tensor,
    /// Per-sample timesteps.
    pub t: Vec<f64>,
}

/// Which part of the UNet a block is.
enum Part {
    Stem,
    Down(usize),
    Mid,
    Up(usize),
    Head,
}

fn core_err(e: crate::Error) -> colossal_core::Error {
    match e {
        crate::Error::Core(e) => e,
        crate::Error::Candle(e) => colossal_core::Error::Candle(e),
        other => colossal_core::Error::Config(other.to_string()),
    }
}

impl UNet {
    fn part(&self, block: usize) -> Part {
        let n = self.levels();
        match block {
            0 => Part::Stem,
            b if b <= n => Part::Down(b - 1),
            b if b == n + 1 => Part::Mid,
            b if b <= 2 * n + 1 => Part::Up(b - n - 2),
            _ => Part::Head,
        }
    }

    fn prefixes(&self, block: usize) -> Vec<String> {
        match self.part(block) {
            Part::Stem => vec!["time_embedding.".into(), "conv_in.".into()],
            Part::Down(i) => vec![format!("down_blocks.{i}.")],
            Part::Mid => vec!["mid_block.".into()],
            Part::Up(i) => vec![format!("up_blocks.{i}.")],
            Part::Head => vec!["conv_norm_out.".into(), "conv_out.".into()],
        }
    }

    /// Skips stashed before down level `i` (the stem stashes one).
    fn skips_before(&self, i: usize) -> usize {
        let n = self.levels();
        1 + (0..i)
            .map(|l| self.cfg.layers_per_block + usize::from(l + 1 < n))
            .sum::<usize>()
    }

    fn run_block(&self, block: usize, p: &Params, x: &Acts, ctx: &UNetCtx) -> crate::Result<Acts> {
        let c = &self.cfg;
        let n = self.levels();
        let blocks = self.ctx(p);
        let mut out = x.clone();
        match self.part(block) {
            Part::Stem => {
                let x = out.take("x")?;
                let temb = self.time_embedding(p, &ctx.t, x.device(), x.dtype())?;
                let h = nn::conv2d(p, "conv_in", &x, 1, 1, self.kernels)?;
                out.insert("skip.0", h.clone());
                out.insert("h", h);
                out.insert("temb", temb);
            }
            Part::Down(i) => {
                let (temb, mut h) = (out.get("temb")?.clone(), out.take("h")?);
                let mut k = self.skips_before(i);
                for j in 0..c.layers_per_block {
                    h = blocks.resnet(&format!("down_blocks.{i}.resnets.{j}"), &h, &temb, 1.0)?;
                    if self.down[i] == DownKind::CrossAttn {
                        let layers = c.transformer_layers_per_block.get(i);
                        let prefix = format!("down_blocks.{i}.attentions.{j}");
                        h = blocks.transformer(&prefix, &h, &ctx.text, c.heads(i), layers)?;
                    }
                    out.insert(&format!("skip.{k}"), h.clone());
                    k += 1;
                }
                if i + 1 < n {
                    let prefix = format!("down_blocks.{i}.downsamplers.0");
                    h = conv_blocks::downsample(
                        p,
                        &prefix,
                        &h,
                        c.downsample_padding,
                        self.kernels,
                    )?;
                    out.insert(&format!("skip.{k}"), h.clone());
                }
                out.insert("h", h);
            }
            Part::Mid => {
                let (temb, h) = (out.get("temb")?.clone(), out.take("h")?);
                let scale = c.mid_block_scale_factor;
                let h = blocks.resnet("mid_block.resnets.0", &h, &temb, scale)?;
                let layers = c.transformer_layers_per_block.get(n - 1);
                let h = blocks.transformer(
                    "mid_block.attentions.0",
                    &h,
                    &ctx.text,
                    c.heads(n - 1),
                    layers,
                )?;
                out.insert("h", blocks.resnet("mid_block.resnets.1", &h, &temb, scale)?);
            }
            Part::Up(i) => {
                let (temb, mut h) = (out.get("temb")?.clone(), out.take("h")?);
                let level = n - 1 - i;
                let top = self.skips_before(n) - 1 - i * (c.layers_per_block + 1);
                for j in 0..=c.layers_per_block {
                    let skip = out.take(&format!("skip.{}", top - j))?;
                    h = Tensor::cat(&[&h, &skip], 1)?;
                    h = blocks.resnet(&format!("up_blocks.{i}.resnets.{j}"), &h, &temb, 1.0)?;
                    if self.up[i] == UpKind::CrossAttn {
                        let layers = c.transformer_layers_per_block.get(level);
                        let prefix = format!("up_blocks.{i}.attentions.{j}");
                        h = blocks.transformer(&prefix, &h, &ctx.text, c.heads(level), layers)?;
                    }
                }
                if i + 1 < n {
                    h = conv_blocks::upsample(
                        p,
                        &format!("up_blocks.{i}.upsamplers.0"),
                        &h,
                        self.kernels,
                    )?;
                }
                out.insert("h", h);
            }
            Part::Head => {
                let h = out.take("h")?;
                let h = nn::group_norm(
                    p,
                    "conv_norm_out",
                    &h,
                    c.norm_num_groups,
                    c.norm_eps,
                    self.kernels,
                )?;
                let pred = nn::conv2d(p, "conv_out", &self.act.apply(&h)?, 1, 1, self.kernels)?;
                out = Acts::one("pred", pred);
            }
        }
        Ok(out)
    }
}

impl BlockModel for UNet {
    type Ctx = UNetCtx;

    fn num_blocks(&self) -> usize {
        2 * self.levels() + 3
    }

    fn block_param_names(&self, block: usize) -> Vec<String> {
        let prefixes = self.prefixes(block);
        let adapters = self
            .lora
            .iter()
            .flat_map(|l| l.sites.iter())
            .flat_map(|s| [s.a_name(), s.b_name()]);
        self.param_shapes()
            .into_iter()
            .map(|(n, _)| n)
            .chain(adapters)
            .filter(|n| prefixes.iter().any(|p| n.starts_with(p.as_str())))
            .collect()
    }

    fn block_forward(
        &self,
        block: usize,
        p: &Params,
        x: &Acts,
        ctx: &UNetCtx,
    ) -> colossal_core::Result<Acts> {
        self.run_block(block, p, x, ctx).map_err(core_err)
    }

    fn takes_grad(&self, name: &str) -> bool {
        name != "x"
    }
}

impl ModelFamily for UNet {
    fn family(&self) -> &'static str {
        "unet"
    }

    /// torch's defaults: norm weights 1 and biases 0; convolution and linear weights and
    /// biases uniform in ±1/√fan_in.
    fn param_specs(&self) -> Vec<ParamSpec> {
        let shapes = self.param_shapes();
        let fan_in = |weight: &str| -> usize {
            shapes
                .iter()
                .find(|(n, _)| n == weight)
                .map_or(1, |(_, s)| s[1..].iter().product())
        };
        shapes
            .iter()
            .map(|(name, shape)| {
                let is_norm =
                    shape.len() == 1 && name.rsplit('.').nth(1).is_some_and(|m| m.contains("norm"));
                let init = match (is_norm, name.ends_with(".bias")) {
                    (true, false) => Init::Ones,
                    (true, true) => Init::Zeros,
                    (false, false) => Init::Uniform {
                        bound: 1.0 / (fan_in(name) as f32).sqrt(),
                    },
                    (false, true) => {
                        let w = format!("{}.weight", name.trim_end_matches(".bias"));
                        Init::Uniform {
                            bound: 1.0 / (fan_in(&w) as f32).sqrt(),
                        }
                    }
                };
                ParamSpec {
                    name: name.clone(),
                    shape: shape.clone(),
                    init,
                }
            })
            .collect()
    }

    fn tied_params(&self) -> Vec<String> {
        Vec::new()
    }

    fn tp_plan(&self) -> TpPlan {
        TpPlan::new(&[])
    }

    fn read_config(dir: &Path) -> colossal_core::Result<Self> {
        let cfg = UNetConfig::from_file(&dir.join("config.json")).map_err(core_err)?;
        UNet::new(cfg).map_err(core_err)
    }

    fn write_config(&self, dir: &Path, _dtype: DType) -> colossal_core::Result<()> {
        let path = dir.join("config.json");
        let text = self.cfg.to_json().map_err(core_err)?;
        colossal_core::checkpoint::atomic::write_file(&path, text.as_bytes())
    }

    fn weights_stem(&self) -> &'static str {
        "diffusion_pytorch_model"
    }

    /// The Linear layers of the spatial transformers (attention projections, feed-forward,
    /// linear proj_in/out): where the UNet applies LoRA. The time-embedding linears are not.
    fn linear_layers(&self) -> Vec<(String, Vec<usize>, bool)> {
        self.param_shapes()
            .into_iter()
            .filter(|(n, s)| s.len() == 2 && n.ends_with(".weight") && n.contains(".attentions."))
            .map(|(n, s)| (n, s, false))
            .collect()
    }

    fn with_lora(self, cfg: &LoraConfig, sites: Vec<Site>) -> colossal_core::Result<Self> {
        Ok(UNet {
            lora: Some(std::sync::Arc::new(Adapters {
                cfg: cfg.clone(),
                sites,
            })),
            ..self
        })
    }

    fn adapters(&self) -> Option<(&LoraConfig, &[Site])> {
        self.lora.as_ref().map(|a| (&a.cfg, a.sites.as_slice()))
    }
}
