//! `fold predict`: a trained model's structure for a sequence and its MSA, written as a PDB file
//! (N, Cα, C of each residue, pLDDT in the B-factor column) with a PNG of the predicted contact
//! map beside it (P(Cβ distance < 8 Å) from the distogram, white = certain contact).

use std::path::Path;

use candle_core::{Device, Tensor};
use colossal_core::params::Params;
use rand::SeedableRng;

use crate::model::{FoldCtx, FoldModel};
use crate::msa::Msa;
use crate::pdb::{Atom, Chain, Residue};
use crate::superpose::Vec3;
use crate::{residues, Error, Result};

pub struct Prediction {
    /// N, Cα, C, O of each residue.
    pub backbone: Vec<[Vec3; 4]>,
    /// Per residue, 0–100.
    pub plddt: Vec<f64>,
    /// Distogram logits (R, R, bins).
    pub distogram: Tensor,
}

/// The model on `msa` (its first `max_seqs` rows, no masking) after `recycles` recycling
/// passes.
pub fn predict(
    model: &FoldModel,
    p: &Params,
    msa: &Msa,
    max_seqs: usize,
    recycles: usize,
) -> colossal_core::Result<Prediction> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let f = crate::features::make(msa, max_seqs, None, &mut rng, &Device::Cpu)?;
    // Inference: frozen weights, no gradient bookkeeping.
    let mut p = p.clone();
    p.freeze_all();
    let out = model.forward_recycled(&p, &FoldCtx::of(&f), recycles)?;
    let bb: Vec<Vec<Vec<f32>>> = out
        .get("backbone")?
        .to_dtype(candle_core::DType::F32)?
        .to_vec3()?;
    let backbone = bb
        .iter()
        .map(|r| std::array::from_fn(|a| [r[a][0] as f64, r[a][1] as f64, r[a][2] as f64]))
        .collect();
    Ok(Prediction {
        backbone,
        plddt: crate::model::heads::plddt_values(out.get("plddt")?)?,
        distogram: out.get("distogram")?.clone(),
    })
}

/// The prediction as a chain `A` of `sequence`, numbered from 1.
pub fn to_chain(sequence: &str, pred: &Prediction) -> Result<Chain> {
    let residues = sequence
        .chars()
        .zip(&pred.backbone)
        .zip(&pred.plddt)
        .enumerate()
        .map(|(i, ((c, atoms), &b))| {
            let name = residues::three_letter(c).unwrap_or("UNK");
            Residue {
                name: name.into(),
                number: i as i32 + 1,
                insertion: ' ',
                atoms: ["N", "CA", "C", "O"]
                    .iter()
                    .zip(atoms)
                    .map(|(n, xyz)| Atom {
                        name: n.to_string(),
                        xyz: *xyz,
                        b_factor: b,
                    })
                    .collect(),
            }
        })
        .collect();
    Ok(Chain {
        id: "A".into(),
        residues,
    })
}

/// P(distance < 8 Å) per pair from distogram logits (the bins below 8 Å).
pub fn contact_probabilities(distogram: &Tensor) -> Result<Vec<Vec<f32>>> {
    let bins = distogram.dim(2)?;
    let p = colossal_kernels::Kernels::default().softmax(&distogram.contiguous()?)?;
    let p: Vec<Vec<Vec<f32>>> = p.to_vec3()?;
    let below = crate::loss::distogram_edges(bins)
        .iter()
        .filter(|&&e| e <= 8.0)
        .count();
    Ok(p.iter()
        .map(|row| row.iter().map(|q| q[..below.max(1)].iter().sum()).collect())
        .collect())
}

/// Writes the contact map as a grayscale PNG, `scale` pixels per residue.
pub fn write_contact_png(path: &Path, probs: &[Vec<f32>], scale: u32) -> Result<()> {
    let r = probs.len() as u32;
    let img = image::GrayImage::from_fn(r * scale, r * scale, |x, y| {
        let v = probs[(y / scale) as usize][(x / scale) as usize];
        image::Luma([(v.clamp(0.0, 1.0) * 255.0).round() as u8])
    });
    let tmp = path.with_extension("png.tmp");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| Error::file(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::file(path, e))
}
