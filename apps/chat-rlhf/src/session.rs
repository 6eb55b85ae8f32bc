//! The loop every chat trainer shares: ranks (threads, or MPI processes), the global batch of
//! each step, evaluation, metrics JSONL, curves (PNG), progress and checkpoints. A method
//! (SFT, RM, DPO, PPO, GRPO) supplies only what one step and one evaluation do.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use candle_core::Device;
use colossal_core::dist::Communicator;
use colossal_core::train::{launch_ranks, plot_curves, run_outputs, DeviceSpec, Trainer};
use colossal_data::chat::prep::Record;
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
#[derive(Debug, Default)]
pub struct Summary {
    pub records: Vec<Value>,
    pub final_dir: Option<PathBuf>,
    pub rank: usize,
}

impl Summary {
    /// Values of `key` over the run's records, in step order.
    pub fn series(&self, key: &str) -> Vec<f64> {
        self.records
            .iter()
            .filter_map(|r| r[key].as_f64())
            .collect()
    }
}

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
    // Rollouts, frozen models and metrics are host-side here: a GPU is refused, not ignored.
    if cfg.train.device != DeviceSpec::Cpu {
        cfg.train.device.device(0)?;
        anyhow::bail!(
            "train.device = \"{}\": the chat trainers run on the CPU for now; set train.device = \"cpu\" (llama-pretrain trains on a GPU)",
            cfg.train.device
        );
    }
    let summary = launch_ranks(&cfg.parallel, cfg.train.device, |setup| {
        let mut cfg = cfg.clone();
        cfg.parallel = setup.parallel;
        run_rank(&cfg, resume, stop_at, setup.comm, setup.device, make)
            .map_err(|e| colossal_core::msg!("{e:#}"))
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(summary)
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
    let mut policy = Trainer::new_rank_without_data(cfg.trainer_config(), resume, device, comm)?;
    let mut method = make(cfg, &policy, extra)?;
    let data = ChatSet::open(&cfg.data.path, method.kind())?;
    let t = &cfg.train;
    let end = stop_at.unwrap_or(t.max_steps).min(t.max_steps) as u64;
    let main = policy.is_main();
    let metrics_path = t.out_dir.join("metrics.jsonl");
    let (mut metrics, bar) = run_outputs(&t.out_dir, main, policy.state.step, end)?;
    let mut summary = Summary {
        rank: if main { 0 } else { 1 },
        ..Default::default()
    };
    tracing::info!(
        rows = data.train.len(),
        start = policy.state.step,
        end,
        "training"
    );
    while policy.state.step < end {
        let started = Instant::now();
        let batch = global_batch(&data.train, policy.state.cursor, t.batch_size, t.seed);
        let mut rec = method.step(&mut policy, &batch)?;
        policy.state.cursor += t.batch_size as u64;
        let step = policy.state.step;
        rec.insert("step".into(), json!(step));
        rec.insert("step_s".into(), json!(started.elapsed().as_secs_f64()));
        // A method may take several optimizer steps per batch (PPO epochs): past the end is the end.
        let last = step >= end;
        if (t.eval_every > 0 && step.is_multiple_of(t.eval_every as u64)) || last {
            let val = method.evaluate(&policy, &data.validation)?;
            if !val.is_empty() {
                tracing::info!(step, metrics = %serde_json::Value::Object(val.clone()), "evaluation");
            }
            rec.extend(val);
        }
        let msg = ["loss", "reward_mean", "accuracy", "kl"]
            .iter()
            .filter_map(|k| {
                rec.get(*k)
                    .and_then(Value::as_f64)
                    .map(|v| format!("{k} {v:.4}"))
            })
            .collect::<Vec<_>>()
            .join(" ");
        bar.set_message(msg);
        bar.set_position(step);
        if let Some(m) = metrics.as_mut() {
            m.write(&Value::Object(rec.clone()))?;
        }
        summary.records.push(Value::Object(rec));
        if (t.save_every > 0 && step.is_multiple_of(t.save_every as u64)) || last {
            if let Some(d) = policy.save_checkpoint()? {
                summary.final_dir = Some(d);
            }
            method.saved()?;
        }
    }
    bar.finish();
    if main && metrics_path.exists() {
        for (name, keys) in method.curves() {
            let png = t.out_dir.join(name);
            if let Err(e) = plot_curves(&metrics_path, &png, name.trim_end_matches(".png"), &keys) {
                tracing::warn!("{} not drawn: {e}", png.display());
            }
        }
    }
    Ok(summary)
}
