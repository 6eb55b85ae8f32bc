//! Pretraining a causal LM as a session task: the trainer's step over the next global batch,
//! validation loss, HF checkpoints, the loss curve.

use std::path::{Path, PathBuf};

use colossal_core::train::{launch_ranks, TrainConfig, Trainer};
use colossal_core::Result;
use serde_json::json;

use crate::session::{run_session, Plan, Record, Task};

/// What a pretraining run reports.
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

struct Pretrain<'a>(&'a mut Trainer);

impl Task for Pretrain<'_> {
    fn position(&self) -> u64 {
        self.0.state.step
    }

    fn is_main(&self) -> bool {
        self.0.is_main()
    }

    fn step(&mut self) -> Result<Record> {
        let started = std::time::Instant::now();
        let (loss, grad_norm, lr) = self.0.train_step()?;
        let secs = started.elapsed().as_secs_f64();
        let t = &self.0.cfg.train;
        let tokens_per_step = (t.batch_size * self.0.seq_len()) as f64;
        let mut rec = self.0.last_step_metrics();
        for (k, v) in [
            ("loss", json!(loss)),
            ("lr", json!(lr)),
            ("grad_norm", json!(grad_norm)),
            ("tokens", json!(self.0.state.tokens_seen)),
            ("tokens_per_s", json!(tokens_per_step / secs)),
            ("step_s", json!(secs)),
        ] {
            rec.insert(k.into(), v);
        }
        Ok(rec)
    }

    fn evaluate(&mut self) -> Result<Record> {
        let mut rec = Record::new();
        if let Some(v) = self.0.evaluate()? {
            rec.insert("val_loss".into(), json!(v));
            rec.insert("val_ppl".into(), json!(v.exp()));
        }
        Ok(rec)
    }

    fn save(&mut self) -> Result<Option<PathBuf>> {
        self.0.save_checkpoint()
    }

    fn progress_keys(&self) -> Vec<&'static str> {
        vec!["loss", "lr", "tokens_per_s"]
    }

    fn curves(&self) -> Vec<(&'static str, Vec<&'static str>)> {
        vec![("loss.png", vec!["loss", "val_loss"])]
    }
}

/// Runs a trainer through the session loop.
pub trait RunExt {
    /// Trains until `stop_at` (default `train.max_steps`), evaluating and checkpointing as
    /// configured; always checkpoints at the end and plots the loss curve.
    fn run(&mut self, stop_at: Option<usize>) -> Result<RunSummary>;
}

impl RunExt for Trainer {
    fn run(&mut self, stop_at: Option<usize>) -> Result<RunSummary> {
        let plan = Plan::of(&self.cfg.train, stop_at);
        tracing::info!(params = self.params.num_elements(), "model");
        let rank = self.world_rank();
        let s = run_session(&mut Pretrain(self), &plan)?;
        let losses = s.series("loss");
        Ok(RunSummary {
            first_loss: losses.first().map(|&l| l as f32),
            last_loss: losses.last().map(|&l| l as f32),
            last_val_loss: s.series("val_loss").last().copied(),
            steps: losses.len() as u64,
            final_dir: s.final_dir,
            rank,
        })
    }
}

/// Pretraining as configured on every rank. Returns rank 0's summary (under MPI, each process
/// returns its own; `RunSummary::rank` tells which).
pub fn train(
    cfg: TrainConfig,
    resume: Option<&Path>,
    stop_at: Option<usize>,
) -> Result<RunSummary> {
    use colossal_core::train::Backend;
    launch_ranks(&cfg.parallel, cfg.train.device, |setup| {
        let mut cfg = cfg.clone();
        cfg.parallel = setup.parallel;
        let mpi = cfg.parallel.backend == Backend::Mpi;
        let mut t = Trainer::new_rank(cfg, resume, setup.device, setup.comm)?;
        if mpi {
            // Test hook for the mpirun failure test: COLOSSAL_TEST_FAIL_AT="RANK:STEP".
            t.fail_at_step = std::env::var("COLOSSAL_TEST_FAIL_AT").ok().and_then(|v| {
                let (r, s) = v.split_once(':')?;
                (r.parse() == Ok(setup.world_rank)).then(|| s.parse().ok())?
            });
        }
        t.run(stop_at)
    })
}
