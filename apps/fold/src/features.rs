//! Model inputs from a sequence and its MSA, as AlphaFold's data pipeline makes them (monomer,
//! no templates, no extra MSA stack): `target_feat` (R, 22) — a zero "between segments" column
//! and the residue type one-hot over 20 + unknown; `msa_feat` (S, R, 49) — the (masked) MSA
//! one-hot over 20 + unknown + gap + mask, has-deletion, the squashed deletion count
//! (2/π·atan(d/3)), the cluster profile and deletion mean (each sequence is its own cluster
//! here, so they are its own one-hot and deletion value); residue indices; masks; and for
//! training the BERT-style masked MSA with its targets. Randomness comes from the caller's
//! generator.

use candle_core::{Device, Result, Tensor};
use rand::Rng;

use crate::msa::Msa;

/// AlphaFold's MSA alphabet: 20 amino acids in `residues::STANDARD` order, X, gap; 22 is the
/// mask token.
pub fn msa_class(c: char) -> u32 {
    match c {
        '-' => 21,
        c => crate::residues::STANDARD
            .iter()
            .position(|(_, o)| *o == c)
            .map_or(20, |i| i as u32),
    }
}

const CLASSES: usize = 23;
const MASK_TOKEN: u32 = 22;

/// The inputs of one example.
pub struct Features {
    pub target_feat: Tensor,
    pub msa_feat: Tensor,
    pub residue_index: Tensor,
    /// (S, R) and (R, R): which entries are real.
    pub msa_mask: Tensor,
    pub pair_mask: Tensor,
    /// Masked-MSA targets: the true classes (S, R) as one-hot (S, R, 23), and where the model
    /// must predict them (S, R).
    pub true_msa: Tensor,
    pub bert_mask: Tensor,
    pub aatype: Vec<u32>,
    /// (R): which residues are real.
    pub seq_mask: Tensor,
}

/// BERT-style masking (AlphaFold's `make_masked_msa`): each entry is picked with probability
/// `fraction`; a picked entry becomes the mask token (70%), a uniform amino acid (10%), a draw
/// from its column's profile (10%) or stays (10%).
pub struct Masking {
    pub fraction: f64,
}

/// Features of `msa` (its first row the query), keeping at most `max_seqs` rows.
pub fn make(
    msa: &Msa,
    max_seqs: usize,
    masking: Option<&Masking>,
    rng: &mut impl Rng,
    dev: &Device,
) -> Result<Features> {
    let rows: Vec<&str> = msa
        .rows
        .iter()
        .take(max_seqs.max(1))
        .map(String::as_str)
        .collect();
    let (s, r) = (rows.len(), rows[0].len());
    let classes: Vec<Vec<u32>> = rows
        .iter()
        .map(|row| row.chars().map(msa_class).collect())
        .collect();
    let aatype: Vec<u32> = classes[0].iter().map(|&c| c.min(20)).collect();
    // Column profiles for the profile replacement.
    let mut profile = vec![[0f64; CLASSES]; r];
    for row in &classes {
        for (j, &c) in row.iter().enumerate() {
            profile[j][c as usize] += 1.0 / s as f64;
        }
    }
    let mut masked = classes.clone();
    let mut bert = vec![0f32; s * r];
    if let Some(m) = masking {
        for i in 0..s {
            for j in 0..r {
                if !rng.random_bool(m.fraction) {
                    continue;
                }
                bert[i * r + j] = 1.0;
                let u: f64 = rng.random();
                masked[i][j] = if u < 0.7 {
                    MASK_TOKEN
                } else if u < 0.8 {
                    rng.random_range(0..20)
                } else if u < 0.9 {
                    let mut t: f64 = rng.random();
                    let mut pick = 0;
                    for (k, p) in profile[j].iter().enumerate() {
                        t -= p;
                        pick = k;
                        if t < 0.0 {
                            break;
                        }
                    }
                    pick as u32
                } else {
                    masked[i][j]
                };
            }
        }
    }
    let one_hot = |rows: &[Vec<u32>]| -> Vec<f32> {
        let mut v = vec![0f32; s * r * CLASSES];
        for (i, row) in rows.iter().enumerate() {
            for (j, &c) in row.iter().enumerate() {
                v[(i * r + j) * CLASSES + c as usize] = 1.0;
            }
        }
        v
    };
    let (oh_masked, oh_true) = (one_hot(&masked), one_hot(&classes));
    let mut feat = Vec::with_capacity(s * r * 49);
    for i in 0..s {
        for j in 0..r {
            let d = msa.deletions[i][j] as f32;
            let value = 2.0 / std::f32::consts::PI * (d / 3.0).atan();
            let oh = &oh_masked[(i * r + j) * CLASSES..(i * r + j + 1) * CLASSES];
            feat.extend_from_slice(oh);
            feat.push(f32::from(d > 0.0));
            feat.push(value);
            feat.extend_from_slice(&oh_true[(i * r + j) * CLASSES..(i * r + j + 1) * CLASSES]);
            feat.push(value);
        }
    }
    let mut tf = vec![0f32; r * 22];
    for (j, &a) in aatype.iter().enumerate() {
        tf[j * 22 + 1 + a as usize] = 1.0;
    }
    Ok(Features {
        target_feat: Tensor::from_vec(tf, (r, 22), dev)?,
        msa_feat: Tensor::from_vec(feat, (s, r, 49), dev)?,
        residue_index: Tensor::from_vec((0..r as u32).collect::<Vec<_>>(), r, dev)?,
        msa_mask: Tensor::ones((s, r), candle_core::DType::F32, dev)?,
        pair_mask: Tensor::ones((r, r), candle_core::DType::F32, dev)?,
        true_msa: Tensor::from_vec(oh_true, (s, r, CLASSES), dev)?,
        bert_mask: Tensor::from_vec(bert, (s, r), dev)?,
        aatype,
        seq_mask: Tensor::ones(r, candle_core::DType::F32, dev)?,
    })
}
