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
    #[serde(default)]
    pub parallel: ParallelConfig,
}

/// How the run is spread over ranks. The math (global batch, schedule) does not depend on it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelConfig {
    /// `local`: ranks are threads of this process.
    #[serde(default = "local")]
    pub backend: String,
    /// Number of ranks.
    #[serde(default = "one")]
    pub nproc: usize,
    /// Data-parallel degree (defaults to nproc).
    #[serde(default)]
    pub dp: Option<usize>,
    /// ZeRO stage: 0 (plain data parallel), 1 (optimizer states sharded), 2 (+ gradients),
    /// 3 (+ parameters, gathered block by block).
    #[serde(default)]
    pub zero_stage: u8,
    /// Where sharded optimizer state (and, under ZeRO-3, parameter shards) lives: `none`
    /// (memory) or `disk` (memory-mapped files, pages dropped after each use). Needs
    /// `zero_stage` ≥ 1.
    #[serde(default = "none")]
    pub offload: String,
    /// Directory of the offload files (default: OUT_DIR/offload).
    #[serde(default)]
    pub offload_dir: Option<std::path::PathBuf>,
    /// Compute precision: `fp32`, `bf16` or `fp16` (fp32 master weights and moments; fp16
    /// adds dynamic loss scaling).
    #[serde(default = "fp32")]
    pub precision: String,
    /// Gradient all-reduce bucket size (MB).
    #[serde(default = "bucket_mb")]
    pub bucket_mb: f64,
    /// A rank waiting longer than this on a peer fails the run (seconds).
    #[serde(default = "timeout_s")]
    pub timeout_s: u64,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        Self {
            backend: local(),
            nproc: 1,
            dp: None,
            zero_stage: 0,
            precision: fp32(),
            offload: none(),
            offload_dir: None,
            bucket_mb: bucket_mb(),
            timeout_s: timeout_s(),
        }
    }
}

impl ParallelConfig {
    pub fn compute_dtype(&self) -> candle_core::DType {
        match self.precision.as_str() {
            "bf16" => candle_core::DType::BF16,
            "fp16" => candle_core::DType::F16,
            _ => candle_core::DType::F32,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.backend != "local" {
            return Err(format!(
                "parallel.backend `{}`: only `local` is available",
                self.backend
            ));
        }
        if self.zero_stage > 3 {
            return Err(format!(
                "parallel.zero_stage {}: expected 0, 1, 2 or 3",
                self.zero_stage
            ));
        }
        if !matches!(self.precision.as_str(), "fp32" | "bf16" | "fp16") {
            return Err(format!(
                "parallel.precision `{}`: expected fp32, bf16 or fp16",
                self.precision
            ));
        }
        match (self.offload.as_str(), self.zero_stage) {
            ("none", _) => {}
            ("disk", 0) => {
                return Err("parallel.offload = \"disk\" needs parallel.zero_stage >= 1 (the offloaded state is the ZeRO shard)".into())
            }
            ("disk", _) => {}
            (other, _) => return Err(format!("parallel.offload `{other}`: expected none or disk")),
        }
        if self.nproc == 0 {
            return Err("parallel.nproc must be at least 1".into());
        }
        let dp = self.dp.unwrap_or(self.nproc);
        if dp != self.nproc {
            return Err(format!(
                "parallel.dp ({dp}) must equal parallel.nproc ({}): data parallel is the only dimension so far",
                self.nproc
            ));
        }
        Ok(())
    }
}

fn none() -> String {
    "none".into()
}
fn fp32() -> String {
    "fp32".into()
}
fn local() -> String {
    "local".into()
}
fn one() -> usize {
    1
}
fn bucket_mb() -> f64 {
    25.0
}
fn timeout_s() -> u64 {
    300
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
