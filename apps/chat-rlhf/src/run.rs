//! `chat-rlhf sft | rm | dpo | ppo | grpo`: one entry for the binary and the tests.

use std::path::Path;

use anyhow::{bail, Context, Result};
use colossal_core::train::Trainer;

use crate::config::{ChatConfig, LossChoice};
use crate::session::{launch, Factory, Summary};

/// The padding id: `data.pad_id`, else the model's `pad_token_id`, else 0.
pub fn pad_id(cfg: &ChatConfig, policy: &Trainer) -> u32 {
    cfg.data
        .pad_id
        .or(policy.model.cfg.pad_token_id)
        .unwrap_or(0)
}

pub fn train(
    method: &str,
    cfg: &ChatConfig,
    resume: Option<&Path>,
    stop_at: Option<usize>,
) -> Result<Summary> {
    let mut cfg = cfg.clone();
    let make: Box<Factory<'_>> = match method {
        "sft" => Box::new(|c, p, _| Ok(Box::new(crate::sft::Sft { pad: pad_id(c, p) }))),
        "rm" => {
            if cfg.lora.is_some() {
                bail!("[lora] with rm is not implemented: the fresh score head would stay frozen");
            }
            // A causal LM starts as a reward model with a fresh score head.
            if resume.is_none() {
                let base = cfg
                    .model
                    .hf_dir
                    .clone()
                    .context("[model] hf_dir: the reward model starts from an HF model")?;
                let start = cfg.train.out_dir.join("init");
                cfg.model.hf_dir = Some(crate::rm::with_score_head(&base, &start, cfg.train.seed)?);
            }
            Box::new(|c, p, _| Ok(Box::new(crate::rm::RewardModel { pad: pad_id(c, p) })))
        }
        "dpo" => {
            let section = cfg.dpo.map(|d| d.choice()).context("[dpo]: missing (loss = \"dpo\" | \"ipo\" | \"simpo\" | \"orpo\" | \"kto\" and its coefficients)")?;
            Box::new(move |c, p, _| {
                let needs_ref = match section {
                    LossChoice::Pairwise(l) => l.needs_reference(),
                    LossChoice::Kto { .. } => true,
                };
                let reference = match (needs_ref, &c.model.hf_dir) {
                    (true, Some(dir)) => Some(crate::reference::Reference::of(p, dir, false)?),
                    (true, None) => bail!(
                        "[model] hf_dir: {section:?} needs the starting model as its reference"
                    ),
                    (false, _) => None,
                };
                Ok(Box::new(crate::dpo::Dpo {
                    loss: section,
                    pad: pad_id(c, p),
                    reference,
                }))
            })
        }
        "ppo" => {
            let resume = resume.map(Path::to_path_buf);
            Box::new(move |c, p, comm| {
                Ok(Box::new(crate::ppo::Ppo::new(
                    c,
                    p,
                    comm,
                    resume.as_deref(),
                )?))
            })
        }
        "grpo" => Box::new(|c, p, _| Ok(Box::new(crate::grpo::Grpo::new(c, p)?))),
        other => bail!("unknown method `{other}` (sft, rm, dpo, ppo, grpo)"),
    };
    launch(&cfg, resume, stop_at, &*make)
}
