//! Plain models: they compute and know nothing of ranks, offload or schedules.
pub mod llama;
