//! GRPO (DeepSeekMath): k samples per prompt, advantages relative to the group's rewards
//! (GSM8K's numeric answer check, or a reward model), the clipped surrogate with one update
//! per rollout, and a k3 KL penalty to the frozen reference; per-token terms are averaged
//! over each response, then over the global batch's responses.

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use colossal_core::exec::{llama_inputs, on_output};
use colossal_core::models::llama::AttnInputs;
use colossal_core::parallel::pipeline_run::MicroBatch;
use colossal_core::train::Trainer;
use colossal_data::chat::prep::Record;
use colossal_data::tokenizer::LoadedTokenizer;
use serde_json::json;

use crate::config::{ChatConfig, GenerationSection, GrpoSection};
use crate::data::my_micro_batches;
use crate::loss::ppo::{group_advantages, policy_loss_sum};
use crate::loss::KlEstimator;
use crate::reference::{Frozen, Reference};
use crate::reward::rewards;
use crate::rollout::{gsm8k_reward, my_rollouts, Rollout};
use crate::session::{step_metrics, Method, Metrics};

enum Reward {
    Gsm8k(LoadedTokenizer),
    Model(Box<Frozen>),
}

pub struct Grpo {
    cfg: GrpoSection,
    gen: GenerationSection,
    pad: u32,
    seed: u64,
    reference: Reference,
    reward: Reward,
}

impl Grpo {
    pub fn new(c: &ChatConfig, policy: &Trainer) -> Result<Self> {
        let cfg = c
            .grpo
            .clone()
            .unwrap_or_else(|| toml::from_str("").expect("defaults"));
        let start = c
            .model
            .hf_dir
            .clone()
            .context("[model] hf_dir: GRPO starts from an SFT model")?;
        let reward = match (cfg.reward.as_str(), &cfg.reward_model) {
            ("gsm8k", _) => {
                let tok: PathBuf = c
                    .data
                    .tokenizer
                    .clone()
                    .context("[data] tokenizer: the gsm8k reward decodes responses")?;
                Reward::Gsm8k(LoadedTokenizer::load(&tok)?)
            }
            ("model", Some(dir)) => Reward::Model(Box::new(Frozen::load(dir, policy.device())?)),
            ("model", None) => bail!("[grpo] reward = \"model\" needs reward_model = \"DIR\""),
            (other, _) => bail!("[grpo] reward `{other}`: expected gsm8k or model"),
        };
        if cfg.group_size < 2 {
            bail!(
                "[grpo] group_size = {}: a group needs at least 2 samples",
                cfg.group_size
            );
        }
        Ok(Self {
            reference: Reference::of(policy, &start, false)?,
            cfg,
            gen: c.generation.clone(),
            pad: crate::run::pad_id(c, policy),
            seed: c.train.seed,
            reward,
        })
    }

    fn score(&self, ro: &Rollout, policy: &Trainer) -> Result<Vec<f32>> {
        match &self.reward {
            Reward::Gsm8k(tok) => (0..ro.len())
                .map(|b| {
                    let text = tok.decode(&ro.rows[b][ro.prompt_lens[b]..])?;
                    Ok(ro.answers[b]
                        .as_deref()
                        .map_or(0.0, |a| gsm8k_reward(&text, a)))
                })
                .collect(),
            Reward::Model(rm) => {
                let (ids, ctx) = ro.inputs(policy, self.pad, DType::F32)?;
                Ok(rewards(&rm.forward(&ids, &ctx)?, &ro.last_index())?.to_vec1()?)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn micro_batch(
        &self,
        policy: &Trainer,
        ro: &Rollout,
        adv: &[f32],
        ref_logp: &[Vec<f32>],
        norm: f64,
        kl_tally: Rc<RefCell<f64>>,
    ) -> colossal_core::Result<MicroBatch<'static, AttnInputs>> {
        let err = |x: anyhow::Error| colossal_core::msg!("{x:#}");
        let dev = policy.device();
        let (inputs, ctx) = ro
            .inputs(policy, self.pad, policy.cfg.parallel.compute_dtype())
            .map_err(err)?;
        let layout = policy.output_layout();
        let t = inputs.dim(1)?;
        // Each token weighs 1/|response|: a per-response mean.
        let weights: Vec<Vec<f32>> = ro
            .response_lens
            .iter()
            .map(|&n| vec![1.0 / n as f32; n])
            .collect();
        let weight = ro.scatter(&weights, t, dev).map_err(err)?;
        let per_token_adv: Vec<Vec<f32>> = ro
            .response_lens
            .iter()
            .zip(adv)
            .map(|(&n, &a)| vec![a; n])
            .collect();
        let adv = ro.scatter(&per_token_adv, t, dev).map_err(err)?;
        let refl = ro.scatter(ref_logp, t, dev).map_err(err)?;
        let (clip, beta) = (self.cfg.clip_eps, self.cfg.beta);
        let ids = inputs.clone();
        Ok(MicroBatch {
            inputs: llama_inputs(&inputs),
            ctx,
            loss_fn: on_output(move |logits: &Tensor| {
                let lp = layout.token_log_probs(logits, &ids)?;
                // One update per rollout: the old policy is this one (ratio 1, gradient ∇log π).
                let (pl, _) = policy_loss_sum(&lp, &lp.detach(), &adv, &weight, clip)?;
                let kl = (KlEstimator::K3.estimate(&lp, &refl)? * &weight)?.sum_all()?;
                *kl_tally.borrow_mut() += kl.to_scalar::<f32>()? as f64;
                Ok(((pl + (kl * beta)?)? / norm)?)
            }),
        })
    }
}

impl Method for Grpo {
    fn kind(&self) -> &'static str {
        "prompt"
    }

    fn step(&mut self, policy: &mut Trainer, batch: &[&Record]) -> Result<Metrics> {
        let (rank, ranks) = (policy.rank(), policy.ranks());
        let mine = my_micro_batches(batch, policy.cfg.train.micro_batch_size, rank, ranks);
        let k = self.cfg.group_size;
        let mut work = Vec::new();
        let mut local = [0f64; 4]; // responses, reward sum, correct groups (any reward > 0), response tokens
        for ro in my_rollouts(policy, &mine, k, &self.gen, self.pad, self.seed)? {
            let scores = self.score(&ro, policy)?;
            let adv = group_advantages(&scores, k, 1e-4, self.cfg.scale_rewards);
            let (ids, ctx) = ro.inputs(policy, self.pad, DType::F32)?;
            let ref_logp = ro.gather(&self.reference.token_logps(policy, &ids, &ctx)?)?;
            local[0] += ro.len() as f64;
            local[1] += scores.iter().map(|&s| s as f64).sum::<f64>();
            local[2] += scores
                .chunks(k)
                .filter(|g| g.iter().any(|&s| s > 0.0))
                .count() as f64;
            local[3] += ro.response_tokens() as f64;
            work.push((ro, adv, ref_logp));
        }
        let global = policy.sum_over_ranks(&local)?;
        let norm = global[0].max(1.0);
        let kl: Rc<RefCell<f64>> = Rc::default();
        let mut m = step_metrics(policy.step_on(work.len(), |me, i| {
            let (ro, adv, refl) = &work[i];
            self.micro_batch(me, ro, adv, refl, norm, kl.clone())
        })?);
        let kl = policy.sum_over_ranks(&[*kl.borrow()])?[0] / norm;
        m.insert("reward_mean".into(), json!(global[1] / norm));
        m.insert("kl".into(), json!(kl));
        m.insert(
            "groups_with_reward".into(),
            json!(global[2] / (norm / k as f64)),
        );
        m.insert("response_len".into(), json!(global[3] / norm));
        Ok(m)
    }

    fn curves(&self) -> Vec<(&'static str, Vec<&'static str>)> {
        vec![("reward.png", vec!["reward_mean"]), ("kl.png", vec!["kl"])]
    }
}
