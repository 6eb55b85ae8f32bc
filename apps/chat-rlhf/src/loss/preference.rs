//! Pairwise and unpaired preference objectives: the reward model's −log σ(r_c − r_r), the
//! DPO family (DPO, IPO, SimPO, ORPO) and KTO. Every loss is per pair (or per example), so the
//! caller sums and divides by the global count.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// log σ(x) = −softplus(−x), stable for large |x| and smooth at 0. (The usual
/// min(x, 0) − log(1 + e^{−|x|}) has a kink-free value but not gradient there: candle takes
/// relu'(0) = 1 and sign(0) = 1, which gives 1.5 instead of 0.5 at exactly x = 0 — where DPO
/// and KTO start, when the policy is its reference.)
pub fn log_sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    // softplus(y) = log(1 + e^y), with e^y capped at e^20 and the rest of y added linearly
    // (log(1 + e^20) = 20 + 2e-9).
    let y = x.neg()?;
    let capped = y.minimum(20f32)?;
    let softplus = ((capped.exp()? + 1.0)?.log()? + (&y - &capped)?)?;
    softplus.neg()
}

/// The reward model's pairwise loss per pair: −log σ(r_chosen − r_rejected).
pub fn pairwise_reward_loss(chosen: &Tensor, rejected: &Tensor) -> candle_core::Result<Tensor> {
    log_sigmoid(&(chosen - rejected)?)?.neg()
}

/// Summed response log-probs of each pair's chosen and rejected answers, with their lengths
/// in tokens (for the length-normalised losses). All (B,).
pub struct PairLogps {
    pub chosen: Tensor,
    pub rejected: Tensor,
    pub chosen_len: Tensor,
    pub rejected_len: Tensor,
}

impl PairLogps {
    fn avg(&self) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            (&self.chosen / &self.chosen_len)?,
            (&self.rejected / &self.rejected_len)?,
        ))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "loss", rename_all = "lowercase", deny_unknown_fields)]
pub enum PreferenceLoss {
    /// Rafailov et al.: −log σ(β h), h = (log π_c − log π_ref,c) − (log π_r − log π_ref,r);
    /// with label smoothing ε (conservative DPO): −(1 − ε) log σ(β h) − ε log σ(−β h).
    Dpo { beta: f64, label_smoothing: f64 },
    /// Azar et al.: (h − 1/(2β))², h on length-averaged log-probs (as TRL).
    Ipo { beta: f64 },
    /// Meng et al.: −log σ(β (avg log π_c − avg log π_r) − γ); no reference model.
    Simpo { beta: f64, gamma: f64 },
    /// Hong et al.: NLL of the chosen answer (per token) − λ log σ(log odds_c − log odds_r),
    /// odds = p / (1 − p) with p the length-averaged likelihood; no reference model.
    Orpo { lambda: f64 },
}

impl PreferenceLoss {
    pub fn needs_reference(&self) -> bool {
        matches!(
            self,
            PreferenceLoss::Dpo { .. } | PreferenceLoss::Ipo { .. }
        )
    }

    /// Loss of each pair (B,).
    pub fn per_pair(
        &self,
        policy: &PairLogps,
        reference: Option<&PairLogps>,
    ) -> candle_core::Result<Tensor> {
        let need_ref = || {
            reference.ok_or_else(|| {
                candle_core::Error::Msg(format!("{self:?} needs reference log-probs"))
            })
        };
        match *self {
            PreferenceLoss::Dpo {
                beta,
                label_smoothing,
            } => {
                let r = need_ref()?;
                let h = ((&policy.chosen - &r.chosen)? - (&policy.rejected - &r.rejected)?)?;
                let pos = log_sigmoid(&(&h * beta)?)?;
                let neg = log_sigmoid(&(&h * -beta)?)?;
                (pos * -(1.0 - label_smoothing))? - (neg * label_smoothing)?
            }
            PreferenceLoss::Ipo { beta } => {
                let r = need_ref()?;
                let (pc, pr) = policy.avg()?;
                let (rc, rr) = r.avg()?;
                let h = ((pc - rc)? - (pr - rr)?)?;
                (h - 1.0 / (2.0 * beta))?.sqr()
            }
            PreferenceLoss::Simpo { beta, gamma } => {
                let (pc, pr) = policy.avg()?;
                log_sigmoid(&(((pc - pr)? * beta)? - gamma)?)?.neg()
            }
            PreferenceLoss::Orpo { lambda } => {
                let (pc, pr) = policy.avg()?;
                let log_odds = |avg: &Tensor| -> candle_core::Result<Tensor> {
                    // log(1 − e^avg), kept finite when avg → 0.
                    let rest = (avg.exp()?.neg()? + 1.0)?.clamp(1e-7, 1.0)?.log()?;
                    avg - rest
                };
                let ratio = log_sigmoid(&(log_odds(&pc)? - log_odds(&pr)?)?)?;
                pc.neg()? - (ratio * lambda)?
            }
        }
    }
}

/// KTO (Ethayarajh et al.) per example: with log ratio ℓ = log π − log π_ref and the reference
/// point z0 (a detached, non-negative KL estimate), desirable examples lose
/// w_d (1 − σ(β (ℓ − z0))) and undesirable ones w_u (1 − σ(β (z0 − ℓ))).
pub fn kto_per_example(
    log_ratio: &Tensor,
    desirable: &[bool],
    z0: f64,
    beta: f64,
    w_desirable: f64,
    w_undesirable: f64,
) -> candle_core::Result<Tensor> {
    let dev = log_ratio.device();
    let sign: Vec<f32> = desirable
        .iter()
        .map(|&d| if d { 1.0 } else { -1.0 })
        .collect();
    let weight: Vec<f32> = desirable
        .iter()
        .map(|&d| if d { w_desirable } else { w_undesirable } as f32)
        .collect();
    let sign = Tensor::from_vec(sign, desirable.len(), dev)?;
    let weight = Tensor::from_vec(weight, desirable.len(), dev)?;
    // σ(β s (ℓ − z0)) with s = ±1.
    let x = (((log_ratio - z0)? * &sign)? * beta)?;
    let sig = log_sigmoid(&x)?.exp()?;
    (sig.neg()? + 1.0)? * weight
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    fn ls(x: f64) -> f64 {
        -(1.0 + (-x).exp()).ln()
    }

    fn pair() -> (PairLogps, PairLogps) {
        // Policy: chosen −10 over 5 tokens, rejected −12 over 4; reference: −11 and −11.
        let policy = PairLogps {
            chosen: t1(&[-10.0]),
            rejected: t1(&[-12.0]),
            chosen_len: t1(&[5.0]),
            rejected_len: t1(&[4.0]),
        };
        let reference = PairLogps {
            chosen: t1(&[-11.0]),
            rejected: t1(&[-11.0]),
            chosen_len: t1(&[5.0]),
            rejected_len: t1(&[4.0]),
        };
        (policy, reference)
    }

    fn loss(kind: PreferenceLoss) -> f32 {
        let (p, r) = pair();
        scalar(&kind.per_pair(&p, Some(&r)).unwrap().sum_all().unwrap())
    }

    #[test]
    fn log_sigmoid_has_the_right_gradient_at_zero() {
        let x = candle_core::Var::from_tensor(&t1(&[0.0, -1e-3, 1e-3, 3.0, -30.0])).unwrap();
        let g = log_sigmoid(&x)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let got: Vec<f32> = g.get(&x).unwrap().to_vec1().unwrap();
        // d/dx log σ(x) = σ(−x).
        for (x, d) in [0.0f32, -1e-3, 1e-3, 3.0, -30.0].iter().zip(got) {
            close(d, 1.0 / (1.0 + x.exp()), "σ(−x)");
        }
    }

    #[test]
    fn log_sigmoid_is_stable() {
        let v = log_sigmoid(&t1(&[-100.0, 0.0, 100.0]))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        close(v[0], -100.0, "log σ(−100)");
        close(v[1], -(2f32).ln(), "log σ(0)");
        close(v[2], 0.0, "log σ(100)");
    }

    #[test]
    fn reward_model_pairwise_loss() {
        let l = pairwise_reward_loss(&t1(&[1.0, 0.0]), &t1(&[0.0, 2.0])).unwrap();
        let v = l.to_vec1::<f32>().unwrap();
        close(v[0], -ls(1.0) as f32, "margin +1");
        close(v[1], -ls(-2.0) as f32, "margin −2");
    }

    #[test]
    fn dpo_by_hand() {
        // h = (−10 + 11) − (−12 + 11) = 2; β = 0.1 → −log σ(0.2) = 0.598139.
        let l = loss(PreferenceLoss::Dpo {
            beta: 0.1,
            label_smoothing: 0.0,
        });
        close(l, -ls(0.2) as f32, "dpo");
        close(l, 0.598_139, "dpo, literal");
        let smoothed = loss(PreferenceLoss::Dpo {
            beta: 0.1,
            label_smoothing: 0.1,
        });
        close(smoothed, (-0.9 * ls(0.2) - 0.1 * ls(-0.2)) as f32, "cdpo");
    }

    #[test]
    fn ipo_by_hand() {
        // Averages: policy −2, −3; reference −2.2, −2.75; h = 0.2 − (−0.25) = 0.45.
        // β = 0.5: (0.45 − 1)² = 0.3025.
        close(loss(PreferenceLoss::Ipo { beta: 0.5 }), 0.3025, "ipo");
    }

    #[test]
    fn simpo_by_hand() {
        // β = 2, γ = 0.5: −log σ(2 · (−2 + 3) − 0.5) = −log σ(1.5).
        let l = loss(PreferenceLoss::Simpo {
            beta: 2.0,
            gamma: 0.5,
        });
        close(l, -ls(1.5) as f32, "simpo");
        let (p, _) = pair();
        assert!(PreferenceLoss::Simpo {
            beta: 2.0,
            gamma: 0.5
        }
        .per_pair(&p, None)
        .is_ok());
        assert!(PreferenceLoss::Dpo {
            beta: 0.1,
            label_smoothing: 0.0
        }
        .per_pair(&p, None)
        .is_err());
    }

    #[test]
    fn orpo_by_hand() {
        // avg_c = −2, avg_r = −3; log odds = a − log(1 − e^a).
        let lo = |a: f64| a - (1.0 - a.exp()).ln();
        let want = 2.0 - 0.25 * ls(lo(-2.0) - lo(-3.0));
        close(
            loss(PreferenceLoss::Orpo { lambda: 0.25 }),
            want as f32,
            "orpo",
        );
    }

    #[test]
    fn kto_by_hand() {
        // ℓ = [0.5, −0.2], first desirable, second not; z0 = 0.1, β = 2, w_d = 1, w_u = 1.5.
        let l = kto_per_example(&t1(&[0.5, -0.2]), &[true, false], 0.1, 2.0, 1.0, 1.5).unwrap();
        let v = l.to_vec1::<f32>().unwrap();
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        close(v[0], (1.0 - sig(2.0 * 0.4)) as f32, "desirable");
        close(v[1], (1.5 * (1.0 - sig(2.0 * 0.3))) as f32, "undesirable");
    }
}
