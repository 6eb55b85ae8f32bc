//! DDPM (Ho et al.) and DDIM (Song et al.) reverse steps over the training timesteps.

use candle_core::Tensor;

use super::{data_prediction, scale, Prediction, Scheduler, SchedulerKind, VarianceType};
use crate::Result;

/// x̂₀ and ε̂ from the model output at ᾱₜ, per the prediction type, x̂₀ clipped if asked.
fn predictions(s: &Scheduler, out: &Tensor, sample: &Tensor, ac: f32) -> Result<(Tensor, Tensor)> {
    let (sa, sb) = (ac.sqrt(), (1.0 - ac).sqrt());
    let x0 = data_prediction(s.cfg.prediction_type, out, sample, sa, sb)?;
    // ε̂ from x̂₀ (before any clipping), as diffusers does.
    let eps = match s.cfg.prediction_type {
        Prediction::Epsilon => out.clone(),
        Prediction::Sample => scale(&(sample - scale(out, sa)?)?, 1.0 / sb)?,
        Prediction::VPrediction => (scale(out, sa)? + scale(sample, sb)?)?,
    };
    let x0 = if s.cfg.clip_sample {
        let r = s.cfg.clip_sample_range;
        x0.clamp(-r, r)?
    } else {
        x0
    };
    Ok((x0, eps))
}

pub(super) fn step(
    s: &Scheduler,
    i: usize,
    out: &Tensor,
    sample: &Tensor,
    noise: Option<&Tensor>,
) -> Result<Tensor> {
    let t = s.timesteps[i] as usize;
    let ac = s.alpha_cumprod(t)?;
    if s.cfg.kind == SchedulerKind::Ddim {
        // DDIM steps back a fixed stride, whatever the spacing.
        let prev = t as i64 - (s.cfg.num_train_timesteps / s.timesteps.len()) as i64;
        let ac_prev = match prev {
            p if p >= 0 => s.alpha_cumprod(p as usize)?,
            _ if s.cfg.set_alpha_to_one => 1.0,
            _ => s.schedule.alphas_cumprod[0],
        };
        let (x0, eps) = predictions(s, out, sample, ac)?;
        let variance = ((1.0 - ac_prev) / (1.0 - ac)) * (1.0 - ac / ac_prev);
        let std = s.eta * variance.sqrt();
        let dir = scale(&eps, (1.0 - ac_prev - std * std).sqrt())?;
        let x = (scale(&x0, ac_prev.sqrt())? + dir)?;
        return Ok(match noise {
            Some(n) => (x + scale(n, std)?)?,
            None => x,
        });
    }
    // DDPM steps to the next sampling timestep (t − 1 when sampling all of them).
    let ac_prev = match s.timesteps.get(i + 1) {
        Some(&p) => s.alpha_cumprod(p as usize)?,
        None => 1.0,
    };
    let (beta, beta_prev) = (1.0 - ac, 1.0 - ac_prev);
    let alpha_t = ac / ac_prev;
    let beta_t = 1.0 - alpha_t;
    let (x0, _) = predictions(s, out, sample, ac)?;
    let c0 = (ac_prev.sqrt() * beta_t) / beta;
    let ct = alpha_t.sqrt() * beta_prev / beta;
    let x = (scale(&x0, c0)? + scale(sample, ct)?)?;
    let Some(n) = noise else { return Ok(x) };
    let variance = match s.cfg.variance_type.unwrap_or(VarianceType::FixedSmall) {
        VarianceType::FixedSmall => (beta_prev / beta * beta_t).max(1e-20),
        VarianceType::FixedLarge => beta_t,
    };
    Ok((x + scale(n, variance.sqrt())?)?)
}
