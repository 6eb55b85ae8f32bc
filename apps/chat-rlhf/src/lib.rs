//! chat-rlhf: SFT, reward modelling, PPO, the DPO family and GRPO for chat models on the
//! colossal-core parallel trainer.

pub mod config;
pub mod data;
pub mod dpo;
pub mod loss;
pub mod reference;
pub mod reward;
pub mod rm;
pub mod run;
pub mod session;
pub mod sft;
