//! One loop for every trainer: step until the end, evaluate and checkpoint on schedule and at
//! the end, one metrics record per step, a progress bar, curves when done.

use std::path::PathBuf;
use std::time::Instant;

use colossal_core::Result;
use serde_json::{json, Map, Value};

use crate::metrics::{plot_curves, run_outputs};

/// One step's metrics (or an evaluation's).
pub type Record = Map<String, Value>;

/// What an app trains: the session calls it, the task does the work.
pub trait Task {
    /// Optimizer steps done so far (a resumed run starts past 0; a step of the task may take
    /// several, as PPO's epochs do).
    fn position(&self) -> u64;
    /// Whether this rank writes metrics, shows progress and draws curves.
    fn is_main(&self) -> bool;
    /// One step over the next global batch; the record of what happened.
    fn step(&mut self) -> Result<Record>;
    /// Metrics on held-out data (empty when there is none).
    fn evaluate(&mut self) -> Result<Record>;
    /// A checkpoint of the current state; its directory on the rank that wrote it.
    fn save(&mut self) -> Result<Option<PathBuf>>;
    /// The record keys the progress bar shows.
    fn progress_keys(&self) -> Vec<&'static str>;
    /// PNG file name and the record keys it plots.
    fn curves(&self) -> Vec<(&'static str, Vec<&'static str>)>;
}

/// When the session steps, evaluates and saves.
#[derive(Clone, Debug)]
pub struct Plan {
    pub out_dir: PathBuf,
    /// Position at which the run ends.
    pub end: u64,
    /// Evaluate every N positions (0: only at the end).
    pub eval_every: usize,
    /// Checkpoint every N positions (0: only at the end).
    pub save_every: usize,
}

impl Plan {
    /// The `[train]` section's schedule, ending at `stop_at` when given (never past
    /// `max_steps`: the learning-rate schedule spans those).
    pub fn of(t: &colossal_core::train::TrainSection, stop_at: Option<usize>) -> Self {
        Plan {
            out_dir: t.out_dir.clone(),
            end: stop_at.unwrap_or(t.max_steps).min(t.max_steps) as u64,
            eval_every: t.eval_every,
            save_every: t.save_every,
        }
    }
}

/// What a run leaves: every record, the last checkpoint, and which rank saw them (rank 0 has
/// written the metrics and checkpoints).
#[derive(Clone, Debug, Default)]
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

pub fn run_session(task: &mut dyn Task, plan: &Plan) -> Result<Summary> {
    let main = task.is_main();
    let metrics_path = plan.out_dir.join("metrics.jsonl");
    let (mut metrics, bar) = run_outputs(&plan.out_dir, main, task.position(), plan.end)?;
    tracing::info!(start = task.position(), end = plan.end, "training");
    let mut summary = Summary {
        rank: if main { 0 } else { 1 },
        ..Default::default()
    };
    let due = |every: usize, step: u64| every > 0 && step.is_multiple_of(every as u64);
    while task.position() < plan.end {
        let started = Instant::now();
        let mut rec = task.step()?;
        let step = task.position();
        rec.insert("step".into(), json!(step));
        rec.entry("step_s")
            .or_insert(json!(started.elapsed().as_secs_f64()));
        // A task may take several optimizer steps at once: past the end is the end.
        let last = step >= plan.end;
        if due(plan.eval_every, step) || last {
            let val = task.evaluate()?;
            if !val.is_empty() {
                let shown = Value::Object(val.clone());
                tracing::info!(step, metrics = %shown, "evaluation");
            }
            rec.extend(val);
        }
        let msg = task
            .progress_keys()
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
        if due(plan.save_every, step) || last {
            if let Some(d) = task.save()? {
                summary.final_dir = Some(d);
            }
        }
    }
    bar.finish();
    if main && metrics_path.exists() {
        for (name, keys) in task.curves() {
            let png = plan.out_dir.join(name);
            if let Err(e) = plot_curves(&metrics_path, &png, name.trim_end_matches(".png"), &keys) {
                tracing::warn!("{} not drawn: {e}", png.display());
            }
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes `stride` optimizer steps per call, as PPO with several epochs does.
    struct Fake {
        pos: u64,
        stride: u64,
        evals: Vec<u64>,
        saves: Vec<u64>,
    }

    impl Task for Fake {
        fn position(&self) -> u64 {
            self.pos
        }
        fn is_main(&self) -> bool {
            true
        }
        fn step(&mut self) -> Result<Record> {
            self.pos += self.stride;
            let mut r = Record::new();
            r.insert("loss".into(), json!(1.0 / self.pos as f64));
            Ok(r)
        }
        fn evaluate(&mut self) -> Result<Record> {
            self.evals.push(self.pos);
            Ok(Record::new())
        }
        fn save(&mut self) -> Result<Option<PathBuf>> {
            self.saves.push(self.pos);
            Ok(Some(PathBuf::from(format!("step-{}", self.pos))))
        }
        fn progress_keys(&self) -> Vec<&'static str> {
            vec!["loss"]
        }
        fn curves(&self) -> Vec<(&'static str, Vec<&'static str>)> {
            vec![("loss.png", vec!["loss"])]
        }
    }

    #[test]
    fn steps_evaluations_and_checkpoints_follow_the_plan_and_the_end_is_always_saved() {
        let dir = std::env::temp_dir().join(format!("colossal-session-{}", std::process::id()));
        for (stride, end, evals, saves) in [
            (1, 5, vec![2, 4, 5], vec![3, 5]),
            // Jumping past the end still ends with a checkpoint (PPO epochs).
            (2, 5, vec![2, 4, 6], vec![6]),
        ] {
            let mut task = Fake {
                pos: 0,
                stride,
                evals: vec![],
                saves: vec![],
            };
            let plan = Plan {
                out_dir: dir.clone(),
                end,
                eval_every: 2,
                save_every: 3,
            };
            let s = run_session(&mut task, &plan).unwrap();
            assert_eq!(task.evals, evals, "stride {stride}");
            assert_eq!(task.saves, saves, "stride {stride}");
            let last = *saves.last().unwrap();
            assert_eq!(s.final_dir, Some(PathBuf::from(format!("step-{last}"))));
            assert_eq!(s.series("step").last(), Some(&(last as f64)));
            let lines = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
            assert_eq!(lines.lines().count(), s.records.len());
            assert!(dir.join("loss.png").exists());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
