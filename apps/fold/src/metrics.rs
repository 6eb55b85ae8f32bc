//! How close a predicted structure is to the reference, on Cα atoms with a fixed residue
//! correspondence:
//! - RMSD after the optimal superposition (Kabsch);
//! - TM-score (Zhang & Skolnick), normalised by the reference length and maximised over
//!   superpositions as the TM-score program searches them (fragments of L, L/2, … 4 residues
//!   seed superpositions, each refined on the residues within d0_search + 1 Å);
//! - lDDT-Cα (superposition-free): over reference pairs closer than 15 Å, the share of the four
//!   tolerances 0.5, 1, 2, 4 Å their distance keeps, averaged over all pairs;
//! - GDT-TS and GDT-HA at the RMSD superposition (as OpenFold's validation metrics): the mean
//!   over cutoffs {1, 2, 4, 8} Å ({0.5, 1, 2, 4}) of the share of residues within the cutoff.

use serde::Serialize;

use crate::superpose::{dist2, superpose, Vec3};
use crate::{Error, Result};

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Report {
    /// Residues compared (present in both structures).
    pub residues: usize,
    pub rmsd: f64,
    pub tm_score: f64,
    pub lddt_ca: f64,
    pub gdt_ts: f64,
    pub gdt_ha: f64,
}

/// Every metric of `pred` against `reference` (Cα coordinates in corresponding order).
pub fn evaluate(pred: &[Vec3], reference: &[Vec3]) -> Result<Report> {
    if pred.len() != reference.len() {
        return Err(Error::Invalid(format!(
            "{} predicted and {} reference residues: the correspondence must be one to one",
            pred.len(),
            reference.len()
        )));
    }
    if pred.len() < 3 {
        return Err(Error::Invalid(format!(
            "{} residues in common: at least 3 are needed",
            pred.len()
        )));
    }
    let (rigid, rmsd) = superpose(pred, reference);
    let moved: Vec<Vec3> = pred.iter().map(|p| rigid.apply(p)).collect();
    let gdt = |cutoffs: [f64; 4]| {
        let n = reference.len() as f64;
        cutoffs
            .iter()
            .map(|c| {
                let within = moved
                    .iter()
                    .zip(reference)
                    .filter(|(a, b)| dist2(a, b).sqrt() <= *c)
                    .count();
                within as f64 / n
            })
            .sum::<f64>()
            / 4.0
    };
    Ok(Report {
        residues: pred.len(),
        rmsd,
        tm_score: tm_score(pred, reference),
        lddt_ca: lddt(pred, reference, 15.0),
        gdt_ts: gdt([1.0, 2.0, 4.0, 8.0]),
        gdt_ha: gdt([0.5, 1.0, 2.0, 4.0]),
    })
}

/// TM-score's distance scale for a chain of `len` residues (0.5 Å at least).
pub fn tm_d0(len: usize) -> f64 {
    match len > 21 {
        true => (1.24 * ((len - 15) as f64).cbrt() - 1.8).max(0.5),
        false => 0.5,
    }
}

/// The TM-score of `pred` against `reference` at the superposition (searched) that maximises it.
pub fn tm_score(pred: &[Vec3], reference: &[Vec3]) -> f64 {
    let n = reference.len();
    let d0 = tm_d0(n);
    let d0_search = d0.clamp(4.5, 8.0);
    // Score of a superposition, and the residues within `cut` of the reference under it
    // (relaxed by 0.5 Å until there are 3).
    let score = |sel: &[usize], cut: f64| -> (f64, Vec<usize>) {
        let (rigid, _) = superpose(
            &sel.iter().map(|&i| pred[i]).collect::<Vec<_>>(),
            &sel.iter().map(|&i| reference[i]).collect::<Vec<_>>(),
        );
        let d: Vec<f64> = (0..n)
            .map(|i| dist2(&rigid.apply(&pred[i]), &reference[i]))
            .collect();
        let tm = d.iter().map(|di| 1.0 / (1.0 + di / (d0 * d0))).sum::<f64>() / n as f64;
        let mut cut = cut;
        loop {
            let near: Vec<usize> = (0..n).filter(|&i| d[i] < cut * cut).collect();
            if near.len() >= 3 || n <= 3 {
                return (tm, near);
            }
            cut += 0.5;
        }
    };
    let min_frag = n.min(4);
    let mut lengths = Vec::new();
    for k in 0..5 {
        let l = n >> k;
        if l <= min_frag {
            break;
        }
        lengths.push(l);
    }
    lengths.push(min_frag);
    let mut best = 0f64;
    for &len in &lengths {
        let last = n - len;
        let mut start = 0;
        loop {
            let frag: Vec<usize> = (start..start + len).collect();
            let (tm, mut near) = score(&frag, d0_search - 1.0);
            best = best.max(tm);
            for _ in 0..20 {
                let (tm, next) = score(&near, d0_search + 1.0);
                best = best.max(tm);
                let done = next == near;
                near = next;
                if done {
                    break;
                }
            }
            if start >= last {
                break;
            }
            start += 1;
        }
    }
    best
}

/// lDDT on single atoms (Cα): pairs i ≠ j closer than `radius` in the reference, each scored by
/// the share of the tolerances 0.5, 1, 2, 4 Å its distance keeps; the mean over all pairs.
pub fn lddt(pred: &[Vec3], reference: &[Vec3], radius: f64) -> f64 {
    let (kept, pairs) = lddt_sums(pred, reference, radius)
        .into_iter()
        .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
    (LDDT_EPS + kept) / (LDDT_EPS + pairs)
}

/// lDDT of each residue over its own pairs (what the pLDDT head learns).
pub fn lddt_per_residue(pred: &[Vec3], reference: &[Vec3], radius: f64) -> Vec<f64> {
    lddt_sums(pred, reference, radius)
        .into_iter()
        .map(|(kept, pairs)| (LDDT_EPS + kept) / (LDDT_EPS + pairs))
        .collect()
}

const LDDT_EPS: f64 = 1e-10;

/// Per residue i: (Σ_j share kept, number of pairs).
fn lddt_sums(pred: &[Vec3], reference: &[Vec3], radius: f64) -> Vec<(f64, f64)> {
    const EPS: f64 = LDDT_EPS;
    let n = reference.len();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (mut pairs, mut kept) = (0.0, 0.0);
        for j in 0..n {
            if i == j {
                continue;
            }
            let dr = (EPS + dist2(&reference[i], &reference[j])).sqrt();
            if dr >= radius {
                continue;
            }
            let dp = (EPS + dist2(&pred[i], &pred[j])).sqrt();
            let l1 = (dr - dp).abs();
            let share = [0.5, 1.0, 2.0, 4.0].iter().filter(|&&t| l1 < t).count() as f64 / 4.0;
            pairs += 1.0;
            kept += share;
        }
        out.push((kept, pairs));
    }
    out
}
