//! Differentiable building blocks. candle-nn's fused `softmax_last_dim`, `rms_norm` and `rope`
//! return no gradient, so training code uses these formulations instead.

use candle_core::{DType, Tensor, D};

/// Softmax over the last dimension. The max is detached: softmax does not depend on it,
/// and routing gradient through `max` would only add rounding noise.
pub fn softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// log-softmax over the last dimension (same detached-max trick).
pub fn log_softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&m)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// HF LlamaRMSNorm: computed in f32, `w * (x * rsqrt(mean(x^2) + eps))`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(weight)
}

/// `x @ w^T (+ b)` for x of shape (.., in) and w of shape (out, in).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let last = dims[dims.len() - 1];
    let rows = x.elem_count() / last;
    let y = x.reshape((rows, last))?.matmul(&w.t()?)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out_dims = dims;
    *out_dims.last_mut().unwrap() = w.dim(0)?;
    y.reshape(out_dims)
}

/// HF `rotate_half` rotary embedding: x * cos + rotate_half(x) * sin, with x (B, H, T, D)
/// and cos/sin (B, T, D) (halves duplicated).
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let cos = cos.unsqueeze(1)?;
    let sin = sin.unsqueeze(1)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// Sum of token cross-entropies over targets != `ignore_index`, and the number of such targets.
/// `logits` (N, V), `targets` (N) as i64.
pub fn cross_entropy_sum(
    logits: &Tensor,
    targets: &[i64],
    ignore_index: i64,
) -> candle_core::Result<(Tensor, usize)> {
    let device = logits.device();
    let n = targets.len();
    let idx: Vec<u32> = targets
        .iter()
        .map(|&t| if t == ignore_index { 0 } else { t as u32 })
        .collect();
    let keep: Vec<f32> = targets
        .iter()
        .map(|&t| if t == ignore_index { 0.0 } else { 1.0 })
        .collect();
    let count = keep.iter().filter(|&&k| k > 0.0).count();
    let logp = log_softmax(&logits.to_dtype(DType::F32)?)?;
    let idx = Tensor::from_vec(idx, (n, 1), device)?;
    let picked = logp.gather(&idx, 1)?.squeeze(1)?;
    let keep = Tensor::from_vec(keep, n, device)?;
    let total = (picked * keep)?.sum_all()?.neg()?;
    Ok((total, count))
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
