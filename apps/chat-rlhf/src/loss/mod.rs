//! The math of the RLHF objectives, on candle tensors (differentiable where training needs it)
//! and plain slices (advantages, computed without gradient). Losses return sums over their
//! elements, so a caller can divide by a count taken over the whole global batch: N ranks then
//! compute exactly the mean one rank would.

pub mod ppo;
pub mod preference;

use candle_core::{DType, Tensor, D};
use colossal_core::nn::log_softmax;

pub use ppo::{gae, group_advantages, shaped_rewards, KlEstimator};
pub use preference::{log_sigmoid, PairLogps, PreferenceLoss};

/// Log-probability of each next token: `logits` (B, T, V) predict `ids` (B, T) shifted by
/// one, giving (B, T − 1) (position t scores `ids[t + 1]`).
pub fn token_logprobs(logits: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
    let (_, t, _) = logits.dims3()?;
    let logp = log_softmax(&logits.narrow(1, 0, t - 1)?.to_dtype(DType::F32)?)?;
    let next = ids
        .narrow(1, 1, t - 1)?
        .to_dtype(DType::U32)?
        .unsqueeze(2)?;
    logp.gather(&next.contiguous()?, 2)?.squeeze(2)
}

/// Entropy of each position's next-token distribution: (B, T, V) → (B, T).
pub fn entropy(logits: &Tensor) -> candle_core::Result<Tensor> {
    let logp = log_softmax(&logits.to_dtype(DType::F32)?)?;
    (logp.exp()? * &logp)?.sum(D::Minus1)?.neg()
}

/// Σ x·mask over all elements.
pub fn masked_sum(x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    (x * mask)?.sum_all()
}

/// Per-row Σ x·mask: (B, T) → (B,).
pub fn row_sum(x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    (x * mask)?.sum(1)
}

#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{Device, Tensor};

    pub fn t1(v: &[f32]) -> Tensor {
        Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap()
    }

    pub fn t2(rows: &[&[f32]]) -> Tensor {
        let (b, t) = (rows.len(), rows[0].len());
        Tensor::from_vec(rows.concat(), (b, t), &Device::Cpu).unwrap()
    }

    pub fn scalar(t: &Tensor) -> f32 {
        t.to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    pub fn close(a: f32, b: f32, what: &str) {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "{what}: {a} vs expected {b}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use candle_core::Device;

    #[test]
    fn token_logprobs_pick_the_next_token() {
        // One row, V = 3, T = 3: position 0 predicts ids[1] = 2, position 1 predicts ids[2] = 0.
        let logits = Tensor::from_vec(
            vec![0.0f32, 1.0, 2.0, 1.0, 1.0, 1.0, 5.0, 5.0, 5.0],
            (1, 3, 3),
            &Device::Cpu,
        )
        .unwrap();
        let ids = Tensor::from_vec(vec![7u32, 2, 0], (1, 3), &Device::Cpu).unwrap();
        let lp = token_logprobs(&logits, &ids)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let z0 = (1f32 + 1f32.exp() + 2f32.exp()).ln();
        close(lp[0][0], 2.0 - z0, "log p(2 | row 0)");
        close(lp[0][1], -(3f32).ln(), "log p(0 | uniform)");
        let h = entropy(&logits).unwrap().to_vec2::<f32>().unwrap();
        close(h[0][1], 3f32.ln(), "entropy of a uniform distribution");
    }
}
