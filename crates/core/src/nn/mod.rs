//! Differentiable building blocks: the reference formulations of the kernels crate (candle-nn's
//! fused `softmax_last_dim`, `rms_norm` and `rope` return no gradient) and `linear`. Models
//! pick fused or reference through [`colossal_kernels::Kernels`].

use candle_core::Tensor;

pub use colossal_kernels::reference::{cross_entropy_sum, log_softmax, rms_norm, softmax};

/// `x @ w^T (+ b)` for x of shape (.., in) and w of shape (out, in).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let y = colossal_kernels::reference::linear(x, w)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn softmax_has_gradient_and_matches_candle() -> candle_core::Result<()> {
        let x = Var::new(&[[1.0f32, 2.0, 3.0], [0.5, -1.0, 4.0]], &Device::Cpu)?;
        let ours = softmax(x.as_tensor())?;
        let theirs = candle_nn::ops::softmax_last_dim(x.as_tensor())?;
        let diff = (&ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6);
        let w = Tensor::new(&[[1.0f32, 0.0, -1.0], [2.0, 0.5, 0.0]], &Device::Cpu)?;
        let g = (ours * w)?.sum_all()?.backward()?;
        let gx = g.get(x.as_tensor()).expect("softmax gradient");
        assert!(gx.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        Ok(())
    }

    #[test]
    fn cross_entropy_ignores_targets() -> candle_core::Result<()> {
        let logits = Tensor::new(&[[0.0f32, 0.0], [2.0, 0.0]], &Device::Cpu)?;
        let (sum, n) = cross_entropy_sum(&logits, &[1, -100], -100)?;
        assert_eq!(n, 1);
        let v = sum.to_scalar::<f32>()?;
        assert!((v - std::f32::consts::LN_2).abs() < 1e-6);
        Ok(())
    }
}
