//! Noise schedulers as diffusers defines them, read from a `scheduler_config.json`: the
//! forward process for training (`add_noise`, the prediction `target`) and the reverse steps
//! for sampling (DDPM, DDIM). Scalars are f32 in diffusers' order of operations, so a
//! trajectory matches diffusers' given the same model outputs and noise.
//!
//! Noise is passed in, not drawn here: the caller's seeded generator decides it, so a
//! sampling run is reproducible and the schedulers stay pure functions of their inputs.

mod config;
mod schedule;

pub use config::{BetaSchedule, Prediction, SchedulerConfig, SchedulerKind, Spacing, VarianceType};
pub use schedule::{inference_timesteps, linspace_f32, NoiseSchedule};

use std::path::Path;

use candle_core::{DType, Tensor};

use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct Scheduler {
    pub cfg: SchedulerConfig,
    pub schedule: NoiseSchedule,
    /// Set by [`Self::set_timesteps`]: the sampling timesteps, highest first.
    timesteps: Vec<usize>,
    /// DDIM's η (0: deterministic; 1: DDPM-like noise); DDPM ignores it.
    pub eta: f32,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Result<Self> {
        cfg.validate().map_err(Error::Config)?;
        let schedule = NoiseSchedule::new(&cfg);
        Ok(Self {
            cfg,
            schedule,
            timesteps: Vec::new(),
            eta: 0.0,
        })
    }

    /// The scheduler of a diffusers folder's `scheduler/` (or any directory holding a
    /// `scheduler_config.json`).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::new(SchedulerConfig::from_dir(dir)?)
    }

    pub fn kind(&self) -> SchedulerKind {
        self.cfg.kind
    }

    pub fn set_timesteps(&mut self, n: usize) -> Result<()> {
        self.timesteps = inference_timesteps(&self.cfg, n).map_err(Error::Config)?;
        Ok(())
    }

    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// σ of the initial latents (1 for DDPM and DDIM).
    pub fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn alpha_cumprod(&self, t: usize) -> Result<f32> {
        self.schedule.alphas_cumprod.get(t).copied().ok_or_else(|| {
            Error::Config(format!("timestep {t} outside 0..{}", self.schedule.len()))
        })
    }

    /// Per-sample coefficients `f(ᾱ[tᵢ])` shaped (B, 1, …, 1) to broadcast over `like`.
    fn per_sample(&self, like: &Tensor, t: &[usize], f: impl Fn(f32) -> f32) -> Result<Tensor> {
        if t.len() != like.dim(0)? {
            return Err(Error::Config(format!(
                "{} timesteps for a batch of {}",
                t.len(),
                like.dim(0)?
            )));
        }
        let c: Vec<f32> = t
            .iter()
            .map(|&t| self.alpha_cumprod(t).map(&f))
            .collect::<Result<_>>()?;
        let mut shape = vec![1; like.rank()];
        shape[0] = t.len();
        Ok(Tensor::from_vec(c, shape, like.device())?.to_dtype(like.dtype())?)
    }

    /// The forward process at per-sample timesteps: √ᾱₜ·x₀ + √(1−ᾱₜ)·ε.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, t: &[usize]) -> Result<Tensor> {
        let a = self.per_sample(x0, t, f32::sqrt)?;
        let b = self.per_sample(x0, t, |ac| (1.0 - ac).sqrt())?;
        Ok((x0.broadcast_mul(&a)? + noise.broadcast_mul(&b)?)?)
    }

    /// What the model learns to predict: ε, the velocity √ᾱₜ·ε − √(1−ᾱₜ)·x₀, or x₀.
    pub fn target(&self, x0: &Tensor, noise: &Tensor, t: &[usize]) -> Result<Tensor> {
        Ok(match self.cfg.prediction_type {
            Prediction::Epsilon => noise.clone(),
            Prediction::Sample => x0.clone(),
            Prediction::VPrediction => {
                let a = self.per_sample(x0, t, f32::sqrt)?;
                let b = self.per_sample(x0, t, |ac| (1.0 - ac).sqrt())?;
                (noise.broadcast_mul(&a)? - x0.broadcast_mul(&b)?)?
            }
        })
    }

    /// Signal-to-noise ratio ᾱₜ/(1−ᾱₜ) of each timestep (Min-SNR weighting).
    pub fn snr(&self, t: &[usize]) -> Result<Vec<f32>> {
        t.iter()
            .map(|&t| self.alpha_cumprod(t).map(|ac| ac / (1.0 - ac)))
            .collect()
    }

    /// The timestep sampling moves to from `t` (negative: past the end).
    fn previous(&self, t: usize) -> i64 {
        let stride = match self.timesteps.len() {
            0 => 1,
            n => self.cfg.num_train_timesteps / n,
        };
        t as i64 - stride as i64
    }

    /// x̂₀ and ε̂ from the model output at ᾱₜ, per the prediction type.
    fn predictions(&self, out: &Tensor, sample: &Tensor, ac: f32) -> Result<(Tensor, Tensor)> {
        let (sa, sb) = (ac.sqrt() as f64, (1.0 - ac).sqrt() as f64);
        let (x0, eps) = match self.cfg.prediction_type {
            Prediction::Epsilon => (
                (sample - out.affine(sb, 0.0)?)?.affine(1.0 / sa, 0.0)?,
                out.clone(),
            ),
            Prediction::Sample => {
                let eps = (sample - out.affine(sa, 0.0)?)?.affine(1.0 / sb, 0.0)?;
                (out.clone(), eps)
            }
            Prediction::VPrediction => (
                (sample.affine(sa, 0.0)? - out.affine(sb, 0.0)?)?,
                (out.affine(sa, 0.0)? + sample.affine(sb, 0.0)?)?,
            ),
        };
        let x0 = if self.cfg.clip_sample {
            let r = self.cfg.clip_sample_range;
            x0.clamp(-r, r)?
        } else {
            x0
        };
        Ok((x0, eps))
    }

    /// One reverse step from `sample` at timestep `t` given the model's output there. `noise`
    /// (shaped as `sample`) is needed where the step is stochastic: DDPM before t = 0, DDIM
    /// with η > 0.
    pub fn step(
        &self,
        out: &Tensor,
        t: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (out, sample) = (out.to_dtype(DType::F32)?, sample.to_dtype(DType::F32)?);
        let prev = self.previous(t);
        let ac = self.alpha_cumprod(t)?;
        let need_noise = || {
            noise.ok_or_else(|| {
                Error::Config(format!("{:?} step at t = {t} needs noise", self.cfg.kind))
            })
        };
        match self.cfg.kind {
            SchedulerKind::Ddim => {
                let ac_prev = match prev {
                    p if p >= 0 => self.alpha_cumprod(p as usize)?,
                    _ if self.cfg.set_alpha_to_one => 1.0,
                    _ => self.schedule.alphas_cumprod[0],
                };
                let (x0, eps) = self.predictions(&out, &sample, ac)?;
                let variance = ((1.0 - ac_prev) / (1.0 - ac)) * (1.0 - ac / ac_prev);
                let std = self.eta * variance.sqrt();
                let dir = eps.affine((1.0 - ac_prev - std * std).sqrt() as f64, 0.0)?;
                let x = (x0.affine(ac_prev.sqrt() as f64, 0.0)? + dir)?;
                if self.eta > 0.0 {
                    return Ok((x + need_noise()?.affine(std as f64, 0.0)?)?);
                }
                Ok(x)
            }
            SchedulerKind::Ddpm => {
                let ac_prev = if prev >= 0 {
                    self.alpha_cumprod(prev as usize)?
                } else {
                    1.0
                };
                let (beta, beta_prev) = (1.0 - ac, 1.0 - ac_prev);
                let alpha_t = ac / ac_prev;
                let beta_t = 1.0 - alpha_t;
                let (x0, _) = self.predictions(&out, &sample, ac)?;
                let c0 = (ac_prev.sqrt() * beta_t) / beta;
                let ct = alpha_t.sqrt() * beta_prev / beta;
                let x = (x0.affine(c0 as f64, 0.0)? + sample.affine(ct as f64, 0.0)?)?;
                if t == 0 {
                    return Ok(x);
                }
                let variance = match self.cfg.variance_type.unwrap_or(VarianceType::FixedSmall) {
                    VarianceType::FixedSmall => (beta_prev / beta * beta_t).max(1e-20),
                    VarianceType::FixedLarge => beta_t,
                };
                Ok((x + need_noise()?.affine(variance.sqrt() as f64, 0.0)?)?)
            }
        }
    }
}
