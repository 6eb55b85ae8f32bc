//! `fold`: protein structure tools on colossal-rs. `fold eval` compares a predicted structure
//! with a reference.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use fold::pdb::{self, Chain};
use fold::superpose::Vec3;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "fold",
    about = "AlphaFold-style structure prediction on colossal-rs"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Cα RMSD (Kabsch), TM-score, lDDT-Cα, GDT-TS and GDT-HA of a prediction against a
    /// reference (PDB or mmCIF files, full-atom or Cα only; residues matched by number), as JSON.
    Eval {
        #[arg(long)]
        pred: PathBuf,
        #[arg(long = "ref")]
        reference: PathBuf,
        /// The chain to compare (default: each file's first).
        #[arg(long)]
        chain: Option<String>,
    },
}

fn pick(chains: Vec<Chain>, id: Option<String>, path: &Path) -> Result<Chain> {
    match id {
        None => Ok(chains.into_iter().next().expect("read() gives a chain")),
        Some(id) => chains
            .into_iter()
            .find(|c| c.id == id)
            .with_context(|| format!("{}: no chain {id}", path.display())),
    }
}

/// Cα pairs of residues matched by number: every reference residue with a Cα must be in the
/// prediction, as the same amino acid.
fn ca_pairs(pred: &Chain, reference: &Chain, pred_path: &Path) -> Result<(Vec<Vec3>, Vec<Vec3>)> {
    let (mut p, mut r) = (Vec::new(), Vec::new());
    for res in &reference.residues {
        let Some(ca) = res.atom("CA") else { continue };
        let key = (res.number, res.insertion);
        let Some(other) = pred
            .residues
            .iter()
            .find(|o| (o.number, o.insertion) == key)
        else {
            bail!(
                "{}: no residue {}{} (the reference has {})",
                pred_path.display(),
                res.number,
                res.insertion.to_string().trim(),
                res.name
            );
        };
        if other.name != res.name {
            bail!(
                "{}: residue {} is {}, the reference's is {}",
                pred_path.display(),
                res.number,
                other.name,
                res.name
            );
        }
        let pca = other.atom("CA").with_context(|| {
            format!("{}: residue {} has no CA", pred_path.display(), res.number)
        })?;
        p.push(pca.xyz);
        r.push(ca.xyz);
    }
    Ok((p, r))
}

/// A PDB or mmCIF file (by extension; `.gz` too).
fn read_structure(path: &Path) -> Result<Vec<Chain>> {
    let name = path.to_string_lossy();
    let name = name.trim_end_matches(".gz");
    Ok(match name.ends_with(".cif") {
        true => fold::mmcif::read(path)?,
        false => pdb::read(path)?,
    })
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Eval {
            pred,
            reference,
            chain,
        } => {
            let p = pick(read_structure(&pred)?, chain.clone(), &pred)?;
            let r = pick(read_structure(&reference)?, chain, &reference)?;
            let (pc, rc) = ca_pairs(&p, &r, &pred)?;
            let report = fold::metrics::evaluate(&pc, &rc)?;
            println!("{}", serde_json::to_string(&report)?);
        }
    }
    Ok(())
}
