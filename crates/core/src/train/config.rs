//! `llama-pretrain train --config FILE.toml`: every key typed, unknown keys rejected.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::models::llama::LlamaConfig;
use crate::optim::ScheduleKind;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelConfig,
    pub data: DataConfig,
    pub train: TrainSection,
    #[serde(default)]
    pub sample: Option<SampleConfig>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// An HF model directory to start from.
    #[serde(default)]
    pub hf_dir: Option<PathBuf>,
    /// Or an HF-style config to train from scratch.
    #[serde(default)]
    pub config: Option<LlamaConfig>,
    /// Seed of the from-scratch initialisation.
    #[serde(default)]
    pub init_seed: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// A directory prepared by `colossal-data pretrain`.
    pub path: PathBuf,
    /// Per-document positions and no attention across documents of a packed sequence.
    #[serde(default)]
    pub boundary_aware: bool,
    #[serde(default = "yes")]
    pub shuffle: bool,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    pub out_dir: PathBuf,
    /// Global batch: sequences per optimizer step.
    pub batch_size: usize,
    /// Sequences per forward/backward on one rank; accumulation covers the rest.
    pub micro_batch_size: usize,
    /// Length of the schedule (total optimizer steps).
    pub max_steps: usize,
    pub lr: f64,
    #[serde(default)]
    pub min_lr: f64,
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default = "cosine")]
    pub schedule: ScheduleKind,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "b1")]
    pub beta1: f64,
    #[serde(default = "b2")]
    pub beta2: f64,
    #[serde(default = "eps")]
    pub eps: f64,
    /// Global-norm clipping threshold; 0 disables.
    #[serde(default)]
    pub grad_clip: f64,
    /// Parameters whose name contains one of these get no weight decay.
    #[serde(default = "no_decay")]
    pub no_decay: Vec<String>,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub activation_checkpointing: bool,
    /// Evaluate every N steps (0: only at the end).
    #[serde(default)]
    pub eval_every: usize,
    /// Validation batches per evaluation (0: the whole split).
    #[serde(default)]
    pub eval_batches: usize,
    /// Checkpoint every N steps (0: only at the end).
    #[serde(default)]
    pub save_every: usize,
    /// Checkpoints kept (older are deleted).
    #[serde(default = "keep")]
    pub keep_last: usize,
    /// Shard model files above this size (MB), like `save_pretrained(max_shard_size)`.
    #[serde(default = "shard_mb")]
    pub max_shard_mb: usize,
}

fn cosine() -> ScheduleKind {
    ScheduleKind::Cosine
}
fn b1() -> f64 {
    0.9
}
fn b2() -> f64 {
    0.95
}
fn eps() -> f64 {
    1e-8
}
fn no_decay() -> Vec<String> {
    vec!["norm".into(), "bias".into()]
}
fn keep() -> usize {
    2
}
fn shard_mb() -> usize {
    5000
}

/// A sample generation at the end of training.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleConfig {
    /// Directory or file of the HF `tokenizer.json`.
    pub tokenizer: PathBuf,
    pub prompt: String,
    #[serde(default = "new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default)]
    pub temperature: f64,
}

fn new_tokens() -> usize {
    40
}
