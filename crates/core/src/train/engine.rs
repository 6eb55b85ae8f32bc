//! The engine of every trainer, for any model family: micro-batches through the block-wise
//! executor (plain, pipelined, under data parallelism or ZeRO) → gradient norm → clip →
//! AdamW → schedule, with mixed precision and the measurements each step leaves. What a
//! batch is and what the loss is belong to the caller (the causal-LM [`super::Trainer`],
//! the RLHF trainers, any other app).

use candle_core::{DType, Device, Tensor};

use super::checkpoint::TrainerState;
use super::expert_parallel::{
    EpRank, ExpertGrads, ExpertSplitSink, ExpertZero3Sink, ExpertZeroSink,
};
use super::grad_norm::NormGroups;
use super::pipeline::PpRank;
use super::step::{Sink, StepGrads, ToF32, Weights};
use super::tensor_parallel::TpRank;
use super::TrainConfig;
use crate::dist::{Communicator, Group, ReduceOp};
use crate::exec::{grad_ready_block, Acts, Executor, FullParams, GradAccumulator};
use crate::models::llama::Llama;
use crate::models::ModelFamily;
use crate::optim::{clip_to_norm, AdamW, LrSchedule};
use crate::parallel::pipeline_run::MicroBatch;
use crate::parallel::{
    DataParallelSink, StateBuf, Zero3, Zero3GradSink, Zero3Source, ZeroGradSink, ZeroOptimizer,
};
use crate::params::Params;
use crate::Result;

/// One rank of a training job over a model of family `M`: its share of the weights and
/// optimizer state, its process groups, and the step state.
pub struct Engine<M: ModelFamily = Llama> {
    pub cfg: TrainConfig,
    pub model: M,
    pub params: Params,
    pub opt: AdamW,
    pub schedule: LrSchedule,
    pub state: TrainerState,
    pub executor: Executor,
    pub(super) device: Device,
    /// This rank's communicator when data parallel; `None` for one rank.
    pub(super) comm: Option<Box<dyn Communicator>>,
    /// The tensor-parallel group and plan when `parallel.tp > 1`.
    pub(super) tp: Option<TpRank>,
    /// The pipeline group, schedule and stages when `parallel.pp > 1`.
    pub(super) pp: Option<PpRank>,
    /// This rank's experts and their groups when `parallel.ep > 1`.
    pub(super) ep: Option<EpRank>,
    /// All ranks of the job when they form a mesh (otherwise `comm` is all of them).
    pub(super) world: Option<Box<dyn Communicator>>,
    /// Rank in the whole job (rank 0 writes metrics and checkpoints).
    pub(super) world_rank: usize,
    /// Which share of each global batch this rank runs: data-parallel rank and size.
    pub(super) data_rank: usize,
    pub(super) data_ranks: usize,
    /// The sequence-parallel group (ulysses or ring) when `parallel.sp > 1`.
    pub(super) sp: Option<Group>,
    /// Bytes this rank sent during the last step.
    pub last_step_comm_bytes: u64,
    /// Sharded optimizer when `parallel.zero_stage` is 1 or 2 over several ranks.
    pub(super) zero: Option<ZeroOptimizer>,
    /// Sharded parameters and optimizer under ZeRO-3 (then `params` is empty).
    pub(super) zero3: Option<Zero3>,
    /// Test hook: this rank fails when it reaches this step (simulates a crashed rank).
    pub fail_at_step: Option<u64>,
    /// Test hook: an inf is written into the gradients at these steps.
    pub inject_overflow_at: Vec<u64>,
    /// Whether the last step was skipped (fp16 overflow).
    pub last_step_skipped: bool,
    /// Idle fraction of this rank during the last step's pipeline schedule (pp > 1).
    pub last_bubble: Option<f64>,
}

/// What a step's forward and backward leave for the optimizer ([`Engine::apply`]).
pub struct Backward {
    grads: StepGrads,
    pub(super) loss: f32,
    bubble: Option<f64>,
    sent_before: u64,
    scale: f64,
}

impl<M: ModelFamily> Engine<M> {
    /// This rank's share of each global batch: data-parallel rank …
    pub fn rank(&self) -> usize {
        self.data_rank
    }

    /// … out of this many.
    pub fn ranks(&self) -> usize {
        self.data_ranks
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The data-parallel group (ranks holding other shares of each batch), if there is one.
    pub fn data_comm(&self) -> Option<&dyn Communicator> {
        self.comm.as_deref()
    }

    /// This rank's index in the whole job.
    pub fn world_rank(&self) -> usize {
        self.world_rank
    }

    pub fn is_main(&self) -> bool {
        self.world_rank == 0
    }

    /// One optimizer step over this rank's `n` micro-batches (`make(i)` gives the i-th),
    /// each one's `loss_fn` giving its share of the global loss (a sum divided by a global
    /// count), so N ranks step exactly as one would. Returns (loss, grad norm, lr).
    pub fn step<'m, F>(&mut self, n: usize, make: F) -> Result<(f32, f64, f64)>
    where
        F: FnMut(usize) -> Result<MicroBatch<'m, M::Ctx>>,
    {
        let backward = self.accumulate(n, make)?;
        self.apply(backward)
    }

    /// Forward and backward over this rank's `n` micro-batches, gradients handed to the
    /// data-parallel / ZeRO sink as each block finishes.
    pub fn accumulate<'m, F>(&self, n: usize, mut make: F) -> Result<Backward>
    where
        F: FnMut(usize) -> Result<MicroBatch<'m, M::Ctx>>,
    {
        if self.fail_at_step == Some(self.state.step) {
            return Err(crate::msg!(
                "injected failure at step {} (test hook)",
                self.state.step
            ));
        }
        let sent_before = self.bytes_sent();
        let bucket = (self.cfg.parallel.bucket_mb * 1024.0 * 1024.0) as usize;
        let ready = match &self.pp {
            Some(p) => p.ready_blocks(&self.model),
            None => grad_ready_block(&self.model),
        };
        let mut sink = match (self.comm.as_deref(), &self.zero, &self.zero3) {
            (Some(c), None, None) if self.ep.is_some() => {
                let ep = self.ep.as_ref().expect("checked");
                let experts = match ep.expert_data.as_deref() {
                    Some(same) => {
                        ExpertGrads::Summed(DataParallelSink::new(same, bucket, ready.clone()))
                    }
                    None => ExpertGrads::Local(GradAccumulator::default()),
                };
                Sink::Expert(ExpertSplitSink {
                    dense: DataParallelSink::new(c, bucket, ready),
                    experts,
                })
            }
            (Some(c), Some(z), None) if self.ep.is_some() => {
                let ep = self.ep.as_ref().expect("checked");
                Sink::ExpertZero(ExpertZeroSink::new((c, z), ep, ready, bucket)?)
            }
            (Some(c), _, Some(z3)) => match &self.ep {
                Some(ep) => Sink::ExpertZero3(ExpertZero3Sink::new((z3, c), ep, ready)?),
                None => Sink::Zero3(Zero3GradSink::new(z3, c, ready)),
            },
            (Some(c), Some(z), _) => {
                let placement = &z.placement;
                Sink::Zero(ZeroGradSink::new(
                    c, &z.layout, z.stage, ready, bucket, placement,
                )?)
            }
            (Some(c), None, _) => Sink::Data(DataParallelSink::new(c, bucket, ready)),
            _ => Sink::Local(GradAccumulator::default()),
        };
        // Mixed precision: compute on a low-precision copy of the fp32 masters; gradients come
        // back to fp32 before any sink sees them.
        let dtype = self.cfg.parallel.compute_dtype();
        let mut weights = self.weights(dtype)?;
        let scale = self.state.loss_scaler.as_ref().map_or(1.0, |s| s.scale);
        // The model's own loss term (load balancing) counts once per micro-batch of the
        // global batch, as with gradient accumulation on one rank.
        let aux_weight = 1.0 / (n * self.data_ranks).max(1) as f64;
        // What only training does to a micro-batch (LoRA dropout) keys off the step.
        let key = self.cfg.train.seed ^ self.state.step.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let scaled = |mb: MicroBatch<'m, M::Ctx>| {
            let ctx = self.model.training_ctx(&mb.inputs, mb.ctx, key)?;
            let mb = MicroBatch { ctx, ..mb };
            Ok::<_, crate::Error>(with_model_terms(&self.model, mb, scale, aux_weight))
        };
        let mut loss = 0.0f32;
        let mut bubble = None;
        if let Some(pp) = &self.pp {
            // The whole schedule runs into a local accumulator; the data-parallel (or ZeRO)
            // sink then gets the sums as if from one last micro-batch.
            let mbs = (0..n)
                .map(|i| scaled(make(i)?))
                .collect::<Result<Vec<_>>>()?;
            let runner = pp.runner(&self.model, self.executor);
            let mut acc = GradAccumulator::default();
            let report = runner.run(&mut weights, &mbs, &mut ToF32(&mut acc))?;
            // A frozen tied weight (a LoRA's base) has no gradient to share.
            for name in self.model.tied_params() {
                if self.params.is_frozen(&name) {
                    continue;
                }
                runner.sync_tied(&mut acc.grads, &name)?;
            }
            pp.hand_over(&self.model, acc.grads, sink.hooks(true))?;
            let t = Tensor::new(&[report.loss_sum / scale as f32], &Device::Cpu)?;
            loss = pp.comm.all_reduce(&t, ReduceOp::Sum)?.to_vec1::<f32>()?[0];
            bubble = Some(report.bubble());
        }
        for i in (0..n).filter(|_| self.pp.is_none()) {
            let mb = scaled(make(i)?)?;
            let mut to_f32 = ToF32(sink.hooks(i + 1 == n));
            let out = self.executor.forward_backward_with(
                &self.model,
                &mut weights,
                &mb.inputs,
                &mb.ctx,
                &*mb.loss_fn,
                &mut to_f32,
            )?;
            loss += out.loss / scale as f32;
        }
        drop(weights);
        let grads = match sink {
            Sink::Zero3(z) => StepGrads::Chunks(z.finish()?),
            Sink::ExpertZero3(z) => StepGrads::Chunks(z.finish()?),
            Sink::Zero(z) => StepGrads::Shard(z.finish()?),
            Sink::Data(d) => StepGrads::Full(d.finish()?),
            Sink::Expert(e) => StepGrads::Full(e.finish()?),
            Sink::ExpertZero(e) => {
                let (dense, experts) = e.finish()?;
                StepGrads::Split { dense, experts }
            }
            Sink::Local(l) => StepGrads::Full(l.grads),
        };
        if let Some(c) = &self.comm {
            let l = c.all_reduce(&Tensor::new(&[loss], &Device::Cpu)?, ReduceOp::Sum)?;
            loss = l.to_vec1::<f32>()?[0];
        }
        Ok(Backward {
            grads,
            loss,
            bubble,
            sent_before,
            scale,
        })
    }

    /// Clip, skip on overflow, and step the (possibly sharded) optimizer. Returns (loss,
    /// grad norm, lr).
    pub fn apply(&mut self, backward: Backward) -> Result<(f32, f64, f64)> {
        let Backward {
            mut grads,
            loss,
            bubble,
            sent_before,
            scale,
        } = backward;
        self.last_bubble = bubble;
        if self.cfg.train.freeze == super::Freeze::NonEmbedding {
            if let StepGrads::Full(g) = &mut grads {
                let trained = self.model.embedding_params();
                let frozen: Vec<String> = g
                    .names()
                    .filter(|n| !trained.contains(n))
                    .cloned()
                    .collect();
                for n in frozen {
                    g.take(&n);
                }
            }
        }
        if self.inject_overflow_at.contains(&self.state.step) {
            grads.poison()?;
        }
        if scale != 1.0 {
            grads.scale(1.0 / scale)?;
        }
        // The global norm is identical on every rank, so an inf/nan anywhere skips everywhere.
        let split_model = self.tp.is_some() || self.pp.is_some() || self.ep.is_some();
        let duplicates = self.duplicates();
        let groups = NormGroups {
            tp: self.tp.as_ref(),
            ep: self.ep.as_ref().zip(self.comm.as_deref()),
            pp: self.pp.as_ref().map(|p| p.comm.as_ref()),
            duplicates: &duplicates,
        };
        let grad_norm = match (&grads, &self.zero) {
            (StepGrads::Shard(shard), Some(z)) if split_model => {
                let comm = self.comm.as_deref().expect("ZeRO comm");
                groups.of_shard(&z.layout, comm.rank(), shard, comm)?
            }
            (StepGrads::Shard(shard), Some(z)) => {
                z.grad_norm(self.comm.as_deref().expect("ZeRO comm"), shard)?
            }
            (StepGrads::Full(g), _) if split_model => groups.of_grads(g)?,
            (StepGrads::Full(g), _) => crate::optim::global_grad_norm(g)?,
            // ZeRO-3 chunks (of tensor-parallel slices too): replicated weights counted once,
            // summed over the data- and tensor-parallel groups.
            (StepGrads::Chunks(c), _) => {
                groups.of_chunks(c, self.comm.as_deref().expect("ZeRO comm"))?
            }
            (StepGrads::Split { dense, experts }, Some(z)) => {
                let comm = self.comm.as_deref().expect("ZeRO comm");
                let (ez, ec) = self
                    .ep
                    .as_ref()
                    .and_then(EpRank::zero)
                    .expect("ZeRO experts");
                groups.of_expert_shards(
                    (&z.layout, comm.rank(), dense),
                    (&ez.layout, ec.rank(), experts),
                    comm,
                )?
            }
            (StepGrads::Shard(_) | StepGrads::Split { .. }, None) => {
                unreachable!("shards only under ZeRO")
            }
        };
        let overflow = !grad_norm.is_finite();
        let may_step = match self.state.loss_scaler.as_mut() {
            Some(scaler) => scaler.update(overflow),
            None => !overflow,
        };
        self.last_step_skipped = !may_step;
        let clip = self.cfg.train.grad_clip;
        let lr = self.schedule.lr(self.state.step as usize);
        if may_step {
            match grads {
                StepGrads::Chunks(mut chunks) => {
                    if let Some(ez) = self.ep.as_mut().and_then(|e| e.zero3.as_mut()) {
                        let experts = chunks.extract_if(|n, _| ez.holds(n)).collect();
                        ez.step(experts, lr, clip, grad_norm)?;
                    }
                    let z3 = self.zero3.as_mut().expect("chunks only under ZeRO-3");
                    z3.step(chunks, lr, clip, grad_norm)?;
                    self.state.optimizer_step = z3.adam.step;
                }
                StepGrads::Shard(shard) => self.zero_step(shard, lr, clip, grad_norm)?,
                StepGrads::Split { dense, experts } => {
                    self.zero_step(dense, lr, clip, grad_norm)?;
                    let ep = self
                        .ep
                        .as_mut()
                        .expect("split only under expert parallelism");
                    let (ez, ec) = (ep.zero.as_mut(), ep.expert_data.as_deref());
                    let (ez, ec) = ez.zip(ec).expect("ZeRO experts");
                    ez.step(ec, &self.params, experts, lr, clip, grad_norm)?;
                }
                StepGrads::Full(mut grads) => {
                    if clip > 0.0 {
                        clip_to_norm(&mut grads, clip, grad_norm)?;
                    }
                    self.opt.step(&self.params, &grads, lr)?;
                    self.state.optimizer_step = self.opt.step;
                }
            }
        } else {
            self.state.skipped_steps += 1;
            tracing::warn!(
                step = self.state.step + 1,
                "inf/nan gradients: step skipped"
            );
        }
        self.state.step += 1;
        self.last_step_comm_bytes = self.bytes_sent() - sent_before;
        Ok((loss, grad_norm, lr))
    }

    /// Steps the ZeRO 1–2 optimizer with this rank's gradient `shard`.
    fn zero_step(&mut self, shard: StateBuf, lr: f64, clip: f64, norm: f64) -> Result<()> {
        let comm = self.comm.as_deref().expect("ZeRO runs over a communicator");
        let zero = self
            .zero
            .as_mut()
            .expect("ZeRO sink implies ZeRO optimizer");
        zero.step(comm, &self.params, shard, lr, clip, norm)?;
        self.state.optimizer_step = zero.adam.step;
        Ok(())
    }

    /// Where blocks get their weights this step: the fp32 masters, a low-precision copy of them,
    /// or ZeRO-3 gathers.
    pub(super) fn weights(&self, dtype: DType) -> Result<Weights<'_>> {
        if let (Some(z), Some(comm)) = (&self.zero3, self.comm.as_deref()) {
            let blocks = (0..self.model.num_blocks())
                .map(|b| self.model.block_param_names(b))
                .collect();
            let mut shards = vec![(z, comm)];
            shards.extend(self.ep.as_ref().and_then(EpRank::zero3));
            return Ok(Weights::Zero3(Zero3Source {
                shards,
                block_params: blocks,
                dtype,
            }));
        }
        Ok(if dtype == DType::F32 {
            Weights::Full(FullParams(&self.params))
        } else {
            Weights::Cast(self.params.cast(dtype)?)
        })
    }

    /// Tied weights this pipeline rank holds second copies of.
    pub(super) fn duplicates(&self) -> Vec<String> {
        self.pp
            .as_ref()
            .map(|p| p.duplicates(&self.model))
            .unwrap_or_default()
    }
}

/// `mb` with the model's auxiliary loss (times `aux_weight`) added and the sum scaled by the
/// fp16 loss scale.
fn with_model_terms<'a, M: ModelFamily>(
    model: &'a M,
    mb: MicroBatch<'a, M::Ctx>,
    scale: f64,
    aux_weight: f64,
) -> MicroBatch<'a, M::Ctx> {
    let f = mb.loss_fn;
    MicroBatch {
        inputs: mb.inputs,
        ctx: mb.ctx,
        loss_fn: Box::new(move |x: &Acts| {
            let loss = match model.aux_loss(x)? {
                Some(aux) => (f(x)? + (aux * aux_weight)?)?,
                None => f(x)?,
            };
            Ok((loss * scale)?)
        }),
    }
}
