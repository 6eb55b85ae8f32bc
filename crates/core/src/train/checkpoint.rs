//! Trainer checkpoints: an HF model directory plus `optimizer.safetensors` (AdamW moments)
//! and `trainer_state.json` (step, data cursor, seeds), written atomically.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{atomic, hf, llama as hf_llama};
use crate::models::llama::Llama;
use crate::optim::AdamW;
use crate::params::Params;
use crate::{Error, Result};

pub const STATE: &str = "trainer_state.json";
pub const OPTIMIZER: &str = "optimizer.safetensors";

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: u64,
    /// Sequences of the training stream consumed (the data cursor).
    pub cursor: u64,
    pub tokens_seen: u64,
    /// Seed of the data order; epochs are derived from it, so this is the whole RNG state.
    pub data_seed: u64,
    pub optimizer_step: u64,
    /// fp16 loss scaler, when training in fp16.
    #[serde(default)]
    pub loss_scaler: Option<crate::optim::LossScaler>,
    /// Steps skipped because of inf/nan gradients.
    #[serde(default)]
    pub skipped_steps: u64,
}

pub fn checkpoint_dir(out: &Path, step: u64) -> PathBuf {
    out.join("checkpoints").join(format!("step-{step:07}"))
}

/// Checkpoints under `out/checkpoints`, oldest first.
pub fn list_checkpoints(out: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(out.join("checkpoints"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-") && !n.ends_with(".tmp"))
        })
        .collect();
    v.sort();
    v
}

pub fn save(
    dir: &Path,
    model: &Llama,
    params: &Params,
    opt: &AdamW,
    state: &TrainerState,
    max_shard_bytes: usize,
) -> Result<()> {
    atomic::write_dir(dir, |tmp| {
        hf_llama::save_llama(tmp, model, params, max_shard_bytes)?;
        let mut moments = Vec::new();
        for name in params.names() {
            if let (Some(m), Some(v)) = (opt.m.get(name), opt.v.get(name)) {
                let shape = params.get(name)?.shape().clone();
                let dev = Device::Cpu;
                moments.push((
                    format!("exp_avg.{name}"),
                    Tensor::from_slice(m, shape.clone(), &dev)?,
                ));
                moments.push((
                    format!("exp_avg_sq.{name}"),
                    Tensor::from_slice(v, shape, &dev)?,
                ));
            }
        }
        hf::save_file(&tmp.join(OPTIMIZER), &moments)?;
        let json = serde_json::to_string_pretty(state).expect("json");
        atomic::write_file(&tmp.join(STATE), json.as_bytes())
    })
}

/// Deletes all but the newest `keep` checkpoints.
pub fn prune(out: &Path, keep: usize) -> Result<()> {
    let all = list_checkpoints(out);
    let n = all.len().saturating_sub(keep.max(1));
    for old in &all[..n] {
        std::fs::remove_dir_all(old).map_err(|e| Error::io(old, e))?;
    }
    Ok(())
}

/// Loads state and optimizer moments; the model weights are loaded by the caller.
pub fn load_state(dir: &Path, params: &Params, opt: &mut AdamW) -> Result<TrainerState> {
    let path = dir.join(STATE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| Error::file(&path, e.to_string()))?;
    let opt_path = dir.join(OPTIMIZER);
    let mut tensors = hf::read_tensors(std::slice::from_ref(&opt_path), DType::F32, &Device::Cpu)?;
    for name in params.names() {
        let shape = params.get(name)?.dims().to_vec();
        for (prefix, store) in [("exp_avg", &mut opt.m), ("exp_avg_sq", &mut opt.v)] {
            let key = format!("{prefix}.{name}");
            if let Some((t, _)) = tensors.remove(&key) {
                if t.dims() != shape.as_slice() {
                    return Err(Error::ShapeMismatch {
                        path: opt_path.clone(),
                        name: key,
                        found: t.dims().to_vec(),
                        expected: shape.clone(),
                    });
                }
                store.insert(name.clone(), t.flatten_all()?.to_vec1()?);
            }
        }
    }
    opt.step = state.optimizer_step;
    Ok(state)
}
