//! Noise schedulers as diffusers defines them, read from a `scheduler_config.json`: the
//! forward process for training (`add_noise`, the prediction `target`, SNR) and the reverse
//! steps for sampling (DDPM, DDIM, Euler, Euler ancestral, DPM-Solver++ 1S/2M). Scalars are
//! f32 in diffusers' order of operations, so a trajectory follows diffusers' given the same
//! model outputs and noise.
//!
//! Noise is passed in, not drawn here: the caller's seeded generator decides it, so a sampling
//! run is reproducible and the schedulers stay functions of their inputs (plus DPM-Solver's
//! memory of the previous step).

mod config;
mod discrete;
mod schedule;
mod sigma_steps;

pub use config::{
    BetaSchedule, FinalSigma, Prediction, SchedulerConfig, SchedulerKind, SolverType, Spacing,
    VarianceType,
};
pub use schedule::{inference_timesteps, linspace_f32, sigmas, NoiseSchedule};

use std::path::Path;

use candle_core::{DType, Tensor};

use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct Scheduler {
    pub cfg: SchedulerConfig,
    pub schedule: NoiseSchedule,
    /// Set by [`Self::set_timesteps`]: the sampling timesteps, highest first.
    timesteps: Vec<f64>,
    /// σ at each sampling step and after the last (σ-schedulers only).
    sigmas: Vec<f32>,
    /// DDIM's η (0: deterministic; 1: DDPM-like noise); other schedulers ignore it.
    pub eta: f32,
    /// DPM-Solver: x̂₀ of the previous step, and how many steps have run.
    prev_x0: Option<Tensor>,
    steps_done: usize,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Result<Self> {
        cfg.validate().map_err(Error::Config)?;
        let schedule = NoiseSchedule::new(&cfg);
        Ok(Self {
            cfg,
            schedule,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            eta: 0.0,
            prev_x0: None,
            steps_done: 0,
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

    fn uses_sigmas(&self) -> bool {
        matches!(
            self.cfg.kind,
            SchedulerKind::Euler
                | SchedulerKind::EulerAncestral
                | SchedulerKind::DpmSolverMultistep
        )
    }

    /// Prepares `n` sampling steps (and forgets any previous run's state).
    pub fn set_timesteps(&mut self, n: usize) -> Result<()> {
        self.timesteps = inference_timesteps(&self.cfg, n).map_err(Error::Config)?;
        self.sigmas = if self.uses_sigmas() {
            sigmas(&self.cfg, &self.schedule, &self.timesteps)
        } else {
            Vec::new()
        };
        self.prev_x0 = None;
        self.steps_done = 0;
        Ok(())
    }

    /// The sampling timesteps, highest first (what the model is conditioned on).
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// σ of the initial latents: 1, or for Euler the largest σ (√(σ²+1) with leading spacing).
    pub fn init_noise_sigma(&self) -> f64 {
        match self.cfg.kind {
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => {
                let max = self.sigmas.iter().cloned().fold(0.0f32, f32::max);
                match self.cfg.spacing() {
                    Spacing::Linspace | Spacing::Trailing => max as f64,
                    Spacing::Leading => (max * max + 1.0).sqrt() as f64,
                }
            }
            _ => 1.0,
        }
    }

    /// The model's input at step `i`: Euler divides by √(σ²+1); the others take `x` as is.
    pub fn scale_model_input(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        match self.cfg.kind {
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => {
                let s = self.sigma(i)?;
                let scale = Tensor::new((s * s + 1.0).sqrt(), x.device())?.to_dtype(x.dtype())?;
                Ok(x.broadcast_div(&scale)?)
            }
            _ => Ok(x.clone()),
        }
    }

    /// Whether step `i` needs noise passed to [`Self::step`].
    pub fn needs_noise(&self, i: usize) -> bool {
        match self.cfg.kind {
            SchedulerKind::Ddpm => self.timesteps.get(i).is_some_and(|&t| t > 0.0),
            SchedulerKind::Ddim => self.eta > 0.0,
            SchedulerKind::EulerAncestral => true,
            SchedulerKind::Euler | SchedulerKind::DpmSolverMultistep => false,
        }
    }

    /// One reverse step: from `sample` at sampling step `i` (of [`Self::timesteps`]), given
    /// the model's output there, to the sample at step `i + 1`. Steps run in order.
    pub fn step(
        &mut self,
        i: usize,
        out: &Tensor,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        if i >= self.timesteps.len() {
            return Err(Error::Config(format!(
                "step {i} of {} (call set_timesteps first)",
                self.timesteps.len()
            )));
        }
        let dtype = out.dtype();
        let (out, sample) = (out.to_dtype(DType::F32)?, sample.to_dtype(DType::F32)?);
        let noise = match (self.needs_noise(i), noise) {
            (false, _) => None,
            (true, Some(n)) => Some(n.to_dtype(DType::F32)?),
            (true, None) => {
                return Err(Error::Config(format!(
                    "{:?} step {i} needs noise",
                    self.cfg.kind
                )))
            }
        };
        let x = match self.cfg.kind {
            SchedulerKind::Ddpm | SchedulerKind::Ddim => {
                discrete::step(self, i, &out, &sample, noise.as_ref())?
            }
            SchedulerKind::Euler => sigma_steps::euler(self, i, &out, &sample)?,
            SchedulerKind::EulerAncestral => {
                sigma_steps::euler_ancestral(self, i, &out, &sample, noise.as_ref())?
            }
            SchedulerKind::DpmSolverMultistep => sigma_steps::dpm_solver(self, i, &out, &sample)?,
        };
        self.steps_done += 1;
        Ok(x.to_dtype(dtype)?)
    }

    fn sigma(&self, i: usize) -> Result<f32> {
        self.sigmas
            .get(i)
            .copied()
            .ok_or_else(|| Error::Config(format!("no σ for step {i} (call set_timesteps first)")))
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
}

/// x̂₀ from the model output on x = α·x₀ + σ·ε, per the prediction type.
fn data_prediction(
    p: Prediction,
    out: &Tensor,
    x: &Tensor,
    alpha: f32,
    sigma: f32,
) -> Result<Tensor> {
    Ok(match p {
        Prediction::Epsilon => scale(&(x - scale(out, sigma)?)?, 1.0 / alpha)?,
        Prediction::Sample => out.clone(),
        Prediction::VPrediction => (scale(x, alpha)? - scale(out, sigma)?)?,
    })
}

/// `x · s` for a scalar `s` (f32, as diffusers' 0-dim tensors).
fn scale(x: &Tensor, s: f32) -> Result<Tensor> {
    Ok(x.affine(s as f64, 0.0)?)
}
