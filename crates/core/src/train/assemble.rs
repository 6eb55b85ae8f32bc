//! Building one rank of a job for any model family: the mesh of process groups, the model and
//! its weights (fresh, whole, already sliced, or a whole or distributed checkpoint), each cut
//! to this rank's part (tensor slices, pipeline stages, ZeRO shards, offload), and the
//! optimizer.

use std::path::Path;

use candle_core::{DType, Device};

use super::checkpoint::{self, TrainerState};
use super::engine::Engine;
use super::expert_parallel::EpRank;
use super::pipeline::PpRank;
use super::tensor_parallel::TpRank;
use super::TrainConfig;
use super::{CheckpointFormat, Freeze, Offload, Precision, SpMode};
use crate::dist::{Communicator, Group, ParallelDims, ProcessMesh};
use crate::exec::Executor;
use crate::models::{init_all, init_each, ModelFamily};
use crate::optim::{AdamW, AdamWConfig, LrSchedule};
use crate::parallel::sequence::SpMode as SeqSplit;
use crate::parallel::{FlatLayout, Placement, Zero3, ZeroOptimizer};
use crate::params::Params;
use crate::{Error, Result};

/// Where a rank's model and weights come from.
pub enum Origin<'a, M> {
    /// A checkpoint this engine wrote (whole or distributed): weights, moments, step, cursor.
    Resume(&'a Path),
    /// Initialised as the family's parameter specs say, from this seed (under ZeRO-3 straight
    /// into the shards).
    Fresh { model: M, seed: u64 },
    /// Whole weights (every rank cuts its part).
    Whole { model: M, params: Params },
    /// This tensor-parallel rank's slices already (read sliced from a checkpoint).
    Sliced { model: M, params: Params },
}

/// This rank's process groups, as `parallel`'s dimensions arrange the job's ranks.
pub struct RankGroups {
    pub(super) world_rank: usize,
    /// Where gradients are summed (data and sequence ranks holding the same weights) and
    /// ZeRO shards; a world of one under ZeRO on a single rank.
    pub(super) grads: Option<Box<dyn Communicator>>,
    pub(super) tp: Option<Group>,
    pub(super) pp: Option<Box<dyn Communicator>>,
    pub(super) sp: Option<Group>,
    /// All ranks, when they form a mesh (otherwise `grads` is all of them).
    pub(super) world: Option<Box<dyn Communicator>>,
    pub(super) data_rank: usize,
    pub(super) data_ranks: usize,
    /// Expert parallelism: the group experts are split over and the group holding the same
    /// experts as this rank (`None` when it is alone).
    pub(super) ep: Option<(Group, Option<Box<dyn Communicator>>)>,
}

impl RankGroups {
    /// Checks `parallel` and `train`'s batch settings and splits `comm` (all ranks) into
    /// this rank's groups.
    pub fn new(cfg: &TrainConfig, comm: Option<Box<dyn Communicator>>) -> Result<Self> {
        cfg.parallel.validate().map_err(Error::Config)?;
        let world_rank = comm.as_ref().map_or(0, |c| c.rank());
        let p = &cfg.parallel;
        let mut world = None;
        let (grads, tp, pp, sp, (data_rank, data_ranks)) = match comm {
            Some(all) if p.tp > 1 || p.pp > 1 || p.sp > 1 => {
                let dims = ParallelDims::new(p.data_parallel(), p.tp, p.pp, p.sp);
                let mesh = ProcessMesh::new(all, dims)?;
                let data = (mesh.coords.dp, dims.dp);
                // Gradients are summed over every rank holding the same weights: data and
                // sequence ranks alike.
                let grads = (dims.dp * dims.sp > 1).then_some(mesh.dp_sp);
                let tp = (p.tp > 1).then(|| Group::new(mesh.tp));
                let sp = (p.sp > 1).then(|| Group::new(mesh.sp));
                world = Some(mesh.world);
                (grads, tp, (p.pp > 1).then_some(mesh.pp), sp, data)
            }
            c => {
                let data = c.as_ref().map_or((0, 1), |c| (c.rank(), c.size()));
                (c, None, None, None, data)
            }
        };
        // ZeRO (and offload) on one rank: a world of one.
        let grads = match grads {
            None if p.zero_stage > 0 => {
                let timeout = std::time::Duration::from_secs(p.timeout_s);
                let one = crate::dist::LocalComm::alone(timeout);
                Some(Box::new(one) as Box<dyn Communicator>)
            }
            c => c,
        };
        check_batches(cfg, data_ranks)?;
        let ep = match (&grads, p.ep) {
            (Some(c), ep @ 2..) => {
                // Ranks g·ep … g·ep + ep − 1 of the group holding the same weights (data and
                // sequence ranks) share out the experts; ranks at the same place in their
                // groups hold the same ones.
                let d = c.rank();
                let group: Vec<usize> = (d - d % ep..d - d % ep + ep).collect();
                let same: Vec<usize> = (d % ep..c.size()).step_by(ep).collect();
                let group = Group::new(c.split(&group)?);
                let same = match same.len() > 1 {
                    true => Some(c.split(&same)?),
                    false => None,
                };
                Some((group, same))
            }
            _ => None,
        };
        Ok(Self {
            world_rank,
            grads,
            tp,
            pp,
            sp,
            world,
            data_rank,
            data_ranks,
            ep,
        })
    }
}

fn check_batches(cfg: &TrainConfig, ranks: usize) -> Result<()> {
    let t = &cfg.train;
    if let (Freeze::NonEmbedding, z @ 1..) = (t.freeze, cfg.parallel.zero_stage) {
        return Err(Error::Config(format!(
            "train.freeze = \"non_embedding\" with parallel.zero_stage = {z}: freezing needs zero_stage = 0"
        )));
    }
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
    Ok(())
}

impl<M: ModelFamily> Engine<M> {
    /// One rank of a job over a model of family `M`; `comm` spans all its ranks, which
    /// `parallel`'s dimensions arrange into a mesh.
    pub fn new_rank(
        cfg: TrainConfig,
        origin: Origin<'_, M>,
        device: Device,
        comm: Option<Box<dyn Communicator>>,
    ) -> Result<Self> {
        let groups = RankGroups::new(&cfg, comm)?;
        Self::assemble(cfg, groups, origin, device)
    }

    /// The rank's engine from its groups: weights read or made, cut to this rank's part.
    pub fn assemble(
        cfg: TrainConfig,
        g: RankGroups,
        origin: Origin<'_, M>,
        device: Device,
    ) -> Result<Self> {
        let t = &cfg.train;
        let resume = match origin {
            Origin::Resume(dir) => Some(dir),
            _ => None,
        };
        let distributed = resume.is_some_and(crate::checkpoint::distributed::is_distributed);
        if cfg.parallel.ep > 1
            && (distributed || t.checkpoint_format == CheckpointFormat::Distributed)
        {
            return Err(Error::Config(
                "parallel.ep > 1 with distributed checkpoints is not implemented: use train.checkpoint_format = \"whole\"".into(),
            ));
        }
        // Streamed initialisation makes whole parameters; tensor parallelism shards whole
        // ones first (below), so it initialises them whole.
        // LoRA adds its adapters to whole weights before they shard.
        let stream_init = cfg.parallel.zero_stage == 3
            && g.grads.is_some()
            && g.tp.is_none()
            && cfg.lora.is_none();
        let (model, params, seed, whole) = match origin {
            // Each rank reads its own slices below.
            Origin::Resume(dir) if distributed => {
                (M::read_config(dir)?, Params::new(), None, false)
            }
            Origin::Resume(dir) => {
                let (m, p) = M::load(dir, DType::F32, &device)?;
                (m, p, None, true)
            }
            Origin::Fresh { model, seed } if stream_init => {
                (model, Params::new(), Some(seed), true)
            }
            Origin::Fresh { model, seed } => {
                let p = init_all(&model.param_specs(), seed, &device)?;
                (model, p, None, true)
            }
            Origin::Whole { model, params } => (model, params, None, true),
            Origin::Sliced { model, params } => (model, params, None, false),
        };
        let (model, params) = match &cfg.lora {
            Some(_) if distributed => {
                return Err(Error::Config(
                    "[lora] cannot resume from a distributed checkpoint".into(),
                ))
            }
            Some(_) if !whole => {
                return Err(Error::Config(
                    "[lora] needs whole base weights to add its adapters to (not tensor-parallel slices)".into(),
                ))
            }
            Some(l) => {
                l.validate(&cfg)?;
                let mut params = params;
                let model = super::lora::apply(l, model, &mut params, resume, t.seed)?;
                (model, params)
            }
            None => (model, params),
        };
        let mut model = model.with_kernels(t.kernels)?;
        model.check_trainable()?;
        if t.freeze == Freeze::NonEmbedding && model.embedding_params().is_empty() {
            return Err(
                model.unsupported("train.freeze = \"non_embedding\" (it has no embeddings)")
            );
        }
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
        let tp = match g.tp {
            Some(group) => Some(TpRank::new(group, &model)?),
            None => None,
        };
        let mut pp = match g.pp {
            Some(c) => Some(PpRank::new(c, &cfg.parallel, &model)?),
            None => None,
        };
        let (params, mut state) = match resume {
            Some(dir) if distributed => {
                let names = pp.as_ref().map(|p| p.my_names(&model));
                let tp_slice = tp.as_ref().map(|t| (&t.plan, t.rank(), t.size()));
                let params = checkpoint::load_distributed(
                    dir,
                    &model,
                    tp_slice,
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
            Some(t) if whole => {
                t.shard_moments(&mut opt, &params)?;
                t.shard(&params)?
            }
            _ => params,
        };
        if let Some(t) = &tp {
            let megatron_sp = cfg.parallel.sp_mode == SpMode::Megatron;
            model = model.tensor_parallel(t.group.clone(), megatron_sp)?;
        }
        if let Some(group) = &g.sp {
            let mode = match cfg.parallel.sp_mode {
                SpMode::Ring => SeqSplit::Ring,
                SpMode::Dap => SeqSplit::Axial,
                _ => SeqSplit::Ulysses,
            };
            model = model.sequence_parallel(group.clone(), mode)?;
        }
        let mut ep = match g.ep {
            Some((group, expert_data)) => {
                let (m, ep) = model.expert_parallel(group)?;
                model = m;
                Some(EpRank {
                    ep,
                    expert_data,
                    zero: None,
                    zero3: None,
                })
            }
            None => None,
        };
        let params = match &ep {
            Some(e) => e.keep_mine(&params, &mut opt),
            None => params,
        };
        if let Some(p) = &mut pp {
            p.prepare(&mut model)?;
        }
        let mut params = match &pp {
            Some(p) => p.keep_mine(&model, &params, &mut opt)?,
            None => params,
        };
        // QLoRA: what this rank holds (its slices, its stage's layers) rests quantised.
        if let Some(l) = &cfg.lora {
            l.quantise_base(&model, &mut params, cfg.parallel.tp)?;
        }
        if cfg.parallel.precision == Precision::Fp16 && state.loss_scaler.is_none() {
            state.loss_scaler = Some(crate::optim::LossScaler::default());
        }
        let placement = match (cfg.parallel.offload, &g.grads) {
            (Offload::Disk, Some(_)) => {
                let base = cfg
                    .parallel
                    .offload_dir
                    .clone()
                    .unwrap_or_else(|| cfg.train.out_dir.join("offload"));
                let budget = cfg.parallel.memory_budget_bytes().map_err(Error::Config)?;
                Placement::disk(base.join(format!("rank{}", g.world_rank)), budget)
            }
            (offload, _) => state_placement(offload, &device),
        };
        let zero3 = match (&g.grads, cfg.parallel.zero_stage) {
            (Some(c), 3) => {
                let fresh = AdamW::new(opt.cfg.clone());
                let full = std::mem::replace(&mut opt, fresh);
                let timeout = std::time::Duration::from_secs(cfg.parallel.timeout_s);
                let (rank, ranks) = (c.rank(), c.size());
                let z = match seed {
                    // One parameter at a time, keeping this rank's chunks (and experts).
                    Some(seed) => {
                        // The whole model's parameters in order: the same values as one rank.
                        let whole = model.without_expert_parallel();
                        let specs = whole.as_ref().unwrap_or(&model).param_specs();
                        let mut z = Zero3::empty(&full, ranks, &placement);
                        if let Some(e) = &mut ep {
                            e.start_zero3(&full, &placement, timeout);
                        }
                        init_each(&specs, seed, &mut |name, shape, values| {
                            if let Some(e) = &mut ep {
                                if e.take_fresh(name, shape, &values, &placement)? {
                                    return Ok(());
                                }
                            }
                            z.add_fresh(name, shape, &values, rank, &placement)
                        })?;
                        z
                    }
                    None => {
                        // Under expert parallelism the experts shard over their own group.
                        let dense = match &mut ep {
                            Some(e) => &e.shard_experts(3, &params, &full, &placement, timeout)?,
                            None => &params,
                        };
                        Zero3::from_full(dense, &full, rank, ranks, &placement)?
                    }
                };
                // Only the shards stay: the full weights are gathered block by block.
                params = Params::new();
                Some(z)
            }
            _ => None,
        };
        let zero = match (&g.grads, cfg.parallel.zero_stage) {
            (Some(c), stage @ 1..=2) => {
                let fresh = AdamW::new(opt.cfg.clone());
                let full = std::mem::replace(&mut opt, fresh);
                // Under expert parallelism the experts' state shards over their own group.
                let timeout = std::time::Duration::from_secs(cfg.parallel.timeout_s);
                let dense = match &mut ep {
                    Some(e) => &e.shard_experts(stage, &params, &full, &placement, timeout)?,
                    None => &params,
                };
                let layout = FlatLayout::new(dense, c.size());
                let z = ZeroOptimizer::from_full(stage, layout, c.rank(), &full, &placement)?;
                Some(z)
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
            device,
            comm: g.grads,
            tp,
            pp,
            ep,
            world: g.world,
            world_rank: g.world_rank,
            data_rank: g.data_rank,
            data_ranks: g.data_ranks,
            sp: g.sp,
            last_step_comm_bytes: 0,
            zero,
            zero3,
            fail_at_step: None,
            inject_overflow_at: Vec::new(),
            last_step_skipped: false,
            last_bubble: None,
        })
    }
}

/// Where ZeRO keeps its shards when not on disk: with the parameters on a GPU (unless offloaded
/// to the CPU, which is what `offload = "cpu"` asks for); in host memory on a CPU.
pub(crate) fn state_placement(offload: Offload, device: &Device) -> Placement {
    match offload {
        Offload::None if !device.is_cpu() => Placement::Device(device.clone()),
        _ => Placement::Memory,
    }
}
