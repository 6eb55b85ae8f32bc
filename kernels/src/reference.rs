//! The reference formulations: compositions of candle's differentiable tensor ops, any
//! dtype and device. candle-nn's own fused `softmax_last_dim`, `rms_norm` and `rope` have no
//! backward, so training cannot use them; these are what the fused kernels are checked
//! against and what runs where no fused kernel applies.

use candle_core::{DType, Result, Tensor, D};

/// Softmax over the last dimension. The max is detached: softmax does not depend on it,
/// and routing gradient through `max` would only add rounding noise.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// log-softmax over the last dimension (same detached-max trick).
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&m)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// HF LlamaRMSNorm: computed in f32, `w * (x * rsqrt(mean(x^2) + eps))`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(weight)
}

/// HF `rotate_half` rotary embedding: x * cos + rotate_half(x) * sin, with x (B, H, T, D)
/// and cos/sin (B, T, D) (halves duplicated).
pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let cos = cos.unsqueeze(1)?;
    let sin = sin.unsqueeze(1)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// silu(gate) · up.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

/// Sum of token cross-entropies over targets != `ignore`, and the number of such targets.
/// `logits` (N, V), `targets` (N).
pub fn cross_entropy_sum(logits: &Tensor, targets: &[i64], ignore: i64) -> Result<(Tensor, usize)> {
    let device = logits.device();
    let n = targets.len();
    let idx: Vec<u32> = targets
        .iter()
        .map(|&t| if t == ignore { 0 } else { t as u32 })
        .collect();
    let keep: Vec<f32> = targets
        .iter()
        .map(|&t| if t == ignore { 0.0 } else { 1.0 })
        .collect();
    let count = keep.iter().filter(|&&k| k > 0.0).count();
    let logp = log_softmax(&logits.to_dtype(DType::F32)?)?;
    let idx = Tensor::from_vec(idx, (n, 1), device)?;
    let picked = logp.gather(&idx, 1)?.squeeze(1)?;
    let keep = Tensor::from_vec(keep, n, device)?;
    let total = (picked * keep)?.sum_all()?.neg()?;
    Ok((total, count))
}

/// x (…, K) · wᵀ for w (N, K): reshape to rows, matmul with the transposed view, reshape back.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let last = dims[dims.len() - 1];
    let rows = x.elem_count() / last;
    let y = x.reshape((rows, last))?.matmul(&w.t()?)?;
    let mut out = dims;
    *out.last_mut().expect("x has a last dimension") = w.dim(0)?;
    y.reshape(out)
}

/// LayerNorm over the last dimension: (x − mean) / sqrt(var + eps) · w + b (biased variance).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(w)?.broadcast_add(b)
}

/// GroupNorm of x (N, C, spatial…): each (n, group) normalised over its channels and
/// positions, then per-channel w and b.
pub fn group_norm(x: &Tensor, groups: usize, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (n, c) = (dims[0], dims[1]);
    let grouped = x.reshape((n, groups, ()))?;
    let mean = grouped.mean_keepdim(D::Minus1)?;
    let centred = grouped.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .reshape(dims.as_slice())?;
    let mut affine = vec![1usize; dims.len()];
    affine[1] = c;
    normed
        .broadcast_mul(&w.reshape(affine.as_slice())?)?
        .broadcast_add(&b.reshape(affine.as_slice())?)
}
