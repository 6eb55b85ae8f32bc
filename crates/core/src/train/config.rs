//! `llama-pretrain train --config FILE.toml`: every key typed, unknown keys rejected.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::modes::{
    Backend, CheckpointFormat, DeviceSpec, Freeze, MpiCollectives, Offload, PpSchedule, Precision,
    SpMode,
};
use crate::models::llama::LlamaConfig;
use crate::optim::ScheduleKind;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// The LLaMA to train (the causal-LM trainer; another family's app brings its model).
    #[serde(default)]
    pub model: ModelConfig,
    /// The packed pretraining data (the causal-LM trainer; apps with their own data omit it).
    #[serde(default)]
    pub data: DataConfig,
    pub train: TrainSection,
    #[serde(default)]
    pub sample: Option<SampleConfig>,
    #[serde(default)]
    pub parallel: ParallelConfig,
    /// Train LoRA adapters on a frozen base instead of every weight.
    #[serde(default)]
    pub lora: Option<super::lora::LoraSection>,
}

/// How the run is spread over ranks. The math (global batch, schedule) does not depend on it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelConfig {
    /// `local`: ranks are threads of this process (`nproc` of them). `mpi`: ranks are the
    /// processes of an `mpirun`/`srun` job (needs a build with `--features mpi`; `nproc`, if
    /// set, must equal the job's size). `nccl`: GPU ranks with NCCL collectives.
    #[serde(default)]
    pub backend: Backend,
    /// Under `backend = "mpi"`: `native` (the MPI library's collectives, default) or `ring`
    /// (point-to-point rings, bit-identical to the local backend).
    #[serde(default)]
    pub mpi_collectives: MpiCollectives,
    /// Number of ranks.
    #[serde(default = "one")]
    pub nproc: usize,
    /// Data-parallel degree (defaults to nproc).
    #[serde(default)]
    pub dp: Option<usize>,
    /// Tensor-parallel ranks (Megatron 1D): each holds a slice of every layer.
    #[serde(default = "one")]
    pub tp: usize,
    /// Sequence-parallel ranks for `sp_mode` ulysses or ring.
    #[serde(default = "one")]
    pub sp: usize,
    /// Sequence parallelism: "none"; "megatron" (with tp > 1: the residual stream split along
    /// the sequence between tensor-parallel regions, over the tp group); "ulysses" or "ring"
    /// (each of `sp` ranks holds part of every sequence).
    #[serde(default)]
    pub sp_mode: SpMode,
    /// Pipeline stages.
    #[serde(default = "one")]
    pub pp: usize,
    /// Expert-parallel ranks: a mixture of experts' experts split over groups of `ep` ranks
    /// that hold the same weights (data- and sequence-parallel ones; must divide dp × sp).
    #[serde(default = "one")]
    pub ep: usize,
    /// "gpipe", "1f1b", "interleaved" or "zbh1".
    #[serde(default)]
    pub pp_schedule: PpSchedule,
    /// Model chunks per rank under the interleaved schedule.
    #[serde(default = "two")]
    pub pp_chunks: usize,
    /// Decoder layers of each stage (default: as even as possible).
    #[serde(default)]
    pub layers_per_stage: Option<Vec<usize>>,
    /// ZeRO stage: 0 (plain data parallel), 1 (optimizer states sharded), 2 (+ gradients),
    /// 3 (+ parameters, gathered block by block).
    #[serde(default)]
    pub zero_stage: u8,
    /// Where the fp32 master state of the ZeRO shard (moments; under ZeRO-3 also parameter
    /// chunks) lives: `none` (beside the compute), `cpu` (host memory, updated by the fused CPU
    /// AdamW) or `disk` (memory-mapped files, pages dropped after each use). Needs
    /// `zero_stage` ≥ 1. On the CPU device `none` and `cpu` hold the same bytes in the same
    /// place; they differ once compute runs on a GPU.
    #[serde(default)]
    pub offload: Offload,
    /// With `offload = "disk"`: bytes of that state each rank may keep resident (a number, or a
    /// string such as "512MiB" / "2GB"); buffers are placed in memory until the budget is
    /// spent, the rest on disk. Default 0: everything offloadable goes to disk.
    #[serde(default)]
    pub memory_budget: Option<toml::Value>,
    /// Directory of the offload files (default: OUT_DIR/offload).
    #[serde(default)]
    pub offload_dir: Option<std::path::PathBuf>,
    /// Compute precision: `fp32`, `bf16` or `fp16` (fp32 master weights and moments; fp16
    /// adds dynamic loss scaling).
    #[serde(default)]
    pub precision: Precision,
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
            backend: Backend::Local,
            mpi_collectives: MpiCollectives::Native,
            nproc: 1,
            dp: None,
            tp: 1,
            sp: 1,
            sp_mode: SpMode::None,
            pp: 1,
            ep: 1,
            pp_schedule: PpSchedule::OneFOneB,
            pp_chunks: 2,
            layers_per_stage: None,
            zero_stage: 0,
            precision: Precision::Fp32,
            offload: Offload::None,
            memory_budget: None,
            offload_dir: None,
            bucket_mb: bucket_mb(),
            timeout_s: timeout_s(),
        }
    }
}

impl ParallelConfig {
    pub fn compute_dtype(&self) -> candle_core::DType {
        self.precision.dtype()
    }

    pub fn validate(&self) -> Result<(), String> {
        match self.backend {
            Backend::Local => {}
            Backend::Mpi if cfg!(feature = "mpi") => {}
            Backend::Mpi => {
                return Err("parallel.backend = \"mpi\" needs a build with `--features mpi` (Open MPI and libclang installed)".into())
            }
            Backend::Nccl if cfg!(feature = "cuda") => {}
            Backend::Nccl => {
                return Err("parallel.backend = \"nccl\" needs a build with `--features cuda` (colossal-core/cuda) on a machine with the CUDA toolkit".into())
            }
        }
        if self.zero_stage > 3 {
            return Err(format!(
                "parallel.zero_stage {}: expected 0, 1, 2 or 3",
                self.zero_stage
            ));
        }
        if self.offload != Offload::None && self.zero_stage == 0 {
            return Err(format!("parallel.offload = \"{}\" needs parallel.zero_stage >= 1 (the offloaded state is the ZeRO shard)", self.offload));
        }
        let budget = self.memory_budget_bytes()?;
        if budget > 0 && self.offload != Offload::Disk {
            return Err(format!(
                "parallel.memory_budget is set but parallel.offload is `{}`: the budget splits the state between memory and disk, so it needs offload = \"disk\"",
                self.offload
            ));
        }
        if self.nproc == 0 {
            return Err("parallel.nproc must be at least 1".into());
        }
        let model_parallel = self.tp * self.pp * self.sp;
        if model_parallel == 0 || !self.nproc.is_multiple_of(model_parallel) {
            return Err(format!(
                "parallel.tp ({}) × parallel.pp ({}) × parallel.sp ({}) must divide parallel.nproc ({})",
                self.tp, self.pp, self.sp, self.nproc
            ));
        }
        let dp = self.data_parallel();
        if dp * model_parallel != self.nproc {
            return Err(format!(
                "parallel.dp ({dp}) × parallel.tp ({}) × parallel.pp ({}) × parallel.sp ({}) must equal parallel.nproc ({})",
                self.tp, self.pp, self.sp, self.nproc
            ));
        }
        // Sequence-parallel ranks hold the same weights as data-parallel ones: experts split
        // over both.
        let holders = dp * self.sp;
        if self.ep == 0 || !holders.is_multiple_of(self.ep) {
            return Err(format!(
                "parallel.ep ({}) must divide parallel.dp ({dp}) × parallel.sp ({}): experts are split over the ranks that hold the same weights",
                self.ep, self.sp
            ));
        }
        if self.pp > 1 && self.zero_stage == 3 {
            return Err(format!(
                "parallel.pp = {} with parallel.zero_stage = 3: a pipeline stage keeps its own layers whole; use zero_stage ≤ 2",
                self.pp
            ));
        }
        match (self.sp_mode, self.sp) {
            (SpMode::None, 1) => {}
            (SpMode::Megatron, 1) if self.tp > 1 => {}
            (SpMode::Megatron, 1) => {
                return Err("parallel.sp_mode = \"megatron\" splits the sequence over the tensor-parallel group: it needs parallel.tp > 1".into())
            }
            (SpMode::Ulysses | SpMode::Ring | SpMode::Dap, sp) if sp > 1 => {}
            (mode @ (SpMode::Ulysses | SpMode::Ring | SpMode::Dap), _) => {
                return Err(format!("parallel.sp_mode = \"{mode}\" needs parallel.sp > 1"))
            }
            (mode @ (SpMode::None | SpMode::Megatron), sp) => {
                return Err(format!(
                    "parallel.sp = {sp} with parallel.sp_mode = \"{mode}\": set sp_mode to ulysses, ring or dap (megatron uses the tp group)"
                ))
            }
        }
        Ok(())
    }
}

impl ParallelConfig {
    /// Data-parallel ranks: `dp` if set, else what `nproc` leaves after the other dimensions.
    pub fn data_parallel(&self) -> usize {
        self.dp
            .unwrap_or(self.nproc / (self.tp * self.pp * self.sp).max(1))
    }

    /// `memory_budget` in bytes (0 when unset).
    pub fn memory_budget_bytes(&self) -> Result<u64, String> {
        match &self.memory_budget {
            None => Ok(0),
            Some(toml::Value::Integer(n)) if *n >= 0 => Ok(*n as u64),
            Some(toml::Value::String(s)) => parse_bytes(s)
                .ok_or_else(|| format!("parallel.memory_budget `{s}`: expected bytes such as 1073741824, \"512MiB\" or \"2GB\"")),
            Some(other) => Err(format!(
                "parallel.memory_budget `{other}`: expected a byte count or a string such as \"512MiB\""
            )),
        }
    }
}

/// "123", "512KiB", "2GiB", "1.5GB", "64M" → bytes (K/M/G/T: powers of 1000 with B, of 1024
/// with iB or alone).
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().ok()?;
    let unit = unit.trim();
    let (prefix, rest) = unit.split_at(unit.len().min(1));
    let power = match prefix.to_ascii_uppercase().as_str() {
        "" | "B" if rest.is_empty() => 0,
        "K" => 1,
        "M" => 2,
        "G" => 3,
        "T" => 4,
        _ => return None,
    };
    let base: f64 = match rest {
        "B" | "b" if power > 0 => 1000.0,
        "" | "iB" | "ib" => 1024.0,
        _ if power == 0 => 1.0,
        _ => return None,
    };
    (num >= 0.0).then(|| (num * base.powi(power)) as u64)
}

fn two() -> usize {
    2
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

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
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
    #[serde(default)]
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

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            path: PathBuf::new(),
            boundary_aware: false,
            shuffle: true,
        }
    }
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
    /// "none", or "non_embedding": only the token embedding and LM head train (the first stage
    /// of Colossal-LLaMA's recipe after a vocabulary expansion).
    #[serde(default)]
    pub freeze: Freeze,
    /// Where parameters, gradients and compute live: "cpu", "cuda" (each rank its local
    /// rank's GPU) or "cuda:N".
    #[serde(default)]
    pub device: DeviceSpec,
    /// `fused` (default): the kernels crate's fused ops; `reference`: compositions of
    /// candle ops, for comparison.
    #[serde(default)]
    pub kernels: colossal_kernels::Kernels,
    /// NEFTune: uniform noise of scale alpha/√(L·d) on the token embeddings while training
    /// (L tokens per sequence, d hidden size); 0 disables.
    #[serde(default)]
    pub neftune_alpha: f64,
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
    /// "hf": rank 0 gathers and writes an HF model directory plus moments; "distributed":
    /// every rank writes its own slices and an index (any layout can resume from either;
    /// `colossal convert` turns one into the other).
    #[serde(default)]
    pub checkpoint_format: CheckpointFormat,
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
