//! Colossal-LLaMA's continued-pretraining pieces through the binaries and the trainer: model
//! resizing to an expanded vocabulary, freezing and NEFTune, evaluation — one test binary.

#[path = "../common/mod.rs"]
mod common;
mod eval;
mod init_model;
mod recipe;
