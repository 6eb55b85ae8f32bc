//! Recycling (AlphaFold 2, Algorithm 32): the model runs several times on an example, each pass
//! starting from the previous one's first MSA row, pair stream and Cβ positions (detached): the
//! embedder adds LayerNorm-ed copies of the first two and a projection of the binned Cβ
//! distances. The first pass starts from zeros. OpenFold's `recycling_embedder` names.

use candle_core::{DType, Result, Tensor};

use super::config::RecyclingConfig;
use super::primitives::Ctx;
use super::specs::{LinearInit, Specs};

/// What one pass hands the next (no gradient).
#[derive(Clone, Debug)]
pub struct Recycled {
    /// First MSA row (R, c_m), pair stream (R, R, c_z), Cβ positions (R, 3) in Å.
    pub m1: Tensor,
    pub z: Tensor,
    pub x: Tensor,
}

/// (update of the first MSA row (R, c_m), update of the pair stream (R, R, c_z)).
pub fn embed(
    c: &Ctx,
    cfg: &RecyclingConfig,
    prev: Option<&Recycled>,
    r: usize,
    like: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let p = "recycling_embedder";
    let (dtype, dev) = (like.dtype(), like.device());
    let zeros = || -> Result<Recycled> {
        Ok(Recycled {
            m1: Tensor::zeros((r, cfg.c_m), dtype, dev)?,
            z: Tensor::zeros((r, r, cfg.c_z), dtype, dev)?,
            x: Tensor::zeros((r, 3), DType::F32, dev)?,
        })
    };
    let prev = match prev {
        Some(p) => p.clone(),
        None => zeros()?,
    };
    let m = c.layer_norm(&format!("{p}.layer_norm_m"), &prev.m1.to_dtype(dtype)?)?;
    let z = c.layer_norm(&format!("{p}.layer_norm_z"), &prev.z.to_dtype(dtype)?)?;
    let bins = distance_bins(cfg, &prev.x)?.to_dtype(dtype)?;
    Ok((m, (z + c.linear(&format!("{p}.linear"), &bins)?)?))
}

/// One-hot (R, R, no_bins) of squared Cβ distances between consecutive squared edges from
/// `min_bin` to `max_bin` Å (the last bin open-ended); a distance below the first edge is in none.
fn distance_bins(cfg: &RecyclingConfig, x: &Tensor) -> Result<Tensor> {
    let pts: Vec<Vec<f32>> = x.to_dtype(DType::F32)?.to_vec2()?;
    let n = cfg.no_bins;
    let edges: Vec<f32> = (0..n)
        .map(|k| cfg.min_bin + (cfg.max_bin - cfg.min_bin) * k as f64 / (n - 1) as f64)
        .map(|e| (e * e) as f32)
        .collect();
    let r = pts.len();
    let mut oh = vec![0f32; r * r * n];
    for i in 0..r {
        for j in 0..r {
            let d: f32 = (0..3).map(|k| (pts[i][k] - pts[j][k]).powi(2)).sum();
            for k in 0..n {
                let upper = edges.get(k + 1).copied().unwrap_or(f32::INFINITY);
                if d > edges[k] && d < upper {
                    oh[(i * r + j) * n + k] = 1.0;
                }
            }
        }
    }
    Tensor::from_vec(oh, (r, r, n), x.device())
}

/// Cβ of each residue from its backbone (R, 3, 3: N, Cα, C), Cα for glycine: the ideal Cβ
/// placed from N, Cα, C (the constants of trRosetta's imputation).
pub fn pseudo_beta(backbone: &Tensor, aatype: &[u32]) -> Result<Tensor> {
    let bb: Vec<Vec<Vec<f32>>> = backbone.to_dtype(DType::F32)?.to_vec3()?;
    let gly = crate::residues::STANDARD
        .iter()
        .position(|(t, _)| *t == "GLY")
        .unwrap_or(7) as u32;
    let mut out = Vec::with_capacity(bb.len() * 3);
    for (res, &a) in bb.iter().zip(aatype) {
        let (n, ca, c) = (&res[0], &res[1], &res[2]);
        if a == gly {
            out.extend_from_slice(ca);
            continue;
        }
        let b: Vec<f32> = (0..3).map(|k| ca[k] - n[k]).collect();
        let cc: Vec<f32> = (0..3).map(|k| c[k] - ca[k]).collect();
        let x = [
            b[1] * cc[2] - b[2] * cc[1],
            b[2] * cc[0] - b[0] * cc[2],
            b[0] * cc[1] - b[1] * cc[0],
        ];
        for k in 0..3 {
            out.push(-0.582_734_3 * x[k] + 0.568_028_3 * b[k] - 0.540_674_7 * cc[k] + ca[k]);
        }
    }
    Tensor::from_vec(out, (bb.len(), 3), backbone.device())
}

pub fn specs(s: &mut Specs, cfg: &RecyclingConfig) {
    let p = "recycling_embedder";
    s.linear(
        &format!("{p}.linear"),
        cfg.no_bins,
        cfg.c_z,
        true,
        LinearInit::Default,
    );
    s.layer_norm(&format!("{p}.layer_norm_m"), cfg.c_m);
    s.layer_norm(&format!("{p}.layer_norm_z"), cfg.c_z);
}
