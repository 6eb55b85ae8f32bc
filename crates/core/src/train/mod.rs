//! Training: the generic [`Engine`] (any model family, every parallel layout) and the
//! causal-LM [`Trainer`] on it; config, batches, checkpoints, launch.
mod assemble;
mod batch;
mod build;
mod checkpoint;
mod config;
mod engine;
mod eval;
mod expert_parallel;
mod grad_norm;
mod launch;
mod lora;
mod measure;
mod modes;
mod neftune;
mod output;
mod pipeline;
mod rank_batch;
mod replica;
mod save;
mod step;
mod tensor_parallel;
mod trainer;

pub use assemble::{Origin, RankGroups};
pub use batch::{causal_lm_batch, LmBatch};
pub use checkpoint::{
    distributed_to_whole, list_checkpoints, load_distributed, whole_to_distributed, TrainerState,
    OPTIMIZER,
};
pub use config::{
    parse_bytes, DataConfig, ModelConfig, ParallelConfig, SampleConfig, TrainConfig, TrainSection,
};
pub use engine::{Backward, Engine};
pub use launch::{launch_ranks, RankSetup};
pub use lora::{adapter_dir, LoraSection};
pub use modes::{
    Backend, CheckpointFormat, DeviceSpec, Freeze, MpiCollectives, Offload, PpSchedule, Precision,
    SpMode,
};
pub use output::OutputLayout;
pub use rank_batch::lm_loss;
pub use trainer::Trainer;
