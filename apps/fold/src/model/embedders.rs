//! The input embedder (AlphaFold 2, Algorithms 3–5): the pair stream starts as the outer sum
//! of two projections of the target features plus a projection of the clipped relative
//! position one-hot; the MSA stream as a projection of the MSA features plus one of the target
//! features. Names as OpenFold's `input_embedder`.

use candle_core::{DType, Result, Tensor};

use super::config::InputEmbedderConfig;
use super::primitives::Ctx;
use super::specs::{LinearInit, Specs};

/// (m (S, R, c_m), z (R, R, c_z)) from `target_feat` (R, tf_dim), `msa_feat` (S, R, msa_dim)
/// and `residue_index` (R).
pub fn input_embedder(
    c: &Ctx,
    cfg: &InputEmbedderConfig,
    target_feat: &Tensor,
    msa_feat: &Tensor,
    residue_index: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let p = "input_embedder";
    let zi = c.linear(&format!("{p}.linear_tf_z_i"), target_feat)?;
    let zj = c.linear(&format!("{p}.linear_tf_z_j"), target_feat)?;
    let z = zi.unsqueeze(1)?.broadcast_add(&zj.unsqueeze(0)?)?;
    let z = (z + relpos(c, cfg, residue_index, target_feat.dtype())?)?;
    let tf_m = c.linear(&format!("{p}.linear_tf_m"), target_feat)?;
    let m = c
        .linear(&format!("{p}.linear_msa_m"), msa_feat)?
        .broadcast_add(&tf_m.unsqueeze(0)?)?;
    Ok((m, z))
}

/// Relative positions i − j clipped to ±k, one-hot over 2k + 1 bins, projected.
fn relpos(c: &Ctx, cfg: &InputEmbedderConfig, ri: &Tensor, dtype: DType) -> Result<Tensor> {
    let k = cfg.relpos_k as i64;
    let idx: Vec<i64> = ri.to_dtype(DType::I64)?.to_vec1()?;
    let r = idx.len();
    let bins = 2 * cfg.relpos_k + 1;
    let mut oh = vec![0f32; r * r * bins];
    for i in 0..r {
        for j in 0..r {
            let d = (idx[i] - idx[j]).clamp(-k, k) + k;
            oh[(i * r + j) * bins + d as usize] = 1.0;
        }
    }

    let oh = Tensor::from_vec(oh, (r, r, bins), ri.device())?.to_dtype(dtype)?;
    c.linear("input_embedder.linear_relpos", &oh)
}

pub fn input_embedder_specs(s: &mut Specs, cfg: &InputEmbedderConfig) {
    let p = "input_embedder";
    let (tf, cz, cm) = (cfg.tf_dim, cfg.c_z, cfg.c_m);
    s.linear(
        &format!("{p}.linear_tf_z_i"),
        tf,
        cz,
        true,
        LinearInit::Default,
    );
    s.linear(
        &format!("{p}.linear_tf_z_j"),
        tf,
        cz,
        true,
        LinearInit::Default,
    );
    s.linear(
        &format!("{p}.linear_tf_m"),
        tf,
        cm,
        true,
        LinearInit::Default,
    );
    s.linear(
        &format!("{p}.linear_msa_m"),
        cfg.msa_dim,
        cm,
        true,
        LinearInit::Default,
    );
    s.linear(
        &format!("{p}.linear_relpos"),
        2 * cfg.relpos_k + 1,
        cz,
        true,
        LinearInit::Default,
    );
}
