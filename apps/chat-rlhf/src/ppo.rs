//! PPO (InstructGPT / ColossalChat): actor (the policy), critic (value head, started from the
//! reward model), frozen reference and reward models. Each step: roll out the batch's prompts,
//! score them, shape per-token rewards with the KL to the reference, GAE, then `ppo_epochs`
//! clipped updates of actor and critic (plus the optional ptx loss on SFT data).

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use colossal_core::dist::Communicator;
use colossal_core::exec::{llama_inputs, on_output};
use colossal_core::models::llama::AttnInputs;
use colossal_core::parallel::pipeline_run::MicroBatch;
use colossal_core::train::Trainer;
use colossal_data::chat::prep::Record;
use serde_json::json;

use crate::config::{ChatConfig, GenerationSection, PpoSection};
use crate::data::{count_learned, global_batch, my_micro_batches, ChatSet};
use crate::loss::masked_sum;
use crate::loss::ppo::{gae, policy_loss_sum, shaped_rewards, value_loss_sum, whiten};
use crate::reference::{Frozen, Reference};
use crate::reward::rewards;
use crate::rollout::{my_rollouts, Rollout};
use crate::session::{Method, Metrics};

/// One micro-batch of experience: the rollout and, per response token, the old log-probs,
/// old values, advantages and returns.
struct Experience {
    ro: Rollout,
    old_logp: Vec<Vec<f32>>,
    old_values: Vec<Vec<f32>>,
    advantages: Vec<Vec<f32>>,
    returns: Vec<Vec<f32>>,
}

pub struct Ppo {
    cfg: PpoSection,
    gen: GenerationSection,
    pad: u32,
    seed: u64,
    batch_size: usize,
    reference: Reference,
    reward: Frozen,
    critic: Trainer,
    ptx: Option<ChatSet>,
}

impl Ppo {
    pub fn new(
        c: &ChatConfig,
        policy: &Trainer,
        comm: Option<Box<dyn Communicator>>,
        resume: Option<&Path>,
    ) -> Result<Self> {
        let cfg = c
            .ppo
            .clone()
            .context("[ppo]: missing (reward_model = \"DIR\" at least)")?;
        let start = c
            .model
            .hf_dir
            .clone()
            .context("[model] hf_dir: PPO starts from an SFT model")?;
        let mut critic_cfg = c.trainer_config();
        critic_cfg.model.hf_dir = Some(
            cfg.critic_model
                .clone()
                .unwrap_or_else(|| cfg.reward_model.clone()),
        );
        critic_cfg.model.config = None;
        // The critic's value head starts fresh: it trains whole, not through adapters.
        critic_cfg.lora = None;
        critic_cfg.train.lr = cfg.critic_lr;
        critic_cfg.train.out_dir = c.train.out_dir.join("critic");
        let critic_resume = resume
            .and_then(|r| r.file_name())
            .map(|name| critic_cfg.train.out_dir.join("checkpoints").join(name))
            .filter(|d| d.exists());
        let critic = Trainer::new_rank_without_data(
            critic_cfg,
            critic_resume.as_deref(),
            policy.device().clone(),
            comm,
        )?;
        anyhow::ensure!(
            critic.model.cfg.score_labels() == Some(1),
            "[ppo] critic_model / reward_model: the critic needs a one-label score head (LlamaForSequenceClassification)"
        );
        let ptx = match (&cfg.ptx_data, cfg.ptx_coef > 0.0) {
            (Some(d), true) => Some(ChatSet::open(d, "sft")?),
            (None, true) => {
                anyhow::bail!("[ppo] ptx_coef > 0 needs ptx_data (a `colossal-data sft` directory)")
            }
            _ => None,
        };
        Ok(Self {
            reference: Reference::of(policy, &start, cfg.offload_frozen)?,
            reward: Frozen::open(&cfg.reward_model, cfg.offload_frozen, policy.device())?,
            cfg,
            gen: c.generation.clone(),
            pad: crate::run::pad_id(c, policy),
            seed: c.train.seed,
            batch_size: c.train.batch_size,
            critic,
            ptx,
        })
    }

    fn experience(&self, policy: &Trainer, ro: Rollout) -> Result<(Experience, Vec<f32>, f32)> {
        let (ids, ctx) = ro.inputs(policy, self.pad, DType::F32)?;
        let t = ids.dim(1)?;
        let layout = policy.output_layout();
        let old_logp = policy.forward_map(&ids, &ctx, |out| layout.token_log_probs(out, &ids))?;
        let old_logp = ro.gather(&old_logp)?;
        let ref_logp = ro.gather(&self.reference.token_logps(policy, &ids, &ctx)?)?;
        let critic = self.critic.output_layout();
        let values = self.critic.forward_map(&ids, &ctx, |out| {
            let v = critic.whole_positions(&out.to_dtype(DType::F32)?)?;
            Ok(v.squeeze(2)?.narrow(1, 0, t - 1)?)
        })?;
        let old_values = ro.gather(&values)?;
        let scores: Vec<f32> =
            rewards(&self.reward.forward(&ids, &ctx)?, &ro.last_index())?.to_vec1()?;
        let (mut advantages, mut returns) = (Vec::new(), Vec::new());
        let mut kl_sum = 0.0f32;
        for b in 0..ro.len() {
            let kl: Vec<f32> = old_logp[b]
                .iter()
                .zip(&ref_logp[b])
                .map(|(p, r)| self.cfg.kl_estimator.estimate_f32(*p, *r))
                .collect();
            kl_sum += kl.iter().sum::<f32>();
            let n = ro.response_lens[b];
            let r = shaped_rewards(scores[b], &kl, n, self.cfg.kl_coef as f32);
            let (a, ret) = gae(
                &r,
                &old_values[b],
                n,
                self.cfg.gamma as f32,
                self.cfg.lambda as f32,
            );
            advantages.push(a);
            returns.push(ret);
        }
        if self.cfg.whiten_advantages {
            whiten(&mut advantages, &ro.response_lens);
        }
        let exp = Experience {
            ro,
            old_logp,
            old_values,
            advantages,
            returns,
        };
        Ok((exp, scores, kl_sum))
    }

    fn actor_batch(
        policy: &Trainer,
        e: &Experience,
        pad: u32,
        cfg: &PpoSection,
        norm: f64,
        tally: Rc<RefCell<[f64; 2]>>,
    ) -> colossal_core::Result<MicroBatch<'static, AttnInputs>> {
        let err = |x: anyhow::Error| colossal_core::msg!("{x:#}");
        let dev = policy.device();
        let dtype = policy.cfg.parallel.compute_dtype();
        let (inputs, ctx) = e.ro.inputs(policy, pad, dtype).map_err(err)?;
        let layout = policy.output_layout();
        let t = inputs.dim(1)?;
        let old = e.ro.scatter(&e.old_logp, t, dev).map_err(err)?;
        let adv = e.ro.scatter(&e.advantages, t, dev).map_err(err)?;
        let mask = e.ro.mask(t, dev).map_err(err)?;
        let (clip, ent_coef) = (cfg.clip_eps, cfg.entropy_coef);
        let ids = inputs.clone();
        Ok(MicroBatch {
            inputs: llama_inputs(&inputs),
            ctx,
            loss_fn: on_output(move |logits: &Tensor| {
                let lp = layout.token_log_probs(logits, &ids)?;
                let (pl, clipped) = policy_loss_sum(&lp, &old, &adv, &mask, clip)?;
                let ent = masked_sum(&layout.entropy(logits)?.narrow(1, 0, t - 1)?, &mask)?;
                let mut tl = tally.borrow_mut();
                tl[0] += clipped as f64;
                tl[1] += ent.to_scalar::<f32>()? as f64;
                Ok(((pl - (ent * ent_coef)?)? / norm)?)
            }),
        })
    }

    fn critic_batch(
        critic: &Trainer,
        e: &Experience,
        pad: u32,
        clip: f64,
        norm: f64,
    ) -> colossal_core::Result<MicroBatch<'static, AttnInputs>> {
        let err = |x: anyhow::Error| colossal_core::msg!("{x:#}");
        let dev = critic.device();
        let (inputs, ctx) =
            e.ro.inputs(critic, pad, critic.cfg.parallel.compute_dtype())
                .map_err(err)?;
        let layout = critic.output_layout();
        let t = inputs.dim(1)?;
        let old = e.ro.scatter(&e.old_values, t, dev).map_err(err)?;
        let ret = e.ro.scatter(&e.returns, t, dev).map_err(err)?;
        let mask = e.ro.mask(t, dev).map_err(err)?;
        Ok(MicroBatch {
            inputs: llama_inputs(&inputs),
            ctx,
            loss_fn: on_output(move |scores: &Tensor| {
                let v = layout
                    .whole_positions(&scores.to_dtype(DType::F32)?)?
                    .squeeze(2)?
                    .narrow(1, 0, t - 1)?;
                Ok((value_loss_sum(&v, &old, &ret, &mask, clip)? / norm)?)
            }),
        })
    }
}

impl Method for Ppo {
    fn kind(&self) -> &'static str {
        "prompt"
    }

    fn step(&mut self, policy: &mut Trainer, batch: &[&Record]) -> Result<Metrics> {
        let (rank, ranks) = (policy.rank(), policy.ranks());
        let mine = my_micro_batches(batch, policy.cfg.train.micro_batch_size, rank, ranks);
        let step = policy.state.step;
        let mut exps = Vec::new();
        let mut local = [0f64; 4]; // response tokens, reward sum, rows, KL sum
        let rollouts = my_rollouts(policy, &mine, 1, &self.gen, self.pad, self.seed)?;
        for ro in rollouts {
            local[0] += ro.response_tokens() as f64;
            local[2] += ro.len() as f64;
            let (e, scores, kl) = self.experience(policy, ro)?;
            local[1] += scores.iter().map(|&s| s as f64).sum::<f64>();
            local[3] += kl as f64;
            exps.push(e);
        }
        let global = policy.sum_over_ranks(&local)?;
        let norm = global[0].max(1.0);
        let ptx_batch: Vec<&Record> = match &self.ptx {
            Some(p) => global_batch(
                &p.train,
                step * self.batch_size as u64,
                self.batch_size,
                self.seed,
            ),
            None => Vec::new(),
        };
        let ptx_mine = my_micro_batches(&ptx_batch, policy.cfg.train.micro_batch_size, rank, ranks);
        let ptx_labels: Vec<Vec<i64>> = ptx_batch.iter().map(|r| r.labels("labels")).collect();
        let ptx_norm = count_learned(&ptx_labels).max(1) as f64 / self.cfg.ptx_coef.max(1e-12);
        let mut m = Metrics::new();
        let (mut loss, mut vloss) = (0.0, 0.0);
        let tally: Rc<RefCell<[f64; 2]>> = Rc::default();
        for _ in 0..self.cfg.ppo_epochs {
            let (pad, cfg) = (self.pad, &self.cfg);
            let n = exps.len();
            let (l, gn, lr) = policy.step_on(n + ptx_mine.len(), |me, i| match i < n {
                true => Self::actor_batch(me, &exps[i], pad, cfg, norm, tally.clone()),
                false => crate::sft::sft_micro_batch(me, ptx_mine[i - n], pad, ptx_norm),
            })?;
            let clip = cfg.value_clip_eps;
            let (vl, _, _) = self
                .critic
                .step_on(n, |me, i| Self::critic_batch(me, &exps[i], pad, clip, norm))?;
            (loss, vloss) = (l, vl);
            m.insert("grad_norm".into(), json!(gn));
            m.insert("lr".into(), json!(lr));
        }
        let t = policy.sum_over_ranks(&*tally.borrow())?;
        let epochs = self.cfg.ppo_epochs.max(1) as f64;
        m.insert("loss".into(), json!(loss));
        m.insert("value_loss".into(), json!(vloss));
        m.insert("reward_mean".into(), json!(global[1] / global[2].max(1.0)));
        m.insert("kl".into(), json!(global[3] / norm));
        m.insert("response_len".into(), json!(global[0] / global[2].max(1.0)));
        m.insert("clipfrac".into(), json!(t[0] / (norm * epochs)));
        m.insert("entropy".into(), json!(t[1] / (norm * epochs)));
        Ok(m)
    }

    fn curves(&self) -> Vec<(&'static str, Vec<&'static str>)> {
        vec![
            ("reward.png", vec!["reward_mean"]),
            ("kl.png", vec!["kl"]),
            ("loss.png", vec!["loss", "value_loss"]),
        ]
    }

    fn saved(&mut self) -> Result<()> {
        self.critic.save_checkpoint()?;
        Ok(())
    }
}
