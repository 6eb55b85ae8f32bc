//! The noise schedule (βₜ and ᾱₜ = Π(1 − βₛ)) and the inference timesteps, computed in f32
//! in the same order as diffusers (torch's linspace and cumprod), so they match it exactly.

use super::config::{BetaSchedule, SchedulerConfig, Spacing};

#[derive(Clone, Debug)]
pub struct NoiseSchedule {
    pub betas: Vec<f32>,
    pub alphas_cumprod: Vec<f32>,
}

/// `torch.linspace(start, end, n, dtype=float32)`: the first half counted up from `start`, the
/// second half down from `end`, each point one fused multiply-add, as ATen's vectorised
/// kernel computes it (plain multiply-then-add differs in 145 of SD's 1000 betas).
pub fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine ᾱ (Nichol & Dhariwal), in f64 then
/// cast, as diffusers builds it in Python floats.
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

impl NoiseSchedule {
    pub fn new(c: &SchedulerConfig) -> Self {
        let n = c.num_train_timesteps;
        let betas = match (&c.trained_betas, c.beta_schedule) {
            (Some(b), _) => b.iter().map(|&x| x as f32).collect(),
            (None, BetaSchedule::Linear) => linspace_f32(c.beta_start as f32, c.beta_end as f32, n),
            (None, BetaSchedule::ScaledLinear) => {
                linspace_f32(c.beta_start.sqrt() as f32, c.beta_end.sqrt() as f32, n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            (None, BetaSchedule::SquaredCosCapV2) => cosine_betas(n),
        };
        // torch's CPU cumprod accumulates in f64 (its accumulate type for f32) and rounds
        // each output to f32.
        let mut acc = 1.0f64;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= (1.0 - b) as f64;
                acc as f32
            })
            .collect();
        Self {
            betas,
            alphas_cumprod,
        }
    }

    pub fn len(&self) -> usize {
        self.betas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.betas.is_empty()
    }
}

/// The `n` inference timesteps, highest first, as `set_timesteps(n)` spreads them.
pub fn inference_timesteps(c: &SchedulerConfig, n: usize) -> Result<Vec<usize>, String> {
    let total = c.num_train_timesteps;
    if n == 0 || n > total {
        return Err(format!(
            "num_inference_steps = {n}: between 1 and num_train_timesteps = {total}"
        ));
    }
    Ok(match c.timestep_spacing {
        Spacing::Leading => {
            let ratio = total / n;
            (0..n).rev().map(|i| i * ratio + c.steps_offset).collect()
        }
        Spacing::Trailing => {
            let ratio = total as f64 / n as f64;
            (0..n)
                .map(|i| {
                    (round_half_even(total as f64 - i as f64 * ratio) as usize).saturating_sub(1)
                })
                .collect()
        }
        Spacing::Linspace => {
            // numpy: arange(n) · step + start, the last point exactly `stop`.
            let last = (total - 1) as f64;
            let step = if n == 1 { 0.0 } else { last / (n - 1) as f64 };
            (0..n)
                .rev()
                .map(|i| match i + 1 == n && n > 1 {
                    true => last as usize,
                    false => round_half_even(i as f64 * step) as usize,
                })
                .collect()
        }
    })
}

/// numpy's `round`: halves to even.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}
