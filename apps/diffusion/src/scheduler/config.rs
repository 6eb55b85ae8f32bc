//! `scheduler_config.json` as diffusers writes it, validated once: a key that is not a setting
//! of the named scheduler, or that selects something we do not implement, is an error naming
//! it, never ignored.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::{Error, Result};

/// Which scheduler the folder asks for (`_class_name`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum SchedulerKind {
    #[serde(rename = "DDPMScheduler")]
    Ddpm,
    #[serde(rename = "DDIMScheduler")]
    Ddim,
    #[serde(rename = "EulerDiscreteScheduler")]
    Euler,
    #[serde(rename = "EulerAncestralDiscreteScheduler")]
    EulerAncestral,
    /// DPM-Solver++ (multistep; order 2 is "DPM++ 2M").
    #[serde(rename = "DPMSolverMultistepScheduler")]
    DpmSolverMultistep,
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

/// How inference timesteps are spread over the training ones.
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

/// The σ after the last step of a σ-schedule (Euler, DPM-Solver).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigma {
    #[default]
    Zero,
    SigmaMin,
}

/// DPM-Solver's second-order update rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SolverType {
    #[default]
    Midpoint,
    Heun,
}

fn d<T: serde::de::DeserializeOwned>(v: &str) -> T {
    serde_json::from_str(v).expect("default literal")
}

/// The settings, with diffusers' defaults for the keys a file leaves out.
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
    /// DDPM/DDIM: clamp x̂₀ to ±`clip_sample_range`.
    #[serde(default = "default_true")]
    pub clip_sample: bool,
    #[serde(default = "default_clip_range")]
    pub clip_sample_range: f64,
    #[serde(default)]
    pub steps_offset: usize,
    /// Defaults differ per scheduler (leading for DDPM/DDIM, linspace for the σ-schedulers).
    #[serde(default)]
    pub timestep_spacing: Option<Spacing>,
    /// DDIM: the "previous" ᾱ after the last step is 1 (else `alphas_cumprod[0]`).
    #[serde(default = "default_true")]
    pub set_alpha_to_one: bool,
    /// DDPM only.
    #[serde(default)]
    pub variance_type: Option<VarianceType>,
    #[serde(default)]
    pub final_sigmas_type: FinalSigma,
    #[serde(default = "default_order")]
    pub solver_order: usize,
    #[serde(default)]
    pub solver_type: SolverType,
    #[serde(default = "default_true")]
    pub lower_order_final: bool,
    #[serde(default)]
    pub euler_at_final: bool,
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
fn default_order() -> usize {
    2
}

const COMMON: [&str; 10] = [
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "steps_offset",
    "timestep_spacing",
    "rescale_betas_zero_snr",
    "_class_name",
];

/// Keys each scheduler has beyond [`COMMON`].
fn own_keys(kind: SchedulerKind) -> &'static [&'static str] {
    const THRESHOLD: [&str; 3] = [
        "thresholding",
        "dynamic_thresholding_ratio",
        "sample_max_value",
    ];
    match kind {
        SchedulerKind::Ddpm => &[
            "variance_type",
            "clip_sample",
            "clip_sample_range",
            THRESHOLD[0],
            THRESHOLD[1],
            THRESHOLD[2],
        ],
        SchedulerKind::Ddim => &[
            "set_alpha_to_one",
            "clip_sample",
            "clip_sample_range",
            THRESHOLD[0],
            THRESHOLD[1],
            THRESHOLD[2],
        ],
        SchedulerKind::Euler => &[
            "interpolation_type",
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "sigma_min",
            "sigma_max",
            "timestep_type",
            "final_sigmas_type",
        ],
        SchedulerKind::EulerAncestral => &[],
        SchedulerKind::DpmSolverMultistep => &[
            "solver_order",
            "algorithm_type",
            "solver_type",
            "lower_order_final",
            "euler_at_final",
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_lu_lambdas",
            "use_flow_sigmas",
            "flow_shift",
            "final_sigmas_type",
            "lambda_min_clipped",
            "variance_type",
            "use_dynamic_shifting",
            "time_shift_type",
            THRESHOLD[0],
            THRESHOLD[1],
            THRESHOLD[2],
        ],
    }
}

/// Keys that switch on something we do not implement, with the value (JSON) we accept; null
/// (diffusers' "default") is accepted too.
const FIXED: [(&str, &str); 12] = [
    ("thresholding", "false"),
    ("rescale_betas_zero_snr", "false"),
    ("use_karras_sigmas", "false"),
    ("use_exponential_sigmas", "false"),
    ("use_beta_sigmas", "false"),
    ("use_lu_lambdas", "false"),
    ("use_flow_sigmas", "false"),
    ("use_dynamic_shifting", "false"),
    ("interpolation_type", "\"linear\""),
    ("timestep_type", "\"discrete\""),
    ("lambda_min_clipped", "\"-inf\""),
    ("algorithm_type", "\"dpmsolver++\""),
];

impl SchedulerConfig {
    /// Reads and validates `dir/scheduler_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("scheduler_config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::file(&path, e))?;
        Self::from_json(&text).map_err(|e| Error::file(&path, e))
    }

    /// Parses and validates a config's text (diffusers writes ±inf as bare `Infinity`).
    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let text = text
            .replace("-Infinity", "\"-inf\"")
            .replace("Infinity", "\"inf\"");
        let mut v: serde_json::Map<String, Value> =
            serde_json::from_str(&text).map_err(|e| e.to_string())?;
        let kind: SchedulerKind = serde_json::from_value(
            v.get("_class_name")
                .cloned()
                .ok_or("`_class_name` is missing")?,
        )
        .map_err(|e| format!("`_class_name`: {e} (implemented: DDPM, DDIM, Euler, Euler ancestral, DPM-Solver multistep)"))?;
        v.retain(|k, _| !k.starts_with('_') || k == "_class_name");
        for (key, value) in &v {
            if !COMMON.contains(&key.as_str()) && !own_keys(kind).contains(&key.as_str()) {
                return Err(format!("`{key}` is not a {kind:?} setting"));
            }
            if let Some((_, ok)) = FIXED.iter().find(|(k, _)| k == key) {
                if !value.is_null() && *value != d::<Value>(ok) {
                    return Err(format!("`{key} = {value}` is not implemented (only {ok})"));
                }
            }
        }
        if kind == SchedulerKind::DpmSolverMultistep
            && v.get("variance_type").is_some_and(|x| !x.is_null())
        {
            return Err(
                "`variance_type` (learned variance) is not implemented for DPM-Solver".into(),
            );
        }
        let cfg: Self = serde_json::from_value(Value::Object(v)).map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
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
        if self.kind == SchedulerKind::EulerAncestral && self.prediction_type == Prediction::Sample
        {
            return Err("`prediction_type = \"sample\"` is not defined for Euler ancestral".into());
        }
        if self.kind == SchedulerKind::DpmSolverMultistep && !(1..=2).contains(&self.solver_order) {
            return Err(format!(
                "`solver_order = {}` is not implemented (1 or 2)",
                self.solver_order
            ));
        }
        Ok(())
    }

    /// The spacing in effect: the file's, else the scheduler's default.
    pub fn spacing(&self) -> Spacing {
        self.timestep_spacing.unwrap_or(match self.kind {
            SchedulerKind::Ddpm | SchedulerKind::Ddim => Spacing::Leading,
            _ => Spacing::Linspace,
        })
    }
}
