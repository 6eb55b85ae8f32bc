//! The AlphaFold 2 model as OpenFold builds it, module by module (so far: the input embedder, the Evoformer, the backbone structure module, the distogram and
//! masked-MSA heads).

pub mod config;
pub mod dap;
pub mod embedders;
pub mod evoformer;
pub mod family;
pub mod heads;
pub mod primitives;
pub mod recycling;
pub mod rigid;
pub mod specs;
pub mod structure;
pub mod torsion;

pub use config::FoldConfig;
pub use family::{FoldCtx, FoldModel};
