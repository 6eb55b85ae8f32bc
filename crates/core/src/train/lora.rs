//! `[lora]`: train LoRA adapters on a frozen base. The base weights are frozen parameters (no
//! gradient, no optimizer state, not reduced; under ZeRO-3 sharded and gathered block by block
//! like the adapters); the adapters are the only trainable parameters, so data parallelism and
//! ZeRO apply to them unchanged; under tensor parallelism each pair splits the way its base
//! weight does (`Llama::tp_plan`). A checkpoint keeps the base weights and writes the adapters
//! in PEFT's layout under `adapter/`, which a resume reads.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::TrainConfig;
use super::{CheckpointFormat, Freeze};
use crate::lora::{self, LoraConfig, Targets};
use crate::models::ModelFamily;
use crate::params::Params;
use crate::quant::{self, QuantKind};
use crate::{Error, Result};

/// PEFT's `LoraConfig` fields, as a section of the training config.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    pub r: usize,
    pub alpha: f64,
    /// Dropout on the adapters' input in training (PEFT's `lora_dropout`).
    #[serde(default)]
    pub dropout: f64,
    /// Module names (a path or its last components, as PEFT matches them), or
    /// `["all-linear"]`: every Linear but the output head.
    pub target_modules: Vec<String>,
    #[serde(default)]
    pub use_rslora: bool,
    /// Start from this adapter (PEFT's layout) instead of fresh ones.
    #[serde(default)]
    pub adapter: Option<PathBuf>,
    /// Rest the frozen base's Linear weights (not the head) in these codes, QLoRA-style:
    /// `"nf4"` or `"int8"`; each is dequantised only while its block runs.
    #[serde(default)]
    pub quantize: Option<QuantKind>,
    /// Values sharing one absmax scale (default 64, as bitsandbytes' nf4).
    #[serde(default)]
    pub quant_block_size: Option<usize>,
}

impl LoraSection {
    pub fn lora_config(&self) -> LoraConfig {
        let targets = match self.target_modules.as_slice() {
            [one] if one == "all-linear" => Targets::AllLinear,
            names => Targets::Names(names.to_vec()),
        };
        LoraConfig {
            r: self.r,
            alpha: self.alpha,
            targets,
            dropout: self.dropout,
            use_rslora: self.use_rslora,
        }
    }

    /// What LoRA training does not combine with yet, each an error naming the setting.
    pub fn validate(&self, cfg: &TrainConfig) -> Result<()> {
        self.lora_config().validate()?;
        let p = &cfg.parallel;
        let refuse = |what: String| {
            Err(Error::Config(format!(
                "[lora] with {what} is not implemented"
            )))
        };
        if cfg.train.checkpoint_format == CheckpointFormat::Distributed {
            return refuse("train.checkpoint_format = \"distributed\"".into());
        }
        if cfg.train.freeze != Freeze::None {
            return refuse("train.freeze".into());
        }
        match (self.quantize, self.quant_block_size) {
            (None, Some(_)) => Err(Error::Config(
                "lora.quant_block_size is set but lora.quantize is not".into(),
            )),
            (Some(kind), block) => {
                let block = block.unwrap_or(quant::DEFAULT_BLOCK);
                kind.check_block(block)
                    .map_err(|e| Error::Config(format!("lora.quant_block_size: {e}")))?;
                // ZeRO-3 shards dense chunks; codes and scales would need their own.
                if p.zero_stage == 3 {
                    return Err(Error::Config(format!(
                        "lora.quantize = \"{kind}\" with parallel.zero_stage = 3 is not implemented"
                    )));
                }
                Ok(())
            }
            (None, None) => Ok(()),
        }
    }

    /// Rests the frozen base's Linear weights (the head excepted) in `lora.quantize`'s codes,
    /// if set. Under tensor parallelism `params` holds slices, quantised in the blocks one
    /// rank quantises the whole weight in: a block runs along a row, so it must fit a slice's
    /// row (an error names the weight where it does not).
    pub fn quantise_base<M: ModelFamily>(
        &self,
        model: &M,
        params: &mut Params,
        tp: usize,
    ) -> Result<()> {
        let Some(kind) = self.quantize else {
            return Ok(());
        };
        let block = self.quant_block_size.unwrap_or(quant::DEFAULT_BLOCK);
        let before = params.frozen_bytes();
        let names = lora::frozen_linears(&model.linear_layers(), params);
        for name in names.iter().filter(|_| tp > 1) {
            let cols = params.get(name)?.dims().last().copied().unwrap_or(1);
            if !cols.is_multiple_of(block) {
                return Err(Error::Config(format!(
                    "lora.quant_block_size = {block} does not divide the {cols} columns of `{name}` on each of parallel.tp = {tp} ranks: its blocks would straddle the split"
                )));
            }
        }
        params.quantise(&names, kind, block)?;
        tracing::info!(
            %kind,
            block,
            weights = names.len(),
            frozen_bytes_before = before,
            frozen_bytes = params.frozen_bytes(),
            "frozen base rests quantised"
        );
        Ok(())
    }
}

/// Where a checkpoint keeps its adapters.
pub fn adapter_dir(checkpoint: &Path) -> PathBuf {
    checkpoint.join("adapter")
}

/// The model with adapters and `params` with its base frozen: read from `resume`'s adapter,
/// or `lora.adapter`, or made fresh from `seed`.
pub fn apply<M: ModelFamily>(
    section: &LoraSection,
    model: M,
    params: &mut Params,
    resume: Option<&Path>,
    seed: u64,
) -> Result<M> {
    let linears = model.linear_layers();
    if linears.is_empty() {
        return Err(model.unsupported("LoRA (`[lora]`)"));
    }
    let from = resume.map(adapter_dir).or_else(|| section.adapter.clone());
    let (cfg, sites) = match from {
        Some(dir) => {
            let (cfg, sites) = lora::load_adapter(&dir, &linears, params)?;
            let want = section.lora_config();
            if (cfg.r, cfg.alpha, cfg.use_rslora) != (want.r, want.alpha, want.use_rslora) {
                return Err(Error::file(
                    dir.join(lora::ADAPTER_CONFIG),
                    format!(
                        "r = {}, alpha = {}, use_rslora = {} differ from [lora]'s {}, {}, {}",
                        cfg.r, cfg.alpha, cfg.use_rslora, want.r, want.alpha, want.use_rslora
                    ),
                ));
            }
            (cfg, sites)
        }
        None => {
            let cfg = section.lora_config();
            let sites = lora::sites(&cfg, &linears)?;
            lora::add_fresh(params, cfg.r, &sites, seed)?;
            (cfg, sites)
        }
    };
    tracing::info!(
        modules = sites.len(),
        trainable = params.num_elements(),
        "LoRA adapters on a frozen base"
    );
    model.with_lora(&cfg, sites)
}
