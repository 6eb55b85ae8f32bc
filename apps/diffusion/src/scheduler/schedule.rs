//! The noise schedule (βₜ and ᾱₜ = Π(1 − βₛ)) and the inference timesteps, computed in f32
//! in the same order as diffusers (torch's linspace and cumprod), so they match it exactly.

use super::config::{BetaSchedule, FinalSigma, SchedulerConfig, SchedulerKind, Spacing};

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

/// The `n` inference timesteps, highest first, as each scheduler's `set_timesteps(n)` spreads
/// them (integers, except the σ-schedulers' linspace, which keeps fractions).
pub fn inference_timesteps(c: &SchedulerConfig, n: usize) -> Result<Vec<f64>, String> {
    let total = c.num_train_timesteps;
    if n == 0 || n > total {
        return Err(format!(
            "num_inference_steps = {n}: between 1 and num_train_timesteps = {total}"
        ));
    }
    let offset = c.steps_offset as f64;
    // DPM-Solver spreads n + 1 points and drops the last (t = 0).
    let dpm = c.kind == SchedulerKind::DpmSolverMultistep;
    let trailing = || -> Vec<f64> {
        let ratio = total as f64 / n as f64;
        (0..n)
            .map(|i| round_half_even(total as f64 - i as f64 * ratio) - 1.0)
            .collect()
    };
    Ok(match (c.spacing(), dpm) {
        (Spacing::Leading, false) => {
            let ratio = (total / n) as f64;
            (0..n).rev().map(|i| i as f64 * ratio + offset).collect()
        }
        (Spacing::Leading, true) => {
            let ratio = (total / (n + 1)) as f64;
            (1..=n).rev().map(|i| i as f64 * ratio + offset).collect()
        }
        (Spacing::Trailing, _) => trailing(),
        (Spacing::Linspace, false) => {
            let pts = numpy_linspace(0.0, (total - 1) as f64, n);
            match c.kind {
                // Euler keeps the points as float32 (fractional timesteps).
                SchedulerKind::Euler | SchedulerKind::EulerAncestral => {
                    pts.iter().rev().map(|&t| t as f32 as f64).collect()
                }
                _ => pts.iter().rev().map(|&t| round_half_even(t)).collect(),
            }
        }
        (Spacing::Linspace, true) => {
            let pts = numpy_linspace(0.0, (total - 1) as f64, n + 1);
            pts.iter()
                .skip(1)
                .rev()
                .map(|&t| round_half_even(t))
                .collect()
        }
    })
}

/// numpy's `linspace`: `arange(n) · step + start`, the last point exactly `stop`.
fn numpy_linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    (0..n)
        .map(|i| {
            if i + 1 == n {
                stop
            } else {
                i as f64 * step + start
            }
        })
        .collect()
}

/// The σ-schedulers' σ at each inference timestep, then the final σ (0, or the smallest
/// training σ): √((1−ᾱ)/ᾱ) in f32, linearly interpolated in f64 as `np.interp`, stored as f32.
pub fn sigmas(c: &SchedulerConfig, schedule: &NoiseSchedule, timesteps: &[f64]) -> Vec<f32> {
    let full: Vec<f32> = schedule
        .alphas_cumprod
        .iter()
        .map(|&ac| ((1.0 - ac) / ac).sqrt())
        .collect();
    let interp = |t: f64| -> f64 {
        let last = full.len() - 1;
        if t <= 0.0 {
            return full[0] as f64;
        }
        if t >= last as f64 {
            return full[last] as f64;
        }
        let j = t.floor() as usize;
        let (a, b) = (full[j] as f64, full[j + 1] as f64);
        let frac = t - j as f64;
        if frac == 0.0 {
            a
        } else {
            (b - a) * frac + a
        }
    };
    let mut out: Vec<f32> = timesteps.iter().map(|&t| interp(t) as f32).collect();
    out.push(match c.final_sigmas_type {
        FinalSigma::Zero => 0.0,
        FinalSigma::SigmaMin => full[0],
    });
    out
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
