//! The model as blocks for the engine: the input embedder, one block per Evoformer block, and
//! the heads (the structure module, distogram and masked MSA). Between blocks travel the two streams, `m` (MSA) and `z` (pair), so ZeRO,
//! offload, checkpointing, data parallelism and pipeline stages apply as to any model; the
//! features and masks of the example are the per-batch context.

use std::path::Path;

use candle_core::{DType, Tensor};
use colossal_core::exec::{Acts, BlockModel};
use colossal_core::models::{ModelFamily, ParamSpec};
use colossal_core::parallel::plan::TpPlan;
use colossal_core::parallel::sequence::SpMode as SeqSplit;
use colossal_core::params::Params;
use colossal_kernels::Kernels;

use super::config::FoldConfig;
use super::dap::{self, Dap};
use super::embedders::{input_embedder, input_embedder_specs};
use super::evoformer::{self, Masks};
use super::heads::{self, heads_specs};
use super::primitives::Ctx;
use super::recycling::{self, Recycled};
use super::specs::Specs;
use super::structure::{structure_module, structure_specs};

#[derive(Clone, Debug)]
pub struct FoldModel {
    pub cfg: FoldConfig,
    pub kernels: Kernels,
    /// Chunked computation (see `primitives::Ctx::chunk`); `None`: all rows at once.
    pub chunk_size: Option<usize>,
    /// Dynamic axial parallelism (`parallel.sp_mode = "dap"`): between blocks each rank holds
    /// its share of the MSA's sequences and of the pair rows.
    pub dap: Option<Dap>,
}

/// One example's inputs (see `features`).
#[derive(Clone, Debug)]
pub struct FoldCtx {
    pub target_feat: Tensor,
    pub msa_feat: Tensor,
    pub residue_index: Tensor,
    pub msa_mask: Tensor,
    pub pair_mask: Tensor,
    /// Residue types (`residues::STANDARD` order; 20 unknown) and which residues are real (R).
    pub aatype: Vec<u32>,
    pub seq_mask: Tensor,
    /// The previous pass's outputs (recycling); `None`: the first pass.
    pub prev: Option<Recycled>,
}

impl FoldCtx {
    pub fn of(f: &crate::features::Features) -> Self {
        Self {
            target_feat: f.target_feat.clone(),
            msa_feat: f.msa_feat.clone(),
            residue_index: f.residue_index.clone(),
            msa_mask: f.msa_mask.clone(),
            pair_mask: f.pair_mask.clone(),
            aatype: f.aatype.clone(),
            seq_mask: f.seq_mask.clone(),
            prev: None,
        }
    }
}

impl FoldModel {
    pub fn new(cfg: FoldConfig) -> Result<Self, String> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            kernels: Kernels::default(),
            chunk_size: None,
            dap: None,
        })
    }

    fn prefixes(&self, block: usize) -> Vec<String> {
        let n = self.cfg.evoformer_stack.no_blocks;
        match block {
            0 => vec!["input_embedder.".into(), "recycling_embedder.".into()],
            b if b <= n => vec![format!("evoformer.blocks.{}.", b - 1)],
            _ => vec![
                "evoformer.linear.".into(),
                "structure_module.".into(),
                "aux_heads.".into(),
            ],
        }
    }

    /// The outputs for one example after `recycles` extra passes (the earlier passes without
    /// gradient, each feeding the next; AlphaFold infers with 3).
    pub fn forward_recycled(
        &self,
        p: &Params,
        ctx: &FoldCtx,
        recycles: usize,
    ) -> colossal_core::Result<Acts> {
        let mut ctx = ctx.clone();
        self.recycle_into(p, &mut ctx, recycles)?;
        self.forward(p, &ctx)
    }

    /// Runs `passes` passes on `ctx` without gradient (frozen copies of the weights), leaving
    /// the last one's outputs in `ctx.prev` for the pass that follows.
    pub fn recycle_into(
        &self,
        p: &Params,
        ctx: &mut FoldCtx,
        passes: usize,
    ) -> colossal_core::Result<()> {
        if passes == 0 {
            return Ok(());
        }
        let mut frozen = p.clone();
        frozen.freeze_all();
        for _ in 0..passes {
            let out = self.forward(&frozen, ctx)?;
            ctx.prev = Some(self.recycled(&out, &ctx.aatype)?);
        }
        Ok(())
    }

    /// What a pass's outputs hand the next pass.
    pub fn recycled(&self, out: &Acts, aatype: &[u32]) -> colossal_core::Result<Recycled> {
        Ok(Recycled {
            m1: out.get("msa_first")?.detach(),
            z: out.get("pair")?.detach(),
            x: recycling::pseudo_beta(out.get("backbone")?, aatype)?,
        })
    }

    /// Every block in order: the outputs for one example (see the heads block).
    pub fn forward(&self, p: &Params, ctx: &FoldCtx) -> colossal_core::Result<Acts> {
        let mut acts = Acts::new();
        for b in 0..self.num_blocks() {
            acts = self.block_forward(b, p, &acts, ctx)?;
        }
        Ok(acts)
    }
}

impl BlockModel for FoldModel {
    type Ctx = FoldCtx;

    fn num_blocks(&self) -> usize {
        self.cfg.evoformer_stack.no_blocks + 2
    }

    fn block_param_names(&self, block: usize) -> Vec<String> {
        let prefixes = self.prefixes(block);
        self.param_specs()
            .into_iter()
            .map(|s| s.name)
            .filter(|n| prefixes.iter().any(|p| n.starts_with(p.as_str())))
            .collect()
    }

    fn block_forward(
        &self,
        block: usize,
        p: &Params,
        x: &Acts,
        ctx: &FoldCtx,
    ) -> colossal_core::Result<Acts> {
        let c = Ctx {
            p,
            k: self.kernels,
            chunk: self.chunk_size,
        };
        let n = self.cfg.evoformer_stack.no_blocks;
        // The compute dtype: the weights' (trainable, or frozen for inference).
        let dtype = p
            .iter()
            .map(|(_, v)| v.dtype())
            .chain(p.frozen().map(|(_, t)| t.dtype()))
            .next()
            .unwrap_or(DType::F32);
        Ok(match block {
            0 => {
                let (s, r) = (ctx.msa_feat.dim(0)?, ctx.msa_feat.dim(1)?);
                dap::check(self.dap.as_ref(), s, r)?;
                let tf = ctx.target_feat.to_dtype(dtype)?;
                let msa = ctx.msa_feat.to_dtype(dtype)?;
                let (m, z) =
                    input_embedder(&c, &self.cfg.input_embedder, &tf, &msa, &ctx.residue_index)?;
                let rc = &self.cfg.recycling_embedder;
                let (m1, dz) = recycling::embed(&c, rc, ctx.prev.as_ref(), r, &m)?;
                let m = Tensor::cat(
                    &[(m.get(0)? + m1)?.unsqueeze(0)?, m.narrow(0, 1, s - 1)?],
                    0,
                )?;
                let z = (z + dz)?;
                // Every rank embeds the whole example and keeps its share.
                let d = self.dap.as_ref();
                Acts::one("m", dap::local(d, &m, 0)?).with("z", dap::local(d, &z, 0)?)
            }
            b if b <= n => {
                let masks = Masks {
                    msa: &ctx.msa_mask.to_dtype(dtype)?,
                    pair: &ctx.pair_mask.to_dtype(dtype)?,
                };
                let prefix = format!("evoformer.blocks.{}", b - 1);
                let (m, z) = evoformer::block(
                    &c,
                    &prefix,
                    &self.cfg.evoformer_stack,
                    x.get("m")?,
                    x.get("z")?,
                    &masks,
                    self.dap.as_ref(),
                )?;
                Acts::one("m", m).with("z", z)
            }
            // The heads: the single representation (first MSA row, projected) through the
            // structure module; distogram and masked MSA from the streams. Under DAP every rank
            // gathers the streams and computes the same outputs (the task divides the loss by
            // the group size, so the summed gradients are the whole ones).
            _ => {
                let d = self.dap.as_ref();
                let (m, z) = (
                    &dap::gather(d, x.get("m")?, 0)?,
                    &dap::gather(d, x.get("z")?, 0)?,
                );
                let single = c.linear("evoformer.linear", &m.get(0)?)?;
                let mask = ctx.seq_mask.to_dtype(dtype)?;
                let sm = structure_module(
                    &c,
                    &self.cfg.structure_module,
                    &single,
                    z,
                    &ctx.aatype,
                    &mask,
                )?;
                Acts::one("distogram", heads::distogram(&c, z)?)
                    .with("masked_msa", heads::masked_msa(&c, m)?)
                    .with("frames_rot", sm.rots)
                    .with("frames_trans", sm.trans)
                    .with("plddt", heads::plddt(&c, &sm.single)?)
                    .with("backbone", sm.backbone)
                    .with("angles_raw", sm.unnormalized_angles)
                    .with("msa_first", m.get(0)?)
                    .with("pair", z.clone())
            }
        })
    }
}

impl ModelFamily for FoldModel {
    fn family(&self) -> &'static str {
        "alphafold"
    }

    fn param_specs(&self) -> Vec<ParamSpec> {
        let mut s = Specs::default();
        input_embedder_specs(&mut s, &self.cfg.input_embedder);
        recycling::specs(&mut s, &self.cfg.recycling_embedder);
        for i in 0..self.cfg.evoformer_stack.no_blocks {
            evoformer::block_specs(
                &mut s,
                &format!("evoformer.blocks.{i}"),
                &self.cfg.evoformer_stack,
            );
        }
        let e = &self.cfg.evoformer_stack;
        s.linear(
            "evoformer.linear",
            e.c_m,
            e.c_s,
            true,
            super::specs::LinearInit::Default,
        );
        structure_specs(&mut s, &self.cfg.structure_module);
        heads_specs(&mut s, e, &self.cfg.heads);
        s.0
    }

    fn tied_params(&self) -> Vec<String> {
        Vec::new()
    }

    fn tp_plan(&self) -> TpPlan {
        TpPlan::new(&[])
    }

    /// Dynamic axial parallelism over `group` (`parallel.sp_mode = "dap"`).
    fn sequence_parallel(
        &self,
        group: colossal_core::dist::Group,
        mode: SeqSplit,
    ) -> colossal_core::Result<Self> {
        match mode {
            SeqSplit::Axial => Ok(Self {
                dap: Some(Dap { group }),
                ..self.clone()
            }),
            _ => Err(self.unsupported("parallel.sp_mode ulysses or ring (use \"dap\")")),
        }
    }

    fn read_config(dir: &Path) -> colossal_core::Result<Self> {
        let path = dir.join(CONFIG);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| colossal_core::Error::file(&path, e.to_string()))?;
        let cfg: FoldConfig = serde_json::from_str(&text)
            .map_err(|e| colossal_core::Error::file(&path, e.to_string()))?;
        Self::new(cfg).map_err(|e| colossal_core::Error::file(&path, e))
    }

    fn write_config(&self, dir: &Path, _dtype: DType) -> colossal_core::Result<()> {
        let text = serde_json::to_string_pretty(&self.cfg)
            .map_err(|e| colossal_core::Error::Config(e.to_string()))?;
        colossal_core::checkpoint::atomic::write_file(&dir.join(CONFIG), text.as_bytes())
    }
}

/// The model's config inside a checkpoint.
const CONFIG: &str = "fold_config.json";
