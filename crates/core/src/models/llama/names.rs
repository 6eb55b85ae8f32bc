//! LLaMA's parameter list: HF names and shapes in checkpoint order, which blocks read which,
//! and the Linear layers LoRA adapters may sit beside.

use super::Llama;

impl Llama {
    /// Every Linear weight (name, (out, in), whether it is the output head): where LoRA
    /// adapters may go. A tied head is the embedding, no Linear of its own.
    pub fn linear_layers(&self) -> Vec<(String, Vec<usize>, bool)> {
        let head = self.head_weight_name();
        self.param_shapes()
            .into_iter()
            .filter(|(n, s)| s.len() == 2 && n != Self::EMBED)
            .map(|(n, s)| {
                let is_head = n == head;
                (n, s, is_head)
            })
            .collect()
    }

    /// The adapter parameters on weights whose names start with `prefix`.
    fn adapter_names(&self, prefix: &str) -> Vec<String> {
        let Some(lora) = &self.lora else {
            return Vec::new();
        };
        // Under expert parallelism, this rank's experts' adapters only.
        let held = |s: &&crate::lora::Site| self.ep.as_ref().is_none_or(|ep| ep.holds(&s.module));
        lora.sites
            .iter()
            .filter(|s| s.module.starts_with(prefix))
            .filter(held)
            .flat_map(|s| [s.a_name(), s.b_name()])
            .collect()
    }

    /// HF names and shapes of every parameter, in checkpoint order.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let c = &self.cfg;
        let (h, hd, i) = (c.hidden_size, c.head_dim(), c.intermediate_size);
        let q = c.num_attention_heads * hd;
        let kv = c.num_kv_heads() * hd;
        let mut out = vec![(Self::EMBED.to_string(), vec![c.vocab_size, h])];
        let held = |e: &usize| self.ep.as_ref().is_none_or(|ep| ep.local().contains(e));
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}.");
            let mut push = |n: &str, s: Vec<usize>| out.push((format!("{p}{n}"), s));
            push("self_attn.q_proj.weight", vec![q, h]);
            push("self_attn.k_proj.weight", vec![kv, h]);
            push("self_attn.v_proj.weight", vec![kv, h]);
            if c.attention_bias {
                push("self_attn.q_proj.bias", vec![q]);
                push("self_attn.k_proj.bias", vec![kv]);
                push("self_attn.v_proj.bias", vec![kv]);
            }
            push("self_attn.o_proj.weight", vec![h, q]);
            if c.attention_bias {
                push("self_attn.o_proj.bias", vec![h]);
            }
            if let Some(e) = c.num_local_experts {
                push("block_sparse_moe.gate.weight", vec![e, h]);
                for x in (0..e).filter(held) {
                    push(
                        &format!("block_sparse_moe.experts.{x}.w1.weight"),
                        vec![i, h],
                    );
                    push(
                        &format!("block_sparse_moe.experts.{x}.w2.weight"),
                        vec![h, i],
                    );
                    push(
                        &format!("block_sparse_moe.experts.{x}.w3.weight"),
                        vec![i, h],
                    );
                }
            } else {
                push("mlp.gate_proj.weight", vec![i, h]);
                push("mlp.up_proj.weight", vec![i, h]);
                push("mlp.down_proj.weight", vec![h, i]);
            }
            if c.mlp_bias {
                push("mlp.gate_proj.bias", vec![i]);
                push("mlp.up_proj.bias", vec![i]);
                push("mlp.down_proj.bias", vec![h]);
            }
            push("input_layernorm.weight", vec![h]);
            push("post_attention_layernorm.weight", vec![h]);
        }
        out.push((Self::NORM.to_string(), vec![h]));
        if let Some(labels) = c.score_labels() {
            out.push((Self::SCORE.to_string(), vec![labels, h]));
        } else if !c.tie_word_embeddings && c.has_lm_head() {
            out.push(("lm_head.weight".to_string(), vec![c.vocab_size, h]));
        }
        out
    }

    /// Parameter names used by decoder layer `l`.
    pub fn layer_param_names(&self, l: usize) -> Vec<String> {
        let prefix = format!("model.layers.{l}.");
        self.param_shapes()
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| n.starts_with(&prefix))
            .chain(self.adapter_names(&prefix))
            .collect()
    }

    /// Parameter names of the final block: the norm, the head and any adapter on the head.
    pub fn head_param_names(&self) -> Vec<String> {
        let head = self.head_weight_name();
        let module = head.strip_suffix(".weight").unwrap_or(head);
        let mut v = vec![Self::NORM.to_string(), head.to_string()];
        v.extend(
            self.lora
                .iter()
                .flat_map(|l| l.sites.iter())
                .filter(|s| s.module == module)
                .flat_map(|s| [s.a_name(), s.b_name()]),
        );
        v
    }
}
