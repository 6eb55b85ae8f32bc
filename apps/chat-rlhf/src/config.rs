//! `chat-rlhf <method> --config FILE.toml`: the pretraining sections (`[model]`, `[train]`,
//! `[parallel]`) plus the chat data and one section per method. Unknown keys are errors.

use std::path::PathBuf;

use colossal_core::train::{
    DataConfig, LoraSection, ModelConfig, ParallelConfig, TrainConfig, TrainSection,
};
use serde::{Deserialize, Serialize};

use crate::loss::{KlEstimator, PreferenceLoss};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatConfig {
    /// The policy (SFT, DPO, PPO actor, GRPO) or the model a reward model starts from.
    pub model: ModelConfig,
    pub data: ChatData,
    pub train: TrainSection,
    #[serde(default)]
    pub parallel: ParallelConfig,
    #[serde(default)]
    pub dpo: Option<DpoSection>,
    #[serde(default)]
    pub ppo: Option<PpoSection>,
    #[serde(default)]
    pub grpo: Option<GrpoSection>,
    #[serde(default)]
    pub generation: GenerationSection,
    /// Train LoRA adapters on the frozen policy; its base is then the reference (no second copy).
    #[serde(default)]
    pub lora: Option<LoraSection>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatData {
    /// A directory written by `colossal-data sft | preference | prompt`.
    pub path: PathBuf,
    /// Tokenizer directory (for chat, evaluation and decoding samples in logs).
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Padding id (default: the model's pad_token_id, else 0). Never inside the text.
    #[serde(default)]
    pub pad_id: Option<u32>,
}

/// `[dpo] loss = "dpo" | "ipo" | "simpo" | "orpo" | "kto"` with that loss's coefficients.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "loss", rename_all = "lowercase", deny_unknown_fields)]
pub enum DpoSection {
    Dpo {
        beta: f64,
        #[serde(default)]
        label_smoothing: f64,
    },
    Ipo {
        beta: f64,
    },
    Simpo {
        beta: f64,
        gamma: f64,
    },
    Orpo {
        lambda: f64,
    },
    /// Chosen answers are desirable, rejected ones undesirable (TRL's unpaired conversion).
    Kto {
        beta: f64,
        #[serde(default = "one")]
        desirable_weight: f64,
        #[serde(default = "one")]
        undesirable_weight: f64,
    },
}

/// The DPO family's pairwise loss, or KTO on the pairs' answers as unpaired examples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LossChoice {
    Pairwise(PreferenceLoss),
    Kto {
        beta: f64,
        desirable_weight: f64,
        undesirable_weight: f64,
    },
}

impl DpoSection {
    pub fn choice(self) -> LossChoice {
        match self {
            DpoSection::Dpo {
                beta,
                label_smoothing,
            } => LossChoice::Pairwise(PreferenceLoss::Dpo {
                beta,
                label_smoothing,
            }),
            DpoSection::Ipo { beta } => LossChoice::Pairwise(PreferenceLoss::Ipo { beta }),
            DpoSection::Simpo { beta, gamma } => {
                LossChoice::Pairwise(PreferenceLoss::Simpo { beta, gamma })
            }
            DpoSection::Orpo { lambda } => LossChoice::Pairwise(PreferenceLoss::Orpo { lambda }),
            DpoSection::Kto {
                beta,
                desirable_weight,
                undesirable_weight,
            } => LossChoice::Kto {
                beta,
                desirable_weight,
                undesirable_weight,
            },
        }
    }
}

fn one() -> f64 {
    1.0
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PpoSection {
    /// The reward model (`LlamaForSequenceClassification`), frozen.
    pub reward_model: PathBuf,
    /// The critic's starting point (default: the reward model).
    #[serde(default)]
    pub critic_model: Option<PathBuf>,
    #[serde(default = "critic_lr")]
    pub critic_lr: f64,
    #[serde(default = "kl_coef")]
    pub kl_coef: f64,
    #[serde(default = "k1")]
    pub kl_estimator: KlEstimator,
    #[serde(default = "gamma")]
    pub gamma: f64,
    #[serde(default = "lambda")]
    pub lambda: f64,
    #[serde(default = "clip")]
    pub clip_eps: f64,
    #[serde(default = "clip")]
    pub value_clip_eps: f64,
    #[serde(default)]
    pub entropy_coef: f64,
    /// PPO epochs over each rollout batch.
    #[serde(default = "one_usize")]
    pub ppo_epochs: usize,
    /// Weight of the pretraining (SFT) loss mixed in (InstructGPT's ptx); needs `ptx_data`.
    #[serde(default)]
    pub ptx_coef: f64,
    #[serde(default)]
    pub ptx_data: Option<PathBuf>,
    /// Whitens advantages within each micro-batch.
    #[serde(default = "yes")]
    pub whiten_advantages: bool,
    /// Keep the frozen reference and reward models on disk, streaming each block's weights
    /// when it runs (memory: one block instead of two whole models).
    #[serde(default)]
    pub offload_frozen: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpoSection {
    /// Samples per prompt.
    #[serde(default = "four")]
    pub group_size: usize,
    /// `gsm8k`: 1 when the last number of the answer equals the reference, else 0; or
    /// `model`: the reward model's score.
    #[serde(default = "gsm8k")]
    pub reward: String,
    #[serde(default)]
    pub reward_model: Option<PathBuf>,
    #[serde(default = "grpo_beta")]
    pub beta: f64,
    #[serde(default = "clip")]
    pub clip_eps: f64,
    /// Divide by the group's standard deviation (false: Dr. GRPO).
    #[serde(default = "yes")]
    pub scale_rewards: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationSection {
    #[serde(default = "new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default = "temperature")]
    pub temperature: f64,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub top_p: Option<f64>,
}

impl Default for GenerationSection {
    fn default() -> Self {
        Self {
            max_new_tokens: new_tokens(),
            temperature: temperature(),
            top_k: None,
            top_p: None,
        }
    }
}

fn critic_lr() -> f64 {
    1e-5
}
fn kl_coef() -> f64 {
    0.05
}
fn k1() -> KlEstimator {
    KlEstimator::K1
}
fn gamma() -> f64 {
    1.0
}
fn lambda() -> f64 {
    0.95
}
fn clip() -> f64 {
    0.2
}
fn one_usize() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn four() -> usize {
    4
}
fn gsm8k() -> String {
    "gsm8k".into()
}
fn grpo_beta() -> f64 {
    0.04
}
fn new_tokens() -> usize {
    32
}
fn temperature() -> f64 {
    1.0
}

impl ChatConfig {
    /// The core trainer's config for the policy (its data section is not read).
    pub fn trainer_config(&self) -> TrainConfig {
        TrainConfig {
            model: self.model.clone(),
            data: DataConfig {
                path: self.data.path.clone(),
                boundary_aware: false,
                shuffle: false,
            },
            train: self.train.clone(),
            sample: None,
            parallel: self.parallel.clone(),
            lora: self.lora.clone(),
        }
    }
}
