//! `LlamaConfig` mirrors Hugging Face `config.json` for `LlamaForCausalLM`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::rope::RopeParameters;
use crate::{Error, Result};

/// config.json keys that a LLaMA checkpoint may carry and that do not change its math here
/// (metadata, generation and serving hints, the ones read elsewhere).
const HARMLESS_KEYS: &[&str] = &[
    "architectures",
    "output_router_logits",
    "router_jitter_noise",
    "model_type",
    "transformers_version",
    "use_cache",
    "initializer_range",
    "pretraining_tp",
    "_name_or_path",
    "name_or_path",
    "id2label",
    "label2id",
    "num_labels",
    "problem_type",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "torchscript",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "is_decoder",
    "add_cross_attention",
    "tie_encoder_decoder",
    "prefix",
    "task_specific_params",
    "finetuning_task",
    "tokenizer_class",
    "max_length",
    "decoder_start_token_id",
    "sep_token_id",
];

/// Keys that change the model's math in transformers (or another library's LLaMA variant)
/// and that this LLaMA does not implement: an error unless they hold their no-op value.
const UNIMPLEMENTED_KEYS: &[&str] = &[
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "layer_types",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "embedding_multiplier",
    "residual_multiplier",
    "attention_multiplier",
    "query_pre_attn_scalar",
    "qk_layernorm",
    "use_qk_norm",
    "partial_rotary_factor",
    "rope_interleave",
    "quantization_config",
    "num_local_experts",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "auto_map",
    "no_rope_layers",
];

/// Architectures read as this LLaMA.
const ARCHITECTURES: &[&str] = &[
    "LlamaForCausalLM",
    "MixtralForCausalLM",
    "LlamaForSequenceClassification",
    "LlamaModel",
];

fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}
fn default_max_pos() -> usize {
    2048
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// RoPE as transformers 4.x writes it: `rope_theta` and `rope_scaling`; 5.x moves both into
    /// `rope_parameters`. Kept as written (a saved config round-trips); read through
    /// [`LlamaConfig::rope`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Mixtral: experts per MoE layer (the MLP of every layer becomes
    /// `block_sparse_moe.{gate, experts.E.w1|w2|w3}`), experts per token, and the weight of the
    /// load-balancing loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_local_experts: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_experts_per_tok: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_aux_loss_coef: Option<f64>,
    /// ST-MoE's router z-loss weight (mean squared log-sum-exp of the router logits), as
    /// Switch Transformers' config names it; 0 or absent: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_z_loss_coef: Option<f64>,
    /// Expert capacity (GShard/DeepSpeed): each expert takes at most
    /// ⌈factor · tokens · k / experts⌉ of a forward's routed slots, first choices before
    /// second ones, in token order; the rest are dropped (that slot adds nothing; the residual
    /// carries the token). Absent: no capacity, nothing dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_factor: Option<f64>,
    /// transformers ≥ 4.56 writes `dtype`; older checkpoints say `torch_dtype`.
    #[serde(default, alias = "torch_dtype")]
    pub dtype: Option<String>,
    /// Everything else in config.json, kept so that saving round-trips it.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl LlamaConfig {
    /// Experts each token is routed to (Mixtral's default 2).
    pub fn experts_per_token(&self) -> usize {
        self.num_experts_per_tok.unwrap_or(2)
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Whether the checkpoint carries an LM head (`LlamaForCausalLM`, the default); other
    /// architectures (e.g. `LlamaForSequenceClassification`) load as the base model.
    pub fn has_lm_head(&self) -> bool {
        match self.extra.get("architectures").and_then(|a| a.as_array()) {
            Some(archs) if !archs.is_empty() => archs
                .iter()
                .any(|a| matches!(a.as_str(), Some("LlamaForCausalLM" | "MixtralForCausalLM"))),
            _ => true,
        }
    }

    /// `Some(num_labels)` for `LlamaForSequenceClassification` (a reward model or critic):
    /// the head is `score.weight` (num_labels, hidden), no bias, instead of the LM head.
    pub fn score_labels(&self) -> Option<usize> {
        let archs = self.extra.get("architectures")?.as_array()?;
        if !archs
            .iter()
            .any(|a| a.as_str() == Some("LlamaForSequenceClassification"))
        {
            return None;
        }
        let from_map = self
            .extra
            .get("id2label")
            .and_then(|m| m.as_object())
            .map(|m| m.len());
        let n = self.extra.get("num_labels").and_then(|n| n.as_u64());
        Some(n.map(|n| n as usize).or(from_map).unwrap_or(2))
    }

    /// This config as `LlamaForSequenceClassification` with `num_labels` outputs (transformers
    /// records them as `id2label`/`label2id`).
    pub fn with_score_head(&self, num_labels: usize) -> Self {
        let mut c = self.clone();
        c.extra.insert(
            "architectures".into(),
            serde_json::json!(["LlamaForSequenceClassification"]),
        );
        let id2label: serde_json::Map<String, serde_json::Value> = (0..num_labels)
            .map(|i| (i.to_string(), format!("LABEL_{i}").into()))
            .collect();
        let label2id: serde_json::Map<String, serde_json::Value> = (0..num_labels)
            .map(|i| (format!("LABEL_{i}"), i.into()))
            .collect();
        c.extra.insert("id2label".into(), id2label.into());
        c.extra.insert("label2id".into(), label2id.into());
        c.extra.remove("num_labels");
        c
    }

    /// EOS ids (HF allows an int or a list).
    pub fn eos_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|v| v as u32).into_iter().collect()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64().map(|v| v as u32))
                .collect(),
            _ => vec![],
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.hidden_act != "silu" {
            return bad(format!(
                "hidden_act `{}` unsupported (only silu)",
                self.hidden_act
            ));
        }
        if self.num_attention_heads == 0
            || !self.num_attention_heads.is_multiple_of(self.num_kv_heads())
        {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.num_kv_heads()
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        self.rope()?;
        if let Some(t) = self.extra.get("model_type").and_then(|t| t.as_str()) {
            if t != "llama" && !(t == "mixtral" && self.num_local_experts.is_some()) {
                return bad(format!(
                    "model_type `{t}` is not implemented here (llama); its weights and math differ"
                ));
            }
        }
        if let Some(archs) = self.extra.get("architectures").and_then(|a| a.as_array()) {
            for a in archs {
                let a = a.as_str().unwrap_or_default();
                if !ARCHITECTURES.contains(&a) {
                    return bad(format!(
                        "architectures entry `{a}` is not implemented (one of {})",
                        ARCHITECTURES.join(", ")
                    ));
                }
            }
        }
        self.validate_moe()?;
        for k in ["router_jitter_noise"] {
            if let Some(v) = self
                .extra
                .get(k)
                .and_then(|v| v.as_f64())
                .filter(|v| *v != 0.0)
            {
                return bad(format!("`{k}` = {v}: not implemented (set it to 0.0)"));
            }
        }
        if let Some(p) = self.extra.get("attention_dropout").and_then(|p| p.as_f64()) {
            if p != 0.0 {
                return bad(format!(
                    "attention_dropout = {p}: dropout is not implemented (set it to 0.0)"
                ));
            }
        }
        for k in UNIMPLEMENTED_KEYS {
            let noop = match self.extra.get(*k) {
                None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => true,
                Some(serde_json::Value::Number(n)) => {
                    *k == "partial_rotary_factor" && n.as_f64() == Some(1.0)
                }
                _ => false,
            };
            if !noop {
                return bad(format!(
                    "`{k}` = {}: not implemented for LLaMA here, and it changes the model",
                    self.extra[*k]
                ));
            }
        }
        Ok(())
    }

    /// Keys of config.json this LLaMA neither reads nor knows to be harmless: kept for saving,
    /// and worth a warning when a model is loaded.
    pub fn unread_keys(&self) -> Vec<&str> {
        self.extra
            .keys()
            .map(String::as_str)
            .filter(|k| {
                !HARMLESS_KEYS.contains(k)
                    && !UNIMPLEMENTED_KEYS.contains(k)
                    && *k != "attention_dropout"
            })
            .collect()
    }

    /// The RoPE settings, from whichever spelling the config uses.
    pub fn rope(&self) -> Result<RopeParameters> {
        RopeParameters::from_config(
            self.rope_theta,
            self.rope_scaling.as_ref(),
            self.rope_parameters.as_ref(),
            self.max_position_embeddings,
        )
        .map_err(Error::Config)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: Self =
            serde_json::from_str(&text).map_err(|e| Error::file(path, e.to_string()))?;
        cfg.validate()
            .map_err(|e| Error::file(path, e.to_string()))?;
        let unread = cfg.unread_keys();
        if !unread.is_empty() {
            tracing::warn!(
                "{}: keys not read by this LLaMA (kept when saving): {}",
                path.display(),
                unread.join(", ")
            );
        }
        Ok(cfg)
    }

    /// The JSON that transformers writes for this config.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("config serialises");
        let obj = v.as_object_mut().expect("object");
        let moe = self.num_local_experts.is_some();
        obj.insert(
            "model_type".into(),
            if moe { "mixtral" } else { "llama" }.into(),
        );
        obj.entry("architectures").or_insert_with(|| {
            serde_json::json!([if moe {
                "MixtralForCausalLM"
            } else {
                "LlamaForCausalLM"
            }])
        });
        obj.insert("num_key_value_heads".into(), self.num_kv_heads().into());
        obj.insert("head_dim".into(), self.head_dim().into());
        obj.entry("dtype").or_insert_with(|| "float32".into());
        if obj.get("dtype").is_some_and(|d| d.is_null()) {
            obj.insert("dtype".into(), "float32".into());
        }
        v
    }

    /// Parameter count (embedding + layers + norm + head unless tied).
    pub fn num_params(&self) -> usize {
        let h = self.hidden_size;
        let hd = self.head_dim();
        let q = self.num_attention_heads * hd;
        let kv = self.num_kv_heads() * hd;
        let attn = h * q + 2 * h * kv + q * h;
        let mlp = 3 * h * self.intermediate_size;
        let layer = attn + mlp + 2 * h;
        let emb = self.vocab_size * h;
        emb + self.num_hidden_layers * layer + h + if self.tie_word_embeddings { 0 } else { emb }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_hf_variants() {
        let c: LlamaConfig = serde_json::from_str(
            r#"{"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                "rope_theta": 500000.0, "torch_dtype": "bfloat16", "eos_token_id": [128001, 128008],
                "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                "tie_word_embeddings": true, "model_type": "llama"}"#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
        assert_eq!(c.eos_ids(), vec![128001, 128008]);
        assert_eq!(c.head_dim(), 64);
        assert_eq!(c.num_kv_heads(), 8);
        assert!(matches!(
            c.rope().unwrap().rope_type,
            super::super::rope::RopeType::Llama3 { factor, .. } if factor == 32.0
        ));
        assert!(c.has_lm_head());
        // Llama-3.2-1B: 1.236 B parameters with tied embeddings.
        assert_eq!(c.num_params(), 1_235_814_400);
    }

    #[test]
    fn bad_head_layout_is_rejected() {
        let c: LlamaConfig = serde_json::from_str(
            r#"{"vocab_size": 10, "hidden_size": 64, "intermediate_size": 8,
                "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 3}"#,
        )
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads 3"), "{e}");
    }
}
