//! What the trainer does differently on a pipeline rank: keep only its stages' weights, run
//! micro-batches through the schedule, hand the accumulated gradients to the data-parallel
//! sink, and bring whole weights to stage 0 for checkpoints.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use candle_core::{Device, Tensor, Var};

use super::config::ParallelConfig;
use super::expert_parallel::EpRank;
use crate::dist::Communicator;
use crate::exec::{BlockModel, Executor, Hooks};
use crate::models::ModelFamily;
use crate::optim::{AdamW, Moment};
use crate::parallel::pipeline::{stage_of, Schedule};
use crate::parallel::pipeline_run::PipelineRank;
use crate::parallel::weight_grad::WeightGradStash;
use crate::params::{Grads, Params};
use crate::{Error, Result};

pub(super) struct PpRank {
    pub comm: Box<dyn Communicator>,
    pub schedule: Schedule,
    pub stages: Vec<Range<usize>>,
    pub stash: Option<Arc<WeightGradStash>>,
}

impl PpRank {
    /// Stages for `model` (see [`Self::prepare`] for the model the schedule runs).
    pub fn new<M: ModelFamily>(
        comm: Box<dyn Communicator>,
        p: &ParallelConfig,
        model: &M,
    ) -> Result<Self> {
        let schedule = p.pp_schedule.schedule(p.pp_chunks);
        let stages = model.pipeline_stages(
            schedule.chunks() * comm.size(),
            p.layers_per_stage.as_deref(),
        )?;
        Ok(Self {
            comm,
            schedule,
            stages,
            stash: None,
        })
    }

    /// Under ZB-H1, `model` becomes the one with deferrable weight gradients (wrapping
    /// whatever regions it has by now).
    pub fn prepare<M: ModelFamily>(&mut self, model: &mut M) -> Result<()> {
        if self.schedule == Schedule::ZbH1 {
            let (deferring, stash) = model.defer_weight_grads()?;
            *model = deferring;
            self.stash = Some(stash);
        }
        Ok(())
    }

    /// Names of this rank's parameters.
    pub fn my_names<M: BlockModel>(&self, model: &M) -> Vec<String> {
        self.names_of(model, self.comm.rank())
    }

    pub fn runner<'a, M: BlockModel>(
        &'a self,
        model: &'a M,
        executor: Executor,
    ) -> PipelineRank<'a, M> {
        PipelineRank {
            model,
            executor,
            comm: self.comm.as_ref(),
            schedule: self.schedule,
            stages: self.stages.clone(),
            stash: self.stash.clone(),
        }
    }

    fn blocks_of(&self, rank: usize) -> Vec<usize> {
        let p = self.comm.size();
        (0..self.schedule.chunks())
            .flat_map(|c| self.stages[stage_of(c, rank, p)].clone())
            .collect()
    }

    /// Parameter names used by `rank`'s blocks, in block order, each once.
    fn names_of<M: BlockModel>(&self, model: &M, rank: usize) -> Vec<String> {
        let mut names = Vec::new();
        for b in self.blocks_of(rank) {
            for n in model.block_param_names(b) {
                if !names.contains(&n) {
                    names.push(n);
                }
            }
        }
        names
    }

    /// Drops the weights and moments of other stages.
    pub fn keep_mine<M: BlockModel>(
        &self,
        model: &M,
        params: &Params,
        opt: &mut AdamW,
    ) -> Result<Params> {
        let mine = self.names_of(model, self.comm.rank());
        let mut out = Params::new();
        for (name, var) in params.iter() {
            if mine.iter().any(|n| n == name) {
                out.insert(name, var.clone());
            }
        }
        for (name, t) in params.frozen() {
            if mine.iter().any(|n| n == name) {
                out.insert_frozen(name, t.clone());
            }
        }
        opt.m.retain(|n, _| mine.contains(n));
        opt.v.retain(|n, _| mine.contains(n));
        Ok(out)
    }

    /// For each of this rank's parameters, the block whose backward completes its gradient
    /// here: the first of this rank's blocks using it.
    pub fn ready_blocks<M: BlockModel>(&self, model: &M) -> HashMap<String, usize> {
        let mut ready = HashMap::new();
        for b in self.blocks_of(self.comm.rank()).into_iter().rev() {
            for n in model.block_param_names(b) {
                ready.insert(n, b);
            }
        }
        ready
    }

    /// Gives accumulated gradients to `hooks` block by block, last block first, each at the
    /// block that completes it (what a data-parallel or ZeRO sink expects).
    pub fn hand_over<M: BlockModel>(
        &self,
        model: &M,
        mut grads: Grads,
        hooks: &mut dyn Hooks,
    ) -> Result<()> {
        let ready = self.ready_blocks(model);
        for b in self.blocks_of(self.comm.rank()).into_iter().rev() {
            let mut block = Vec::new();
            for n in model.block_param_names(b) {
                if ready.get(&n) == Some(&b) {
                    if let Some(g) = grads.take(&n) {
                        block.push((n, g));
                    }
                }
            }
            hooks.after_backward(b, block)?;
        }
        Ok(())
    }

    /// Every stage's weights on every rank of the pipeline group (`mine` are this rank's): each
    /// weight travels from the first rank holding it to the ranks that lack it.
    pub fn all_params<M: BlockModel>(&self, model: &M, mine: Params) -> Result<Params> {
        let (p, me) = (self.comm.size(), self.comm.rank());
        let held: Vec<Vec<String>> = (0..p).map(|r| self.names_of(model, r)).collect();
        let mut all = mine;
        for (owner, names) in held.iter().enumerate() {
            for name in names {
                if held[..owner].iter().any(|h| h.contains(name)) {
                    continue;
                }
                if owner == me {
                    let t = all.get(name)?.clone();
                    for dst in (0..p).filter(|&d| !held[d].contains(name)) {
                        self.comm.send(&t, dst)?;
                    }
                } else if !held[me].contains(name) {
                    all.insert(name, Var::from_tensor(&self.comm.recv(owner)?)?);
                }
            }
        }
        Ok(all)
    }

    /// Tied parameters this rank holds a second copy of (a lower rank holds them too, as the
    /// last stage holds the input embedding tied to its head): counted once in norms and
    /// checkpoints.
    pub fn duplicates<M: ModelFamily>(&self, model: &M) -> Vec<String> {
        let me = self.comm.rank();
        let mine = self.names_of(model, me);
        let lower: Vec<Vec<String>> = (0..me).map(|r| self.names_of(model, r)).collect();
        model
            .tied_params()
            .into_iter()
            .filter(|n| mine.contains(n) && lower.iter().any(|l| l.contains(n)))
            .collect()
    }

    /// Whole weights and moments on pipeline rank 0 (`None` elsewhere): every other rank
    /// sends the ones rank 0 lacks, in block order.
    /// Under expert parallelism (`ep`) the stages' weights are already whole over experts.
    pub fn gather<M: ModelFamily>(
        &self,
        model: &M,
        params: &Params,
        opt: &AdamW,
        ep: Option<&EpRank>,
    ) -> Result<Option<(Params, AdamW)>> {
        let (p, rank) = (self.comm.size(), self.comm.rank());
        let whole =
            |names: Vec<String>| ep.map_or_else(|| names.clone(), |e| e.whole_names(&names));
        let first = whole(self.names_of(model, 0));
        let moments = |name: &str, shape: &[usize]| -> Result<[Tensor; 2]> {
            let get = |m: &HashMap<String, Moment>| -> Result<Tensor> {
                let data = Moment::host_or_zeros(m.get(name), shape.iter().product())?;
                Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
            };
            Ok([get(&opt.m)?, get(&opt.v)?])
        };
        if rank != 0 {
            for name in whole(self.names_of(model, rank)) {
                if first.contains(&name) {
                    continue;
                }
                // A frozen weight (a LoRA's base) goes without moments, flagged.
                let frozen = params.is_frozen(&name);
                self.comm
                    .send(&Tensor::new(&[frozen as u8 as f32], &Device::Cpu)?, 0)?;
                let t = params.get(&name)?;
                self.comm.send(t, 0)?;
                if !frozen {
                    for x in moments(&name, t.dims())? {
                        self.comm.send(&x, 0)?;
                    }
                }
            }
            return Ok(None);
        }
        let mut all = Params::new();
        let mut full = AdamW::new(opt.cfg.clone());
        full.step = opt.step;
        let mut keep = |name: &str, t: Tensor, moments: Option<[Tensor; 2]>| -> Result<()> {
            let Some([m, v]) = moments else {
                all.insert_frozen(name, t);
                return Ok(());
            };
            full.m
                .insert(name.to_string(), m.flatten_all()?.to_vec1()?.into());
            full.v
                .insert(name.to_string(), v.flatten_all()?.to_vec1()?.into());
            all.insert(name, Var::from_tensor(&t)?);
            Ok(())
        };
        for name in &first {
            let t = params.get(name)?.clone();
            let m = match params.is_frozen(name) {
                true => None,
                false => Some(moments(name, t.dims())?),
            };
            keep(name, t, m)?;
        }
        let mut count = first.len();
        for r in 1..p {
            for name in whole(self.names_of(model, r)) {
                if first.contains(&name) {
                    continue;
                }
                count += 1;
                let frozen = self.comm.recv(r)?.to_vec1::<f32>()?[0] != 0.0;
                let t = self.comm.recv(r)?;
                let m = match frozen {
                    true => None,
                    false => Some([self.comm.recv(r)?, self.comm.recv(r)?]),
                };
                keep(&name, t, m)?;
            }
        }
        let held = all.len() + all.frozen().count();
        if held != count {
            return Err(Error::Config(format!(
                "pipeline gather: {held} of {count} parameters"
            )));
        }
        Ok(Some((all, full)))
    }
}
