//! `fold`: protein structure tools on colossal-rs. `fold eval` compares a predicted structure
//! with a reference.

mod bench;

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
    /// Peak memory and time of a forward pass against the residue count: whole, chunked, and
    /// dynamic axial parallelism over 2 and 4 local ranks (JSON).
    Bench(bench::BenchArgs),
    /// Train on chains and their MSAs (`[data] examples`), on any `[parallel]` layout.
    Train(colossal_session::TrainArgs),
    /// Predict a structure from an MSA (`.a3m` / `.sto`; its first row is the sequence) or a
    /// FASTA sequence alone, with a trained checkpoint: a PDB file (pLDDT as B-factors) and a
    /// contact-map PNG beside it.
    Predict {
        /// A checkpoint directory of `fold train`.
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        msa: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// MSA rows used (the query first).
        #[arg(long, default_value_t = 128)]
        max_msa_seqs: usize,
        /// Compute attention, transitions and the outer product mean this many rows at a time
        /// (long chains: less memory, same result).
        #[arg(long)]
        chunk_size: Option<usize>,
        /// Recycling passes before the final one (AlphaFold: 3).
        #[arg(long, default_value_t = 3)]
        recycles: usize,
    },
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

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().cmd {
        Cmd::Bench(a) => bench::run(&a)?,
        Cmd::Train(a) => {
            let cfg: fold::train::FoldTrainConfig = a.load()?;
            let out = cfg.train.out_dir.clone();
            let summary = fold::train::train(cfg, a.resume_dir()?.as_deref(), a.max_steps)?;
            if summary.rank == 0 {
                let (l, r) = (summary.series("loss"), summary.series("ca_rmsd"));
                if let (Some(first), Some(last)) = (l.first(), l.last()) {
                    println!(
                        "train loss: first step {first:.4} -> last step {last:.4} ({} steps)",
                        l.len()
                    );
                }
                if let (Some(first), Some(last)) = (r.first(), r.last()) {
                    println!("Cα RMSD at evaluations: first {first:.3} Å -> last {last:.3} Å");
                }
                if let Some(dir) = &summary.final_dir {
                    println!("checkpoint: {}", dir.display());
                }
                println!(
                    "curves: {} {}",
                    out.join("loss.png").display(),
                    out.join("structure.png").display()
                );
            }
        }
        Cmd::Predict {
            model,
            msa,
            out,
            max_msa_seqs,
            chunk_size,
            recycles,
        } => {
            use colossal_core::models::ModelFamily;
            let (mut m, p) = fold::model::FoldModel::load(
                &model,
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )?;
            m.chunk_size = chunk_size;
            let msa_rows = fold::msa::read(&msa)?;
            let pred = fold::predict::predict(&m, &p, &msa_rows, max_msa_seqs, recycles)?;
            let chain = fold::predict::to_chain(msa_rows.query(), &pred)?;
            match out.extension().is_some_and(|e| e == "cif") {
                true => fold::mmcif::write(&out, &[chain])?,
                false => pdb::write(&out, &[chain])?,
            }
            let png = out.with_extension("contacts.png");
            fold::predict::write_contact_png(
                &png,
                &fold::predict::contact_probabilities(&pred.distogram)?,
                4,
            )?;
            let mean = pred.plddt.iter().sum::<f64>() / pred.plddt.len().max(1) as f64;
            println!(
                "{}: {} residues, mean pLDDT {mean:.1}; contact map {}",
                out.display(),
                pred.plddt.len(),
                png.display()
            );
        }
        Cmd::Eval {
            pred,
            reference,
            chain,
        } => {
            let p = pick(fold::example::read_structure(&pred)?, chain.clone(), &pred)?;
            let r = pick(
                fold::example::read_structure(&reference)?,
                chain,
                &reference,
            )?;
            let (pc, rc) = ca_pairs(&p, &r, &pred)?;
            let report = fold::metrics::evaluate(&pc, &rc)?;
            println!("{}", serde_json::to_string(&report)?);
        }
    }
    Ok(())
}
