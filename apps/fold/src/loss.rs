//! AlphaFold's losses as OpenFold computes them (so far the two the Evoformer trains on alone):
//! the distogram loss — cross-entropy of the distogram against the binned true Cβ distances —
//! and the masked-MSA loss — cross-entropy of the masked entries' true classes.

use candle_core::{Result, Tensor};

use crate::model::primitives::softmax_cross_entropy;
use crate::superpose::Vec3;

/// The distogram's bin edges: `bins − 1` squared boundaries from 2.3125 to 21.6875 Å.
pub fn distogram_targets(
    pseudo_beta: &[Vec3],
    bins: usize,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    let (lo, hi) = (2.3125f64, 21.6875f64);
    let edges: Vec<f64> = (0..bins - 1)
        .map(|k| lo + (hi - lo) * k as f64 / (bins - 2) as f64)
        .map(|e| e * e)
        .collect();
    let r = pseudo_beta.len();
    let mut oh = vec![0f32; r * r * bins];
    for i in 0..r {
        for j in 0..r {
            let d = crate::superpose::dist2(&pseudo_beta[i], &pseudo_beta[j]);
            // OpenFold compares in float32.
            let d32 = d as f32;
            let bin = edges.iter().filter(|&&e| d32 > e as f32).count();
            oh[(i * r + j) * bins + bin] = 1.0;
        }
    }
    Tensor::from_vec(oh, (r, r, bins), dev)
}

/// Mean over real pairs (`mask` (R)) of the distogram cross-entropy.
pub fn distogram_loss(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let errors = softmax_cross_entropy(logits, targets)?;
    let square = mask.unsqueeze(1)?.broadcast_mul(&mask.unsqueeze(0)?)?;
    let denom = (square.sum_all()? + 1e-6)?;
    (errors * square)?.sum_all()?.broadcast_div(&denom)
}

/// Mean over the masked entries (`bert_mask` (S, R)) of the class cross-entropy.
pub fn masked_msa_loss(logits: &Tensor, true_msa: &Tensor, bert_mask: &Tensor) -> Result<Tensor> {
    let errors = softmax_cross_entropy(logits, true_msa)?;
    let denom = (bert_mask.sum_all()? + 1e-8)?;
    (errors * bert_mask)?.sum_all()?.broadcast_div(&denom)
}
