//! Serving-time inference: a paged KV cache, continuous batching and StreamingLLM.
//!
//! [`Engine`] holds requests; every [`Engine::step`] schedules a batch of tokens (the next
//! token of every running sequence, and chunks of prompts of newly admitted ones, within a
//! token budget), runs them through the model as one flat batch whose attention reads each
//! sequence's keys through its block table ([`kv::KvPool`]), samples where a sequence has
//! consumed all its tokens, and reports what came out. Requests join and leave the running
//! batch at every step; when the cache is full the latest-admitted sequence is preempted and
//! recomputed later. Full blocks of prompt tokens are shared between sequences with the same
//! prefix ([`blocks::BlockManager`]).
//!
//! With [`StreamingConfig`] (StreamingLLM, Xiao et al. 2023) a sequence keeps its first
//! `sinks` tokens and its last `window` ones: older tokens leave the cache, the kept keys are
//! turned back to their new places, and positions are places in the cache, so a conversation
//! goes on past the model's context length in bounded memory.
//!
//! Tensor parallelism applies from outside as in training: a model parallelized over a group
//! and this rank's slices of the weights give a pool with this rank's kv heads; the logits,
//! split by vocabulary, are gathered before sampling ([`Engine::with_logits_gather`]). Every
//! rank runs the same schedule from the same requests.

pub mod blocks;
mod engine;
pub mod kv;
mod sampler;
mod schedule;
mod types;

pub use engine::Engine;
pub use sampler::{Sampler, SamplingParams};
pub use types::{EngineConfig, EngineStats, FinishReason, Output, Request, StreamingConfig};

use candle_core::{Device, Tensor};

use crate::dist::Group;
use crate::models::llama::Llama;
use crate::params::Params;
use crate::Result;

/// An engine for one tensor-parallel rank of `group`: `model` parallelized over it, `local`
/// this rank's slices of the weights (`parallel::tensor::shard_params` or `load_sharded`),
/// the logits gathered over the group before sampling. Every rank must be given the same
/// requests in the same order and step together.
pub fn tensor_parallel(
    model: &Llama,
    local: Params,
    group: Group,
    cfg: EngineConfig,
    device: &Device,
) -> Result<Engine> {
    let tp = crate::parallel::tensor::parallelize(model, group.clone(), false)?;
    let gather = move |logits: &Tensor| -> Result<Tensor> {
        let parts = group.with(|c| c.all_gather(&logits.unsqueeze(0)?.contiguous()?))?;
        let parts: Vec<Tensor> = (0..group.size())
            .map(|i| parts.get(i))
            .collect::<candle_core::Result<_>>()?;
        Ok(Tensor::cat(&parts, 1)?)
    };
    Ok(Engine::new(tp, local, cfg, device)?.with_logits_gather(Box::new(gather)))
}
