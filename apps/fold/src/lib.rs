//! `fold`: AlphaFold-style structure prediction on colossal-rs. So far: protein structures in
//! and out (`pdb`, `mmcif`), sequences and alignments in (`msa`), optimal superposition (`superpose`) and the standard comparison metrics —
//! RMSD, TM-score, lDDT-Cα, GDT-TS/HA (`metrics`).

pub mod error;
pub mod example;
pub mod features;
pub mod loss;
pub mod metrics;
pub mod mmcif;
pub mod model;
pub mod msa;
pub mod pdb;
pub mod predict;
pub mod residues;
pub mod superpose;
pub mod train;

pub use error::{Error, Result};
