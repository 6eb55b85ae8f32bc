//! chat-rlhf: SFT, reward modelling, PPO, the DPO family and GRPO for chat models on the
//! colossal-core parallel trainer.

pub mod chat;
pub mod config;
pub mod data;
pub mod dpo;
pub mod eval;
pub mod grpo;
pub mod kto;
pub mod loss;
pub mod ppo;
pub mod reference;
pub mod reward;
pub mod rm;
pub mod rollout;
pub mod run;
pub mod session;
pub mod sft;
