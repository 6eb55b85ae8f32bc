//! PPO and GRPO: KL estimators, reward shaping, GAE, the clipped policy and value losses, and
//! group-relative advantages.

use candle_core::Tensor;

/// How the per-token KL between policy and reference is estimated from one sample
/// (Schulman, "Approximating KL divergence"): with log r = log π_ref − log π,
/// k1 = −log r, k2 = ½ (log r)², k3 = r − 1 − log r (unbiased and never negative).
#[derive(Clone, Copy, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    K1,
    K2,
    K3,
}

impl KlEstimator {
    /// Elementwise estimate from policy and reference log-probs (differentiable in `logp`).
    pub fn estimate(self, logp: &Tensor, ref_logp: &Tensor) -> candle_core::Result<Tensor> {
        let log_r = (ref_logp - logp)?;
        match self {
            KlEstimator::K1 => log_r.neg(),
            KlEstimator::K2 => log_r.sqr()? * 0.5,
            KlEstimator::K3 => (log_r.exp()? - &log_r)? - 1.0,
        }
    }

    /// The same on plain numbers (rollout statistics).
    pub fn estimate_f32(self, logp: f32, ref_logp: f32) -> f32 {
        let log_r = ref_logp - logp;
        match self {
            KlEstimator::K1 => -log_r,
            KlEstimator::K2 => 0.5 * log_r * log_r,
            KlEstimator::K3 => log_r.exp() - 1.0 - log_r,
        }
    }
}

/// Per-token rewards of one response: −kl_coef · kl_t at every token, plus the reward model's
/// `score` at the last token (`len` tokens; the rest of the row is padding and gets 0).
pub fn shaped_rewards(score: f32, kl: &[f32], len: usize, kl_coef: f32) -> Vec<f32> {
    let mut r: Vec<f32> = kl
        .iter()
        .enumerate()
        .map(|(t, k)| if t < len { -kl_coef * k } else { 0.0 })
        .collect();
    if len > 0 {
        r[len - 1] += score;
    }
    r
}

/// Generalised advantage estimation over one response of `len` tokens (the episode ends after
/// the last one): δ_t = r_t + γ V_{t+1} − V_t, A_t = δ_t + γλ A_{t+1}. Returns (advantages,
/// returns = A + V), zero past `len`.
pub fn gae(
    rewards: &[f32],
    values: &[f32],
    len: usize,
    gamma: f32,
    lambda: f32,
) -> (Vec<f32>, Vec<f32>) {
    let n = rewards.len();
    let mut adv = vec![0.0f32; n];
    let mut next_adv = 0.0f32;
    for t in (0..len.min(n)).rev() {
        let next_value = if t + 1 < len { values[t + 1] } else { 0.0 };
        let delta = rewards[t] + gamma * next_value - values[t];
        next_adv = delta + gamma * lambda * next_adv;
        adv[t] = next_adv;
    }
    let ret = (0..n)
        .map(|t| if t < len { adv[t] + values[t] } else { 0.0 })
        .collect();
    (adv, ret)
}

/// Whitens advantages over the valid tokens of a batch (mean 0, std 1), as PPO
/// implementations do before the update.
pub fn whiten(adv: &mut [Vec<f32>], lens: &[usize]) {
    let vals: Vec<f32> = adv
        .iter()
        .zip(lens)
        .flat_map(|(a, &l)| a[..l].iter().copied())
        .collect();
    if vals.len() < 2 {
        return;
    }
    let n = vals.len() as f32;
    let mean = vals.iter().sum::<f32>() / n;
    let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / (n - 1.0);
    let std = var.sqrt() + 1e-8;
    for (a, &l) in adv.iter_mut().zip(lens) {
        a[..l].iter_mut().for_each(|x| *x = (*x - mean) / std);
    }
}

/// Clipped surrogate, summed over masked tokens: −min(ρ A, clip(ρ, 1 − ε, 1 + ε) A) with
/// ρ = exp(logp − old_logp). Also returns on how many tokens the clipped term was the one
/// taken (TRL's `clipfrac` numerator).
pub fn policy_loss_sum(
    logp: &Tensor,
    old_logp: &Tensor,
    adv: &Tensor,
    mask: &Tensor,
    clip_eps: f64,
) -> candle_core::Result<(Tensor, f32)> {
    let ratio = (logp - old_logp)?.exp()?;
    let unclipped = (&ratio * adv)?;
    let clipped = (ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)? * adv)?;
    let surrogate = unclipped.minimum(&clipped)?;
    let was_clipped = clipped.lt(&unclipped)?.to_dtype(candle_core::DType::F32)?;
    let clipfrac = (was_clipped * mask)?.sum_all()?.to_scalar::<f32>()?;
    Ok(((surrogate * mask)?.sum_all()?.neg()?, clipfrac))
}

/// Clipped value loss, summed over masked tokens: ½ max((V − R)², (V_clip − R)²) with
/// V_clip = V_old + clip(V − V_old, −ε, ε).
pub fn value_loss_sum(
    values: &Tensor,
    old_values: &Tensor,
    returns: &Tensor,
    mask: &Tensor,
    clip_eps: f64,
) -> candle_core::Result<Tensor> {
    let v_clip = (old_values + (values - old_values)?.clamp(-clip_eps, clip_eps)?)?;
    let a = (values - returns)?.sqr()?;
    let b = (v_clip - returns)?.sqr()?;
    (a.maximum(&b)? * mask)?.sum_all()? * 0.5
}

/// GRPO's group-relative advantages: `rewards` holds groups of `k` samples of one prompt
/// each; A_i = (r_i − mean) / (std + eps) within the group (std with Bessel's correction, as
/// torch's `std()` in TRL; `scale = false` keeps only r_i − mean, Dr. GRPO's variant).
pub fn group_advantages(rewards: &[f32], k: usize, eps: f32, scale: bool) -> Vec<f32> {
    rewards
        .chunks(k)
        .flat_map(|g| {
            let n = g.len() as f32;
            let mean = g.iter().sum::<f32>() / n;
            let var = if g.len() > 1 {
                g.iter().map(|r| (r - mean).powi(2)).sum::<f32>() / (n - 1.0)
            } else {
                0.0
            };
            let denom = if scale { var.sqrt() + eps } else { 1.0 };
            g.iter().map(move |r| (r - mean) / denom)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    #[test]
    fn kl_estimators_by_hand() {
        // log π = −1, log π_ref = −1.5: log r = −0.5.
        let (lp, rp) = (t1(&[-1.0]), t1(&[-1.5]));
        let k = |e: KlEstimator| scalar(&e.estimate(&lp, &rp).unwrap().sum_all().unwrap());
        close(k(KlEstimator::K1), 0.5, "k1");
        close(k(KlEstimator::K2), 0.125, "k2");
        close(k(KlEstimator::K3), (-0.5f32).exp() - 1.0 + 0.5, "k3"); // 0.1065307
        close(
            KlEstimator::K3.estimate_f32(-1.0, -1.5),
            0.10653066,
            "k3 on f32",
        );
        // k3 is never negative, k1 can be.
        assert!(KlEstimator::K1.estimate_f32(-2.0, -1.0) < 0.0);
        assert!(KlEstimator::K3.estimate_f32(-2.0, -1.0) > 0.0);
    }

    #[test]
    fn shaped_rewards_put_the_score_on_the_last_token() {
        let r = shaped_rewards(2.0, &[0.1, 0.2, 0.3, 9.0], 3, 0.5);
        assert_eq!(r, vec![-0.05, -0.1, 2.0 - 0.15, 0.0]);
    }

    #[test]
    fn gae_by_hand() {
        // γ = 0.9, λ = 0.8, three tokens then padding.
        let (r, v) = ([1.0, 0.0, 2.0, 5.0], [0.5, 0.4, 0.3, 7.0]);
        let (adv, ret) = gae(&r, &v, 3, 0.9, 0.8);
        let d2 = 2.0 - 0.3; // last token: no next value
        let d1 = 0.0 + 0.9 * 0.3 - 0.4;
        let d0 = 1.0 + 0.9 * 0.4 - 0.5;
        let a2 = d2;
        let a1 = d1 + 0.72 * a2;
        let a0 = d0 + 0.72 * a1;
        for (got, want) in adv.iter().zip([a0, a1, a2, 0.0]) {
            close(*got, want, "advantage");
        }
        close(ret[0], a0 + 0.5, "return 0");
        close(ret[2], a2 + 0.3, "return 2");
        assert_eq!(ret[3], 0.0);
        // λ = 1, γ = 1: advantage = (sum of future rewards) − V.
        let (adv, _) = gae(&[1.0, 1.0, 1.0], &[0.0, 0.0, 0.0], 3, 1.0, 1.0);
        assert_eq!(adv, vec![3.0, 2.0, 1.0]);
    }

    #[test]
    fn ppo_clip_by_hand() {
        // ε = 0.2. Token 0: ratio e^0.5 ≈ 1.6487, A = +1 → clipped at 1.2.
        // Token 1: ratio e^−0.5 ≈ 0.6065, A = +2 → unclipped term (min) 1.2131.
        // Token 2: ratio e^−0.5, A = −1 → clip(0.6065)=0.8 · −1 = −0.8 is smaller → clipped.
        // Token 3: masked out.
        let logp = t2(&[&[0.0, -0.5, -0.5, 3.0]]);
        let old = t2(&[&[-0.5, 0.0, 0.0, 0.0]]);
        let adv = t2(&[&[1.0, 2.0, -1.0, 100.0]]);
        let mask = t2(&[&[1.0, 1.0, 1.0, 0.0]]);
        let (loss, clipped) = policy_loss_sum(&logp, &old, &adv, &mask, 0.2).unwrap();
        let r1 = (-0.5f32).exp();
        close(scalar(&loss), -(1.2 + r1 * 2.0 - 0.8), "policy loss sum");
        close(clipped, 2.0, "clipped tokens");
    }

    #[test]
    fn value_clip_by_hand() {
        // ε = 0.2. Token 0: V = 1.0, V_old = 0.5, R = 0.0 → V_clip = 0.7; max(1.0, 0.49) = 1.0.
        // Token 1: V = 0.0, V_old = 0.5, R = 1.0 → V_clip = 0.3; max(1.0, 0.49) = 1.0.
        // Token 2: V = 0.9, V_old = 0.5, R = 1.0 → V_clip = 0.7; max(0.01, 0.09) = 0.09.
        let v = t2(&[&[1.0, 0.0, 0.9]]);
        let old = t2(&[&[0.5, 0.5, 0.5]]);
        let ret = t2(&[&[0.0, 1.0, 1.0]]);
        let mask = t2(&[&[1.0, 1.0, 1.0]]);
        let loss = value_loss_sum(&v, &old, &ret, &mask, 0.2).unwrap();
        close(scalar(&loss), 0.5 * (1.0 + 1.0 + 0.09), "value loss sum");
    }

    #[test]
    fn grpo_advantages_by_hand() {
        // Two prompts, k = 4: rewards {1, 0, 0, 1} and {1, 1, 1, 1}.
        let a = group_advantages(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0], 4, 1e-4, true);
        // mean 0.5, unbiased std = sqrt(4 · 0.25 / 3) = 0.57735.
        let s = (1.0f32 / 3.0).sqrt() + 1e-4;
        for (got, want) in a.iter().zip([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s]) {
            close(*got, want, "advantage, mixed group");
        }
        assert!(a[4..].iter().all(|x| *x == 0.0), "all-equal group: {a:?}");
        let unscaled = group_advantages(&[3.0, 1.0], 2, 1e-4, false);
        assert_eq!(unscaled, vec![1.0, -1.0]);
    }

    #[test]
    fn whitening_gives_zero_mean_unit_std_on_valid_tokens() {
        let mut adv = vec![vec![1.0, 2.0, 99.0], vec![3.0, 4.0, 5.0]];
        whiten(&mut adv, &[2, 3]);
        let v: Vec<f32> = vec![adv[0][0], adv[0][1], adv[1][0], adv[1][1], adv[1][2]];
        let mean = v.iter().sum::<f32>() / 5.0;
        close(mean, 0.0, "mean");
        assert_eq!(adv[0][2], 99.0, "padding untouched");
    }
}
