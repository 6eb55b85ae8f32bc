//! One rank's expert-parallel part of a training job: which experts it holds, the group it
//! exchanges tokens over, the group its experts' gradients are summed over (and, under ZeRO,
//! their optimizer state sharded over), and the collectives that make whole weights (and Adam
//! moments) again for checkpoints.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{Device, Tensor, Var};

use crate::dist::Communicator;
use crate::exec::{GradAccumulator, Hooks};
use crate::optim::{AdamW, Moment};
use crate::parallel::expert::ExpertParallel;
use crate::parallel::{DataParallelSink, FlatLayout, Placement, StateBuf};
use crate::parallel::{Zero3, Zero3GradSink, ZeroGradSink, ZeroOptimizer};
use crate::params::{Grads, Params};
use crate::Result;

pub(crate) struct EpRank {
    pub ep: Arc<ExpertParallel>,
    /// Ranks holding the same experts (other expert-parallel groups); `None` when alone.
    pub expert_data: Option<Box<dyn Communicator>>,
    /// Under ZeRO 1–2: the experts' optimizer, sharded over `expert_data` (then always set: a
    /// world of one when no other rank holds these experts).
    pub zero: Option<ZeroOptimizer>,
    /// Under ZeRO-3: the experts' weights and state, sharded over `expert_data` (set likewise).
    pub zero3: Option<Zero3>,
}

impl EpRank {
    pub fn bytes_sent(&self) -> u64 {
        self.ep.group.bytes_sent()
            + self
                .expert_data
                .as_ref()
                .map_or(0, |c| c.stats().bytes_sent())
    }

    /// This rank's share of whole weights (and their moments): every other expert dropped.
    pub fn keep_mine(&self, params: &Params, opt: &mut AdamW) -> Params {
        let mut out = Params::new();
        for (name, var) in params.iter().filter(|(n, _)| self.ep.holds(n)) {
            out.insert(name, var.clone());
        }
        for (name, t) in params.frozen().filter(|(n, _)| self.ep.holds(n)) {
            out.insert_frozen(name, t.clone());
        }
        opt.m.retain(|n, _| self.ep.holds(n));
        opt.v.retain(|n, _| self.ep.holds(n));
        out
    }

    /// For the gradient norm, summed over the data-parallel group (of `data_ranks`): every
    /// rank holds a replicated weight's whole gradient, and `data_ranks / ep` ranks each
    /// expert's; each counts its share.
    pub fn norm_weight(&self, name: &str, data_ranks: usize) -> f64 {
        let holders = match ExpertParallel::expert_of(name) {
            Some(_) => data_ranks / self.ep.group.size(),
            None => data_ranks,
        };
        1.0 / holders as f64
    }

    /// Under ZeRO stage `stage`: shards this rank's experts' state over the expert-data group
    /// (`full`'s moments; under stage 3 the weights too) and returns the rest of `params`,
    /// which ZeRO shards over the whole data-parallel group. Every expert element is then in one
    /// shard of each expert-data group, every other element in one shard of the data-parallel
    /// group.
    pub fn shard_experts(
        &mut self,
        stage: u8,
        params: &Params,
        full: &AdamW,
        placement: &Placement,
        timeout: Duration,
    ) -> Result<Params> {
        let (dense, experts) = split_params(params);
        let comm = self.expert_data_comm(timeout);
        let (rank, size) = (comm.rank(), comm.size());
        if stage == 3 {
            self.zero3 = Some(Zero3::from_full(&experts, full, rank, size, placement)?);
        } else {
            let (layout, at) = (FlatLayout::new(&experts, size), placement.within("experts"));
            self.zero = Some(ZeroOptimizer::from_full(stage, layout, rank, full, &at)?);
        }
        Ok(dense)
    }

    /// Under ZeRO-3 with streamed initialisation: empty expert shards for [`Self::take_fresh`].
    pub fn start_zero3(&mut self, adam: &AdamW, placement: &Placement, timeout: Duration) {
        let size = self.expert_data_comm(timeout).size();
        self.zero3 = Some(Zero3::empty(adam, size, placement));
    }

    /// A freshly initialised parameter of the whole model: one of this rank's experts goes into
    /// its expert shards, another rank's is dropped (both `true`); any other is the caller's.
    pub fn take_fresh(
        &mut self,
        name: &str,
        shape: &[usize],
        values: &[f32],
        placement: &Placement,
    ) -> Result<bool> {
        if ExpertParallel::expert_of(name).is_none() {
            return Ok(false);
        }
        if self.ep.holds(name) {
            let rank = self.expert_data.as_ref().map_or(0, |c| c.rank());
            let z = self.zero3.as_mut().expect("start_zero3 first");
            z.add_fresh(name, shape, values, rank, placement)?;
        }
        Ok(true)
    }

    /// The ranks holding the same experts: a world of one when no other rank does.
    fn expert_data_comm(&mut self, timeout: Duration) -> &dyn Communicator {
        &**self
            .expert_data
            .get_or_insert_with(|| Box::new(crate::dist::LocalComm::alone(timeout)))
    }

    /// The experts' sharded optimizer and the group it is sharded over (under ZeRO).
    pub fn zero(&self) -> Option<(&ZeroOptimizer, &dyn Communicator)> {
        self.zero.as_ref().zip(self.expert_data.as_deref())
    }

    /// The experts' ZeRO-3 shards and the group they are sharded over.
    pub fn zero3(&self) -> Option<(&Zero3, &dyn Communicator)> {
        self.zero3.as_ref().zip(self.expert_data.as_deref())
    }

    /// Whole weights from every rank's experts, frozen ones (a LoRA's base) too: a collective
    /// over the group. `mine` is dense (the callers have dequantised a QLoRA base already).
    pub fn gather(&self, mine: &Params) -> Result<Params> {
        if mine.has_quantised() {
            return Err(crate::msg!("expert gather: dequantise the base first"));
        }
        let (mut trained, mut frozen) = (HashMap::new(), HashMap::new());
        for (name, var) in mine.iter() {
            match self.peers_of(name) {
                None => {
                    trained.insert(name.to_string(), var.clone());
                }
                Some(peers) => {
                    for (peer, t) in peers.into_iter().zip(self.gather_tensor(var)?) {
                        trained.insert(peer, Var::from_tensor(&t)?);
                    }
                }
            }
        }
        for (name, t) in mine.frozen() {
            match self.peers_of(name) {
                None => {
                    frozen.insert(name.to_string(), t.clone());
                }
                Some(peers) => frozen.extend(peers.into_iter().zip(self.gather_tensor(t)?)),
            }
        }
        let experts = self.ep.experts;
        let frozen_names: Vec<String> = mine.frozen().map(|(n, _)| n.to_string()).collect();
        let mut out = Params::new();
        for (n, v) in in_whole_order(mine.names(), trained, experts) {
            out.insert(n, v);
        }
        for (n, t) in in_whole_order(&frozen_names, frozen, experts) {
            out.insert_frozen(n, t);
        }
        Ok(out)
    }

    /// Whole Adam moments from every rank's (zeros where a parameter was never stepped).
    pub fn gather_moments(&self, opt: &AdamW, mine: &Params) -> Result<AdamW> {
        let mut out = AdamW::new(opt.cfg.clone());
        out.step = opt.step;
        for (name, var) in mine.iter() {
            for (src, dst) in [(&opt.m, &mut out.m), (&opt.v, &mut out.v)] {
                let dims = var.as_tensor().dims();
                let data = Moment::host_or_zeros(src.get(name), var.as_tensor().elem_count())?;
                let Some(peers) = self.peers_of(name) else {
                    dst.insert(name.to_string(), data.into());
                    continue;
                };
                let parts = self.gather_tensor(&Tensor::from_vec(data, dims, &Device::Cpu)?)?;
                for (peer, t) in peers.into_iter().zip(parts) {
                    dst.insert(peer, t.flatten_all()?.to_vec1::<f32>()?.into());
                }
            }
        }
        Ok(out)
    }

    /// `names` (this rank's) with every expert's where this rank's local experts are.
    pub fn whole_names(&self, names: &[String]) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for n in names {
            for w in self.peers_of(n).unwrap_or_else(|| vec![n.clone()]) {
                if !out.contains(&w) {
                    out.push(w);
                }
            }
        }
        out
    }

    /// The names the same local expert slot has on every rank of the group, in rank order
    /// (`None` for a non-expert parameter).
    fn peers_of(&self, name: &str) -> Option<Vec<String>> {
        let e = ExpertParallel::expert_of(name)?;
        let (per, slot) = (self.ep.per_rank(), e - self.ep.local().start);
        let from = format!(".experts.{e}.");
        Some(
            (0..self.ep.group.size())
                .map(|r| name.replace(&from, &format!(".experts.{}.", r * per + slot)))
                .collect(),
        )
    }

    fn gather_tensor(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        let host = t.to_device(&Device::Cpu)?.unsqueeze(0)?.contiguous()?;
        let all = self.ep.group.with(|c| c.all_gather(&host))?;
        (0..self.ep.group.size())
            .map(|r| Ok(all.get(r)?.to_device(t.device())?))
            .collect()
    }
}

/// (non-expert, expert) parameters of `params`, frozen ones too.
fn split_params(params: &Params) -> (Params, Params) {
    let (mut dense, mut experts) = (Params::new(), Params::new());
    for (name, var) in params.iter() {
        match ExpertParallel::expert_of(name) {
            Some(_) => experts.insert(name, var.clone()),
            None => dense.insert(name, var.clone()),
        }
    }
    for (name, t) in params.frozen() {
        match ExpertParallel::expert_of(name) {
            Some(_) => experts.insert_frozen(name, t.clone()),
            None => dense.insert_frozen(name, t.clone()),
        }
    }
    (dense, experts)
}

/// `gathered` in a whole model's order: `mine`'s, each layer's experts (all of them, by
/// index) where its first local expert was.
fn in_whole_order<T>(
    mine: &[String],
    mut gathered: HashMap<String, T>,
    experts: usize,
) -> Vec<(String, T)> {
    let mut out = Vec::new();
    let mut layers_done = HashSet::new();
    for name in mine {
        let Some(e) = ExpertParallel::expert_of(name) else {
            if let Some(v) = gathered.remove(name) {
                out.push((name.clone(), v));
            }
            continue;
        };
        let layer = name.split(".experts.").next().unwrap_or_default();
        if !layers_done.insert(layer.to_string()) {
            continue;
        }
        let own = format!("{layer}.experts.{e}.");
        let weights: Vec<&str> = mine
            .iter()
            .filter_map(|n| n.strip_prefix(own.as_str()))
            .collect();
        for x in 0..experts {
            for w in &weights {
                let n = format!("{layer}.experts.{x}.{w}");
                if let Some(v) = gathered.remove(&n) {
                    out.push((n, v));
                }
            }
        }
    }
    out
}

/// Gradients under expert parallelism with ZeRO 1–2: non-expert ones into this rank's shard
/// over the data-parallel group, expert ones into its shard over the expert-data group.
pub(crate) struct ExpertZeroSink<'a> {
    pub dense: ZeroGradSink<'a>,
    pub experts: ZeroGradSink<'a>,
}

impl<'a> ExpertZeroSink<'a> {
    pub fn new(
        dense: (&'a dyn Communicator, &'a ZeroOptimizer),
        ep: &'a EpRank,
        ready: HashMap<String, usize>,
        bucket: usize,
    ) -> Result<Self> {
        let (dc, dz) = dense;
        let (ez, ec) = ep
            .zero()
            .ok_or_else(|| crate::msg!("ZeRO experts not set up"))?;
        let sink = |c, z: &'a ZeroOptimizer, ready| {
            ZeroGradSink::new(c, &z.layout, z.stage, ready, bucket, &z.placement)
        };
        Ok(Self {
            dense: sink(dc, dz, ready.clone())?,
            experts: sink(ec, ez, ready)?,
        })
    }

    pub fn set_last(&mut self, last: bool) {
        self.dense.last_micro_batch = last;
        self.experts.last_micro_batch = last;
    }

    /// (non-expert shard, expert shard) of the step's gradients.
    pub fn finish(self) -> Result<(StateBuf, StateBuf)> {
        Ok((self.dense.finish()?, self.experts.finish()?))
    }
}

impl Hooks for ExpertZeroSink<'_> {
    fn after_backward(&mut self, block: usize, grads: Vec<(String, Tensor)>) -> Result<()> {
        let (experts, dense) = split_experts(grads);
        self.dense.after_backward(block, dense)?;
        self.experts.after_backward(block, experts)
    }
}

type Named = Vec<(String, Tensor)>;

/// (expert gradients, the others).
fn split_experts(grads: Named) -> (Named, Named) {
    grads
        .into_iter()
        .partition(|(n, _)| ExpertParallel::expert_of(n).is_some())
}

/// Gradients under expert parallelism: non-expert ones summed over the data-parallel group
/// (`dense`), an expert's over the ranks holding the same expert, or kept when none does.
pub(crate) struct ExpertSplitSink<'a> {
    pub dense: DataParallelSink<'a>,
    pub experts: ExpertGrads<'a>,
}

pub(crate) enum ExpertGrads<'a> {
    Summed(DataParallelSink<'a>),
    Local(GradAccumulator),
}

impl ExpertSplitSink<'_> {
    pub fn set_last(&mut self, last: bool) {
        self.dense.last_micro_batch = last;
        if let ExpertGrads::Summed(s) = &mut self.experts {
            s.last_micro_batch = last;
        }
    }

    pub fn finish(self) -> Result<Grads> {
        let mut grads = self.dense.finish()?;
        let experts = match self.experts {
            ExpertGrads::Summed(s) => s.finish()?,
            ExpertGrads::Local(l) => l.grads,
        };
        let names: Vec<String> = experts.names().cloned().collect();
        let mut experts = experts;
        for n in names {
            let g = experts.take(&n).expect("listed");
            grads.accumulate(&n, g)?;
        }
        Ok(grads)
    }
}

impl Hooks for ExpertSplitSink<'_> {
    fn after_backward(&mut self, block: usize, grads: Vec<(String, Tensor)>) -> Result<()> {
        let (experts, dense) = split_experts(grads);
        self.dense.after_backward(block, dense)?;
        match &mut self.experts {
            ExpertGrads::Summed(s) => s.after_backward(block, experts),
            ExpertGrads::Local(l) => l.after_backward(block, experts),
        }
    }
}

/// Gradients under expert parallelism with ZeRO-3: non-expert ones reduce-scattered into this
/// rank's chunks over the data-parallel group, expert ones over the expert-data group.
pub(crate) struct ExpertZero3Sink<'a> {
    dense: Zero3GradSink<'a>,
    experts: Zero3GradSink<'a>,
}

impl<'a> ExpertZero3Sink<'a> {
    pub fn new(
        dense: (&'a Zero3, &'a dyn Communicator),
        ep: &'a EpRank,
        ready: HashMap<String, usize>,
    ) -> Result<Self> {
        let (ez, ec) = ep
            .zero3()
            .ok_or_else(|| crate::msg!("ZeRO-3 experts not set up"))?;
        Ok(Self {
            dense: Zero3GradSink::new(dense.0, dense.1, ready.clone()),
            experts: Zero3GradSink::new(ez, ec, ready),
        })
    }

    /// This rank's gradient chunks, of both kinds (their names are distinct).
    pub fn finish(self) -> Result<HashMap<String, StateBuf>> {
        let mut chunks = self.dense.finish()?;
        chunks.extend(self.experts.finish()?);
        Ok(chunks)
    }
}

impl Hooks for ExpertZero3Sink<'_> {
    fn after_backward(&mut self, block: usize, grads: Vec<(String, Tensor)>) -> Result<()> {
        let (experts, dense) = split_experts(grads);
        self.dense.after_backward(block, dense)?;
        self.experts.after_backward(block, experts)
    }
}
