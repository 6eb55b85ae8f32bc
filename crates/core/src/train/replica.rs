//! A trainer rank as part of a model replica (its tensor-, pipeline- and sequence-parallel
//! peers): forward passes whose results every peer gets, whole weights on every rank (for
//! generation), and metrics counted once per replica. Callers that bring their own batches
//! (the RLHF trainers) work through these and need not know how the model is split.

use std::cell::RefCell;

use candle_core::{DType, Device, Tensor};

use super::engine::Engine;
use super::output::OutputLayout;
use crate::dist::{Communicator, ReduceOp};
use crate::exec::{llama_inputs, on_output};
use crate::models::llama::{AttnInputs, Llama};
use crate::models::ModelFamily;
use crate::parallel::pipeline_run::MicroBatch;
use crate::params::Params;
use crate::Result;

impl<M: ModelFamily> Engine<M> {
    /// Sums `values` over the data-parallel ranks (metrics, global counts). Each model replica
    /// counts once, with the values of its last pipeline stage (where loss functions run) and
    /// first tensor- and sequence-parallel rank.
    pub fn sum_over_ranks(&self, values: &[f64]) -> Result<Vec<f64>> {
        let comm: &dyn Communicator = match (self.world.as_deref(), self.comm.as_deref()) {
            (Some(w), _) => w,
            (None, Some(c)) if c.size() > 1 => c,
            _ => return Ok(values.to_vec()),
        };
        let counted = self.tp.as_ref().is_none_or(|t| t.rank() == 0)
            && self.sp.as_ref().is_none_or(|g| g.rank() == 0)
            && self
                .pp
                .as_ref()
                .is_none_or(|p| p.comm.rank() + 1 == p.comm.size());
        let weight = if counted { 1.0 } else { 0.0 };
        let mine: Vec<f64> = values.iter().map(|v| v * weight).collect();
        let t = Tensor::new(mine.as_slice(), &Device::Cpu)?;
        Ok(comm.all_reduce(&t, ReduceOp::Sum)?.to_vec1::<f64>()?)
    }

    /// Whether every data-parallel rank must run each forward together: its weights are
    /// gathered (ZeRO-3) or its tokens exchanged (expert parallelism) by collectives. Then a
    /// rank with fewer batches to evaluate runs uncounted ones until the others are done.
    pub fn forwards_in_lockstep(&self) -> bool {
        self.zero3.is_some() || self.ep.is_some()
    }

    /// Whole weights on every rank (a collective over the replica's groups and, under ZeRO-3,
    /// the data-parallel group): what generation runs on.
    pub fn replica_params(&self) -> Result<Params> {
        let params = self.stage_params()?;
        match &self.pp {
            Some(p) => p.all_params(&self.model, params),
            None => Ok(params),
        }
    }
}

impl Engine<Llama> {
    /// How this rank's model output relates to the whole (vocabulary slice, positions).
    pub fn output_layout(&self) -> OutputLayout {
        OutputLayout {
            vocab: self.tp.as_ref().map(|t| (t.group.clone(), t.vocab_start)),
            sp: self.sp.clone(),
            inner_seq_split: match (&self.tp, self.cfg.parallel.sp_mode) {
                (Some(t), super::SpMode::Megatron) => t.size(),
                _ => 1,
            },
        }
    }

    /// Runs whole-sequence `inputs` through the model with the current weights, no gradient,
    /// and returns `f(output)` on every rank of the replica: `f` runs where the output is (the
    /// last pipeline stage; every tensor- and sequence-parallel rank, on its part — see
    /// [`OutputLayout`]) and its result travels to the other stages.
    pub fn forward_map<F>(&self, inputs: &Tensor, ctx: &AttnInputs, f: F) -> Result<Tensor>
    where
        F: Fn(&Tensor) -> Result<Tensor>,
    {
        self.forward_map_on(&self.model, inputs, ctx, f)
    }

    /// [`Self::forward_map`] on a LoRA policy's frozen base, the adapters off: the reference
    /// of DPO, PPO and GRPO read in place (under ZeRO-3 gathered block by block, as the
    /// policy's weights are), not a second copy.
    pub fn base_forward_map<F>(&self, inputs: &Tensor, ctx: &AttnInputs, f: F) -> Result<Tensor>
    where
        F: Fn(&Tensor) -> Result<Tensor>,
    {
        if self.model.lora.is_none() {
            return Err(crate::msg!("the model has no LoRA adapters to turn off"));
        }
        let mut base = self.model.clone();
        base.lora = None;
        self.forward_map_on(&base, inputs, ctx, f)
    }

    fn forward_map_on<F>(
        &self,
        model: &Llama,
        inputs: &Tensor,
        ctx: &AttnInputs,
        f: F,
    ) -> Result<Tensor>
    where
        F: Fn(&Tensor) -> Result<Tensor>,
    {
        let dtype = self.cfg.parallel.compute_dtype();
        let ctx = match dtype {
            DType::F32 => ctx.clone(),
            d => ctx.to_dtype(d)?,
        };
        let (inputs, ctx) = self.output_layout().shard(&llama_inputs(inputs), &ctx)?;
        let mut weights = self.weights(dtype)?;
        let Some(pp) = &self.pp else {
            let out = self
                .executor
                .forward_with(model, &mut weights, &inputs, &ctx)?;
            return f(out.output()?);
        };
        let result = RefCell::new(None);
        let mb = MicroBatch {
            inputs,
            ctx,
            loss_fn: on_output(|out: &Tensor| {
                *result.borrow_mut() = Some(f(out)?.to_dtype(DType::F32)?.detach());
                Ok(Tensor::new(0f32, out.device())?)
            }),
        };
        pp.runner(model, self.executor)
            .forward_only(&mut weights, std::slice::from_ref(&mb))?;
        drop(mb);
        let last = pp.comm.size() - 1;
        let mine = match result.into_inner() {
            Some(t) => t,
            None => Tensor::zeros(1, DType::F32, &Device::Cpu)?,
        };
        let whole = pp.comm.broadcast(&mine, last)?;
        Ok(whole.to_device(&self.device)?)
    }

    /// The model without any parallel regions (what whole weights run on).
    pub fn plain_model(&self) -> Result<Llama> {
        Llama::new(self.model.cfg.clone())
    }
}
