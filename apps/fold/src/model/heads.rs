//! Output heads (OpenFold's `aux_heads`): the distogram (pair stream → distance-bin logits,
//! symmetrised), the masked MSA (MSA stream → residue-class logits) and pLDDT (the structure
//! module's single representation → lDDT-Cα bins).

use candle_core::{Result, Tensor};

use super::config::{EvoformerConfig, HeadsConfig};
use super::primitives::Ctx;
use super::specs::{LinearInit, Specs};

/// Distogram logits (R, R, bins): a projection of z plus its transpose.
pub fn distogram(c: &Ctx, z: &Tensor) -> Result<Tensor> {
    let l = c.linear("aux_heads.distogram.linear", z)?;
    &l + l.transpose(0, 1)?
}

/// Masked-MSA logits (S, R, classes).
pub fn masked_msa(c: &Ctx, m: &Tensor) -> Result<Tensor> {
    c.linear("aux_heads.masked_msa.linear", m)
}

/// Per-residue lDDT-Cα logits (R, plddt_bins) from the structure module's single representation
/// (OpenFold's `PerResidueLDDTCaPredictor`).
pub fn plddt(c: &Ctx, s: &Tensor) -> Result<Tensor> {
    let p = "aux_heads.plddt";
    let h = c.layer_norm(&format!("{p}.layer_norm"), s)?;
    let h = c.linear(&format!("{p}.linear_1"), &h)?.relu()?;
    let h = c.linear(&format!("{p}.linear_2"), &h)?.relu()?;
    c.linear(&format!("{p}.linear_3"), &h)
}

/// pLDDT (R) in [0, 100]: the expected bin centre of the logits.
pub fn plddt_values(logits: &Tensor) -> Result<Vec<f64>> {
    let bins = logits.dim(1)?;
    let p: Vec<Vec<f32>> = colossal_kernels::Kernels::default()
        .softmax(logits)?
        .to_vec2()?;
    Ok(p.iter()
        .map(|row| {
            100.0
                * row
                    .iter()
                    .enumerate()
                    .map(|(i, &q)| q as f64 * (i as f64 + 0.5) / bins as f64)
                    .sum::<f64>()
        })
        .collect())
}

pub fn heads_specs(s: &mut Specs, e: &EvoformerConfig, h: &HeadsConfig) {
    let p = "aux_heads.plddt";
    s.layer_norm(&format!("{p}.layer_norm"), e.c_s);
    s.linear(
        &format!("{p}.linear_1"),
        e.c_s,
        h.c_hidden_plddt,
        true,
        LinearInit::Relu,
    );
    s.linear(
        &format!("{p}.linear_2"),
        h.c_hidden_plddt,
        h.c_hidden_plddt,
        true,
        LinearInit::Relu,
    );
    s.linear(
        &format!("{p}.linear_3"),
        h.c_hidden_plddt,
        h.plddt_bins,
        true,
        LinearInit::Final,
    );
    s.linear(
        "aux_heads.distogram.linear",
        e.c_z,
        h.distogram_bins,
        true,
        LinearInit::Final,
    );
    s.linear(
        "aux_heads.masked_msa.linear",
        e.c_m,
        h.masked_msa_classes,
        true,
        LinearInit::Final,
    );
}
