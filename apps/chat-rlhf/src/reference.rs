//! Frozen models: the reference policy (DPO, PPO and GRPO's KL anchor) and the reward model,
//! run forward only, block by block, without gradients. Offloaded, a frozen model keeps no
//! weights in memory: each block's are read from its safetensors files when the block runs.
//! A LoRA policy's reference is its own frozen base, run in place with the adapters off.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use colossal_core::checkpoint::hf::load_expected;
use colossal_core::checkpoint::llama::load_llama;
use colossal_core::exec::{llama_inputs, BlockModel, Executor, FullParams, ParamSource};
use colossal_core::models::llama::{AttnInputs, Llama, LlamaConfig};
use colossal_core::params::Params;

use colossal_core::train::{OutputLayout, Trainer};

enum Weights {
    Resident(Params),
    /// Streamed block by block from this HF directory.
    Disk(PathBuf),
}

// The frozen model computes where the policy does: its weights (resident or streamed) are put
// on the policy's device.

pub struct Frozen {
    pub model: Llama,
    weights: Weights,
    device: Device,
}

/// A block's weights read from disk when it runs, dropped after.
struct DiskBlocks<'a> {
    model: &'a Llama,
    dir: &'a Path,
    shapes: HashMap<String, Vec<usize>>,
    device: &'a Device,
}

impl ParamSource for DiskBlocks<'_> {
    fn acquire(&mut self, block: usize) -> colossal_core::Result<Params> {
        let expected: Vec<(String, Vec<usize>)> = self
            .model
            .block_param_names(block)
            .into_iter()
            .map(|n| {
                let s = self.shapes[&n].clone();
                (n, s)
            })
            .collect();
        let mut p = Params::new();
        for (name, t) in load_expected(self.dir, &expected, DType::F32, self.device)? {
            p.insert(name, Var::from_tensor(&t)?);
        }
        Ok(p)
    }
}

impl Frozen {
    /// All weights in memory.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let (model, params) = load_llama(dir, DType::F32, device)
            .with_context(|| format!("loading the frozen model {}", dir.display()))?;
        Ok(Self {
            model,
            weights: Weights::Resident(params),
            device: device.clone(),
        })
    }

    /// Resident, or (`offload`) streamed from `dir` block by block.
    pub fn open(dir: &Path, offload: bool, device: &Device) -> Result<Self> {
        if !offload {
            return Self::load(dir, device);
        }
        let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
        Ok(Self {
            model: Llama::new(cfg)?,
            weights: Weights::Disk(dir.to_path_buf()),
            device: device.clone(),
        })
    }

    /// The model's output (logits, or scores for a reward model).
    pub fn forward(&self, inputs: &Tensor, ctx: &AttnInputs) -> Result<Tensor> {
        let ctx = ctx.to_dtype(DType::F32)?;
        let exec = Executor::default();
        let inputs = &llama_inputs(inputs);
        let out = match &self.weights {
            Weights::Resident(p) => {
                exec.forward_with(&self.model, &mut FullParams(p), inputs, &ctx)?
            }
            Weights::Disk(dir) => {
                let mut source = DiskBlocks {
                    model: &self.model,
                    dir,
                    shapes: self.model.param_shapes().into_iter().collect(),
                    device: &self.device,
                };
                exec.forward_with(&self.model, &mut source, inputs, &ctx)?
            }
        };
        Ok(out.output()?.clone())
    }

    /// Log-probability of each next token (B, T − 1).
    fn token_logps(&self, inputs: &Tensor, ctx: &AttnInputs) -> Result<Tensor> {
        let whole = OutputLayout::default();
        Ok(whole.token_log_probs(&self.forward(inputs, ctx)?, inputs)?)
    }
}

/// The KL anchor of DPO, KTO, PPO and GRPO: a frozen model of its own, or a LoRA policy's own
/// base. The base is not copied: the policy runs with its adapters off, on its weights wherever
/// they are (sliced under tensor parallelism, gathered block by block under ZeRO-3, resting
/// quantised under QLoRA), in its compute precision. That is a collective under ZeRO-3, so
/// every data-parallel rank asks for the same number of reference passes.
pub enum Reference {
    Model(Box<Frozen>),
    PolicyBase,
}

impl Reference {
    /// The reference of `policy`: its frozen base under LoRA, else the model in `dir`
    /// (resident, or streamed block by block with `offload`).
    pub fn of(policy: &Trainer, dir: &Path, offload: bool) -> Result<Self> {
        match policy.model.lora.is_some() {
            true => Ok(Self::PolicyBase),
            false => Ok(Self::Model(Box::new(Frozen::open(
                dir,
                offload,
                policy.device(),
            )?))),
        }
    }

    /// Log-probability of each next token (B, T − 1), in f32.
    pub fn token_logps(
        &self,
        policy: &Trainer,
        inputs: &Tensor,
        ctx: &AttnInputs,
    ) -> Result<Tensor> {
        match self {
            Self::Model(f) => f.token_logps(inputs, ctx),
            Self::PolicyBase => {
                let layout = policy.output_layout();
                let logps = policy
                    .base_forward_map(inputs, ctx, |out| layout.token_log_probs(out, inputs))?;
                Ok(logps.to_dtype(DType::F32)?)
            }
        }
    }
}
