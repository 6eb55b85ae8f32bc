//! The pieces of one training step that vary with the parallel layout: where blocks get their
//! weights (`Weights`), where gradients go (`Sink`), and what is left after backward (`StepGrads`).

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use crate::exec::{FullParams, GradAccumulator, Hooks, ParamSource};
use crate::parallel::{DataParallelSink, StateBuf, Zero3GradSink, Zero3Source, ZeroGradSink};
use crate::params::{Grads, Params};
use crate::Result;

/// The gradient sink of a step: plain accumulation, data parallel, or ZeRO.
pub(super) enum Sink<'a> {
    Local(GradAccumulator),
    Zero3(Zero3GradSink<'a>),
    Data(DataParallelSink<'a>),
    Zero(ZeroGradSink<'a>),
    Expert(super::expert_parallel::ExpertSplitSink<'a>),
    ExpertZero(super::expert_parallel::ExpertZeroSink<'a>),
    ExpertZero3(super::expert_parallel::ExpertZero3Sink<'a>),
}

impl<'a> Sink<'a> {
    pub(super) fn hooks(&mut self, last_micro_batch: bool) -> &mut (dyn Hooks + 'a) {
        match self {
            Sink::Local(l) => l,
            Sink::Zero3(z) => z,
            Sink::ExpertZero3(z) => z,
            Sink::Data(d) => {
                d.last_micro_batch = last_micro_batch;
                d
            }
            Sink::Zero(z) => {
                z.last_micro_batch = last_micro_batch;
                z
            }
            Sink::Expert(e) => {
                e.set_last(last_micro_batch);
                e
            }
            Sink::ExpertZero(e) => {
                e.set_last(last_micro_batch);
                e
            }
        }
    }
}

/// What a step's backward leaves: all gradients, or this rank's ZeRO shard of them.
pub(super) enum StepGrads {
    Full(Grads),
    Shard(StateBuf),
    /// ZeRO-3: this rank's chunk of each parameter's gradient.
    Chunks(HashMap<String, StateBuf>),
    /// ZeRO 1–2 under expert parallelism: this rank's shard of the non-expert gradients (over
    /// the data-parallel group) and of its experts' (over the expert-data group).
    Split {
        dense: StateBuf,
        experts: StateBuf,
    },
}

impl StepGrads {
    pub(super) fn scale(&mut self, factor: f64) -> Result<()> {
        match self {
            StepGrads::Full(g) => {
                let names: Vec<String> = g.names().cloned().collect();
                for n in names {
                    let t = (g.get(&n).expect("listed") * factor)?;
                    g.set(&n, t);
                }
            }
            StepGrads::Shard(v) => v.scale(factor)?,
            StepGrads::Split { dense, experts } => {
                dense.scale(factor)?;
                experts.scale(factor)?;
            }
            StepGrads::Chunks(c) => {
                for g in c.values_mut() {
                    g.scale(factor)?;
                }
            }
        }
        Ok(())
    }

    /// Writes an inf into the gradients (test hook for overflow handling).
    pub(super) fn poison(&mut self) -> Result<()> {
        match self {
            StepGrads::Full(g) => {
                let first = g.names().next().cloned();
                if let Some(n) = first {
                    let t = (g.get(&n).expect("listed") * f64::INFINITY)?;
                    g.set(&n, t);
                }
            }
            StepGrads::Shard(v) => {
                v.poison()?;
            }
            StepGrads::Split { dense, experts } => {
                if !dense.poison()? {
                    experts.poison()?;
                }
            }
            StepGrads::Chunks(c) => {
                for g in c.values_mut() {
                    if g.poison()? {
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

pub(super) enum Weights<'a> {
    Full(FullParams<'a>),
    Cast(Params),
    Zero3(Zero3Source<'a>),
}

impl ParamSource for Weights<'_> {
    fn acquire(&mut self, block: usize) -> Result<Params> {
        match self {
            Weights::Full(f) => f.acquire(block),
            Weights::Cast(p) => Ok(p.clone()),
            Weights::Zero3(z) => z.acquire(block),
        }
    }

    fn sharded(&self) -> bool {
        match self {
            Weights::Full(f) => f.sharded(),
            Weights::Cast(p) => p.has_quantised(),
            Weights::Zero3(_) => true,
        }
    }
}

/// Hands gradients of a low-precision compute copy to a sink in fp32.
pub(super) struct ToF32<'a, 'b>(pub(super) &'a mut (dyn Hooks + 'b));

impl Hooks for ToF32<'_, '_> {
    fn after_backward(&mut self, block: usize, grads: Vec<(String, Tensor)>) -> Result<()> {
        let grads = grads
            .into_iter()
            .map(|(n, g)| Ok((n, g.to_dtype(DType::F32)?)))
            .collect::<Result<Vec<_>>>()?;
        self.0.after_backward(block, grads)
    }
}
