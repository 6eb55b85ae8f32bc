use candle_core::DType;

use crate::params::Grads;
use crate::Result;

/// L2 norm over all gradients together (f64 accumulation of f32 squares).
pub fn global_grad_norm(grads: &Grads) -> Result<f64> {
    let mut names: Vec<&String> = grads.names().collect();
    names.sort();
    let mut sum = 0.0f64;
    for n in names {
        let g = grads.get(n).expect("listed");
        let v: Vec<f32> = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        sum += v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>();
    }
    Ok(sum.sqrt())
}

/// torch `clip_grad_norm_`: scales every gradient by `min(1, max_norm / (norm + 1e-6))`.
/// Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut Grads, max_norm: f64) -> Result<f64> {
    let norm = global_grad_norm(grads)?;
    clip_to_norm(grads, max_norm, norm)?;
    Ok(norm)
}

/// The scaling of [`clip_grad_norm`] given the norm (computed over shards elsewhere).
pub fn clip_to_norm(grads: &mut Grads, max_norm: f64, norm: f64) -> Result<()> {
    let coef = (max_norm / (norm + 1e-6)).min(1.0);
    if coef < 1.0 {
        let names: Vec<String> = grads.names().cloned().collect();
        for n in names {
            let g = grads.get(&n).expect("listed");
            let scaled = (g * coef)?;
            grads.set(&n, scaled);
        }
    }
    Ok(())
}
