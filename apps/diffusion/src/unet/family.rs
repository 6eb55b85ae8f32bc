//! The UNet as blocks for the engine and as a model family: a stem (time embedding,
//! `conv_in`), one block per down level, the middle, one block per up level, and the output
//! head. Between blocks travel the running activation `h`, the time embedding `temb` (every
//! ResNet reads it) and the skips `skip.k` each down level stashes for the up level that
//! concatenates them; the noisy latents `x` take no gradient. The timesteps and the text
//! conditioning are the per-batch context — with a text encoder training alongside, the
//! caption's token ids are, and its blocks come first and add the stream `text` (its hidden
//! states) that every cross-attention reads and sends its gradient back through.

use std::path::Path;

use candle_core::{DType, Tensor};
use colossal_core::exec::{Acts, BlockModel};
use colossal_core::lora::{Adapters, LoraConfig, Site};
use colossal_core::models::{Init, ModelFamily, ParamSpec};
use colossal_core::parallel::plan::TpPlan;
use colossal_core::params::Params;

use super::{DownKind, UNet, UNetConfig, UpKind, TEXT_PREFIX};
use crate::clip::{ClipTextConfig, ClipTextModel};
use crate::conv_blocks;
use crate::nn;

/// Per-batch inputs every block reads.
#[derive(Clone, Debug)]
pub struct UNetCtx {
    pub text: Text,
    /// Per-sample timesteps.
    pub t: Vec<f64>,
}

/// The text conditioning of a batch.
#[derive(Clone, Debug)]
pub enum Text {
    /// A frozen text encoder's hidden states (B, S, cross_attention_dim), no gradient.
    Hidden(Tensor),
    /// Token ids (B, S) for the text encoder the model trains.
    Ids(Tensor),
}

/// Which part of the model a block is.
enum Part {
    TextEmbed,
    TextLayer(usize),
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
        let (n, k) = (self.levels(), self.text_blocks());
        match block {
            0 if k > 0 => return Part::TextEmbed,
            b if b < k => return Part::TextLayer(b - 1),
            _ => {}
        }
        match block - k {
            0 => Part::Stem,
            b if b <= n => Part::Down(b - 1),
            b if b == n + 1 => Part::Mid,
            b if b <= 2 * n + 1 => Part::Up(b - n - 2),
            _ => Part::Head,
        }
    }

    fn prefixes(&self, block: usize) -> Vec<String> {
        let text = |s: &str| format!("{TEXT_PREFIX}text_model.{s}");
        match self.part(block) {
            Part::TextEmbed => vec![text("embeddings.")],
            Part::TextLayer(l) if l + 1 == self.text_blocks() - 1 => vec![
                text(&format!("encoder.layers.{l}.")),
                text("final_layer_norm."),
            ],
            Part::TextLayer(l) => vec![text(&format!("encoder.layers.{l}."))],
            Part::Stem => vec!["time_embedding.".into(), "conv_in.".into()],
            Part::Down(i) => vec![format!("down_blocks.{i}.")],
            Part::Mid => vec!["mid_block.".into()],
            Part::Up(i) => vec![format!("up_blocks.{i}.")],
            Part::Head => vec!["conv_norm_out.".into(), "conv_out.".into()],
        }
    }

    /// The family's parameters: the UNet's, then a jointly trained text encoder's.
    fn family_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = self.param_shapes();
        out.extend(self.text_encoder.iter().flat_map(|c| c.param_shapes()));
        out
    }

    /// Skips stashed before down level `i` (the stem stashes one).
    fn skips_before(&self, i: usize) -> usize {
        let n = self.levels();
        1 + (0..i)
            .map(|l| self.cfg.layers_per_block + usize::from(l + 1 < n))
            .sum::<usize>()
    }

    /// What the cross-attentions read: the trained text encoder's stream, else the batch's
    /// hidden states.
    fn text(&self, acts: &Acts, ctx: &UNetCtx) -> crate::Result<Tensor> {
        if acts.names().contains(&"text") {
            return Ok(acts.get("text")?.clone());
        }
        match &ctx.text {
            Text::Hidden(h) => Ok(h.clone()),
            Text::Ids(_) => Err(crate::Error::Config(
                "the batch gives token ids but this UNet has no text encoder".into(),
            )),
        }
    }

    fn run_block(&self, block: usize, p: &Params, x: &Acts, ctx: &UNetCtx) -> crate::Result<Acts> {
        let c = &self.cfg;
        let n = self.levels();
        let blocks = self.ctx(p);
        let mut out = x.clone();
        let part = self.part(block);
        if let (Part::TextEmbed | Part::TextLayer(_), Some(clip)) = (&part, &self.text_encoder) {
            let h = match (part, &ctx.text) {
                (Part::TextEmbed, Text::Ids(ids)) => clip.embed(p, ids)?,
                (Part::TextEmbed, Text::Hidden(_)) => {
                    return Err(crate::Error::Config(
                        "this UNet trains its text encoder: the batch must give token ids".into(),
                    ))
                }
                (Part::TextLayer(l), _) => {
                    let h = clip.layer(p, l, out.get("text")?)?;
                    match l + 1 == clip.cfg.num_hidden_layers {
                        true => clip.final_norm(p, &h)?,
                        false => h,
                    }
                }
                _ => unreachable!("a text block"),
            };
            out.insert("text", h);
            return Ok(out);
        }
        let text = match part {
            Part::Down(_) | Part::Mid | Part::Up(_) => Some(self.text(&out, ctx)?),
            _ => None,
        };
        let text = text.as_ref();
        match part {
            Part::TextEmbed | Part::TextLayer(_) => unreachable!("text blocks need a text encoder"),
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
                        h = blocks.transformer(
                            &prefix,
                            &h,
                            text.expect("down"),
                            c.heads(i),
                            layers,
                        )?;
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
                    text.expect("mid"),
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
                        h = blocks.transformer(
                            &prefix,
                            &h,
                            text.expect("up"),
                            c.heads(level),
                            layers,
                        )?;
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
        self.text_blocks() + 2 * self.levels() + 3
    }

    fn block_param_names(&self, block: usize) -> Vec<String> {
        let prefixes = self.prefixes(block);
        let adapters = self
            .lora
            .iter()
            .flat_map(|l| l.sites.iter())
            .flat_map(|s| [s.a_name(), s.b_name()]);
        self.family_shapes()
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
    /// biases uniform in ±1/√fan_in. A text encoder's as transformers initialises CLIP:
    /// normal(0, 0.02) matrices, zero biases, unit LayerNorm weights.
    fn param_specs(&self) -> Vec<ParamSpec> {
        let mut specs = self.unet_specs();
        let text = self.text_encoder.iter().flat_map(|c| c.param_shapes());
        specs.extend(text.map(|(name, shape)| {
            let init = match (shape.len(), name.contains("norm")) {
                (2, _) => Init::Normal {
                    std: 0.02,
                    zero_row: None,
                },
                (_, true) if name.ends_with(".weight") => Init::Ones,
                _ => Init::Zeros,
            };
            ParamSpec { name, shape, init }
        }));
        specs
    }

    fn tied_params(&self) -> Vec<String> {
        Vec::new()
    }

    fn tp_plan(&self) -> TpPlan {
        TpPlan::new(&[])
    }

    /// `config.json` (the UNet's), and `text_encoder_config.json` when the text encoder trains.
    fn read_config(dir: &Path) -> colossal_core::Result<Self> {
        let cfg = UNetConfig::from_file(&dir.join("config.json")).map_err(core_err)?;
        let unet = UNet::new(cfg).map_err(core_err)?;
        let text = dir.join(TEXT_CONFIG);
        if !text.exists() {
            return Ok(unet);
        }
        let clip = ClipTextModel::new(ClipTextConfig::from_file(&text).map_err(core_err)?)
            .map_err(core_err)?;
        Ok(unet.with_text_encoder(clip))
    }

    fn write_config(&self, dir: &Path, _dtype: DType) -> colossal_core::Result<()> {
        let path = dir.join("config.json");
        let text = self.cfg.to_json().map_err(core_err)?;
        colossal_core::checkpoint::atomic::write_file(&path, text.as_bytes())?;
        if let Some(clip) = &self.text_encoder {
            let text = serde_json::to_string_pretty(&clip.cfg)
                .map_err(|e| colossal_core::Error::Config(e.to_string()))?;
            colossal_core::checkpoint::atomic::write_file(&dir.join(TEXT_CONFIG), text.as_bytes())?;
        }
        Ok(())
    }

    fn weights_stem(&self) -> &'static str {
        "diffusion_pytorch_model"
    }

    /// The Linear layers of the spatial transformers (attention projections, feed-forward,
    /// linear proj_in/out): where the UNet applies LoRA. The time-embedding linears are not.
    /// A trained text encoder's linears too (`text_encoder.…q_proj`, …).
    fn linear_layers(&self) -> Vec<(String, Vec<usize>, bool)> {
        let text = self.text_encoder.iter().flat_map(|c| c.linear_layers());
        self.param_shapes()
            .into_iter()
            .filter(|(n, s)| s.len() == 2 && n.ends_with(".weight") && n.contains(".attentions."))
            .chain(text)
            .map(|(n, s)| (n, s, false))
            .collect()
    }

    fn with_lora(self, cfg: &LoraConfig, sites: Vec<Site>) -> colossal_core::Result<Self> {
        if cfg.dropout > 0.0 {
            return Err(self.unsupported(&format!("lora.dropout = {}", cfg.dropout)));
        }
        let lora = Some(std::sync::Arc::new(Adapters {
            cfg: cfg.clone(),
            sites,
        }));
        let text_encoder = self.text_encoder.map(|mut c| {
            c.lora = lora.clone();
            c
        });
        Ok(UNet {
            lora,
            text_encoder,
            ..self
        })
    }

    fn adapters(&self) -> Option<(&LoraConfig, &[Site])> {
        self.lora.as_ref().map(|a| (&a.cfg, a.sites.as_slice()))
    }
}

/// A jointly trained text encoder's config inside an engine checkpoint.
const TEXT_CONFIG: &str = "text_encoder_config.json";

impl UNet {
    /// The diffusers UNet's parameters as [`ModelFamily::param_specs`] gives them.
    fn unet_specs(&self) -> Vec<ParamSpec> {
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
}
