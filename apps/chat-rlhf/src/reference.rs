//! Frozen models: the reference policy (DPO, PPO and GRPO's KL anchor) and the reward model,
//! run forward only, block by block, without gradients.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use colossal_core::checkpoint::llama::load_llama;
use colossal_core::exec::Executor;
use colossal_core::models::llama::{AttnInputs, Llama};
use colossal_core::params::Params;

use crate::loss::token_logprobs;

pub struct Frozen {
    pub model: Llama,
    pub params: Params,
}

impl Frozen {
    pub fn load(dir: &Path) -> Result<Self> {
        let (model, params) = load_llama(dir, DType::F32, &Device::Cpu)
            .with_context(|| format!("loading the frozen model {}", dir.display()))?;
        Ok(Self { model, params })
    }

    /// The model's output (logits, or scores for a reward model).
    pub fn forward(&self, inputs: &Tensor, ctx: &AttnInputs) -> Result<Tensor> {
        let ctx = ctx.to_dtype(DType::F32)?;
        Ok(Executor::default().forward(&self.model, &self.params, inputs, &ctx)?)
    }

    /// Log-probability of each next token (B, T − 1).
    pub fn token_logps(&self, inputs: &Tensor, ctx: &AttnInputs) -> Result<Tensor> {
        Ok(token_logprobs(&self.forward(inputs, ctx)?, inputs)?)
    }
}
