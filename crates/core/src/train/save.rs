//! Checkpoints from any layout: whole (gathered to rank 0) or distributed (each rank's slices).

use std::path::PathBuf;

use candle_core::DType;

use super::checkpoint::{self};
use super::engine::Engine;
use super::expert_parallel::EpRank;
use crate::dist::Communicator;
use crate::models::ModelFamily;
use crate::optim::AdamW;
use crate::parallel::Zero3;
use crate::params::Params;
use crate::{Error, Result};

impl<M: ModelFamily> Engine<M> {
    /// All parameters (gathered from every rank under ZeRO-3 or tensor parallelism, so then
    /// every rank must call it).
    /// Under pipeline parallelism only the first stage's ranks get them all.
    pub fn full_params(&self) -> Result<Params> {
        if self.pp.is_some() {
            return Ok(self.gather_model()?.map(|(p, _)| p).unwrap_or_default());
        }
        self.stage_params()
    }

    /// This pipeline stage's whole weights: gathered over ZeRO-3 shards, then over
    /// tensor-parallel slices (collectives over those groups).
    pub(super) fn stage_params(&self) -> Result<Params> {
        let mine = match (&self.zero3, self.comm.as_deref()) {
            (Some(z), Some(c)) => self.gather_zero3(z, c)?.0,
            _ => self.params.dense()?,
        };
        let mine = match &self.tp {
            Some(t) => t.gather(&mine)?,
            None => mine,
        };
        match &self.ep {
            Some(e) => e.gather(&mine),
            None => Ok(mine),
        }
    }

    /// Whole weights and Adam moments from tensor-parallel slices, pipeline stages and ZeRO
    /// shards (a collective); `None` on ranks that do not end up holding them all.
    fn gather_model(&self) -> Result<Option<(Params, AdamW)>> {
        let comm = self.comm.as_deref();
        // This rank's (tensor-parallel slices of the) weights and moments, whole over ZeRO.
        let (mine, opt) = match (&self.zero3, &self.zero, comm) {
            (Some(z), _, Some(c)) => self.gather_zero3(z, c)?,
            (_, Some(z), Some(c)) => (self.params.dense()?, z.gather_full(c)?),
            _ => (self.params.dense()?, self.opt_copy()),
        };
        // Under ZeRO the experts' moments are sharded over their own group.
        let mut opt = opt;
        if let Some((z, c)) = self.ep.as_ref().and_then(|e| e.zero()) {
            let experts = z.gather_full(c)?;
            opt.m.extend(experts.m);
            opt.v.extend(experts.v);
        }
        let (params, opt) = match &self.tp {
            Some(t) => (t.gather(&mine)?, t.gather_moments(&opt, &mine)?),
            None => (mine, opt),
        };
        let (params, opt) = match &self.ep {
            Some(e) => (e.gather(&params)?, e.gather_moments(&opt, &params)?),
            None => (params, opt),
        };
        match &self.pp {
            Some(p) => p.gather(&self.model, &params, &opt, self.ep.as_ref()),
            None => Ok(Some((params, opt))),
        }
    }

    /// This rank's weights and moments whole over ZeRO-3's shards (a collective), its experts'
    /// from their own group's, in the model's order.
    fn gather_zero3(&self, z: &Zero3, c: &dyn Communicator) -> Result<(Params, AdamW)> {
        let (params, mut opt) = z.gather_full(c)?;
        let Some((ez, ec)) = self.ep.as_ref().and_then(EpRank::zero3) else {
            return Ok((params, opt));
        };
        let (experts, expert_opt) = ez.gather_full(ec)?;
        opt.m.extend(expert_opt.m);
        opt.v.extend(expert_opt.v);
        // In the model's block order (adapters and frozen weights included), each name once.
        let mut ordered = Params::new();
        for b in 0..self.model.num_blocks() {
            for name in self.model.block_param_names(b) {
                if ordered.contains(&name) {
                    continue;
                }
                let from = if params.contains(&name) {
                    &params
                } else {
                    &experts
                };
                match from.is_frozen(&name) {
                    true => ordered.insert_frozen(&name, from.get(&name)?.clone()),
                    false => ordered.insert(&name, from.var(&name)?.clone()),
                }
            }
        }
        Ok((ordered, opt))
    }

    /// Waits for every rank of the job.
    fn barrier(&self) -> Result<()> {
        match self.world.as_deref().or(self.comm.as_deref()) {
            Some(w) => w.barrier(),
            None => Ok(()),
        }
    }

    /// Writes a checkpoint (rank 0). Under ZeRO every rank must call it: the moment shards are
    /// gathered first, so the file is the same whatever the layout.
    pub fn save_checkpoint(&self) -> Result<Option<PathBuf>> {
        if self.cfg.train.checkpoint_format == super::CheckpointFormat::Distributed {
            return self.save_distributed();
        }
        let gathered = self.gather_model()?;
        if !self.is_main() {
            return Ok(None);
        }
        let (params, opt) = gathered
            .as_ref()
            .map(|(p, o)| (p, o))
            .ok_or_else(|| crate::msg!("rank 0 did not receive the whole model"))?;
        let out = &self.cfg.train.out_dir;
        let dir = checkpoint::checkpoint_dir(out, self.state.step);
        let shard = self.cfg.train.max_shard_mb * 1024 * 1024;
        // Under expert parallelism the file holds every expert: the whole model's layout.
        let whole = self.model.without_expert_parallel();
        let model = whole.as_ref().unwrap_or(&self.model);
        checkpoint::save(&dir, model, params, opt, &self.state, shard)?;
        checkpoint::prune(out, self.cfg.train.keep_last)?;
        tracing::info!(dir = %dir.display(), "checkpoint saved");
        Ok(Some(dir))
    }

    /// Every rank writes the slices it owns (one replica of each: data/sequence rank 0,
    /// tensor rank 0 for replicated weights, the first stage for a tied embedding), then
    /// rank 0 writes the index and state and renames the directory into place.
    fn save_distributed(&self) -> Result<Option<PathBuf>> {
        use crate::checkpoint::distributed as dist;
        let out = &self.cfg.train.out_dir;
        let dir = checkpoint::checkpoint_dir(out, self.state.step);
        let tmp = dir.with_extension("tmp");
        let (params, opt) = match (&self.zero3, &self.zero, self.comm.as_deref()) {
            (Some(z), _, Some(c)) => z.gather_full(c)?,
            (_, Some(z), Some(c)) => (self.params.clone(), z.gather_full(c)?),
            _ => (self.params.clone(), self.opt_copy()),
        };
        self.barrier()?;
        if self.is_main() {
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
            }
            std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        self.barrier()?;
        if self.comm.as_ref().is_none_or(|c| c.rank() == 0) {
            let shapes: std::collections::HashMap<String, Vec<usize>> =
                self.model.param_shapes().into_iter().collect();
            let duplicates = self.duplicates();
            let mut owned = Vec::new();
            for (name, var) in params.iter() {
                if duplicates.iter().any(|d| d == name) {
                    continue;
                }
                let shape = &shapes[name];
                let mut start = vec![0; shape.len()];
                if let Some(t) = &self.tp {
                    match t.plan.slice(name, shape, t.rank(), t.size()) {
                        Some(s) => start[s.dim] = s.start,
                        None if t.rank() != 0 => continue,
                        None => {}
                    }
                }
                let w = var.as_tensor();
                owned.extend(checkpoint::owned_pieces(name, shape, start, w, &opt)?);
            }
            dist::write_rank(&tmp, self.world_rank, &owned)?;
        }
        self.barrier()?;
        if !self.is_main() {
            return Ok(None);
        }
        self.model.write_config(&tmp, DType::F32)?;
        let json = serde_json::to_string_pretty(&self.state).expect("json");
        crate::checkpoint::atomic::write_file(&tmp.join(checkpoint::STATE), json.as_bytes())?;
        dist::write_index(&tmp)?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))?;
        checkpoint::prune(out, self.cfg.train.keep_last)?;
        tracing::info!(dir = %dir.display(), "distributed checkpoint saved");
        Ok(Some(dir))
    }

    fn opt_copy(&self) -> AdamW {
        let mut o = AdamW::new(self.opt.cfg.clone());
        o.step = self.opt.step;
        o.m = self.opt.m.clone();
        o.v = self.opt.v.clone();
        o
    }
}
