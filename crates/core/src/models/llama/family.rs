//! LLaMA as a model family: Hugging Face's parameter names and initialisation, tied
//! embeddings, the HF directory layout, and the parallel styles it implements (tensor,
//! sequence, zero-bubble pipeline) through its regions.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use candle_core::DType;

use super::{AttnInputs, Llama, LlamaConfig};
use crate::dist::Group;
use crate::lora::{LoraConfig, Site};
use crate::models::{Init, ModelFamily, ParamSpec};
use crate::parallel::expert::ExpertParallel;
use crate::parallel::pipeline;
use crate::parallel::sequence::SpMode as SeqSplit;
use crate::parallel::weight_grad::WeightGradStash;
use crate::{Error, Result};

impl ModelFamily for Llama {
    fn family(&self) -> &'static str {
        "llama"
    }

    /// Every parameter with HF's initialisation: normal(0, `initializer_range`, default 0.02)
    /// for matrices and embeddings (the padding row zeroed), ones for norms, zeros for biases.
    fn param_specs(&self) -> Vec<ParamSpec> {
        let std = self
            .cfg
            .extra
            .get("initializer_range")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.02) as f32;
        self.param_shapes()
            .into_iter()
            .map(|(name, shape)| {
                let init = if name.ends_with("norm.weight") {
                    Init::Ones
                } else if name.ends_with(".bias") {
                    Init::Zeros
                } else {
                    let pad = self.cfg.pad_token_id.filter(|_| name == Self::EMBED);
                    Init::Normal {
                        std,
                        zero_row: pad.map(|p| p as usize),
                    }
                };
                ParamSpec { name, shape, init }
            })
            .collect()
    }

    fn tied_params(&self) -> Vec<String> {
        if self.cfg.tie_word_embeddings && self.cfg.score_labels().is_none() {
            vec![Self::EMBED.to_string()]
        } else {
            vec![]
        }
    }

    fn tp_plan(&self) -> crate::parallel::plan::TpPlan {
        Llama::tp_plan(self)
    }

    fn read_config(dir: &Path) -> Result<Self> {
        Llama::new(LlamaConfig::from_file(&dir.join("config.json"))?)
    }

    fn write_config(&self, dir: &Path, dtype: DType) -> Result<()> {
        crate::checkpoint::llama::save_config(dir, self, dtype)
    }

    fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        Llama::param_shapes(self)
    }

    /// The user counts decoder layers per stage; the embedding joins the first stage and
    /// the final norm and head the last.
    fn pipeline_stages(
        &self,
        stages: usize,
        per_stage: Option<&[usize]>,
    ) -> Result<Vec<Range<usize>>> {
        pipeline::partition(self.cfg.num_hidden_layers, stages, per_stage)
    }

    fn check_tensor_parallel(&self, tp: usize) -> Result<()> {
        crate::parallel::tensor::validate(&self.cfg, tp)
    }

    fn tensor_parallel(&self, group: Group, sequence_parallel: bool) -> Result<Self> {
        crate::parallel::tensor::parallelize(self, group, sequence_parallel)
    }

    fn sequence_parallel(&self, group: Group, mode: SeqSplit) -> Result<Self> {
        Ok(crate::parallel::sequence::parallelize(self, group, mode)?.0)
    }

    fn defer_weight_grads(&self) -> Result<(Self, Arc<WeightGradStash>)> {
        Ok(crate::parallel::weight_grad::defer_weight_grads(self))
    }

    fn with_kernels(self, kernels: colossal_kernels::Kernels) -> Result<Self> {
        Ok(Llama::with_kernels(&self, kernels))
    }

    fn embedding_params(&self) -> Vec<String> {
        vec![Self::EMBED.to_string(), "lm_head.weight".to_string()]
    }

    fn linear_layers(&self) -> Vec<(String, Vec<usize>, bool)> {
        Llama::linear_layers(self)
    }

    fn with_lora(self, cfg: &LoraConfig, sites: Vec<Site>) -> Result<Self> {
        // Dropout keys an element by its place in its row: an expert's rows (routed,
        // exchanged) are not implemented.
        if cfg.dropout > 0.0 && self.cfg.num_local_experts.is_some() {
            return Err(Error::Config(format!(
                "lora.dropout = {} on a mixture of experts is not implemented",
                cfg.dropout
            )));
        }
        Ok(Llama::with_lora(&self, cfg, sites))
    }

    fn expert_parallel(&self, group: Group) -> Result<(Self, Arc<ExpertParallel>)> {
        let Some(e) = self.cfg.num_local_experts else {
            return Err(crate::Error::Config(
                "parallel.ep > 1 needs a mixture-of-experts model (num_local_experts)".into(),
            ));
        };
        let ep = Arc::new(ExpertParallel::new(group, e)?);
        let mut model = self.clone();
        model.ep = Some(ep.clone());
        Ok((model, ep))
    }

    /// A mixture of experts' routed slots and those dropped for capacity, so far.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        if self.cfg.num_local_experts.is_none() {
            return Vec::new();
        }
        let (routed, dropped) = self.moe_counts.get();
        vec![("moe_routed_slots", routed), ("moe_dropped_slots", dropped)]
    }

    fn without_expert_parallel(&self) -> Option<Self> {
        let mut whole = self.clone();
        whole.ep.take().map(|_| whole)
    }

    fn aux_loss(&self, out: &crate::exec::Acts) -> Result<Option<candle_core::Tensor>> {
        self.aux_loss_of_streams(out)
    }

    /// LoRA dropout's masks, keyed by the step and each row's tokens.
    fn training_ctx(
        &self,
        inputs: &crate::exec::Acts,
        mut ctx: AttnInputs,
        key: u64,
    ) -> Result<AttnInputs> {
        let p = self.lora.as_ref().map_or(0.0, |l| l.cfg.dropout);
        if p > 0.0 {
            let ids = inputs.get(crate::exec::IDS)?;
            let (whole, positions) = self.regions.whole_sequences(ids)?;
            let keys = crate::lora::DropoutKeys::new(p, key, &whole, positions)?;
            ctx.lora_dropout = Some(Arc::new(keys));
        }
        Ok(ctx)
    }

    fn adapters(&self) -> Option<(&LoraConfig, &[Site])> {
        self.lora.as_ref().map(|a| (&a.cfg, a.sites.as_slice()))
    }
}
