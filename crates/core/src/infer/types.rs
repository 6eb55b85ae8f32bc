//! What the engine is configured with, takes and gives back.

use super::sampler::SamplingParams;

/// How the cache is sized and how much one step may do.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Token slots per block.
    pub block_size: usize,
    /// Blocks in the pool (memory: `num_blocks × block_size × layers × 2 × kv heads × d × 4`
    /// bytes).
    pub num_blocks: usize,
    /// Most sequences in the running batch.
    pub max_num_seqs: usize,
    /// Most tokens one step feeds the model (prompts are split into chunks to fit).
    pub max_batched_tokens: usize,
    pub streaming: Option<StreamingConfig>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            num_blocks: 512,
            max_num_seqs: 64,
            max_batched_tokens: 512,
            streaming: None,
        }
    }
}

/// StreamingLLM: keep the first `sinks` tokens (attention sinks) and the last `window`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StreamingConfig {
    pub sinks: usize,
    pub window: usize,
}

/// One generation request: prompt ids and how to sample.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Report the raw logits each new token was chosen from (tests, scoring).
    pub keep_logits: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop id was generated.
    Stop,
    /// `max_tokens` reached, or the model's context is full (without StreamingLLM).
    Length,
}

/// What one step produced for one request: a new token, and whether it is the last.
#[derive(Clone, Debug)]
pub struct Output {
    pub id: u64,
    pub token: u32,
    pub finish: Option<FinishReason>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub logits: Option<Vec<f32>>,
}

/// Running totals, for logs and benchmarks.
#[derive(Clone, Debug, Default)]
pub struct EngineStats {
    pub steps: usize,
    pub prompt_tokens_computed: usize,
    pub prefix_blocks_reused: usize,
    pub generated_tokens: usize,
    pub preemptions: usize,
    pub peak_blocks: usize,
}
