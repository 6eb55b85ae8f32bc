//! Model inputs from a sequence and its MSA, as AlphaFold's data pipeline makes them (monomer,
//! no templates, no extra MSA stack): `target_feat` (R, 22) — a zero "between segments" column
//! and the residue type one-hot over 20 + unknown; `msa_feat` (S, R, 49) — the (masked) MSA
//! one-hot over 20 + unknown + gap + mask, has-deletion, the squashed deletion count
//! (2/π·atan(d/3)), the cluster profile and deletion mean (the rows not sampled as cluster
//! centres assigned to their nearest centre); residue indices; masks; and for training the
//! BERT-style masked MSA with its targets. Randomness comes from the caller's generator.

use candle_core::{Device, Result, Tensor};
use rand::seq::SliceRandom;
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

/// Features of `msa` (its first row the query) with at most `max_seqs` cluster centres: the
/// query and a random choice of the other rows (AlphaFold's `sample_msa`); the remaining rows
/// join the centre they agree with most on residues (gaps and masks do not count:
/// `nearest_neighbor_clusters`), and each centre's profile and deletion mean average it with its
/// members (`summarize_clusters`).
pub fn make(
    msa: &Msa,
    max_seqs: usize,
    masking: Option<&Masking>,
    rng: &mut impl Rng,
    dev: &Device,
) -> Result<Features> {
    let all: Vec<Vec<u32>> = msa
        .rows
        .iter()
        .map(|row| row.chars().map(msa_class).collect())
        .collect();
    let (n, r) = (all.len(), all[0].len());
    let s = max_seqs.max(1).min(n);
    let mut others: Vec<usize> = (1..n).collect();
    others.shuffle(rng);
    let centres: Vec<usize> = std::iter::once(0)
        .chain(others[..s - 1].iter().copied())
        .collect();
    let extra = &others[s - 1..];
    let classes: Vec<Vec<u32>> = centres.iter().map(|&i| all[i].clone()).collect();
    let aatype: Vec<u32> = classes[0].iter().map(|&c| c.min(20)).collect();
    // Column profiles of the whole alignment, for the profile replacement.
    let mut profile = vec![[0f64; CLASSES]; r];
    for row in &all {
        for (j, &c) in row.iter().enumerate() {
            profile[j][c as usize] += 1.0 / n as f64;
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
    // Cluster members: each extra row goes to the centre sharing most residues with it.
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); s];
    for &e in extra {
        let agree = |c: &Vec<u32>| {
            c.iter()
                .zip(&all[e])
                .filter(|(a, b)| a == b && **a < 21)
                .count()
        };
        let best = (0..s).max_by_key(|&k| (agree(&masked[k]), std::cmp::Reverse(k)));
        members[best.expect("at least the query")].push(e);
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
    let squash = |d: f32| 2.0 / std::f32::consts::PI * (d / 3.0).atan();
    let mut feat = Vec::with_capacity(s * r * 49);
    for (i, &c) in centres.iter().enumerate() {
        let size = (1 + members[i].len()) as f32;
        for j in 0..r {
            let d = msa.deletions[c][j] as f32;
            let oh = &oh_masked[(i * r + j) * CLASSES..(i * r + j + 1) * CLASSES];
            feat.extend_from_slice(oh);
            feat.push(f32::from(d > 0.0));
            feat.push(squash(d));
            let mut prof = oh.to_vec();
            let mut dsum = d;
            for &e in &members[i] {
                prof[all[e][j] as usize] += 1.0;
                dsum += msa.deletions[e][j] as f32;
            }
            feat.extend(prof.iter().map(|p| p / size));
            feat.push(squash(dsum / size));
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn msa(rows: &[&str]) -> Msa {
        Msa {
            names: rows.iter().map(|r| r.to_string()).collect(),
            rows: rows.iter().map(|r| r.to_string()).collect(),
            deletions: rows
                .iter()
                .enumerate()
                .map(|(i, r)| vec![i as u32; r.len()])
                .collect(),
        }
    }

    /// Profile (23 classes) and deletion mean of centre `i`, residue `j`.
    fn cluster(f: &Features, i: usize, j: usize) -> (Vec<f32>, f32) {
        let v: Vec<f32> = f
            .msa_feat
            .get(i)
            .unwrap()
            .get(j)
            .unwrap()
            .to_vec1()
            .unwrap();
        (v[25..48].to_vec(), v[48])
    }

    #[test]
    fn rows_beyond_the_centres_join_their_nearest_cluster() {
        // Query ACDE; row 1 agrees with it on three residues, row 2 on none.
        let m = msa(&["ACDE", "ACDF", "WWWW"]);
        let dev = Device::Cpu;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let f = make(&m, 2, None, &mut rng, &dev).unwrap();
        assert_eq!(f.msa_feat.dims(), [2, 4, 49]);
        // The second centre is row 1 or row 2; the other row joins the query only if it is
        // row 1 (it agrees with the query, row 2 agrees with nobody and goes to the query as
        // the first of equals).
        let (q_prof, q_del) = cluster(&f, 0, 3);
        let e = msa_class('E') as usize;
        assert!((q_prof.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        // Either way the query's cluster has 2 members: E and (F or W) at position 3.
        assert!((q_prof[e] - 0.5).abs() < 1e-6, "{q_prof:?}");
        // Deletion counts 0 (query) and 1 or 2: the mean squashed.
        let squash = |d: f32| 2.0 / std::f32::consts::PI * (d / 3.0).atan();
        assert!((q_del - squash(0.5)).abs() < 1e-6 || (q_del - squash(1.0)).abs() < 1e-6);
        // With room for every row, each is its own cluster.
        let f = make(&m, 8, None, &mut rng, &dev).unwrap();
        for i in 0..3 {
            let (prof, _) = cluster(&f, i, 0);
            assert_eq!(prof.iter().filter(|&&p| p == 1.0).count(), 1);
        }
    }
}
