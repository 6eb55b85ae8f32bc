//! LLaMA as blocks: `[embedding, layer 0, …, layer N-1, final norm + LM head]`.

use candle_core::Tensor;

use super::BlockModel;
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
            let mut v = vec![Llama::NORM.to_string()];
            v.push(self.head_weight_name().to_string());
            v
        }
    }

    fn block_forward(
        &self,
        block: usize,
        p: &Params,
        x: &Tensor,
        ctx: &AttnInputs,
    ) -> Result<Tensor> {
        let layers = self.cfg.num_hidden_layers;
        if block == 0 {
            self.embed(p, x)
        } else if block <= layers {
            self.layer(block - 1, p, x, ctx, None)
        } else {
            self.head(p, x)
        }
    }
}
