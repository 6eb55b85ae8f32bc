//! chat-rlhf: SFT, reward modelling, PPO, the DPO family and GRPO for chat models on the
//! colossal-core parallel trainer.

pub mod loss;
pub mod reward;
