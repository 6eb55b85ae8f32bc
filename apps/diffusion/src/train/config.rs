//! `diffusion train --config FILE.toml`: every key typed, unknown keys rejected.

use std::path::PathBuf;

use colossal_core::train::{DeviceSpec, ParallelConfig, Precision, TrainConfig, TrainSection};
use serde::Deserialize;

use crate::scheduler::SchedulerKind;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffusionConfig {
    pub model: ModelSection,
    /// Captioned images (`diffusion train`).
    #[serde(default)]
    pub data: Option<DataSection>,
    /// Instance images of one subject (`diffusion dreambooth`).
    #[serde(default)]
    pub dreambooth: Option<DreamBoothSection>,
    #[serde(default)]
    pub diffusion: DiffusionSection,
    pub train: TrainSection,
    #[serde(default)]
    pub parallel: ParallelConfig,
    /// Train LoRA adapters on the UNet's transformer linears (diffusers' DreamBooth LoRA targets
    /// `to_q`, `to_k`, `to_v`, `to_out.0`); the UNet's weights stay frozen.
    #[serde(default)]
    pub lora: Option<colossal_core::train::LoraSection>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A diffusers Stable Diffusion folder: its tokenizer, text encoder, VAE and scheduler
    /// are used as they are; its UNet is trained.
    pub pretrained: PathBuf,
    /// Train a fresh UNet with this `config.json` instead of the folder's.
    #[serde(default)]
    pub unet_config: Option<PathBuf>,
    /// Seed of a fresh UNet's initialisation.
    #[serde(default)]
    pub init_seed: u64,
    /// Train on the images themselves instead of the folder VAE's latents (a fresh UNet with
    /// 3 input and output channels, `sample_size` = the resolution): for small images and no
    /// trained VAE. The exported folder then has no VAE (`"vae": [null, null]`).
    #[serde(default)]
    pub pixel_space: bool,
    /// Train the folder's text encoder with the UNet (DreamBooth's `--train_text_encoder`):
    /// captions are encoded in every step, the gradient reaches CLIP through the
    /// cross-attentions, and the exported folder holds the trained `text_encoder/` (with
    /// `[lora]`: its adapters, where `target_modules` name its linears, e.g. `q_proj`).
    #[serde(default)]
    pub train_text_encoder: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// A `captions.jsonl` folder or an MNIST folder (see `data`).
    pub path: PathBuf,
    /// Training images are resized and centre-cropped to this square size.
    pub resolution: usize,
    /// At most this many MNIST digits.
    #[serde(default = "default_limit")]
    pub limit: usize,
    /// Mirror each image left-right with probability ½.
    #[serde(default)]
    pub random_flip: bool,
}

fn default_limit() -> usize {
    10_000
}

/// DreamBooth (Ruiz et al.): a few images of one subject, all captioned with the instance
/// prompt ("a photo of sks dog"); with prior preservation, images of the subject's class made
/// by the model itself keep the class prompt's meaning ("a photo of dog").
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DreamBoothSection {
    /// A folder of the subject's images (png, jpg).
    pub instance_dir: PathBuf,
    pub instance_prompt: String,
    pub resolution: usize,
    #[serde(default)]
    pub random_flip: bool,
    #[serde(default)]
    pub with_prior_preservation: bool,
    /// Needed with prior preservation.
    #[serde(default)]
    pub class_prompt: Option<String>,
    /// Where class images are kept; generated there by the model until there are
    /// `num_class_images` (needed with prior preservation).
    #[serde(default)]
    pub class_dir: Option<PathBuf>,
    #[serde(default = "default_class_images")]
    pub num_class_images: usize,
    #[serde(default = "default_one")]
    pub prior_loss_weight: f64,
    #[serde(default = "default_sample_steps")]
    pub class_sample_steps: usize,
    #[serde(default = "default_guidance")]
    pub class_guidance: f64,
}

fn default_class_images() -> usize {
    100
}

fn default_one() -> f64 {
    1.0
}

/// The scheduler sample grids are drawn with (from the training noise schedule).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleScheduler {
    Ddpm,
    #[default]
    Ddim,
    Euler,
    EulerAncestral,
    DpmppTwoM,
}

impl SampleScheduler {
    pub fn kind(self) -> SchedulerKind {
        match self {
            SampleScheduler::Ddpm => SchedulerKind::Ddpm,
            SampleScheduler::Ddim => SchedulerKind::Ddim,
            SampleScheduler::Euler => SchedulerKind::Euler,
            SampleScheduler::EulerAncestral => SchedulerKind::EulerAncestral,
            SampleScheduler::DpmppTwoM => SchedulerKind::DpmSolverMultistep,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffusionSection {
    /// Min-SNR-γ loss weighting (Hang et al.): each sample's loss × min(SNR, γ)/SNR (ε
    /// prediction) or /(SNR + 1) (v prediction). Off when absent.
    #[serde(default)]
    pub snr_gamma: Option<f64>,
    /// Offset noise: ε + offset · N(0, 1) per sample and channel.
    #[serde(default)]
    pub noise_offset: f64,
    /// Exponential moving average of the UNet weights (0: off); sample grids and the exported
    /// pipeline use the average.
    #[serde(default)]
    pub ema_decay: f64,
    /// Prompts of the sample grid drawn at every evaluation (`train.eval_every`) and at the end.
    #[serde(default)]
    pub sample_prompts: Vec<String>,
    #[serde(default = "default_sample_steps")]
    pub sample_steps: usize,
    #[serde(default = "default_guidance")]
    pub guidance: f64,
    #[serde(default)]
    pub sample_scheduler: SampleScheduler,
    #[serde(default)]
    pub sample_seed: u64,
}

fn default_sample_steps() -> usize {
    25
}

fn default_guidance() -> f64 {
    7.5
}

impl Default for DiffusionSection {
    fn default() -> Self {
        Self {
            snr_gamma: None,
            noise_offset: 0.0,
            ema_decay: 0.0,
            sample_prompts: Vec::new(),
            sample_steps: default_sample_steps(),
            guidance: default_guidance(),
            sample_scheduler: SampleScheduler::default(),
            sample_seed: 0,
        }
    }
}

impl DiffusionConfig {
    /// One validation pass over what the engine does not check itself.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.data, &self.dreambooth) {
            (Some(_), Some(_)) => {
                return Err(
                    "[data] and [dreambooth]: give one (captioned images, or one subject)".into(),
                )
            }
            (None, None) => {
                return Err(
                    "[data] (diffusion train) or [dreambooth] (diffusion dreambooth) is missing"
                        .into(),
                )
            }
            _ => {}
        }
        if self.resolution() == 0 {
            return Err("the resolution must be positive".into());
        }
        if self.model.pixel_space && self.model.unet_config.is_none() {
            return Err("model.pixel_space needs model.unet_config (a fresh UNet on pixels; the folder's UNet works on latents)".into());
        }
        if let Some(db) = &self.dreambooth {
            if db.with_prior_preservation && (db.class_prompt.is_none() || db.class_dir.is_none()) {
                return Err(
                    "dreambooth.with_prior_preservation needs class_prompt and class_dir".into(),
                );
            }
            if db.with_prior_preservation && db.num_class_images == 0 {
                return Err("dreambooth.num_class_images must be positive".into());
            }
        }
        if self.parallel.precision == Precision::Bf16 && self.train.device == DeviceSpec::Cpu {
            return Err("parallel.precision = \"bf16\" on the CPU: candle's CPU matmul and convolution have no bf16; use \"fp16\" (with loss scaling), or train.device = \"cuda\"".into());
        }
        if let Some(g) = self.diffusion.snr_gamma {
            if g <= 0.0 {
                return Err(format!("diffusion.snr_gamma = {g}: must be positive"));
            }
        }
        if !(0.0..1.0).contains(&self.diffusion.ema_decay) {
            return Err(format!(
                "diffusion.ema_decay = {}: in [0, 1)",
                self.diffusion.ema_decay
            ));
        }
        if self.model.train_text_encoder && self.diffusion.ema_decay > 0.0 {
            return Err(
                "diffusion.ema_decay with model.train_text_encoder is not implemented (the average covers the UNet)"
                    .into(),
            );
        }
        if let Some(lora) = &self.lora {
            if self.diffusion.ema_decay > 0.0 {
                return Err("diffusion.ema_decay with [lora] is not implemented".into());
            }
            if lora.use_rslora {
                return Err("lora.use_rslora for the UNet is not implemented".into());
            }
            if let Some(kind) = lora.quantize {
                return Err(format!(
                    "lora.quantize = \"{kind}\" for the UNet is not implemented"
                ));
            }
        }
        if self.diffusion.sample_steps == 0 {
            return Err("diffusion.sample_steps must be positive".into());
        }
        Ok(())
    }

    pub fn resolution(&self) -> usize {
        match (&self.data, &self.dreambooth) {
            (Some(d), _) => d.resolution,
            (_, Some(d)) => d.resolution,
            _ => 0,
        }
    }

    pub fn random_flip(&self) -> bool {
        match (&self.data, &self.dreambooth) {
            (Some(d), _) => d.random_flip,
            (_, Some(d)) => d.random_flip,
            _ => false,
        }
    }

    /// The engine's view: the `[train]` and `[parallel]` sections.
    pub fn engine_config(&self) -> TrainConfig {
        TrainConfig {
            model: Default::default(),
            data: Default::default(),
            train: self.train.clone(),
            sample: None,
            parallel: self.parallel.clone(),
            lora: self.lora.clone(),
        }
    }
}
