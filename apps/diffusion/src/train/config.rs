//! `diffusion train --config FILE.toml`: every key typed, unknown keys rejected.

use std::path::PathBuf;

use colossal_core::train::{ParallelConfig, TrainConfig, TrainSection};
use serde::Deserialize;

use crate::scheduler::SchedulerKind;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffusionConfig {
    pub model: ModelSection,
    pub data: DataSection,
    #[serde(default)]
    pub diffusion: DiffusionSection,
    pub train: TrainSection,
    #[serde(default)]
    pub parallel: ParallelConfig,
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
        if self.data.resolution == 0 {
            return Err("data.resolution must be positive".into());
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
        if self.diffusion.sample_steps == 0 {
            return Err("diffusion.sample_steps must be positive".into());
        }
        Ok(())
    }

    /// The engine's view: the `[train]` and `[parallel]` sections.
    pub fn engine_config(&self) -> TrainConfig {
        TrainConfig {
            model: Default::default(),
            data: Default::default(),
            train: self.train.clone(),
            sample: None,
            parallel: self.parallel.clone(),
        }
    }
}
