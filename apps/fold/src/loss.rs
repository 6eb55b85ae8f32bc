//! AlphaFold's losses as OpenFold computes them (so far the two the Evoformer trains on alone):
//! the distogram loss — cross-entropy of the distogram against the binned true Cβ distances —
//! and the masked-MSA loss — cross-entropy of the masked entries' true classes.

use candle_core::{Result, Tensor};

use crate::model::primitives::softmax_cross_entropy;
use crate::superpose::Vec3;

/// The distogram's `bins − 1` bin edges (Å): evenly from 2.3125 to 21.6875 (AlphaFold's).
pub fn distogram_edges(bins: usize) -> Vec<f64> {
    let (lo, hi) = (2.3125f64, 21.6875f64);
    (0..bins - 1)
        .map(|k| lo + (hi - lo) * k as f64 / (bins - 2) as f64)
        .collect()
}

/// One-hot distance bins (R, R, bins) of the true Cβ positions: the squared edges a distance
/// exceeds.
pub fn distogram_targets(
    pseudo_beta: &[Vec3],
    bins: usize,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    let edges: Vec<f64> = distogram_edges(bins).iter().map(|e| e * e).collect();
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

/// Backbone frames of a true structure from its N, Cα, C (R each): rotation columns x̂ along
/// C − Cα, ŷ toward N in the plane, ẑ = x̂ × ŷ (AlphaFold's backbone frame); origin at Cα.
/// (rotations (R, 3, 3), translations (R, 3)).
pub fn true_frames(
    n: &[Vec3],
    ca: &[Vec3],
    c: &[Vec3],
    dev: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let unit = |v: Vec3| -> Vec3 {
        let l = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt().max(1e-8);
        [v[0] / l, v[1] / l, v[2] / l]
    };
    let sub = |a: &Vec3, b: &Vec3| -> Vec3 { [a[0] - b[0], a[1] - b[1], a[2] - b[2]] };
    let (mut rots, mut trans) = (Vec::new(), Vec::new());
    for i in 0..ca.len() {
        let x = unit(sub(&c[i], &ca[i]));
        let v = sub(&n[i], &ca[i]);
        let d = v[0] * x[0] + v[1] * x[1] + v[2] * x[2];
        let y = unit([v[0] - d * x[0], v[1] - d * x[1], v[2] - d * x[2]]);
        let z = [
            x[1] * y[2] - x[2] * y[1],
            x[2] * y[0] - x[0] * y[2],
            x[0] * y[1] - x[1] * y[0],
        ];
        for row in 0..3 {
            rots.extend([x[row] as f32, y[row] as f32, z[row] as f32]);
        }
        trans.extend(ca[i].iter().map(|&v| v as f32));
    }
    let r = ca.len();
    Ok((
        Tensor::from_vec(rots, (r, 3, 3), dev)?,
        Tensor::from_vec(trans, (r, 3), dev)?,
    ))
}

/// Backbone FAPE (AlphaFold 2, Algorithm 28) averaged over the structure module's layers: for
/// every frame i and Cα j, the distance between j seen from predicted frame i and j seen from
/// true frame i, in units of 10 Å; the mean over real pairs. A share `clamped` of it clamps
/// distances at 10 Å, the rest does not (OpenFold trains with 0.9: the unclamped share keeps a
/// signal for pairs still far off).
pub fn backbone_fape(
    pred_rots: &Tensor,
    pred_trans: &Tensor,
    true_rots: &Tensor,
    true_trans: &Tensor,
    mask: &Tensor,
    clamped: f64,
) -> Result<Tensor> {
    const EPS: f64 = 1e-4;
    let local = |rot: &Tensor, t: &Tensor| -> Result<Tensor> {
        // (x_j − t_i)·R_i for all (i, j): (R, R, 3).
        let d = t.unsqueeze(0)?.broadcast_sub(&t.unsqueeze(1)?)?;
        d.matmul(rot)
    };
    let want = local(true_rots, true_trans)?;
    let layers = pred_rots.dim(0)?;
    let square = mask.unsqueeze(1)?.broadcast_mul(&mask.unsqueeze(0)?)?;
    let denom = ((mask.sum_all()? + EPS)?.sqr()?).to_dtype(candle_core::DType::F32)?;
    let mut total: Option<Tensor> = None;
    for l in 0..layers {
        let got = local(&pred_rots.get(l)?, &pred_trans.get(l)?)?;
        let err = ((got - &want)?.sqr()?.sum(candle_core::D::Minus1)? + EPS)?.sqrt()?;
        let err = match clamped {
            c if c >= 1.0 => err.clamp(0f32, 10f32)?,
            c if c <= 0.0 => err,
            c => ((err.clamp(0f32, 10f32)? * c)? + (&err * (1.0 - c))?)?,
        };
        let err = (err / 10.0)?;
        let mean = (err * &square)?.sum_all()?.broadcast_div(&denom)?;
        total = Some(match total {
            None => mean,
            Some(t) => (t + mean)?,
        });
    }
    total.expect("at least one layer") / layers as f64
}

/// The pLDDT loss: cross-entropy of the head's logits (R, bins) against each residue's true
/// lDDT-Cα of the predicted Cα (no gradient through the structure), binned; mean over residues.
pub fn plddt_loss(
    logits: &Tensor,
    pred_ca: &[Vec3],
    true_ca: &[Vec3],
    mask: &Tensor,
) -> Result<Tensor> {
    let bins = logits.dim(1)?;
    let per = crate::metrics::lddt_per_residue(pred_ca, true_ca, 15.0);
    let mut oh = vec![0f32; per.len() * bins];
    for (i, l) in per.iter().enumerate() {
        let b = ((l * bins as f64).floor() as usize).min(bins - 1);
        oh[i * bins + b] = 1.0;
    }
    let targets =
        Tensor::from_vec(oh, (per.len(), bins), logits.device())?.to_dtype(logits.dtype())?;
    let errors = softmax_cross_entropy(logits, &targets)?;
    (errors * mask)?
        .sum_all()?
        .broadcast_div(&(mask.sum_all()? + 1e-10)?)
}

/// FAPE of atoms (AlphaFold's all-atom FAPE restricted to the backbone atoms N, Cα, C, O): every
/// atom j seen from every final backbone frame i, predicted against true; clamped at 10 Å, in
/// units of 10 Å, the mean over pairs. `pred_atoms`/`true_atoms` (P, 3), frames (R, 3, 3) and
/// (R, 3).
pub fn atom_fape(
    pred_rot: &Tensor,
    pred_trans: &Tensor,
    pred_atoms: &Tensor,
    true_rot: &Tensor,
    true_trans: &Tensor,
    true_atoms: &Tensor,
) -> Result<Tensor> {
    const EPS: f64 = 1e-4;
    let local = |rot: &Tensor, t: &Tensor, x: &Tensor| -> Result<Tensor> {
        // (x_j − t_i)·R_i for all (i, j): (R, P, 3).
        x.unsqueeze(0)?.broadcast_sub(&t.unsqueeze(1)?)?.matmul(rot)
    };
    let d = (local(pred_rot, pred_trans, pred_atoms)? - local(true_rot, true_trans, true_atoms)?)?;
    let err = (d.sqr()?.sum(candle_core::D::Minus1)? + EPS)?.sqrt()?;
    (err.clamp(0f32, 10f32)? / 10.0)?.mean_all()
}

/// AlphaFold's angle-norm loss: how far the predicted (unnormalised) torsion vectors (R, 7, 2)
/// are from unit length, on average.
pub fn angle_norm_loss(raw: &Tensor) -> Result<Tensor> {
    let norm = (raw.sqr()?.sum(candle_core::D::Minus1)? + 1e-12)?.sqrt()?;
    (norm - 1.0)?.abs()?.mean_all()
}
