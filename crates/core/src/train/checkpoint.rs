//! Trainer checkpoints: an HF model directory plus `optimizer.safetensors` (AdamW moments)
//! and `trainer_state.json` (step, data cursor, seeds), written atomically.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use candle_core::Var;

use crate::checkpoint::{atomic, distributed as dist, hf};
use crate::models::ModelFamily;
use crate::optim::AdamW;
use crate::parallel::tensor::TpPlan;
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

pub fn save<M: ModelFamily>(
    dir: &Path,
    model: &M,
    params: &Params,
    opt: &AdamW,
    state: &TrainerState,
    max_shard_bytes: usize,
) -> Result<()> {
    atomic::write_dir(dir, |tmp| {
        // A base resting quantised is written dequantised; quantising it again on resume
        // gives the same codes.
        model.save(tmp, &params.dense()?, max_shard_bytes)?;
        if let Some((cfg, sites)) = model.adapters() {
            let adapter = super::lora::adapter_dir(tmp);
            crate::lora::save_adapter(&adapter, cfg, sites, params, None)?;
        }
        let mut moments = Vec::new();
        for name in params.names() {
            if let (Some(m), Some(v)) = (opt.m.get(name), opt.v.get(name)) {
                let shape = params.get(name)?.shape().clone();
                let dev = Device::Cpu;
                moments.push((
                    format!("exp_avg.{name}"),
                    Tensor::from_slice(&m.host()?, shape.clone(), &dev)?,
                ));
                moments.push((
                    format!("exp_avg_sq.{name}"),
                    Tensor::from_slice(&v.host()?, shape, &dev)?,
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

/// The trainer state alone.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::file(&path, e.to_string()))
}

/// This rank's weights and moments from a distributed checkpoint: `names` (default: all) of
/// the model's parameters, each cut to its tensor-parallel slice (`tp`: plan, rank, size).
pub fn load_distributed<M: ModelFamily>(
    dir: &Path,
    model: &M,
    tp: Option<(&TpPlan, usize, usize)>,
    names: Option<&[String]>,
    opt: &mut AdamW,
) -> Result<Params> {
    let mut reader = dist::Reader::open(dir)?;
    let mut params = Params::new();
    for (name, shape) in model.param_shapes() {
        if names.is_some_and(|n| !n.contains(&name)) {
            continue;
        }
        if reader.shape(&name) != Some(shape.as_slice()) {
            return Err(Error::ShapeMismatch {
                path: dir.join(dist::DIST),
                name: name.clone(),
                found: reader.shape(&name).unwrap_or_default().to_vec(),
                expected: shape.clone(),
            });
        }
        let (mut start, mut len) = (vec![0; shape.len()], shape.clone());
        if let Some(s) = tp.and_then(|(plan, rank, size)| plan.slice(&name, &shape, rank, size)) {
            (start[s.dim], len[s.dim]) = (s.start, s.len);
        }
        let t = reader.read(&name, &start, &len)?;
        params.insert(name.clone(), Var::from_tensor(&t)?);
        for (prefix, store) in [("exp_avg", &mut opt.m), ("exp_avg_sq", &mut opt.v)] {
            let key = format!("{prefix}.{name}");
            if reader.shape(&key).is_some() {
                let m = reader.read(&key, &start, &len)?;
                store.insert(name.clone(), m.flatten_all()?.to_vec1()?.into());
            }
        }
    }
    Ok(params)
}

/// The pieces one rank owns: its slice (`start` within the whole `shape`) of a weight and of
/// its two Adam moments (zeros before the first step, as AdamW starts them).
pub fn owned_pieces(
    name: &str,
    shape: &[usize],
    start: Vec<usize>,
    weight: &Tensor,
    opt: &AdamW,
) -> Result<Vec<dist::Owned>> {
    let mut out = vec![dist::Owned {
        tensor: name.to_string(),
        global: shape.to_vec(),
        start: start.clone(),
        data: weight.to_dtype(DType::F32)?,
    }];
    for (prefix, store) in [("exp_avg", &opt.m), ("exp_avg_sq", &opt.v)] {
        let data = match store.get(name) {
            Some(v) => Tensor::from_slice(&v.host()?, weight.dims(), &Device::Cpu)?,
            None => Tensor::zeros(weight.dims(), DType::F32, &Device::Cpu)?,
        };
        out.push(dist::Owned {
            tensor: format!("{prefix}.{name}"),
            global: shape.to_vec(),
            start: start.clone(),
            data,
        });
    }
    Ok(out)
}

/// A whole checkpoint (HF weights + moments + state) of a model of family `M` from a
/// distributed one.
pub fn distributed_to_whole<M: ModelFamily>(
    src: &Path,
    dst: &Path,
    max_shard_bytes: usize,
) -> Result<()> {
    let model = M::read_config(src)?;
    let mut opt = AdamW::new(crate::optim::AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        no_decay: Vec::new(),
    });
    let params = load_distributed(src, &model, None, None, &mut opt)?;
    let state = read_state(src).unwrap_or_default();
    save(dst, &model, &params, &opt, &state, max_shard_bytes)
}

/// A distributed checkpoint (one rank owning everything) from a whole one or a plain HF
/// model directory (then without moments or state).
pub fn whole_to_distributed<M: ModelFamily>(src: &Path, dst: &Path) -> Result<()> {
    let (model, params) = M::load(src, DType::F32, &Device::Cpu)?;
    let mut opt = AdamW::new(crate::optim::AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        no_decay: Vec::new(),
    });
    let state = if src.join(STATE).is_file() && src.join(OPTIMIZER).is_file() {
        Some(load_state(src, &params, &mut opt)?)
    } else {
        None
    };
    atomic::write_dir(dst, |tmp| {
        model.write_config(tmp, DType::F32)?;
        let mut owned = Vec::new();
        for (name, shape) in model.param_shapes() {
            let zeros = vec![0; shape.len()];
            let mut pieces = owned_pieces(&name, &shape, zeros, params.get(&name)?, &opt)?;
            if state.is_none() {
                pieces.truncate(1);
            }
            owned.extend(pieces);
        }
        dist::write_rank(tmp, 0, &owned)?;
        dist::write_index(tmp)?;
        if let Some(state) = &state {
            let json = serde_json::to_string_pretty(state).expect("json");
            atomic::write_file(&tmp.join(STATE), json.as_bytes())?;
        }
        Ok::<(), Error>(())
    })
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
                store.insert(name.clone(), t.flatten_all()?.to_vec1()?.into());
            }
        }
    }
    opt.step = state.optimizer_step;
    Ok(state)
}
