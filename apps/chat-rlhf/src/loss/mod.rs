//! The math of the RLHF objectives, on candle tensors (differentiable where training needs it)
//! and plain slices (advantages, computed without gradient). Losses return sums over their
//! elements, so a caller can divide by a count taken over the whole global batch: N ranks then
//! compute exactly the mean one rank would. Per-token log-probs and entropies come from the
//! model's output through `colossal_core::train::OutputLayout`.

pub mod ppo;
pub mod preference;

use candle_core::Tensor;

pub use ppo::{gae, group_advantages, shaped_rewards, KlEstimator};
pub use preference::{log_sigmoid, PairLogps, PreferenceLoss};

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
