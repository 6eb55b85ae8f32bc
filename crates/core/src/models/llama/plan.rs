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
            ("model.layers.*.input_layernorm.weight", Replicate),
            ("model.layers.*.post_attention_layernorm.weight", Replicate),
            (Self::NORM, Replicate),
        ];
        if c.num_local_experts.is_some() {
            // Tensor parallelism splits attention only: the router and experts are whole on
            // every rank, which all route the same (whole) tokens; `parallel.ep` splits the
            // experts over data-parallel ranks instead.
            rules.extend([
                ("model.layers.*.block_sparse_moe.gate.weight", Replicate),
                (
                    "model.layers.*.block_sparse_moe.experts.*.w1.weight",
                    Replicate,
                ),
                (
                    "model.layers.*.block_sparse_moe.experts.*.w2.weight",
                    Replicate,
                ),
                (
                    "model.layers.*.block_sparse_moe.experts.*.w3.weight",
                    Replicate,
                ),
            ]);
        } else {
            rules.extend([
                ("model.layers.*.mlp.gate_proj.weight", Colwise),
                ("model.layers.*.mlp.up_proj.weight", Colwise),
                ("model.layers.*.mlp.down_proj.weight", Rowwise),
            ]);
        }
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
        let mut plan = TpPlan::new(&rules);
        // LoRA: B(A·x) is split the way its base weight is. A column-split base keeps A whole
        // (its gradient, partial per output slice, is summed over the group by the region)
        // and B's rows; a row-split base splits A's input columns (A·x is summed like the
        // base's output) and keeps B whole.
        for site in self.lora.iter().flat_map(|l| &l.sites) {
            let (a, b) = match plan.style(&format!("{}.weight", site.module)) {
                Colwise | VocabParallel => (Replicate, Colwise),
                Rowwise => (Rowwise, Replicate),
                Replicate => (Replicate, Replicate),
            };
            plan.rules.push((site.a_name(), a));
            plan.rules.push((site.b_name(), b));
        }
        plan
    }
}
