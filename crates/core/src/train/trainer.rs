//! The training loop: global batch → micro-batches through the block-wise executor →
//! clip → AdamW → schedule; evaluation, checkpoints, metrics.

use candle_core::{DType, Device, Tensor};

use super::batch::{causal_lm_batch, count_targets};
use super::checkpoint::TrainerState;
use super::grad_norm::NormGroups;
use super::neftune::NoiseOn;
use super::pipeline::PpRank;
use super::rank_batch::loss_of;
use super::step::{Sink, StepGrads, ToF32, Weights};
use super::tensor_parallel::TpRank;
use super::TrainConfig;
use crate::data::PackedDataset;
use crate::dist::{Communicator, Group, ReduceOp};
use crate::exec::{
    grad_ready_block, llama_inputs, on_output, Acts, BlockModel, Executor, FullParams,
    GradAccumulator,
};
use crate::models::llama::{AttnInputs, Llama};
use crate::models::ModelFamily;
use crate::optim::{clip_to_norm, AdamW, LrSchedule};
use crate::parallel::pipeline_run::MicroBatch;
use crate::parallel::{
    DataParallelSink, Zero3, Zero3GradSink, Zero3Source, ZeroGradSink, ZeroOptimizer,
};
use crate::params::Params;
use crate::Result;

pub struct Trainer {
    pub cfg: TrainConfig,
    pub model: Llama,
    pub params: Params,
    pub opt: AdamW,
    pub schedule: LrSchedule,
    pub state: TrainerState,
    pub executor: Executor,
    /// The packed pretraining data (`None` when the caller brings its own batches).
    pub(super) train_data: Option<PackedDataset>,
    pub(super) val_data: Option<PackedDataset>,
    pub(super) device: Device,
    /// This rank's communicator when data parallel; `None` for one rank.
    pub(super) comm: Option<Box<dyn Communicator>>,
    /// The tensor-parallel group and plan when `parallel.tp > 1`.
    pub(super) tp: Option<TpRank>,
    /// The pipeline group, schedule and stages when `parallel.pp > 1`.
    pub(super) pp: Option<PpRank>,
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
    /// NEFTune's switch (on during training steps), when `train.neftune_alpha > 0`.
    pub(super) neftune: Option<std::sync::Arc<super::neftune::Neftune>>,
}

/// What a step's forward and backward leave for the optimizer.
struct Backward {
    grads: StepGrads,
    loss: f32,
    bubble: Option<f64>,
    sent_before: u64,
    scale: f64,
}

impl Trainer {
    /// Tokens per sequence of the pretraining data (0 without it).
    pub fn seq_len(&self) -> usize {
        self.train_data.as_ref().map_or(0, |d| d.manifest.seq_len)
    }

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

    /// Rank 0 writes metrics, checkpoints and plots.
    /// This rank's index in the whole job.
    pub fn world_rank(&self) -> usize {
        self.world_rank
    }

    /// What the engine measured of the last step, for its metrics record: bytes this rank
    /// sent, the memory it holds (parameters, gradients, optimizer state; resident and
    /// offloaded), the loss scale and a skipped step under fp16, the pipeline's bubble.
    pub fn last_step_metrics(&self) -> serde_json::Map<String, serde_json::Value> {
        use serde_json::json;
        let mut rec = serde_json::Map::new();
        rec.insert("comm_bytes".into(), json!(self.last_step_comm_bytes));
        if let Some(sc) = &self.state.loss_scaler {
            rec.insert("loss_scale".into(), json!(sc.scale));
        }
        if self.last_step_skipped {
            rec.insert("skipped".into(), json!(true));
        }
        if let (Some(b), Some(pp)) = (self.last_bubble, &self.pp) {
            let t = &self.cfg.train;
            let m = t.batch_size / t.micro_batch_size / self.ranks();
            rec.insert("pp_bubble".into(), json!(b));
            let theory = pp.schedule.theoretical_bubble(pp.comm.size(), m);
            rec.insert("pp_bubble_theory".into(), json!(theory));
        }
        let (mp, mg, mo) = self.memory_bytes();
        rec.insert("mem_params_bytes".into(), json!(mp));
        rec.insert("mem_grads_bytes".into(), json!(mg));
        rec.insert("mem_optim_bytes".into(), json!(mo));
        rec.insert("offloaded_bytes".into(), json!(self.offloaded_bytes()));
        rec
    }

    pub fn is_main(&self) -> bool {
        self.world_rank == 0
    }

    /// Bytes this rank has sent over all its groups.
    fn bytes_sent(&self) -> u64 {
        self.comm.as_ref().map_or(0, |c| c.stats().bytes_sent())
            + self.tp.as_ref().map_or(0, |t| t.group.bytes_sent())
            + self.pp.as_ref().map_or(0, |p| p.comm.stats().bytes_sent())
    }

    /// One optimizer step over the global batch. Returns (loss, grad norm, lr).
    pub fn train_step(&mut self) -> Result<(f32, f64, f64)> {
        let (bs, mbs) = (self.cfg.train.batch_size, self.cfg.train.micro_batch_size);
        let (rank, ranks) = (self.rank(), self.ranks());
        let shuffle = self.cfg.data.shuffle;
        let cursor = self.state.cursor;
        let batch = self
            .train_data
            .as_mut()
            .ok_or_else(|| crate::msg!("this trainer was built without pretraining data"))?
            .batch(cursor, bs, shuffle)?;
        let aware = self.cfg.data.boundary_aware;
        // Normalise by the global batch's target count, so accumulation and any number of
        // ranks compute the same mean as one big batch.
        let norm = count_targets(&batch.seqs, aware).max(1) as f64;
        // Rank r runs micro-batches r, r + N, r + 2N, … of the global batch.
        let mine: Vec<_> = batch.seqs.chunks(mbs).skip(rank).step_by(ranks).collect();
        // Embedding noise for this step's forward passes only (seeded by the step: resumable).
        let neftune = self.neftune.clone();
        let noise = NoiseOn::start(
            neftune.as_deref(),
            self.cfg.train.seed ^ self.state.step.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let tp = self.tp.clone();
        let backward = self.accumulate(mine.len(), |me: &Self, i| {
            let mb = me.rank_batch(causal_lm_batch(&me.model, mine[i], aware, &me.device)?)?;
            let (targets, shifted, tp) = (mb.targets, mb.shifted, tp.clone());
            Ok(MicroBatch {
                inputs: llama_inputs(&mb.ids),
                ctx: mb.ctx,
                loss_fn: on_output(move |logits: &Tensor| {
                    loss_of(tp.as_ref(), logits, &targets, shifted, norm)
                }),
            })
        })?;
        drop(noise);
        let out = self.apply(backward)?;
        self.state.cursor += bs as u64;
        self.state.tokens_seen += (bs * self.seq_len()) as u64;
        Ok(out)
    }

    /// One optimizer step on micro-batches someone else built (`make(self, i)` gives this
    /// rank's i-th of `n`, whole sequences: under sequence parallelism each rank runs its
    /// positions). Each one's `loss_fn` maps this rank's model output to its share of the
    /// global loss (a sum divided by a global count), the same on every rank of a model
    /// replica ([`super::OutputLayout`] makes whole per-token quantities of the output), so N
    /// ranks step exactly as one would. The RLHF trainers drive the parallel machinery
    /// through this.
    pub fn step_on<F>(&mut self, n: usize, mut make: F) -> Result<(f32, f64, f64)>
    where
        F: FnMut(&Self, usize) -> Result<MicroBatch<'static, AttnInputs>>,
    {
        let layout = self.output_layout();
        let mut backward = self.accumulate(n, |me: &Self, i| {
            let mb = make(me, i)?;
            let (inputs, ctx) = layout.shard(&mb.inputs, &mb.ctx)?;
            Ok(MicroBatch {
                inputs,
                ctx,
                loss_fn: mb.loss_fn,
            })
        })?;
        // Every sequence-parallel rank computed the whole loss; the sum counted it sp times.
        backward.loss /= self.sp.as_ref().map_or(1, |g| g.size()) as f32;
        self.apply(backward)
    }

    /// Forward and backward over this rank's `n` micro-batches, gradients handed to the
    /// data-parallel / ZeRO sink as each block finishes.
    fn accumulate<'m, F>(&self, n: usize, mut make: F) -> Result<Backward>
    where
        F: FnMut(&Self, usize) -> Result<MicroBatch<'m, AttnInputs>>,
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
            (Some(c), _, Some(z3)) => Sink::Zero3(Zero3GradSink::new(z3, c, ready)),
            (Some(c), Some(z), _) => {
                Sink::Zero(ZeroGradSink::new(c, &z.layout, z.stage, ready, bucket))
            }
            (Some(c), None, _) => Sink::Data(DataParallelSink::new(c, bucket, ready)),
            _ => Sink::Local(GradAccumulator::default()),
        };
        // Mixed precision: compute on a low-precision copy of the fp32 masters; gradients come
        // back to fp32 before any sink sees them.
        let dtype = self.cfg.parallel.compute_dtype();
        let mut weights = self.weights(dtype)?;
        let scale = self.state.loss_scaler.as_ref().map_or(1.0, |s| s.scale);
        let scaled = |mb: MicroBatch<'m, AttnInputs>| -> MicroBatch<'m, AttnInputs> {
            let f = mb.loss_fn;
            MicroBatch {
                inputs: mb.inputs,
                ctx: mb.ctx,
                loss_fn: Box::new(move |x: &Acts| Ok((f(x)? * scale)?)),
            }
        };
        let mut loss = 0.0f32;
        let mut bubble = None;
        if let Some(pp) = &self.pp {
            // The whole schedule runs into a local accumulator; the data-parallel (or ZeRO)
            // sink then gets the sums as if from one last micro-batch.
            let mbs = (0..n)
                .map(|i| Ok(scaled(make(self, i)?)))
                .collect::<Result<Vec<_>>>()?;
            let runner = pp.runner(&self.model, self.executor);
            let mut acc = GradAccumulator::default();
            let report = runner.run(&mut weights, &mbs, &mut ToF32(&mut acc))?;
            for name in self.model.tied_params() {
                runner.sync_tied(&mut acc.grads, &name)?;
            }
            pp.hand_over(&self.model, acc.grads, sink.hooks(true))?;
            let t = Tensor::new(&[report.loss_sum / scale as f32], &Device::Cpu)?;
            loss = pp.comm.all_reduce(&t, ReduceOp::Sum)?.to_vec1::<f32>()?[0];
            bubble = Some(report.bubble());
        }
        for i in (0..n).filter(|_| self.pp.is_none()) {
            let mb = scaled(make(self, i)?);
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
            Sink::Zero(z) => StepGrads::Shard(z.finish()?),
            Sink::Data(d) => StepGrads::Full(d.finish()?),
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
    fn apply(&mut self, backward: Backward) -> Result<(f32, f64, f64)> {
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
                let frozen: Vec<String> = g
                    .names()
                    .filter(|n| !matches!(n.as_str(), Llama::EMBED | "lm_head.weight"))
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
        let split_model = self.tp.is_some() || self.pp.is_some();
        let groups = NormGroups {
            tp: self.tp.as_ref(),
            pp: self.pp.as_ref().map(|p| p.comm.as_ref()),
            duplicate: self.pp.as_ref().and_then(|p| p.duplicate(&self.model)),
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
            (StepGrads::Shard(_), None) => unreachable!("shards only under ZeRO"),
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
                StepGrads::Chunks(chunks) => {
                    let z3 = self.zero3.as_mut().expect("chunks only under ZeRO-3");
                    z3.step(chunks, lr, clip, grad_norm)?;
                    self.state.optimizer_step = z3.adam.step;
                }
                StepGrads::Shard(shard) => {
                    let comm = self.comm.as_deref().expect("ZeRO runs over a communicator");
                    let zero = self
                        .zero
                        .as_mut()
                        .expect("ZeRO sink implies ZeRO optimizer");
                    zero.step(comm, &self.params, shard, lr, clip, grad_norm)?;
                    self.state.optimizer_step = zero.adam.step;
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

    /// Where blocks get their weights this step: the fp32 masters, a low-precision copy of them,
    /// or ZeRO-3 gathers.
    pub(super) fn weights(&self, dtype: DType) -> Result<Weights<'_>> {
        if let (Some(z), Some(comm)) = (&self.zero3, self.comm.as_deref()) {
            let blocks = (0..self.model.num_blocks())
                .map(|b| self.model.block_param_names(b))
                .collect();
            return Ok(Weights::Zero3(Zero3Source {
                zero: z,
                comm,
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

    /// Bytes of model state this rank keeps on disk.
    pub fn offloaded_bytes(&self) -> u64 {
        self.zero3
            .as_ref()
            .map(Zero3::offloaded_bytes)
            .or(self.zero.as_ref().map(ZeroOptimizer::offloaded_bytes))
            .unwrap_or(0)
    }

    /// Bytes this rank holds in memory for (parameters, gradients, optimizer moments), fp32.
    pub fn memory_bytes(&self) -> (u64, u64, u64) {
        if let Some(z) = &self.zero3 {
            return z.memory();
        }
        match &self.zero {
            Some(z) => z.memory(),
            None => {
                let psi = self.params.num_elements() as u64;
                (4 * psi, 4 * psi, 8 * psi)
            }
        }
    }
}
