//! chat-rlhf's integration tests, one binary (each test binary costs CI a link).

mod cli;
mod common;
mod lora;
mod model_parallel;
mod reward_fixture;
mod trainers;
