//! LLaMA's tensor-parallel plan (Megatron 1D), keyed by HF parameter path: only entries for
//! parameters this config has, so the plan checks exactly against the parameter list.

use super::Llama;
use crate::parallel::plan::{TpPlan, TpStyle};

impl Llama {
    pub fn tp_plan(&self) -> TpPlan {
        use TpStyle::*;
        let c = &self.cfg;
        let mut rules = vec![
            (Self::EMBED, VocabParallel),
            ("model.layers.*.self_attn.q_proj.weight", Colwise),
            ("model.layers.*.self_attn.k_proj.weight", Colwise),
            ("model.layers.*.self_attn.v_proj.weight", Colwise),
            ("model.layers.*.self_attn.o_proj.weight", Rowwise),
            ("model.layers.*.mlp.gate_proj.weight", Colwise),
            ("model.layers.*.mlp.up_proj.weight", Colwise),
            ("model.layers.*.mlp.down_proj.weight", Rowwise),
            ("model.layers.*.input_layernorm.weight", Replicate),
            ("model.layers.*.post_attention_layernorm.weight", Replicate),
            (Self::NORM, Replicate),
        ];
        if c.attention_bias {
            rules.extend([
                ("model.layers.*.self_attn.q_proj.bias", Colwise),
                ("model.layers.*.self_attn.k_proj.bias", Colwise),
                ("model.layers.*.self_attn.v_proj.bias", Colwise),
                // Added after the row-parallel sum, once.
                ("model.layers.*.self_attn.o_proj.bias", Replicate),
            ]);
        }
        if c.mlp_bias {
            rules.extend([
                ("model.layers.*.mlp.gate_proj.bias", Colwise),
                ("model.layers.*.mlp.up_proj.bias", Colwise),
                ("model.layers.*.mlp.down_proj.bias", Replicate),
            ]);
        }
        match self.head_weight_name() {
            // The score head is small: every rank holds it whole.
            Self::SCORE => rules.push((Self::SCORE, Replicate)),
            "lm_head.weight" if c.has_lm_head() => rules.push(("lm_head.weight", Colwise)),
            _ => {}
        }
        TpPlan::new(&rules)
    }
}
