//! ZeRO stage 3: parameters sharded too. Each parameter is split into N equal chunks
//! (⌈len/N⌉, zero-padded); rank r keeps chunk r of every parameter, of its gradient and of its
//! AdamW moments. A block's parameters are all-gathered just before its forward and again before
//! its backward (the executor recomputes every block), and dropped right after; gradients are
//! reduce-scattered into the chunks as soon as they are complete, every micro-batch.
//!
//! Per-rank memory (fp32): parameter chunks 4Ψ/N + gradient chunks 4Ψ/N + moments 8Ψ/N = 16Ψ/N
//! (plus padding, < N elements per parameter), and one block's gathered parameters while it runs.
//! Communication per step and rank: two all-gathers and one reduce-scatter, 3Ψ(N−1)/N elements
//! (with k micro-batches per rank: 3kΨ(N−1)/N).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};

use super::offload::{Placement, StateBuf};
use super::state_ops::{adam_update, SqSum};
use crate::dist::{Communicator, ReduceOp};
use crate::exec::{Hooks, ParamSource};
use crate::optim::{AdamW, AdamWKernel, Moment};
use crate::params::{Grads, Params};
use crate::Result;

struct Entry {
    name: String,
    shape: Vec<usize>,
    len: usize,
    /// A frozen weight (a LoRA's base): sharded and gathered like the rest, but no moments
    /// and no gradient.
    frozen: bool,
}

pub struct Zero3 {
    entries: Vec<Entry>,
    ranks: usize,
    chunks: HashMap<String, StateBuf>,
    m: HashMap<String, StateBuf>,
    v: HashMap<String, StateBuf>,
    pub adam: AdamW,
    placement: Placement,
}

impl Zero3 {
    fn chunk_len(&self, len: usize) -> usize {
        len.div_ceil(self.ranks)
    }

    fn own_chunk(values: &[f32], rank: usize, chunk: usize) -> Vec<f32> {
        let mut out = vec![0.0; chunk];
        let start = (rank * chunk).min(values.len());
        let end = ((rank + 1) * chunk).min(values.len());
        out[..end - start].copy_from_slice(&values[start..end]);
        out
    }

    /// Keeps only this rank's chunks of `params` (the frozen ones too) and of the moments in
    /// `full`. `placement`: memory, or files on disk (parameter chunks and moments).
    pub fn from_full(
        params: &Params,
        full: &AdamW,
        rank: usize,
        ranks: usize,
        placement: &Placement,
    ) -> Result<Self> {
        if params.has_quantised() {
            return Err(crate::msg!(
                "ZeRO-3 shards dense weights: a base resting quantised cannot be sharded"
            ));
        }
        let mut z = Self::empty(full, ranks, placement);
        for (name, var) in params.iter() {
            let values: Vec<f32> = var
                .as_tensor()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            z.add(
                name,
                var.dims(),
                &values,
                full.m.get(name).map(Moment::host).transpose()?.as_deref(),
                full.v.get(name).map(Moment::host).transpose()?.as_deref(),
                rank,
                placement,
            )?;
        }
        for (name, t) in params.frozen() {
            let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            z.add_chunk(name, t.dims(), &values, true, rank, placement)?;
        }
        Ok(z)
    }

    /// A freshly initialised trainable parameter: this rank's chunk, zero moments. Called one
    /// parameter at a time (streamed initialisation), the whole model never exists on one
    /// rank, so models larger than a rank's memory can be initialised.
    pub fn add_fresh(
        &mut self,
        name: &str,
        shape: &[usize],
        values: &[f32],
        rank: usize,
        placement: &Placement,
    ) -> Result<()> {
        self.add(name, shape, values, None, None, rank, placement)
    }

    /// No parameters yet, over `ranks`, with `full`'s optimizer settings and step.
    pub fn empty(full: &AdamW, ranks: usize, placement: &Placement) -> Self {
        Self {
            entries: Vec::new(),
            ranks,
            chunks: HashMap::new(),
            m: HashMap::new(),
            v: HashMap::new(),
            placement: placement.without_budget(),
            adam: AdamW {
                cfg: full.cfg.clone(),
                step: full.step,
                m: HashMap::new(),
                v: HashMap::new(),
            },
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        name: &str,
        shape: &[usize],
        values: &[f32],
        m: Option<&[f32]>,
        v: Option<&[f32]>,
        rank: usize,
        placement: &Placement,
    ) -> Result<()> {
        self.add_chunk(name, shape, values, false, rank, placement)?;
        let chunk = self.chunk_len(values.len());
        let own = |x: Option<&[f32]>| match x {
            Some(x) => Self::own_chunk(x, rank, chunk),
            None => vec![0.0; chunk],
        };
        let buf = |kind: &str, v: Vec<f32>| StateBuf::new(placement, &format!("{kind}.{name}"), v);
        self.m.insert(name.to_string(), buf("exp_avg", own(m))?);
        self.v.insert(name.to_string(), buf("exp_avg_sq", own(v))?);
        Ok(())
    }

    /// This rank's chunk of `values` and its entry (`add` gives a trainable one its moments).
    fn add_chunk(
        &mut self,
        name: &str,
        shape: &[usize],
        values: &[f32],
        frozen: bool,
        rank: usize,
        placement: &Placement,
    ) -> Result<()> {
        let chunk = Self::own_chunk(values, rank, self.chunk_len(values.len()));
        let buf = StateBuf::new(placement, &format!("param.{name}"), chunk)?;
        self.chunks.insert(name.to_string(), buf);
        self.entries.push(Entry {
            name: name.to_string(),
            shape: shape.to_vec(),
            len: values.len(),
            frozen,
        });
        Ok(())
    }

    /// Whether `name` is one of these shards' parameters.
    pub fn holds(&self, name: &str) -> bool {
        self.chunks.contains_key(name)
    }

    /// Whether `name` is a frozen weight (no variable, no gradient).
    pub fn is_frozen(&self, name: &str) -> bool {
        self.entry(name).is_ok_and(|e| e.frozen)
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| crate::msg!("no parameter `{name}`"))
    }

    /// The whole parameter `name`, gathered from every rank's chunk.
    pub fn gather(&self, comm: &dyn Communicator, name: &str) -> Result<Tensor> {
        let e = self.entry(name)?;
        let full = comm.all_gather(&self.chunks[name].tensor()?)?;
        Ok(full.narrow(0, 0, e.len)?.reshape(e.shape.as_slice())?)
    }

    /// Every parameter and the full moments (collective), for checkpoints and evaluation.
    pub fn gather_full(&self, comm: &dyn Communicator) -> Result<(Params, AdamW)> {
        let mut params = Params::new();
        let mut opt = AdamW::new(self.adam.cfg.clone());
        opt.step = self.adam.step;
        for e in &self.entries {
            let t = self.gather(comm, &e.name)?;
            if e.frozen {
                params.insert_frozen(e.name.clone(), t);
                continue;
            }
            params.insert(e.name.clone(), Var::from_tensor(&t)?);
            for (src, dst) in [(&self.m, &mut opt.m), (&self.v, &mut opt.v)] {
                let full = comm.all_gather(&src[&e.name].tensor()?)?;
                dst.insert(e.name.clone(), full.narrow(0, 0, e.len)?.to_vec1()?.into());
            }
        }
        Ok((params, opt))
    }

    /// Global gradient norm from every rank's chunks.
    pub fn grad_norm(
        &self,
        comm: &dyn Communicator,
        grads: &HashMap<String, StateBuf>,
    ) -> Result<f64> {
        let mut sq = SqSum::default();
        for g in grads.values() {
            sq.add_all(g, 1.0)?;
        }
        let local = sq.total()?;
        let total = comm.all_reduce(&Tensor::new(&[local], &Device::Cpu)?, ReduceOp::Sum)?;
        Ok(total.to_vec1::<f64>()?[0].sqrt())
    }

    /// Clip by `norm`, then AdamW on this rank's chunks. No communication.
    pub fn step(
        &mut self,
        mut grads: HashMap<String, StateBuf>,
        lr: f64,
        max_norm: f64,
        norm: f64,
    ) -> Result<()> {
        let coef = if max_norm > 0.0 {
            (max_norm / (norm + 1e-6)).min(1.0)
        } else {
            1.0
        };
        self.adam.step += 1;
        let k = AdamWKernel::new(&self.adam.cfg, self.adam.step, lr);
        for e in &self.entries {
            // Taken out so its pages are unmapped as soon as this parameter is done.
            let Some(mut g) = grads.remove(&e.name) else {
                continue;
            };
            if coef < 1.0 {
                g.scale(coef)?;
            }
            let decay = self.adam.decay_factor(&e.name, lr);
            let (p, m, v) = (
                self.chunks.get_mut(&e.name).expect("chunk"),
                self.m.get_mut(&e.name).expect("m"),
                self.v.get_mut(&e.name).expect("v"),
            );
            adam_update(&k, decay, 0..g.len(), p, &g, m, v)?;
            for b in [&*p, &*m, &*v] {
                b.release()?;
            }
        }
        Ok(())
    }

    /// Bytes held in memory for (parameter chunks, gradient chunks, moment chunks).
    pub fn memory(&self) -> (u64, u64, u64) {
        let p: u64 = self.chunks.values().map(StateBuf::resident_bytes).sum();
        // Gradient chunks exist during a step: in memory, or on disk (never on the budget);
        // a frozen weight has none.
        let g: u64 = match self.placement {
            Placement::Disk(_) => 0,
            _ => self
                .entries
                .iter()
                .filter(|e| !e.frozen)
                .map(|e| 4 * self.chunks[&e.name].len() as u64)
                .sum(),
        };
        let o: u64 = self
            .m
            .values()
            .chain(self.v.values())
            .map(StateBuf::resident_bytes)
            .sum();
        (p, g, o)
    }

    /// Whether every parameter chunk and moment lives on a device.
    pub fn on_device(&self) -> bool {
        let mut all = self
            .chunks
            .values()
            .chain(self.m.values())
            .chain(self.v.values());
        all.all(StateBuf::is_device)
    }

    /// Bytes of parameter chunks and moments kept on disk.
    pub fn offloaded_bytes(&self) -> u64 {
        self.chunks
            .values()
            .chain(self.m.values())
            .chain(self.v.values())
            .map(StateBuf::offloaded_bytes)
            .sum()
    }
}

/// Gathers a block's parameters on demand (in the compute dtype).
pub struct Zero3Source<'a> {
    /// Each set of shards with the group it is sharded over (under expert parallelism the
    /// experts' over the ranks holding the same experts, the rest over data parallel).
    pub shards: Vec<(&'a Zero3, &'a dyn Communicator)>,
    pub block_params: Vec<Vec<String>>,
    pub dtype: DType,
}

impl ParamSource for Zero3Source<'_> {
    fn acquire(&mut self, block: usize) -> Result<Params> {
        let mut p = Params::new();
        for name in &self.block_params[block] {
            let (zero, comm) = self
                .shards
                .iter()
                .find(|(z, _)| z.holds(name))
                .ok_or_else(|| crate::msg!("ZeRO-3: no shards hold `{name}`"))?;
            let t = zero.gather(*comm, name)?.to_dtype(self.dtype)?;
            match zero.is_frozen(name) {
                true => p.insert_frozen(name.clone(), t),
                false => p.insert(name.clone(), Var::from_tensor(&t)?),
            }
        }
        Ok(p)
    }

    fn sharded(&self) -> bool {
        true
    }
}

/// Reduce-scatters each complete gradient into this rank's chunk, every micro-batch.
pub struct Zero3GradSink<'a> {
    zero: &'a Zero3,
    comm: &'a dyn Communicator,
    ready_at: HashMap<String, usize>,
    local: Grads,
    pub chunks: HashMap<String, StateBuf>,
}

impl<'a> Zero3GradSink<'a> {
    pub fn new(
        zero: &'a Zero3,
        comm: &'a dyn Communicator,
        ready_at: HashMap<String, usize>,
    ) -> Self {
        Self {
            zero,
            comm,
            ready_at,
            local: Grads::new(),
            chunks: HashMap::new(),
        }
    }

    pub fn finish(self) -> Result<HashMap<String, StateBuf>> {
        if !self.local.is_empty() {
            return Err(crate::msg!("ZeRO-3: gradients left unreduced"));
        }
        Ok(self.chunks)
    }
}

impl Hooks for Zero3GradSink<'_> {
    fn after_backward(&mut self, block: usize, grads: Vec<(String, Tensor)>) -> Result<()> {
        let mut complete = Vec::new();
        for (name, g) in grads {
            if self.ready_at.get(&name).is_none_or(|&b| b == block) {
                complete.push(name.clone());
            }
            self.local.accumulate(&name, g.to_dtype(DType::F32)?)?;
        }
        for name in complete {
            let g = self
                .local
                .take(&name)
                .expect("just accumulated")
                .flatten_all()?;
            let chunk = self.zero.chunk_len(g.elem_count());
            let padded = chunk * self.zero.ranks;
            let g = if padded > g.elem_count() {
                let zeros = Tensor::zeros(padded - g.elem_count(), DType::F32, g.device())?;
                Tensor::cat(&[&g, &zeros], 0)?
            } else {
                g
            };
            let mine = self.comm.reduce_scatter(&g, ReduceOp::Sum)?;
            match self.chunks.get_mut(&name) {
                Some(acc) => acc.add_at(0, &mine)?,
                None => {
                    // Gradient chunks follow the state's placement (disk when offloading, the
                    // device's memory on a GPU), outside the memory budget, which holds the
                    // persistent state.
                    let path = format!("grad.{name}");
                    let buf = StateBuf::from_tensor(&self.zero.placement, &path, mine)?;
                    self.chunks.insert(name, buf);
                }
            }
        }
        Ok(())
    }
}
