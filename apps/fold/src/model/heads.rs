//! Output heads (OpenFold's `aux_heads`): the distogram (pair stream → distance-bin logits,
//! symmetrised) and the masked MSA (MSA stream → residue-class logits).

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

pub fn heads_specs(s: &mut Specs, e: &EvoformerConfig, h: &HeadsConfig) {
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
