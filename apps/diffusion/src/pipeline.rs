//! Text-to-image sampling as diffusers' `StableDiffusionPipeline`: prompts → CLIP hidden
//! states; Gaussian latents × the scheduler's initial σ; each step the UNet predicts on the
//! (scaled) latents — twice, unconditioned and conditioned, under classifier-free guidance —
//! and the scheduler steps; the VAE decodes latents / scaling factor (a pixel-space model's
//! output is the image: `space.rs`); images map from [−1, 1] to [0, 1]. Randomness comes from one seeded generator, so a run is reproducible.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use colossal_core::params::Params;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::clip::{ClipTextModel, ClipTokenizer};
use crate::scheduler::Scheduler;
use crate::space::Space;
use crate::unet::UNet;
use crate::vae::Vae;
use crate::{Error, Result};

/// A diffusers Stable Diffusion folder, loaded.
pub struct Pipeline {
    pub tokenizer: ClipTokenizer,
    pub text: ClipTextModel,
    pub text_params: Params,
    pub unet: UNet,
    pub unet_params: Params,
    /// The VAE's latent space, or pixels.
    pub space: Space,
    pub scheduler: Scheduler,
    pub device: Device,
}

/// How to sample.
#[derive(Clone, Debug)]
pub struct SampleOptions {
    pub steps: usize,
    /// Classifier-free guidance scale (≤ 1: the conditioned prediction only).
    pub guidance: f64,
    pub height: usize,
    pub width: usize,
    pub seed: u64,
}

/// `n` standard normal values from `rng`, shaped `shape`.
pub fn gaussian(rng: &mut ChaCha8Rng, shape: &[usize], device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// Checks the folder's `model_index.json`; true when it has a VAE (`"vae": [null, null]` or no
/// entry: a pixel-space model).
fn check_model_index(dir: &Path) -> Result<bool> {
    let path = dir.join("model_index.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::file(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::file(&path, e))?;
    match v["_class_name"].as_str() {
        Some("StableDiffusionPipeline") => {}
        other => {
            return Err(Error::file(
                &path,
                format!(
                    "_class_name {other:?}: only StableDiffusionPipeline folders are implemented"
                ),
            ))
        }
    }
    Ok(v["vae"]
        .as_array()
        .is_some_and(|a| a.iter().any(|x| !x.is_null())))
}

impl Pipeline {
    /// Merges a LoRA file's adapters into the UNet and text encoder at `strength` (1 = as
    /// trained); returns how many (UNet, text encoder) weights changed.
    pub fn apply_lora(
        &mut self,
        lora: &crate::lora::LoraWeights,
        strength: f64,
    ) -> Result<(usize, usize)> {
        let u = crate::lora::merge(&lora.unet, &self.unet_params, strength, "the UNet")?;
        let t = crate::lora::merge(
            &lora.text_encoder,
            &self.text_params,
            strength,
            "the text encoder",
        )?;
        Ok((u, t))
    }

    /// Loads `dir` (a diffusers folder: `model_index.json`, `tokenizer/`, `text_encoder/`,
    /// `unet/`, `vae/`, `scheduler/`), with the scheduler from `scheduler_dir` if given.
    pub fn load(dir: &Path, scheduler_dir: Option<&Path>, device: &Device) -> Result<Self> {
        Self::load_with(dir, scheduler_dir, device, true)
    }

    /// [`Self::load`]; without `unet_weights` the UNet is built from its config only and its
    /// parameters are left empty (training that resumes or starts fresh never reads them).
    pub fn load_with(
        dir: &Path,
        scheduler_dir: Option<&Path>,
        device: &Device,
        unet_weights: bool,
    ) -> Result<Self> {
        let has_vae = check_model_index(dir)?;
        let (text, text_params) =
            ClipTextModel::load(&dir.join("text_encoder"), DType::F32, device)?;
        let (unet, unet_params) = match unet_weights {
            true => UNet::load(&dir.join("unet"), DType::F32, device)?,
            false => {
                let cfg = crate::unet::UNetConfig::from_file(&dir.join("unet/config.json"))?;
                (UNet::new(cfg)?, Params::new())
            }
        };
        let space = match has_vae {
            true => {
                let (vae, params) = Vae::load(&dir.join("vae"), DType::F32, device)?;
                Space::Latent {
                    vae: Box::new(vae),
                    params,
                }
            }
            false => Space::Pixels,
        };
        let sched_dir = scheduler_dir.map_or_else(|| dir.join("scheduler"), Path::to_path_buf);
        Ok(Self {
            tokenizer: ClipTokenizer::from_dir(&dir.join("tokenizer"))?,
            text,
            text_params,
            unet,
            unet_params,
            space,
            scheduler: Scheduler::from_dir(&sched_dir)?,
            device: device.clone(),
        })
    }

    /// The token ids (B, 77) of `prompts`, padded and truncated as transformers does.
    pub fn token_ids(&self, prompts: &[String]) -> Result<Tensor> {
        let ids: Vec<u32> = prompts
            .iter()
            .flat_map(|p| self.tokenizer.encode(p))
            .collect();
        let shape = (prompts.len(), self.tokenizer.max_len);
        Ok(Tensor::from_vec(ids, shape, &self.device)?)
    }

    /// CLIP hidden states (B, 77, D) of `prompts`, without gradient history.
    pub fn encode_prompts(&self, prompts: &[String]) -> Result<Tensor> {
        let ids = self.token_ids(prompts)?;
        Ok(self.text.forward(&self.text_params, &ids)?.0.detach())
    }

    /// How many pixels one latent covers (2 per VAE level after the first; 1 in pixel space).
    pub fn latent_scale(&self) -> usize {
        self.space.scale()
    }

    /// Images (B, 3, H, W) in [0, 1] for `prompts`; `latents` replaces the initial noise
    /// (already × σ₀) when given.
    pub fn generate(
        &mut self,
        prompts: &[String],
        opts: &SampleOptions,
        latents: Option<Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let b = prompts.len();
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
        let s = self.latent_scale();
        if !opts.height.is_multiple_of(s) || !opts.width.is_multiple_of(s) {
            return Err(Error::Config(format!(
                "image {}×{}: each side must be a multiple of {s}",
                opts.height, opts.width
            )));
        }
        let shape = [
            b,
            self.unet.cfg.in_channels,
            opts.height / s,
            opts.width / s,
        ];
        let guided = opts.guidance > 1.0;
        let cond = self.encode_prompts(prompts)?;
        let text = if guided {
            let uncond = self.encode_prompts(&vec![String::new(); b])?;
            Tensor::cat(&[&uncond, &cond], 0)?
        } else {
            cond
        };
        self.scheduler.set_timesteps(opts.steps)?;
        let mut x = match latents {
            Some(l) => l,
            None => gaussian(&mut rng, &shape, &self.device)?
                .affine(self.scheduler.init_noise_sigma(), 0.0)?,
        };
        let timesteps = self.scheduler.timesteps().to_vec();
        for (i, &t) in timesteps.iter().enumerate() {
            let input = if guided {
                Tensor::cat(&[&x, &x], 0)?
            } else {
                x.clone()
            };
            let input = self.scheduler.scale_model_input(&input, i)?;
            let ts = vec![t; input.dim(0)?];
            let pred = self
                .unet
                .forward(&self.unet_params, &input, &ts, &text)?
                .detach();
            let pred = if guided {
                let (u, c) = (pred.narrow(0, 0, b)?, pred.narrow(0, b, b)?);
                (&u + ((c - &u)? * opts.guidance)?)?
            } else {
                pred
            };
            let noise = if self.scheduler.needs_noise(i) {
                Some(gaussian(&mut rng, x.dims(), &self.device)?)
            } else {
                None
            };
            x = self.scheduler.step(i, &pred, &x, noise.as_ref())?;
        }
        let decoded = self.space.decode(&x)?;
        let images = (decoded.affine(0.5, 0.5)?).clamp(0f32, 1f32)?;
        Ok((images, x))
    }
}
