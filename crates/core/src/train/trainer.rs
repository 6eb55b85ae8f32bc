//! The training loop: global batch → micro-batches through the block-wise executor →
//! clip → AdamW → schedule; evaluation, checkpoints, metrics.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::batch::{causal_lm_batch, count_targets};
use super::checkpoint::{self, TrainerState};
use super::grad_norm::NormGroups;
use super::pipeline::PpRank;
use super::step::{Sink, StepGrads, ToF32, Weights};
use super::tensor_parallel::TpRank;
use super::{MetricsWriter, TrainConfig};
use crate::checkpoint::llama as hf_llama;
use crate::data::PackedDataset;
use crate::dist::{run_local, Communicator, Group, ParallelDims, ProcessMesh, ReduceOp};
use crate::exec::{grad_ready_block, BlockModel, Executor, FullParams, GradAccumulator};
use crate::models::llama::{init_each_param, init_params, Llama, LlamaConfig};
use crate::nn::cross_entropy_sum;
use crate::optim::{clip_to_norm, AdamW, AdamWConfig, LrSchedule};
use crate::parallel::sequence::SpMode;
use crate::parallel::{
    DataParallelSink, FlatLayout, Placement, Zero3, Zero3GradSink, Zero3Source, ZeroGradSink,
    ZeroOptimizer,
};
use crate::params::Params;
use crate::{Error, Result};

pub struct Trainer {
    pub cfg: TrainConfig,
    pub model: Llama,
    pub params: Params,
    pub opt: AdamW,
    pub schedule: LrSchedule,
    pub state: TrainerState,
    pub executor: Executor,
    train_data: PackedDataset,
    val_data: Option<PackedDataset>,
    device: Device,
    /// This rank's communicator when data parallel; `None` for one rank.
    comm: Option<Box<dyn Communicator>>,
    /// The tensor-parallel group and plan when `parallel.tp > 1`.
    tp: Option<TpRank>,
    /// The pipeline group, schedule and stages when `parallel.pp > 1`.
    pp: Option<PpRank>,
    /// All ranks of the job when they form a mesh (otherwise `comm` is all of them).
    world: Option<Box<dyn Communicator>>,
    /// Rank in the whole job (rank 0 writes metrics and checkpoints).
    world_rank: usize,
    /// Which share of each global batch this rank runs: data-parallel rank and size.
    data_rank: usize,
    data_ranks: usize,
    /// The sequence-parallel group (ulysses or ring) when `parallel.sp > 1`.
    sp: Option<Group>,
    /// Bytes this rank sent during the last step.
    pub last_step_comm_bytes: u64,
    /// Sharded optimizer when `parallel.zero_stage` is 1 or 2 over several ranks.
    zero: Option<ZeroOptimizer>,
    /// Sharded parameters and optimizer under ZeRO-3 (then `params` is empty).
    zero3: Option<Zero3>,
    /// Test hook: this rank fails when it reaches this step (simulates a crashed rank).
    pub fail_at_step: Option<u64>,
    /// Test hook: an inf is written into the gradients at these steps.
    pub inject_overflow_at: Vec<u64>,
    /// Whether the last step was skipped (fp16 overflow).
    pub last_step_skipped: bool,
    /// Idle fraction of this rank during the last step's pipeline schedule (pp > 1).
    pub last_bubble: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct RunSummary {
    pub first_loss: Option<f32>,
    pub last_loss: Option<f32>,
    pub last_val_loss: Option<f64>,
    pub steps: u64,
    pub final_dir: Option<PathBuf>,
    /// The rank that produced this summary (rank 0 prints and samples).
    pub rank: usize,
}

impl Trainer {
    /// Builds the model (HF directory or from-scratch config), data and optimizer; with
    /// `resume`, restores weights, moments, step and cursor from that checkpoint.
    pub fn new(cfg: TrainConfig, resume: Option<&Path>, device: Device) -> Result<Self> {
        Self::new_rank(cfg, resume, device, None)
    }

    /// One rank of a job; `comm` spans all its ranks, which `parallel.dp × parallel.tp`
    /// arranges into a mesh.
    pub fn new_rank(
        cfg: TrainConfig,
        resume: Option<&Path>,
        device: Device,
        comm: Option<Box<dyn Communicator>>,
    ) -> Result<Self> {
        cfg.parallel.validate().map_err(Error::Config)?;
        let world_rank = comm.as_ref().map_or(0, |c| c.rank());
        let p = &cfg.parallel;
        let mut world_comm = None;
        let (comm, tp_group, pp_comm, sp_group, (data_rank, data_ranks)) = match comm {
            Some(world) if p.tp > 1 || p.pp > 1 || p.sp > 1 => {
                let dims = ParallelDims::new(p.data_parallel(), p.tp, p.pp, p.sp);
                let mesh = ProcessMesh::new(world, dims)?;
                let data = (mesh.coords.dp, dims.dp);
                // Gradients are summed over every rank holding the same weights: data and
                // sequence ranks alike.
                let grads = (dims.dp * dims.sp > 1).then_some(mesh.dp_sp);
                let tp = (p.tp > 1).then(|| Group::new(mesh.tp));
                let sp = (p.sp > 1).then(|| Group::new(mesh.sp));
                world_comm = Some(mesh.world);
                (grads, tp, (p.pp > 1).then_some(mesh.pp), sp, data)
            }
            c => {
                let data = c.as_ref().map_or((0, 1), |c| (c.rank(), c.size()));
                (c, None, None, None, data)
            }
        };
        // ZeRO (and offload) on one rank: a world of one.
        let comm = match comm {
            None if cfg.parallel.zero_stage > 0 => {
                let timeout = std::time::Duration::from_secs(cfg.parallel.timeout_s);
                let one = crate::dist::LocalComm::world(1, timeout)
                    .pop()
                    .expect("one rank");
                Some(Box::new(one) as Box<dyn Communicator>)
            }
            c => c,
        };
        let t = &cfg.train;
        let ranks = data_ranks;
        let micro = t.batch_size / t.micro_batch_size.max(1);
        if ranks > 1 && !micro.is_multiple_of(ranks) {
            return Err(Error::Config(format!(
                "train.batch_size ({}) / train.micro_batch_size ({}) = {micro} micro-batches do not split over parallel.dp = {ranks} ranks",
                t.batch_size, t.micro_batch_size
            )));
        }
        if t.batch_size == 0
            || t.micro_batch_size == 0
            || !t.batch_size.is_multiple_of(t.micro_batch_size)
        {
            return Err(Error::Config(format!(
                "train.batch_size ({}) must be a positive multiple of train.micro_batch_size ({})",
                t.batch_size, t.micro_batch_size
            )));
        }
        let stream_init = cfg.parallel.zero_stage == 3
            && comm.is_some()
            && resume.is_none()
            && cfg.model.hf_dir.is_none();
        let distributed = resume.is_some_and(crate::checkpoint::distributed::is_distributed);
        let (mut model, params) = match (resume, &cfg.model.hf_dir, &cfg.model.config) {
            // Each rank reads its own slices below.
            (Some(dir), _, _) if distributed => (
                Llama::new(LlamaConfig::from_file(&dir.join("config.json"))?)?,
                Params::new(),
            ),
            (Some(dir), _, _) => hf_llama::load_llama(dir, DType::F32, &device)?,
            (None, Some(_), Some(_)) => {
                return Err(Error::Config(
                    "set only one of model.hf_dir and model.config".into(),
                ))
            }
            (None, Some(dir), None) => match &tp_group {
                // Each tensor-parallel rank reads only its slices.
                Some(g) => {
                    let model = Llama::new(LlamaConfig::from_file(&dir.join("config.json"))?)?;
                    let params = TpRank::new(g.clone(), &model.cfg)?.load(dir, &model, &device)?;
                    (model, params)
                }
                None => hf_llama::load_llama(dir, DType::F32, &device)?,
            },
            (None, None, Some(c)) => {
                let model = Llama::new(c.clone())
                    .map_err(|e| Error::Config(format!("model.config: {e}")))?;
                // ZeRO-3 initialises straight into the shards (below).
                let params = if stream_init {
                    Params::new()
                } else {
                    init_params(&model, cfg.model.init_seed, &device)?
                };
                (model, params)
            }
            (None, None, None) => {
                return Err(Error::Config("set model.hf_dir or model.config".into()))
            }
        };
        let train_data = PackedDataset::open(&cfg.data.path, "train", t.seed)?;
        let m = &train_data.manifest;
        if m.vocab_size > model.cfg.vocab_size {
            return Err(Error::Config(format!(
                "tokenizer vocab size {} (data.path {}: manifest.json, tokenizer {}) is larger than the model's vocab_size {}",
                m.vocab_size,
                cfg.data.path.display(),
                m.tokenizer,
                model.cfg.vocab_size
            )));
        }
        if train_data.is_empty() {
            return Err(Error::file(
                &cfg.data.path,
                "training split has no sequences",
            ));
        }
        let val_data = PackedDataset::open(&cfg.data.path, "validation", t.seed)?;
        let val_data = (!val_data.is_empty()).then_some(val_data);
        let mut opt = AdamW::new(AdamWConfig {
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
            weight_decay: t.weight_decay,
            no_decay: t.no_decay.clone(),
        });
        let schedule = LrSchedule {
            kind: t.schedule,
            peak: t.lr,
            min: t.min_lr,
            warmup_steps: t.warmup_steps,
            total_steps: t.max_steps,
        };
        let tp = match tp_group {
            Some(g) => Some(TpRank::new(g, &model.cfg)?),
            None => None,
        };
        let mut pp = match pp_comm {
            Some(c) => Some(PpRank::new(c, &cfg.parallel, &model)?),
            None => None,
        };
        let (params, mut state) = match resume {
            Some(dir) if distributed => {
                let names = pp.as_ref().map(|p| p.my_names(&model));
                let params = checkpoint::load_distributed(
                    dir,
                    &model,
                    tp.as_ref().map(|t| (&t.plan, t.rank(), t.size())),
                    names.as_deref(),
                    &mut opt,
                )?;
                let state = checkpoint::read_state(dir)?;
                opt.step = state.optimizer_step;
                (params, state)
            }
            Some(dir) => {
                let state = checkpoint::load_state(dir, &params, &mut opt)?;
                (params, state)
            }
            None => (
                params,
                TrainerState {
                    data_seed: t.seed,
                    ..Default::default()
                },
            ),
        };
        let params = match &tp {
            // Checkpoints and fresh inits are whole; HF and distributed loads are sliced.
            Some(t)
                if (resume.is_some() && !distributed)
                    || (resume.is_none() && cfg.model.hf_dir.is_none()) =>
            {
                t.shard_moments(&mut opt, &params)?;
                t.shard(&params)?
            }
            _ => params,
        };
        if let Some(t) = &tp {
            let megatron_sp = cfg.parallel.sp_mode == "megatron";
            model = crate::parallel::tensor::parallelize(&model, t.group.clone(), megatron_sp)?;
        }
        if let Some(g) = &sp_group {
            let (sp, seq) = (g.size(), train_data.manifest.seq_len);
            let heads = model.cfg.num_attention_heads / cfg.parallel.tp;
            if !seq.is_multiple_of(2 * sp) {
                return Err(Error::Config(format!(
                    "parallel.sp = {sp} needs the sequence length ({seq}, data.path manifest) to be a multiple of 2 × sp"
                )));
            }
            if cfg.parallel.sp_mode == "ulysses" && !heads.is_multiple_of(sp) {
                return Err(Error::Config(format!(
                    "parallel.sp_mode = \"ulysses\" splits each rank's {heads} attention heads over parallel.sp = {sp}: they must divide"
                )));
            }
            let mode = match cfg.parallel.sp_mode.as_str() {
                "ring" => SpMode::Ring,
                _ => SpMode::Ulysses,
            };
            model = crate::parallel::sequence::parallelize(&model, g.clone(), mode)?.0;
        }
        if let Some(p) = &mut pp {
            p.prepare(&mut model);
        }
        let params = match &pp {
            Some(p) => p.keep_mine(&model, &params, &mut opt)?,
            None => params,
        };
        if cfg.parallel.precision == "fp16" && state.loss_scaler.is_none() {
            state.loss_scaler = Some(crate::optim::LossScaler::default());
        }
        let mut params = params;
        let placement = match (cfg.parallel.offload.as_str(), &comm) {
            ("disk", Some(c)) => {
                let base = cfg
                    .parallel
                    .offload_dir
                    .clone()
                    .unwrap_or_else(|| cfg.train.out_dir.join("offload"));
                let budget = cfg.parallel.memory_budget_bytes().map_err(Error::Config)?;
                let _ = c;
                Placement::disk(base.join(format!("rank{world_rank}")), budget)
            }
            _ => Placement::Memory,
        };
        let zero3 = match (&comm, cfg.parallel.zero_stage) {
            (Some(c), 3) => {
                let fresh = AdamW::new(opt.cfg.clone());
                let full = std::mem::replace(&mut opt, fresh);
                let z = if stream_init {
                    let seed = cfg.model.init_seed;
                    let init =
                        |f: &mut crate::models::llama::ParamSink| init_each_param(&model, seed, f);
                    Zero3::from_init(init, full, c.rank(), c.size(), &placement)?
                } else {
                    Zero3::from_full(&params, full, c.rank(), c.size(), &placement)?
                };
                // Only the shards stay: the full weights are gathered block by block.
                params = Params::new();
                Some(z)
            }
            _ => None,
        };
        let zero = match (&comm, cfg.parallel.zero_stage) {
            (Some(c), stage @ 1..=2) => {
                let fresh = AdamW::new(opt.cfg.clone());
                let full = std::mem::replace(&mut opt, fresh);
                let layout = FlatLayout::new(&params, c.size());
                Some(ZeroOptimizer::from_full(
                    stage,
                    layout,
                    c.rank(),
                    full,
                    &placement,
                )?)
            }
            _ => None,
        };
        let executor = Executor {
            activation_checkpointing: t.activation_checkpointing,
        };
        Ok(Self {
            cfg,
            model,
            params,
            opt,
            schedule,
            state,
            executor,
            train_data,
            val_data,
            device,
            comm,
            tp,
            pp,
            world: world_comm,
            world_rank,
            data_rank,
            data_ranks,
            sp: sp_group,
            last_step_comm_bytes: 0,
            zero,
            zero3,
            fail_at_step: None,
            inject_overflow_at: Vec::new(),
            last_step_skipped: false,
            last_bubble: None,
        })
    }

    fn seq_len(&self) -> usize {
        self.train_data.manifest.seq_len
    }

    fn rank(&self) -> usize {
        self.data_rank
    }

    fn ranks(&self) -> usize {
        self.data_ranks
    }

    /// Rank 0 writes metrics, checkpoints and plots.
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
        if self.fail_at_step == Some(self.state.step) {
            return Err(crate::msg!(
                "injected failure at step {} (test hook)",
                self.state.step
            ));
        }
        let (bs, mbs) = (self.cfg.train.batch_size, self.cfg.train.micro_batch_size);
        let (rank, ranks) = (self.rank(), self.ranks());
        let sent_before = self.bytes_sent();
        let batch = self
            .train_data
            .batch(self.state.cursor, bs, self.cfg.data.shuffle)?;
        let aware = self.cfg.data.boundary_aware;
        // Normalise by the global batch's target count, so accumulation and any number of
        // ranks compute the same mean as one big batch.
        let norm = count_targets(&batch.seqs, aware).max(1) as f64;
        // Rank r runs micro-batches r, r + N, r + 2N, … of the global batch.
        let mine: Vec<_> = batch.seqs.chunks(mbs).skip(rank).step_by(ranks).collect();
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
        let mut loss = 0.0f32;
        let mut bubble = None;
        if let Some(pp) = &self.pp {
            // The whole schedule runs into a local accumulator; the data-parallel (or ZeRO)
            // sink then gets the sums as if from one last micro-batch.
            let mut mbs = Vec::with_capacity(mine.len());
            for seqs in &mine {
                let mb =
                    self.rank_batch(causal_lm_batch(&self.model, seqs, aware, &self.device)?)?;
                let (targets, shifted, tp) = (mb.targets, mb.shifted, self.tp.as_ref());
                mbs.push(crate::parallel::pipeline_run::MicroBatch {
                    inputs: mb.ids,
                    ctx: mb.ctx,
                    loss_fn: Box::new(move |logits: &Tensor| {
                        Ok((loss_of(tp, logits, &targets, shifted, norm)? * scale)?)
                    }),
                });
            }
            let runner = pp.runner(&self.model, self.executor);
            let mut acc = GradAccumulator::default();
            let report = runner.run(&mut weights, &mbs, &mut ToF32(&mut acc))?;
            runner.sync_tied(&mut acc.grads, Llama::EMBED)?;
            pp.hand_over(&self.model, acc.grads, sink.hooks(true))?;
            let t = Tensor::new(&[report.loss_sum / scale as f32], &Device::Cpu)?;
            loss = pp.comm.all_reduce(&t, ReduceOp::Sum)?.to_vec1::<f32>()?[0];
            bubble = Some(report.bubble());
        }
        for (i, seqs) in mine.iter().enumerate().filter(|_| self.pp.is_none()) {
            let mb = self.rank_batch(causal_lm_batch(&self.model, seqs, aware, &self.device)?)?;
            let (targets, shifted, tp) = (mb.targets, mb.shifted, self.tp.as_ref());
            let loss_fn =
                move |logits: &Tensor| Ok((loss_of(tp, logits, &targets, shifted, norm)? * scale)?);
            let mut to_f32 = ToF32(sink.hooks(i + 1 == mine.len()));
            let out = self.executor.forward_backward_with(
                &self.model,
                &mut weights,
                &mb.ids,
                &mb.ctx,
                &loss_fn,
                &mut to_f32,
            )?;
            loss += out.loss / scale as f32;
        }
        drop(weights);
        let mut grads = match sink {
            Sink::Zero3(z) => StepGrads::Chunks(z.finish()?),
            Sink::Zero(z) => StepGrads::Shard(z.finish()?),
            Sink::Data(d) => StepGrads::Full(d.finish()?),
            Sink::Local(l) => StepGrads::Full(l.grads),
        };
        self.last_bubble = bubble;
        if let Some(c) = &self.comm {
            let l = c.all_reduce(&Tensor::new(&[loss], &Device::Cpu)?, ReduceOp::Sum)?;
            loss = l.to_vec1::<f32>()?[0];
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
            (StepGrads::Chunks(c), _) => {
                let z3 = self.zero3.as_ref().expect("chunks only under ZeRO-3");
                z3.grad_norm(self.comm.as_deref().expect("ZeRO comm"), c)?
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
        self.state.cursor += bs as u64;
        self.state.tokens_seen += (bs * self.seq_len()) as u64;
        self.last_step_comm_bytes = self.bytes_sent() - sent_before;
        Ok((loss, grad_norm, lr))
    }

    /// Where blocks get their weights this step: the fp32 masters, a low-precision copy of them,
    /// or ZeRO-3 gathers.
    fn weights(&self, dtype: DType) -> Result<Weights<'_>> {
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

    /// All parameters (gathered from every rank under ZeRO-3 or tensor parallelism, so then
    /// every rank must call it).
    /// Under pipeline parallelism only the first stage's ranks get them all.
    pub fn full_params(&self) -> Result<Params> {
        if self.pp.is_some() {
            return Ok(self.gather_model()?.map(|(p, _)| p).unwrap_or_default());
        }
        match (&self.zero3, self.comm.as_deref(), &self.tp) {
            (Some(z), Some(c), _) => Ok(z.gather_full(c)?.0),
            (_, _, Some(t)) => t.gather(&self.params),
            _ => Ok(self.params.clone()),
        }
    }

    /// Whole weights and Adam moments from tensor-parallel slices, pipeline stages and ZeRO
    /// shards (a collective); `None` on ranks that do not end up holding them all.
    fn gather_model(&self) -> Result<Option<(Params, AdamW)>> {
        let comm = self.comm.as_deref();
        if let (Some(z), Some(c)) = (&self.zero3, comm) {
            return Ok(Some(z.gather_full(c)?));
        }
        let opt = match (&self.zero, comm) {
            (Some(z), Some(c)) => z.gather_full(c)?,
            _ => self.opt_copy(),
        };
        let (params, opt) = match &self.tp {
            Some(t) => (
                t.gather(&self.params)?,
                t.gather_moments(&opt, &self.params)?,
            ),
            None => (self.params.clone(), opt),
        };
        match &self.pp {
            Some(p) => p.gather(&self.model, &params, &opt),
            None => Ok(Some((params, opt))),
        }
    }

    /// Waits for every rank of the job.
    fn barrier(&self) -> Result<()> {
        match self.world.as_deref().or(self.comm.as_deref()) {
            Some(w) => w.barrier(),
            None => Ok(()),
        }
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
            let duplicate = self.pp.as_ref().and_then(|p| p.duplicate(&self.model));
            let mut owned = Vec::new();
            for (name, var) in params.iter() {
                if duplicate == Some(name) {
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
        hf_llama::save_config(&tmp, &self.model, DType::F32)?;
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

    /// Mean validation loss per target token over `eval_batches` batches (0 = all).
    pub fn evaluate(&mut self) -> Result<Option<f64>> {
        let Some(mut val) = self.val_data.take() else {
            return Ok(None);
        };
        let result = self.evaluate_on(&mut val);
        self.val_data = Some(val);
        result
    }

    fn evaluate_on(&self, val: &mut PackedDataset) -> Result<Option<f64>> {
        let mbs = self.cfg.train.micro_batch_size;
        let batches = match self.cfg.train.eval_batches {
            0 => val.len().div_ceil(mbs),
            n => n.min(val.len().div_ceil(mbs)),
        };
        let (rank, ranks) = (self.rank(), self.ranks());
        let dtype = self.cfg.parallel.compute_dtype();
        let mut weights = self.weights(dtype)?;
        let (mut sum, mut count) = (0.0f64, 0usize);
        let mut staged = Vec::new();
        for b in (0..batches).skip(rank).step_by(ranks) {
            let start = b * mbs;
            let n = mbs.min(val.len() - start);
            // A fixed seeded shuffle: the same representative subset at every evaluation
            // (files are concatenated in order, so the first sequences are one source).
            let batch = val.batch(start as u64, n, true)?;
            let mb = self.rank_batch(causal_lm_batch(
                &self.model,
                &batch.seqs,
                self.cfg.data.boundary_aware,
                &self.device,
            )?)?;
            count += mb.loss_tokens;
            let (targets, shifted, tp) = (mb.targets, mb.shifted, self.tp.as_ref());
            if self.pp.is_some() {
                staged.push(crate::parallel::pipeline_run::MicroBatch {
                    inputs: mb.ids,
                    ctx: mb.ctx,
                    loss_fn: Box::new(move |l: &Tensor| loss_of(tp, l, &targets, shifted, 1.0)),
                });
                continue;
            }
            let logits = self
                .executor
                .forward_with(&self.model, &mut weights, &mb.ids, &mb.ctx)?;
            let l = loss_of(tp, &logits, &targets, shifted, 1.0)?;
            sum += l.to_scalar::<f32>()? as f64;
        }
        if let Some(pp) = &self.pp {
            let local = pp
                .runner(&self.model, self.executor)
                .forward_only(&mut weights, &staged)?;
            let t = Tensor::new(&[local as f64], &Device::Cpu)?;
            sum = pp.comm.all_reduce(&t, ReduceOp::Sum)?.to_vec1::<f64>()?[0];
        }
        if let Some(c) = &self.comm {
            let t = Tensor::new(&[sum, count as f64], &Device::Cpu)?;
            let v = c.all_reduce(&t, ReduceOp::Sum)?.to_vec1::<f64>()?;
            (sum, count) = (v[0], v[1] as usize);
        }
        Ok((count > 0).then(|| sum / count as f64))
    }

    /// Writes a checkpoint (rank 0). Under ZeRO every rank must call it: the moment shards are
    /// gathered first, so the file is the same whatever the layout.
    pub fn save_checkpoint(&self) -> Result<Option<PathBuf>> {
        match self.cfg.train.checkpoint_format.as_str() {
            "hf" => {}
            "distributed" => return self.save_distributed(),
            other => {
                return Err(Error::Config(format!(
                    "train.checkpoint_format `{other}`: expected hf or distributed"
                )))
            }
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
        checkpoint::save(&dir, &self.model, params, opt, &self.state, shard)?;
        checkpoint::prune(out, self.cfg.train.keep_last)?;
        tracing::info!(dir = %dir.display(), "checkpoint saved");
        Ok(Some(dir))
    }

    /// Trains until `stop_at` (default `train.max_steps`), evaluating and checkpointing as
    /// configured; always checkpoints at the end and plots the loss curve.
    pub fn run(&mut self, stop_at: Option<usize>) -> Result<RunSummary> {
        let t = self.cfg.train.clone();
        let end = stop_at.unwrap_or(t.max_steps).min(t.max_steps) as u64;
        let main = self.is_main();
        let metrics_path = t.out_dir.join("metrics.jsonl");
        let mut metrics = if main {
            std::fs::create_dir_all(&t.out_dir).map_err(|e| Error::io(&t.out_dir, e))?;
            Some(MetricsWriter::open(&metrics_path, Some(self.state.step))?)
        } else {
            None
        };
        let bar = if main {
            ProgressBar::new(end)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("template"),
        );
        bar.set_position(self.state.step);
        let tokens_per_step = (t.batch_size * self.seq_len()) as f64;
        let mut summary = RunSummary {
            first_loss: None,
            last_loss: None,
            last_val_loss: None,
            steps: 0,
            final_dir: None,
            rank: self.world_rank,
        };
        tracing::info!(
            params = self.params.num_elements(),
            start = self.state.step,
            end,
            "training"
        );
        while self.state.step < end {
            let started = Instant::now();
            let (loss, grad_norm, lr) = self.train_step()?;
            let secs = started.elapsed().as_secs_f64();
            let step = self.state.step;
            summary.first_loss.get_or_insert(loss);
            summary.last_loss = Some(loss);
            summary.steps += 1;
            let mut rec = json!({
                "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "tokens": self.state.tokens_seen, "tokens_per_s": tokens_per_step / secs,
                "step_s": secs, "comm_bytes": self.last_step_comm_bytes,
            });
            if let Some(sc) = &self.state.loss_scaler {
                rec["loss_scale"] = json!(sc.scale);
            }
            if self.last_step_skipped {
                rec["skipped"] = json!(true);
            }
            if let (Some(b), Some(pp)) = (self.last_bubble, &self.pp) {
                let m = t.batch_size / t.micro_batch_size / self.ranks();
                rec["pp_bubble"] = json!(b);
                rec["pp_bubble_theory"] = json!(pp.schedule.theoretical_bubble(pp.comm.size(), m));
            }
            let (mp, mg, mo) = self.memory_bytes();
            rec["mem_params_bytes"] = json!(mp);
            rec["mem_grads_bytes"] = json!(mg);
            rec["mem_optim_bytes"] = json!(mo);
            rec["offloaded_bytes"] = json!(self.offloaded_bytes());
            let last = step == end;
            if (t.eval_every > 0 && step.is_multiple_of(t.eval_every as u64)) || last {
                if let Some(v) = self.evaluate()? {
                    rec["val_loss"] = json!(v);
                    rec["val_ppl"] = json!(v.exp());
                    summary.last_val_loss = Some(v);
                    tracing::info!(step, val_loss = v, val_ppl = v.exp(), "evaluation");
                }
            }
            if let Some(m) = metrics.as_mut() {
                m.write(&rec)?;
            }
            bar.set_position(step);
            bar.set_message(format!(
                "loss {loss:.4} lr {lr:.2e} {:.0} tok/s",
                tokens_per_step / secs
            ));
            let save = (t.save_every > 0 && step.is_multiple_of(t.save_every as u64)) || last;
            if save {
                if let Some(dir) = self.save_checkpoint()? {
                    summary.final_dir = Some(dir);
                }
            }
        }
        bar.finish();
        if main && metrics_path.exists() {
            let png = t.out_dir.join("loss.png");
            if let Err(e) = super::plot_loss_curve(&metrics_path, &png) {
                tracing::warn!("loss curve not drawn: {e}");
            }
        }
        Ok(summary)
    }
}

/// Runs training as configured: one rank in this thread, `parallel.nproc` local ranks as
/// threads, or this process's rank of an MPI job. Returns rank 0's summary (under MPI, each
/// process returns its own; `RunSummary::rank` tells which).
pub fn train(
    cfg: TrainConfig,
    resume: Option<&Path>,
    stop_at: Option<usize>,
) -> Result<RunSummary> {
    cfg.parallel.validate().map_err(Error::Config)?;
    if cfg.parallel.backend == "mpi" {
        return train_mpi(cfg, resume, stop_at);
    }
    let n = cfg.parallel.nproc;
    if n == 1 {
        return Trainer::new(cfg, resume, Device::Cpu)?.run(stop_at);
    }
    let timeout = std::time::Duration::from_secs(cfg.parallel.timeout_s);
    let mut out = run_local(n, timeout, |comm| {
        let comm: Box<dyn Communicator> = Box::new(comm);
        Trainer::new_rank(cfg.clone(), resume, Device::Cpu, Some(comm))?.run(stop_at)
    })?;
    Ok(out.swap_remove(0))
}

#[cfg(feature = "mpi")]
fn train_mpi(
    mut cfg: TrainConfig,
    resume: Option<&Path>,
    stop_at: Option<usize>,
) -> Result<RunSummary> {
    use crate::dist::MpiComm;
    let timeout = std::time::Duration::from_secs(cfg.parallel.timeout_s);
    let world = MpiComm::world(timeout)?;
    let _mpi = world.keep_alive();
    let (rank, size) = (world.rank(), world.size());
    let p = &mut cfg.parallel;
    if p.nproc != 1 && p.nproc != size {
        return Err(Error::Config(format!(
            "parallel.nproc = {} but mpirun started {size} processes",
            p.nproc
        )));
    }
    p.nproc = size;
    p.validate()
        .map_err(|e| Error::Config(format!("{e} (mpirun started {size} processes)")))?;
    let comm: Option<Box<dyn Communicator>> =
        (size > 1 || p.zero_stage > 0).then(|| Box::new(world) as Box<dyn Communicator>);
    // Test hook for the mpirun failure test: COLOSSAL_TEST_FAIL_AT="RANK:STEP".
    let fail_at = std::env::var("COLOSSAL_TEST_FAIL_AT").ok().and_then(|v| {
        let (r, s) = v.split_once(':')?;
        (r.parse() == Ok(rank)).then(|| s.parse().ok())?
    });
    let run = Trainer::new_rank(cfg, resume, Device::Cpu, comm).and_then(|mut t| {
        t.fail_at_step = fail_at;
        t.run(stop_at)
    });
    match run {
        Ok(s) => Ok(s),
        Err(e) if size > 1 => {
            // Peers may be blocked in a receive: end the whole job now, naming this rank.
            eprintln!("rank {rank} failed: {e}");
            crate::dist::mpi_abort(1)
        }
        Err(e) => Err(e),
    }
}

#[cfg(not(feature = "mpi"))]
fn train_mpi(_: TrainConfig, _: Option<&Path>, _: Option<usize>) -> Result<RunSummary> {
    unreachable!("ParallelConfig::validate rejects backend = mpi without the mpi feature")
}

/// Sum of token cross-entropies of `logits` (B, T, V) — vocabulary-parallel on a
/// tensor-parallel rank — divided by `norm`. `targets` cover every position, or with
/// `shifted` the first T − 1 (the next-token targets of a whole sequence).
fn loss_of(
    tp: Option<&TpRank>,
    logits: &Tensor,
    targets: &[i64],
    shifted: bool,
    norm: f64,
) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let rows = if shifted {
        logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?
    } else {
        logits.reshape((b * t, v))?
    };
    let (sum, _) = match tp {
        Some(tp) => tp.cross_entropy(&rows, targets)?,
        None => cross_entropy_sum(&rows, targets, super::batch::IGNORE)?,
    };
    Ok((sum / norm)?)
}

/// A micro-batch as one rank sees it.
struct RankBatch {
    ids: Tensor,
    ctx: crate::models::llama::AttnInputs,
    targets: Vec<i64>,
    /// `targets` are the next-token targets of the first T − 1 positions (no sequence split).
    shifted: bool,
    loss_tokens: usize,
}

impl Trainer {
    /// The micro-batch in compute precision; under ulysses/ring only this rank's positions,
    /// each with its own target.
    fn rank_batch(&self, mb: super::LmBatch) -> Result<RankBatch> {
        let dtype = self.cfg.parallel.compute_dtype();
        let ctx = if dtype == DType::F32 {
            mb.inputs
        } else {
            mb.inputs.to_dtype(dtype)?
        };
        let Some(g) = &self.sp else {
            return Ok(RankBatch {
                ids: mb.ids,
                ctx,
                targets: mb.targets,
                shifted: true,
                loss_tokens: mb.loss_tokens,
            });
        };
        use crate::parallel::sequence::{local_positions, shard_inputs, shard_tokens};
        let (b, t) = mb.ids.dims2()?;
        let (sp, rank) = (g.size(), g.rank());
        let positions = local_positions(t, sp, rank)?;
        let ignore = super::batch::IGNORE;
        let targets: Vec<i64> = (0..b)
            .flat_map(|r| {
                let row = &mb.targets[r * (t - 1)..(r + 1) * (t - 1)];
                positions
                    .iter()
                    .map(move |&p| row.get(p).copied().unwrap_or(ignore))
            })
            .collect();
        Ok(RankBatch {
            ids: shard_tokens(&mb.ids, sp, rank)?,
            ctx: shard_inputs(&ctx, sp, rank)?,
            loss_tokens: targets.iter().filter(|&&x| x != ignore).count(),
            targets,
            shifted: false,
        })
    }
}

/// Sum of next-token cross-entropies of `logits` (B, T, V) against flattened targets,
/// divided by `norm`.
pub fn lm_loss(logits: &Tensor, targets: &[i64], norm: f64) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let shifted = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
    let (sum, _) = cross_entropy_sum(&shifted, targets, super::batch::IGNORE)?;
    Ok((sum / norm)?)
}
