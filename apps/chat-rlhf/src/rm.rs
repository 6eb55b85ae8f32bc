//! Reward model: `LlamaForSequenceClassification` (one label) read at each answer's last
//! token, trained with −log σ(r_chosen − r_rejected); accuracy and margin on held-out pairs.

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use colossal_core::checkpoint::llama::{load_llama, save_llama};
use colossal_core::exec::{llama_inputs, on_output};
use colossal_core::models::llama::{AttnInputs, Llama};
use colossal_core::parallel::pipeline_run::MicroBatch;
use colossal_core::train::Trainer;
use colossal_data::chat::prep::Record;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use serde_json::json;

use crate::data::{forward_each, my_micro_batches, trainer_inputs};
use crate::loss::preference::pairwise_reward_loss;
use crate::reward::rewards;
use crate::session::{step_metrics, Method, Metrics};

pub struct RewardModel {
    pub pad: u32,
}

/// Pairwise statistics a loss closure leaves behind: (pairs, correct, margin sum, loss sum).
type Tally = Rc<RefCell<[f64; 4]>>;

/// `[chosen…, rejected…]` rows of `pairs`, and each row's last real position.
fn pair_rows(pairs: &[&Record]) -> (Vec<Vec<u32>>, Vec<usize>) {
    let rows: Vec<Vec<u32>> = pairs
        .iter()
        .map(|r| r.ids("chosen_input_ids"))
        .chain(pairs.iter().map(|r| r.ids("rejected_input_ids")))
        .collect();
    let last = rows.iter().map(|r| r.len() - 1).collect();
    (rows, last)
}

fn pair_micro_batch(
    policy: &Trainer,
    pairs: &[&Record],
    pad: u32,
    norm: f64,
    tally: Tally,
) -> colossal_core::Result<MicroBatch<'static, AttnInputs>> {
    let (rows, last) = pair_rows(pairs);
    let m = pairs.len();
    let (inputs, ctx) =
        trainer_inputs(policy, &rows, pad).map_err(|e| colossal_core::msg!("{e:#}"))?;
    let layout = policy.output_layout();
    Ok(MicroBatch {
        inputs: llama_inputs(&inputs),
        ctx,
        loss_fn: on_output(move |scores: &Tensor| {
            let scores = layout.whole_positions(&scores.to_dtype(DType::F32)?)?;
            let r = rewards(&scores, &last)?;
            let (c, x) = (r.narrow(0, 0, m)?, r.narrow(0, m, m)?);
            let per_pair = pairwise_reward_loss(&c, &x)?;
            let margin: Vec<f32> = (&c - &x)?.to_vec1()?;
            let mut t = tally.borrow_mut();
            t[0] += m as f64;
            t[1] += margin.iter().filter(|d| **d > 0.0).count() as f64;
            t[2] += margin.iter().map(|d| *d as f64).sum::<f64>();
            let sum = per_pair.sum_all()?;
            t[3] += sum.to_scalar::<f32>()? as f64;
            Ok((sum / norm)?)
        }),
    })
}

impl Method for RewardModel {
    fn kind(&self) -> &'static str {
        "preference"
    }

    fn step(&mut self, policy: &mut Trainer, batch: &[&Record]) -> Result<Metrics> {
        let norm = batch.len() as f64;
        let mine = my_micro_batches(
            batch,
            policy.cfg.train.micro_batch_size,
            policy.rank(),
            policy.ranks(),
        );
        let tally: Tally = Rc::default();
        let pad = self.pad;
        let mut m = step_metrics(policy.step_on(mine.len(), |me, i| {
            pair_micro_batch(me, mine[i], pad, norm, tally.clone())
        })?);
        let t = *tally.borrow();
        let v = policy.sum_over_ranks(&t)?;
        m.insert("accuracy".into(), json!(v[1] / v[0]));
        m.insert("margin".into(), json!(v[2] / v[0]));
        Ok(m)
    }

    fn evaluate(&mut self, policy: &Trainer, val: &[Record]) -> Result<Metrics> {
        let mut m = Metrics::new();
        let tally: Tally = Rc::default();
        forward_each(policy, val, |chunk| {
            pair_micro_batch(policy, chunk, self.pad, 1.0, tally.clone())
        })?;
        let t = *tally.borrow();
        let v = policy.sum_over_ranks(&t)?;
        if v[0] > 0.0 {
            m.insert("val_loss".into(), json!(v[3] / v[0]));
            m.insert("val_accuracy".into(), json!(v[1] / v[0]));
            m.insert("val_margin".into(), json!(v[2] / v[0]));
            m.insert("val_pairs".into(), json!(v[0]));
        }
        Ok(m)
    }

    fn curves(&self) -> Vec<(&'static str, Vec<&'static str>)> {
        vec![
            ("loss.png", vec!["loss", "val_loss"]),
            ("accuracy.png", vec!["accuracy", "val_accuracy"]),
        ]
    }
}

/// A reward model to start training from: `base` as is when it already has a score head,
/// else its body with a fresh score head (normal, std 1/√(hidden + 1), as ColossalChat's
/// value head) written to `out` in HF layout (`LlamaForSequenceClassification`).
pub fn with_score_head(base: &Path, out: &Path, seed: u64) -> Result<std::path::PathBuf> {
    let (model, mut params) = load_llama(base, DType::F32, &Device::Cpu)?;
    if model.cfg.score_labels() == Some(1) {
        return Ok(base.to_path_buf());
    }
    let cfg = model.cfg.with_score_head(1);
    let scored = Llama::new(cfg)?;
    let h = scored.cfg.hidden_size;
    let std = 1.0 / ((h + 1) as f32).sqrt();
    let normal = Normal::new(0.0f32, std).expect("std > 0");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let w: Vec<f32> = (0..h).map(|_| normal.sample(&mut rng)).collect();
    params.insert(
        Llama::SCORE,
        Var::from_tensor(&Tensor::from_vec(w, (1, h), &Device::Cpu)?)?,
    );
    save_llama(out, &scored, &params, usize::MAX)
        .with_context(|| format!("{}: writing the reward model's start", out.display()))?;
    Ok(out.to_path_buf())
}
