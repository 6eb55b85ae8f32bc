//! LLaMA as blocks: `[embedding, layer 0, …, layer N-1, final norm + LM head]`, carrying
//! `ids` → `h` (the residual stream) → `logits`; a mixture-of-experts model adds its routing
//! sums (`moe.*`), which pass through the head for the load-balancing loss.

use candle_core::Tensor;

use super::{Acts, BlockModel};
use crate::models::llama::moe::{MOE_HOT, MOE_TOKENS};
use crate::models::llama::{AttnInputs, Llama};
use crate::params::Params;
use crate::Result;

impl BlockModel for Llama {
    type Ctx = AttnInputs;

    fn num_blocks(&self) -> usize {
        self.cfg.num_hidden_layers + 2
    }

    fn block_param_names(&self, block: usize) -> Vec<String> {
        let layers = self.cfg.num_hidden_layers;
        if block == 0 {
            vec![Llama::EMBED.to_string()]
        } else if block <= layers {
            self.layer_param_names(block - 1)
        } else {
            self.head_param_names()
        }
    }

    fn block_forward(&self, block: usize, p: &Params, x: &Acts, ctx: &AttnInputs) -> Result<Acts> {
        let layers = self.cfg.num_hidden_layers;
        Ok(if block == 0 {
            Acts::one(H, self.embed(p, x.get(IDS)?)?)
        } else if block <= layers {
            let (h, routing) = self.layer_routed(block - 1, p, x.get(H)?, ctx)?;
            let mut out = Acts::one(H, h);
            if let Some(r) = routing {
                self.add_routing_streams(x, &r, ctx, &mut out)?;
            }
            out
        } else {
            let drop = ctx.lora_dropout.as_deref();
            let mut out = Acts::one(LOGITS, self.head_with(p, x.get(H)?, drop)?);
            for (name, t) in x.iter().filter(|(n, _)| n.starts_with("moe.")) {
                out.insert(name, t.clone());
            }
            out
        })
    }

    /// Token ids and the routing counts (discrete choices) take no gradient.
    fn takes_grad(&self, name: &str) -> bool {
        name != IDS && name != MOE_HOT && name != MOE_TOKENS
    }
}

/// Names of the tensors between LLaMA's blocks.
pub const IDS: &str = "ids";
pub const H: &str = "h";
pub const LOGITS: &str = "logits";

/// The model's input set for token ids (B, T).
pub fn llama_inputs(ids: &Tensor) -> Acts {
    Acts::one(IDS, ids.clone())
}

impl super::Executor {
    /// [`Self::forward_backward`] of a LLaMA on token ids, with `loss` on its logits.
    pub fn lm_forward_backward(
        &self,
        model: &Llama,
        params: &Params,
        ids: &Tensor,
        ctx: &AttnInputs,
        loss: impl Fn(&Tensor) -> Result<Tensor>,
        hooks: &mut dyn super::Hooks,
    ) -> Result<super::StepOutput> {
        let loss = super::on_output(loss);
        self.forward_backward(model, params, &llama_inputs(ids), ctx, &*loss, hooks)
    }
}
