//! Plain models: they compute and know nothing of ranks, offload or schedules.
pub mod family;
pub mod llama;

pub use family::{init_all, init_each, Init, ModelFamily, ParamSink, ParamSpec};
