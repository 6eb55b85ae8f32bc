//! The model's sizes, named and grouped as OpenFold's `config.model` names them
//! (`input_embedder`, `recycling_embedder`, `evoformer_stack`, …), so an OpenFold config's
//! numbers carry over. Unknown keys are errors.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FoldConfig {
    pub input_embedder: InputEmbedderConfig,
    pub recycling_embedder: RecyclingConfig,
    pub evoformer_stack: EvoformerConfig,
    pub structure_module: super::structure::StructureConfig,
    pub heads: HeadsConfig,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InputEmbedderConfig {
    /// Target feature width: 20 amino acids + unknown + gap... (AlphaFold: 22).
    pub tf_dim: usize,
    /// MSA feature width (AlphaFold: 49 = 23 one-hot + has-deletion + deletion value +
    /// 23 cluster profile + deletion mean).
    pub msa_dim: usize,
    pub c_z: usize,
    pub c_m: usize,
    /// Relative positions clipped to ±relpos_k.
    pub relpos_k: usize,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RecyclingConfig {
    pub c_z: usize,
    pub c_m: usize,
    pub min_bin: f64,
    pub max_bin: f64,
    pub no_bins: usize,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvoformerConfig {
    pub c_m: usize,
    pub c_z: usize,
    pub c_hidden_msa_att: usize,
    pub c_hidden_opm: usize,
    pub c_hidden_mul: usize,
    pub c_hidden_pair_att: usize,
    pub c_s: usize,
    pub no_heads_msa: usize,
    pub no_heads_pair: usize,
    pub no_blocks: usize,
    pub transition_n: usize,
    /// Large negative logit for masked attention keys (OpenFold: 1e9).
    #[serde(default = "inf")]
    pub inf: f64,
    /// The outer product mean's normaliser (OpenFold: 1e-3).
    #[serde(default = "opm_eps")]
    pub opm_eps: f64,
}

fn inf() -> f64 {
    1e9
}

fn opm_eps() -> f64 {
    1e-3
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeadsConfig {
    /// Distogram bins (AlphaFold: 64, from 2.3125 to 21.6875 Å).
    pub distogram_bins: usize,
    /// Masked-MSA classes (AlphaFold: 23).
    pub masked_msa_classes: usize,
    /// pLDDT bins (AlphaFold: 50) and the head's hidden width (128).
    pub plddt_bins: usize,
    pub c_hidden_plddt: usize,
}

impl FoldConfig {
    /// A small model for tests and CPU runs: the full architecture at narrow widths.
    pub fn tiny() -> Self {
        let (c_m, c_z) = (16, 8);
        Self {
            input_embedder: InputEmbedderConfig {
                tf_dim: 22,
                msa_dim: 49,
                c_z,
                c_m,
                relpos_k: 32,
            },
            recycling_embedder: RecyclingConfig {
                c_z,
                c_m,
                min_bin: 3.25,
                max_bin: 20.75,
                no_bins: 15,
            },
            evoformer_stack: EvoformerConfig {
                c_m,
                c_z,
                c_hidden_msa_att: 8,
                c_hidden_opm: 4,
                c_hidden_mul: 8,
                c_hidden_pair_att: 8,
                c_s: 16,
                no_heads_msa: 2,
                no_heads_pair: 2,
                no_blocks: 2,
                transition_n: 2,
                inf: inf(),
                opm_eps: opm_eps(),
            },
            structure_module: super::structure::StructureConfig {
                c_s: 16,
                c_z,
                c_ipa: 8,
                no_heads_ipa: 2,
                no_qk_points: 4,
                no_v_points: 4,
                no_blocks: 4,
                no_transition_layers: 1,
                trans_scale_factor: 10.0,
                c_resnet: 8,
                no_resnet_blocks: 1,
                epsilon: 1e-8,
                inf: 1e5,
            },
            heads: HeadsConfig {
                distogram_bins: 64,
                masked_msa_classes: 23,
                plddt_bins: 50,
                c_hidden_plddt: 16,
            },
        }
    }

    /// One validation pass: the widths that must agree do.
    pub fn validate(&self) -> Result<(), String> {
        let (e, i, r) = (
            &self.evoformer_stack,
            &self.input_embedder,
            &self.recycling_embedder,
        );
        for (what, a, b) in [
            ("input_embedder.c_m", i.c_m, e.c_m),
            ("input_embedder.c_z", i.c_z, e.c_z),
            ("recycling_embedder.c_m", r.c_m, e.c_m),
            ("recycling_embedder.c_z", r.c_z, e.c_z),
            ("structure_module.c_s", self.structure_module.c_s, e.c_s),
            ("structure_module.c_z", self.structure_module.c_z, e.c_z),
        ] {
            if a != b {
                return Err(format!("{what} = {a}, but evoformer_stack has {b}"));
            }
        }
        if e.no_blocks == 0 || e.no_heads_msa == 0 || e.no_heads_pair == 0 {
            return Err("evoformer_stack: no_blocks and the head counts must be positive".into());
        }
        if r.no_bins < 2 || r.max_bin <= r.min_bin {
            return Err("recycling_embedder: needs no_bins ≥ 2 and max_bin > min_bin".into());
        }
        Ok(())
    }
}
