//! The chat trainers on the engine every app shares: ranks from the one launcher, the run loop
//! (evaluation, metrics JSONL, curves, progress, checkpoints) from `colossal_session`; this
//! file adds the global batch of each step. A method (SFT, RM, DPO, PPO, GRPO) supplies only
//! what one step and one evaluation do.

use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::Device;
use colossal_core::dist::Communicator;
use colossal_core::train::{launch_ranks, Trainer};
use colossal_data::chat::prep::Record;
use colossal_session::{run_session, Plan, Task};
use serde_json::{json, Map, Value};

use crate::config::ChatConfig;
use crate::data::{global_batch, ChatSet};

pub type Metrics = Map<String, Value>;

/// The record every optimizer step starts from: loss, gradient norm and learning rate.
pub fn step_metrics((loss, grad_norm, lr): (f32, f64, f64)) -> Metrics {
    let mut m = Metrics::new();
    m.insert("loss".into(), json!(loss));
    m.insert("grad_norm".into(), json!(grad_norm));
    m.insert("lr".into(), json!(lr));
    m
}

pub trait Method {
    /// Data kind the method trains on: sft, preference or prompt.
    fn kind(&self) -> &'static str;
    /// One optimizer step on the global batch `batch` (each rank takes its share).
    fn step(&mut self, policy: &mut Trainer, batch: &[&Record]) -> Result<Metrics>;
    /// Metrics on the validation rows (every rank calls it).
    fn evaluate(&mut self, _policy: &Trainer, _val: &[Record]) -> Result<Metrics> {
        Ok(Metrics::new())
    }
    /// Curves to draw: (file name, metric keys).
    fn curves(&self) -> Vec<(&'static str, Vec<&'static str>)>;
    /// After each policy checkpoint (a critic saves itself here); every rank calls it.
    fn saved(&mut self) -> Result<()> {
        Ok(())
    }
}

/// What rank 0 reports: every metrics record of the run and the last checkpoint.
pub use colossal_session::Summary;

/// Builds a rank's method from the config, its policy trainer and a second communicator over
/// the same ranks (PPO's critic trains on it).
pub type Factory<'a> = dyn Fn(&ChatConfig, &Trainer, Option<Box<dyn Communicator>>) -> Result<Box<dyn Method>>
    + Sync
    + 'a;

/// Runs every rank `cfg.parallel` asks for (local threads or an mpirun job, through the one
/// launcher every app uses), each building its method with `make`.
pub fn launch(
    cfg: &ChatConfig,
    resume: Option<&Path>,
    stop_at: Option<usize>,
    make: &Factory<'_>,
) -> Result<Summary> {
    let summary = launch_ranks(&cfg.parallel, cfg.train.device, |setup| {
        let mut cfg = cfg.clone();
        cfg.parallel = setup.parallel;
        run_rank(&cfg, resume, stop_at, setup.comm, setup.device, make)
            .map_err(|e| colossal_core::msg!("{e:#}"))
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(summary)
}

/// A chat method on its policy and data, as a session task.
struct ChatTask<'a> {
    policy: Trainer,
    method: Box<dyn Method>,
    data: ChatSet,
    cfg: &'a ChatConfig,
}

/// A chat method's error, in the core's terms (the session loop is the core's).
fn core_err(e: anyhow::Error) -> colossal_core::Error {
    colossal_core::msg!("{e:#}")
}

impl Task for ChatTask<'_> {
    fn position(&self) -> u64 {
        self.policy.state.step
    }

    fn is_main(&self) -> bool {
        self.policy.is_main()
    }

    fn step(&mut self) -> colossal_core::Result<Metrics> {
        let t = &self.cfg.train;
        let batch = global_batch(
            &self.data.train,
            self.policy.state.cursor,
            t.batch_size,
            t.seed,
        );
        let rec = self
            .method
            .step(&mut self.policy, &batch)
            .map_err(core_err)?;
        self.policy.state.cursor += t.batch_size as u64;
        Ok(rec)
    }

    fn evaluate(&mut self) -> colossal_core::Result<Metrics> {
        self.method
            .evaluate(&self.policy, &self.data.validation)
            .map_err(core_err)
    }

    fn save(&mut self) -> colossal_core::Result<Option<PathBuf>> {
        let dir = self.policy.save_checkpoint()?;
        self.method.saved().map_err(core_err)?;
        Ok(dir)
    }

    fn progress_keys(&self) -> Vec<&'static str> {
        vec!["loss", "reward_mean", "accuracy", "kl"]
    }

    fn curves(&self) -> Vec<(&'static str, Vec<&'static str>)> {
        self.method.curves()
    }
}

fn run_rank(
    cfg: &ChatConfig,
    resume: Option<&Path>,
    stop_at: Option<usize>,
    comm: Option<Box<dyn Communicator>>,
    device: Device,
    make: &Factory<'_>,
) -> Result<Summary> {
    let extra = match &comm {
        Some(c) => Some(c.split(&(0..c.size()).collect::<Vec<_>>())?),
        None => None,
    };
    let policy = Trainer::new_rank_without_data(cfg.trainer_config(), resume, device, comm)?;
    let method = make(cfg, &policy, extra)?;
    let data = ChatSet::open(&cfg.data.path, method.kind())?;
    tracing::info!(rows = data.train.len(), "chat data");
    let plan = Plan::of(&cfg.train, stop_at);
    let mut task = ChatTask {
        policy,
        method,
        data,
        cfg,
    };
    Ok(run_session(&mut task, &plan)?)
}
