//! Building a trainer rank: the mesh of process groups, the model and its weights (fresh,
//! HF, whole or distributed checkpoint), each sliced to this rank's part, and the optimizer.

use std::path::Path;

use candle_core::{DType, Device};

use super::checkpoint::{self, TrainerState};
use super::pipeline::PpRank;
use super::tensor_parallel::TpRank;
use super::trainer::Trainer;
use super::TrainConfig;
use super::{Freeze, Offload, Precision, SpMode};
use crate::checkpoint::llama as hf_llama;
use crate::data::PackedDataset;
use crate::dist::{Communicator, Group, ParallelDims, ProcessMesh};
use crate::exec::Executor;
use crate::models::llama::{init_each_param, init_params, Llama, LlamaConfig};
use crate::optim::{AdamW, AdamWConfig, LrSchedule};
use crate::parallel::sequence::SpMode as SeqSplit;
use crate::parallel::{FlatLayout, Placement, Zero3, ZeroOptimizer};
use crate::params::Params;
use crate::{Error, Result};

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
        Self::build(cfg, resume, device, comm, true)
    }

    /// A rank without pretraining data: the caller brings its micro-batches
    /// ([`Trainer::step_on`]) and `data.path` is not read.
    pub fn new_rank_without_data(
        cfg: TrainConfig,
        resume: Option<&Path>,
        device: Device,
        comm: Option<Box<dyn Communicator>>,
    ) -> Result<Self> {
        Self::build(cfg, resume, device, comm, false)
    }

    fn build(
        cfg: TrainConfig,
        resume: Option<&Path>,
        device: Device,
        comm: Option<Box<dyn Communicator>>,
        with_data: bool,
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
        match (t.freeze, cfg.parallel.zero_stage) {
            (Freeze::None, _) | (Freeze::NonEmbedding, 0) => {}
            (Freeze::NonEmbedding, z) => {
                return Err(Error::Config(format!(
                    "train.freeze = \"non_embedding\" with parallel.zero_stage = {z}: freezing needs zero_stage = 0"
                )))
            }
        }
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
        // Streamed initialisation makes whole parameters; tensor parallelism shards whole
        // ones first (below), so it initialises them whole.
        let stream_init = cfg.parallel.zero_stage == 3
            && comm.is_some()
            && tp_group.is_none()
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
                    let params = TpRank::new(g.clone(), &model)?.load(dir, &model, &device)?;
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
        let (train_data, val_data) = if with_data {
            let (train, val) = open_data(&cfg, &model)?;
            (Some(train), val)
        } else {
            (None, None)
        };
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
            Some(g) => Some(TpRank::new(g, &model)?),
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
            let megatron_sp = cfg.parallel.sp_mode == SpMode::Megatron;
            model = crate::parallel::tensor::parallelize(&model, t.group.clone(), megatron_sp)?;
        }
        if let Some(g) = &sp_group {
            let seq = train_data.as_ref().map_or(0, |d| d.manifest.seq_len);
            let sp = g.size();
            let heads = model.cfg.num_attention_heads / cfg.parallel.tp;
            if !seq.is_multiple_of(2 * sp) {
                return Err(Error::Config(format!(
                    "parallel.sp = {sp} needs the sequence length ({seq}, data.path manifest) to be a multiple of 2 × sp"
                )));
            }
            if cfg.parallel.sp_mode == SpMode::Ulysses && !heads.is_multiple_of(sp) {
                return Err(Error::Config(format!(
                    "parallel.sp_mode = \"ulysses\" splits each rank's {heads} attention heads over parallel.sp = {sp}: they must divide"
                )));
            }
            let mode = match cfg.parallel.sp_mode {
                SpMode::Ring => SeqSplit::Ring,
                _ => SeqSplit::Ulysses,
            };
            model = crate::parallel::sequence::parallelize(&model, g.clone(), mode)?.0;
        }
        let neftune = (t.neftune_alpha > 0.0).then(|| {
            let (noisy, handle) = super::neftune::Neftune::wrap(&model, t.neftune_alpha);
            model = noisy;
            handle
        });
        if let Some(p) = &mut pp {
            p.prepare(&mut model);
        }
        let params = match &pp {
            Some(p) => p.keep_mine(&model, &params, &mut opt)?,
            None => params,
        };
        if cfg.parallel.precision == Precision::Fp16 && state.loss_scaler.is_none() {
            state.loss_scaler = Some(crate::optim::LossScaler::default());
        }
        let mut params = params;
        let placement = match (cfg.parallel.offload, &comm) {
            (Offload::Disk, Some(c)) => {
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
            neftune,
        })
    }
}

/// The packed training split (checked against the model's vocabulary) and the validation split
/// when it has sequences.
fn open_data(cfg: &TrainConfig, model: &Llama) -> Result<(PackedDataset, Option<PackedDataset>)> {
    let seed = cfg.train.seed;
    let train_data = PackedDataset::open(&cfg.data.path, "train", seed)?;
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
    let val_data = PackedDataset::open(&cfg.data.path, "validation", seed)?;
    Ok((train_data, (!val_data.is_empty()).then_some(val_data)))
}
