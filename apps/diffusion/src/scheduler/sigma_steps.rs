//! Steps of the σ-parameterised samplers (Karras et al.'s view, x = x₀ + σ·ε): Euler,
//! Euler ancestral and DPM-Solver++ (Lu et al.) in its multistep form.

use candle_core::Tensor;

use super::{data_prediction, scale, FinalSigma, Prediction, Scheduler, SolverType};
use crate::Result;

/// x̂₀ for the Euler schedulers from the output at σ.
fn euler_x0(s: &Scheduler, out: &Tensor, sample: &Tensor, sigma: f32) -> Result<Tensor> {
    Ok(match s.cfg.prediction_type {
        Prediction::Epsilon => (sample - scale(out, sigma)?)?,
        Prediction::VPrediction => {
            let a = -sigma / (sigma * sigma + 1.0).sqrt();
            (scale(out, a)? + scale(sample, 1.0 / (sigma * sigma + 1.0))?)?
        }
        Prediction::Sample => out.clone(),
    })
}

/// Euler (no churn): x ← x + (x − x̂₀)/σ · (σ_next − σ).
pub(super) fn euler(s: &Scheduler, i: usize, out: &Tensor, sample: &Tensor) -> Result<Tensor> {
    let (sigma, next) = (s.sigma(i)?, s.sigma(i + 1)?);
    let x0 = euler_x0(s, out, sample, sigma)?;
    let derivative = scale(&(sample - x0)?, 1.0 / sigma)?;
    Ok((sample + scale(&derivative, next - sigma)?)?)
}

/// Euler ancestral: an Euler step down to σ_down, then fresh noise of σ_up.
pub(super) fn euler_ancestral(
    s: &Scheduler,
    i: usize,
    out: &Tensor,
    sample: &Tensor,
    noise: Option<&Tensor>,
) -> Result<Tensor> {
    let (from, to) = (s.sigma(i)?, s.sigma(i + 1)?);
    let x0 = euler_x0(s, out, sample, from)?;
    let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
    let down = (to * to - up * up).sqrt();
    let derivative = scale(&(sample - x0)?, 1.0 / from)?;
    let x = (sample + scale(&derivative, down - from)?)?;
    Ok(match noise {
        Some(n) => (x + scale(n, up)?)?,
        None => x,
    })
}

/// (αₜ, σₜ) of the VP process at Karras σ: α = 1/√(σ²+1), σₜ = σ·α.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// λ = log α − log σ (half the log-SNR); +∞ at σ = 0.
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// DPM-Solver++ with the data prediction: first order on the first step (and the last when
/// the final σ is 0 or few steps are taken), second order (midpoint or Heun) otherwise.
pub(super) fn dpm_solver(
    s: &mut Scheduler,
    i: usize,
    out: &Tensor,
    sample: &Tensor,
) -> Result<Tensor> {
    let n = s.timesteps.len();
    let (sig_s0, sig_t) = (s.sigma(i)?, s.sigma(i + 1)?);
    let (alpha_s0, sigma_s0) = alpha_sigma(sig_s0);
    let x0 = data_prediction(s.cfg.prediction_type, out, sample, alpha_s0, sigma_s0)?;
    let last = i + 1 == n;
    let lower_final = last
        && (s.cfg.euler_at_final
            || (s.cfg.lower_order_final && n < 15)
            || s.cfg.final_sigmas_type == FinalSigma::Zero);
    let (alpha_t, sigma_t) = alpha_sigma(sig_t);
    let h = lambda(alpha_t, sigma_t) - lambda(alpha_s0, sigma_s0);
    let em1 = (-h).exp() - 1.0;
    let x = match s.prev_x0.as_ref() {
        Some(m1) if s.cfg.solver_order == 2 && s.steps_done >= 1 && !lower_final => {
            let sig_s1 = s.sigma(i - 1)?;
            let (alpha_s1, sigma_s1) = alpha_sigma(sig_s1);
            let h0 = lambda(alpha_s0, sigma_s0) - lambda(alpha_s1, sigma_s1);
            let r0 = h0 / h;
            let d1 = scale(&(&x0 - m1)?, 1.0 / r0)?;
            let base = (scale(sample, sigma_t / sigma_s0)? - scale(&x0, alpha_t * em1)?)?;
            match s.cfg.solver_type {
                SolverType::Midpoint => (base - scale(&d1, 0.5 * (alpha_t * em1))?)?,
                SolverType::Heun => (base + scale(&d1, alpha_t * (em1 / h + 1.0))?)?,
            }
        }
        _ => (scale(sample, sigma_t / sigma_s0)? - scale(&x0, alpha_t * em1)?)?,
    };
    s.prev_x0 = Some(x0);
    Ok(x)
}
