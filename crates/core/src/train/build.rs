//! Building a causal-LM trainer rank: where its LLaMA comes from (`model.hf_dir`,
//! `model.config` or a checkpoint), the engine around it, the packed data, NEFTune.

use std::path::Path;

use candle_core::{DType, Device};

use super::assemble::{Origin, RankGroups};
use super::engine::Engine;
use super::neftune::Neftune;
use super::tensor_parallel::TpRank;
use super::trainer::Trainer;
use super::{SpMode, TrainConfig};
use crate::data::PackedDataset;
use crate::dist::Communicator;
use crate::models::llama::Llama;
use crate::models::ModelFamily;
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
        let groups = RankGroups::new(&cfg, comm)?;
        let origin = match (resume, &cfg.model.hf_dir, &cfg.model.config) {
            (Some(dir), _, _) => Origin::Resume(dir),
            (None, Some(_), Some(_)) => {
                return Err(Error::Config(
                    "set only one of model.hf_dir and model.config".into(),
                ))
            }
            (None, Some(dir), None) => match &groups.tp {
                // Each tensor-parallel rank reads only its slices (LoRA adds its adapters to
                // whole weights first, then cuts both).
                Some(g) if cfg.lora.is_none() => {
                    let model = Llama::read_config(dir)?;
                    let params = TpRank::new(g.clone(), &model)?.load(dir, &model, &device)?;
                    Origin::Sliced { model, params }
                }
                _ => {
                    let (model, params) = Llama::load(dir, DType::F32, &device)?;
                    Origin::Whole { model, params }
                }
            },
            (None, None, Some(c)) => Origin::Fresh {
                model: Llama::new(c.clone())
                    .map_err(|e| Error::Config(format!("model.config: {e}")))?,
                seed: cfg.model.init_seed,
            },
            (None, None, None) => {
                return Err(Error::Config("set model.hf_dir or model.config".into()))
            }
        };
        let mut engine = Engine::assemble(cfg, groups, origin, device)?;
        let cfg = &engine.cfg;
        let (train_data, val_data) = if with_data {
            let (train, val) = open_data(cfg, &engine.model)?;
            (Some(train), val)
        } else {
            (None, None)
        };
        if let Some(g) = &engine.sp {
            let seq = train_data.as_ref().map_or(0, |d| d.manifest.seq_len);
            let sp = g.size();
            let heads = engine.model.cfg.num_attention_heads / cfg.parallel.tp;
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
        }
        let alpha = cfg.train.neftune_alpha;
        let neftune = (alpha > 0.0).then(|| {
            let (noisy, handle) = Neftune::wrap(&engine.model, alpha);
            engine.model = noisy;
            handle
        });
        Ok(Self {
            engine,
            train_data,
            val_data,
            neftune,
        })
    }
}

/// The packed training split (checked against the model's vocabulary) and the validation split
/// when it has sequences.
fn open_data(cfg: &TrainConfig, model: &Llama) -> Result<(PackedDataset, Option<PackedDataset>)> {
    if cfg.data.path.as_os_str().is_empty() {
        return Err(Error::Config(
            "data.path is not set: the causal-LM trainer reads its packed data (colossal-data pretrain) from there".into(),
        ));
    }
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
