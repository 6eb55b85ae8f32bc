//! `scheduler_config.json` as diffusers writes it, validated once: a key that changes the
//! math and that we do not implement is an error naming it, never ignored.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

/// Which scheduler the folder asks for (`_class_name`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum SchedulerKind {
    #[serde(rename = "DDPMScheduler")]
    Ddpm,
    #[serde(rename = "DDIMScheduler")]
    Ddim,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredCosCapV2,
}

/// What the model predicts (and so what a training target is).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    Epsilon,
    VPrediction,
    Sample,
}

/// How inference timesteps are spread over the training ones (diffusers' Table 2 of
/// "Common Diffusion Noise Schedules and Sample Steps are Flawed").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

/// DDPM's posterior variance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VarianceType {
    FixedSmall,
    FixedLarge,
}

fn default_steps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_beta_schedule() -> BetaSchedule {
    BetaSchedule::Linear
}
fn default_prediction() -> Prediction {
    Prediction::Epsilon
}
fn default_true() -> bool {
    true
}
fn default_clip_range() -> f64 {
    1.0
}
fn default_spacing() -> Spacing {
    Spacing::Leading
}

#[derive(Clone, Debug, Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub kind: SchedulerKind,
    #[serde(default = "default_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: BetaSchedule,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default = "default_prediction")]
    pub prediction_type: Prediction,
    #[serde(default = "default_true")]
    pub clip_sample: bool,
    #[serde(default = "default_clip_range")]
    pub clip_sample_range: f64,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "default_spacing")]
    pub timestep_spacing: Spacing,
    /// DDIM: the "previous" alpha product after the last step is 1 (else `alphas_cumprod[0]`).
    #[serde(default = "default_true")]
    pub set_alpha_to_one: bool,
    /// DDPM only.
    #[serde(default)]
    pub variance_type: Option<VarianceType>,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// Keys that only matter with a feature that is off (checked in `validate`) or carry no math.
const INERT: [&str; 3] = [
    "_diffusers_version",
    "dynamic_thresholding_ratio",
    "sample_max_value",
];

impl SchedulerConfig {
    /// Reads and validates `dir/scheduler_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("scheduler_config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::file(&path, e))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| Error::file(&path, e))?;
        cfg.validate().map_err(|e| Error::file(&path, e))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if let Some(key) = self.other.keys().find(|k| !INERT.contains(&k.as_str())) {
            return Err(format!(
                "`{key}` is not implemented for {:?} (it may change the schedule)",
                self.kind
            ));
        }
        if self.thresholding {
            return Err("`thresholding = true` (dynamic thresholding) is not implemented".into());
        }
        if self.rescale_betas_zero_snr {
            return Err("`rescale_betas_zero_snr = true` is not implemented".into());
        }
        if self.kind != SchedulerKind::Ddpm && self.variance_type.is_some() {
            return Err("`variance_type` is a DDPMScheduler setting".into());
        }
        if self.num_train_timesteps < 2 {
            return Err(format!(
                "num_train_timesteps = {}: at least 2",
                self.num_train_timesteps
            ));
        }
        if let Some(b) = &self.trained_betas {
            if b.len() != self.num_train_timesteps {
                return Err(format!(
                    "trained_betas has {} values for num_train_timesteps = {}",
                    b.len(),
                    self.num_train_timesteps
                ));
            }
        }
        Ok(())
    }
}
