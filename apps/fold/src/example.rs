//! A training example — a chain's structure and its MSA — and what one training step needs of
//! it: freshly masked features, and AlphaFold's loss as OpenFold weighs it (backbone FAPE,
//! distogram, masked MSA, pLDDT).

use std::path::Path;

use candle_core::{Device, Tensor};
use colossal_core::exec::{Acts, LossFn};
use colossal_core::parallel::pipeline_run::MicroBatch;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::features::{self, Masking};
use crate::model::{FoldCtx, FoldModel};
use crate::msa::Msa;
use crate::pdb::Chain;
use crate::superpose::Vec3;
use crate::{Error, Result};

/// Loss weights (OpenFold's `loss.*.weight`; FAPE here is the backbone term alone).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LossWeights {
    #[serde(default = "one")]
    pub fape: f64,
    #[serde(default = "distogram")]
    pub distogram: f64,
    #[serde(default = "masked_msa")]
    pub masked_msa: f64,
    #[serde(default = "plddt")]
    pub plddt: f64,
    /// FAPE of N, Cα, C, O from the final frames (AlphaFold's all-atom FAPE on the backbone
    /// atoms: it trains ψ, which places O) and the torsion vectors' norm loss.
    #[serde(default = "atom_fape")]
    pub atom_fape: f64,
    #[serde(default = "angle_norm")]
    pub angle_norm: f64,
    /// Share of FAPE computed with distances clamped at 10 Å (OpenFold: 0.9).
    #[serde(default = "clamped")]
    pub fape_clamped_fraction: f64,
}

fn one() -> f64 {
    1.0
}
fn distogram() -> f64 {
    0.3
}
fn masked_msa() -> f64 {
    2.0
}
fn atom_fape() -> f64 {
    0.5
}
fn angle_norm() -> f64 {
    0.01
}
fn plddt() -> f64 {
    0.01
}
fn clamped() -> f64 {
    0.9
}

impl Default for LossWeights {
    fn default() -> Self {
        Self {
            fape: one(),
            distogram: distogram(),
            masked_msa: masked_msa(),
            plddt: plddt(),
            atom_fape: atom_fape(),
            angle_norm: angle_norm(),
            fape_clamped_fraction: clamped(),
        }
    }
}

/// How an example becomes a training step: MSA depth, BERT masking, loss weights.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// At most this many MSA rows (the query first).
    #[serde(default = "max_msa_seqs")]
    pub max_msa_seqs: usize,
    /// Share of MSA entries masked for the masked-MSA loss (AlphaFold: 0.15; 0: off).
    #[serde(default = "masked_fraction")]
    pub masked_msa_fraction: f64,
    #[serde(default)]
    pub loss: LossWeights,
}

fn max_msa_seqs() -> usize {
    128
}
fn masked_fraction() -> f64 {
    0.15
}

impl Default for Recipe {
    fn default() -> Self {
        Self {
            max_msa_seqs: max_msa_seqs(),
            masked_msa_fraction: masked_fraction(),
            loss: LossWeights::default(),
        }
    }
}

#[derive(Clone)]
pub struct Example {
    pub chain: Chain,
    pub msa: Msa,
    pub n: Vec<Vec3>,
    pub ca: Vec<Vec3>,
    pub c: Vec<Vec3>,
    pub o: Vec<Vec3>,
    pub pseudo_beta: Vec<Vec3>,
}

/// Reads a PDB or mmCIF file (by extension; `.gz` too).
pub fn read_structure(path: &Path) -> Result<Vec<Chain>> {
    let name = path.to_string_lossy();
    match name.trim_end_matches(".gz").ends_with(".cif") {
        true => crate::mmcif::read(path),
        false => crate::pdb::read(path),
    }
}

impl Example {
    /// Chain `chain` of `structure` with the MSA at `msa` (its query must be the chain's
    /// modelled sequence).
    pub fn load(structure: &Path, chain: &str, msa: &Path) -> Result<Self> {
        let chain = read_structure(structure)?
            .into_iter()
            .find(|c| c.id == chain)
            .ok_or_else(|| Error::file(structure, format!("no chain {chain}")))?;
        let msa = crate::msa::read(msa)?;
        let seq = chain.sequence();
        if msa.query() != seq {
            return Err(Error::file(
                structure,
                format!(
                    "chain {}'s modelled sequence {seq} is not the MSA's query {}",
                    chain.id,
                    msa.query()
                ),
            ));
        }
        let at = |name: &str| -> Result<Vec<Vec3>> {
            chain
                .residues
                .iter()
                .map(|r| {
                    r.atom(name).map(|a| a.xyz).ok_or_else(|| {
                        Error::file(
                            structure,
                            format!("residue {} {} has no {name}", r.number, r.name),
                        )
                    })
                })
                .collect()
        };
        let (n, ca, c, o) = (at("N")?, at("CA")?, at("C")?, at("O")?);
        let pseudo_beta = chain
            .residues
            .iter()
            .zip(&ca)
            .map(|(r, ca)| r.atom("CB").map_or(*ca, |a| a.xyz))
            .collect();
        Ok(Self {
            chain,
            msa,
            n,
            ca,
            c,
            o,
            pseudo_beta,
        })
    }

    /// Residues `start..start + len` (AlphaFold's cropping, contiguous): the structure and every
    /// MSA row cut alike.
    pub fn crop(&self, start: usize, len: usize) -> Result<Self> {
        let r = self.ca.len();
        if len == 0 || start + len > r {
            return Err(Error::Invalid(format!(
                "crop {start}..{} of {r} residues",
                start + len
            )));
        }
        let cut = |v: &[Vec3]| v[start..start + len].to_vec();
        let msa = Msa {
            names: self.msa.names.clone(),
            rows: self
                .msa
                .rows
                .iter()
                .map(|row| row[start..start + len].to_string())
                .collect(),
            deletions: self
                .msa
                .deletions
                .iter()
                .map(|d| d[start..start + len].to_vec())
                .collect(),
        };
        let mut chain = self.chain.clone();
        chain.residues = chain.residues[start..start + len].to_vec();
        Ok(Self {
            chain,
            msa,
            n: cut(&self.n),
            ca: cut(&self.ca),
            c: cut(&self.c),
            o: cut(&self.o),
            pseudo_beta: cut(&self.pseudo_beta),
        })
    }

    /// The features (masked with `seed`) and the weighted loss, as its share of `batch`.
    pub fn micro_batch(
        &self,
        model: &FoldModel,
        recipe: &Recipe,
        seed: u64,
        batch: usize,
        dev: &Device,
    ) -> Result<MicroBatch<'static, FoldCtx>> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let masking = Masking {
            fraction: recipe.masked_msa_fraction,
        };
        let masking = (masking.fraction > 0.0).then_some(&masking);
        let f = features::make(&self.msa, recipe.max_msa_seqs, masking, &mut rng, dev)?;
        let targets =
            crate::loss::distogram_targets(&self.pseudo_beta, model.cfg.heads.distogram_bins, dev)?;
        let mask = f.seq_mask.clone();
        let (true_msa, bert) = (f.true_msa.clone(), f.bert_mask.clone());
        let (rots, trans) = crate::loss::true_frames(&self.n, &self.ca, &self.c, dev)?;
        let (w, true_ca) = (recipe.loss.clone(), self.ca.clone());
        let atoms: Vec<f32> = (0..self.ca.len())
            .flat_map(|i| [self.n[i], self.ca[i], self.c[i], self.o[i]])
            .flatten()
            .map(|v| v as f32)
            .collect();
        let true_atoms = Tensor::from_vec(atoms, (self.ca.len() * 4, 3), dev)?;
        let loss_fn: Box<LossFn<'static>> = Box::new(move |out: &Acts| {
            use crate::loss;
            let fape = loss::backbone_fape(
                out.get("frames_rot")?,
                out.get("frames_trans")?,
                &rots,
                &trans,
                &mask,
                w.fape_clamped_fraction,
            )?;
            let d = loss::distogram_loss(out.get("distogram")?, &targets, &mask)?;
            let m = loss::masked_msa_loss(out.get("masked_msa")?, &true_msa, &bert)?;
            let pred_ca = ca_of(out.get("backbone")?)?;
            let p = loss::plddt_loss(out.get("plddt")?, &pred_ca, &true_ca, &mask)?;
            let (fr, ft) = (out.get("frames_rot")?, out.get("frames_trans")?);
            let last = fr.dim(0)? - 1;
            let bb = out.get("backbone")?;
            let pred_atoms = bb.reshape((bb.dim(0)? * 4, 3))?;
            let (lr, lt) = (fr.get(last)?, ft.get(last)?);
            let af = loss::atom_fape(&lr, &lt, &pred_atoms, &rots, &trans, &true_atoms)?;
            let an = loss::angle_norm_loss(out.get("angles_raw")?)?;
            let total = ((((fape * w.fape)? + (d * w.distogram)?)? + (m * w.masked_msa)?)?
                + (p * w.plddt)?)?;
            let total = ((total + (af * w.atom_fape)?)? + (an * w.angle_norm)?)?;
            Ok((total / batch as f64)?)
        });
        Ok(MicroBatch {
            inputs: Acts::new(),
            ctx: FoldCtx::of(&f),
            loss_fn,
        })
    }
}

/// The Cα of a backbone (R, 3, 3) output.
pub fn ca_of(backbone: &Tensor) -> candle_core::Result<Vec<Vec3>> {
    let v: Vec<Vec<Vec<f32>>> = backbone.to_dtype(candle_core::DType::F32)?.to_vec3()?;
    Ok(v.iter()
        .map(|r| [r[1][0] as f64, r[1][1] as f64, r[1][2] as f64])
        .collect())
}
