//! Supervised fine-tuning on chat data: next-token cross-entropy on the assistant tokens
//! only, averaged over the global batch's learned tokens.

use anyhow::Result;
use candle_core::Tensor;
use colossal_core::nn::cross_entropy_sum;
use colossal_core::parallel::pipeline_run::MicroBatch;
use colossal_core::train::Trainer;
use colossal_data::chat::encode::IGNORE;
use colossal_data::chat::prep::Record;
use serde_json::json;

use crate::data::{count_learned, forward_each, my_micro_batches, padded, shifted_targets};
use crate::session::{step_metrics, Method, Metrics};

pub struct Sft {
    pub pad: u32,
}

/// Summed next-token cross-entropy of right-padded `logits` (B, T, V) against `targets`
/// (B·(T − 1)), divided by `norm`.
pub fn lm_loss_sum(logits: &Tensor, targets: &[i64], norm: f64) -> candle_core::Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let rows = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
    let (sum, _) = cross_entropy_sum(&rows, targets, IGNORE)?;
    sum / norm
}

/// The micro-batch of SFT rows with its loss (sum over learned tokens / `norm`).
pub fn sft_micro_batch(
    policy: &Trainer,
    rows: &[&Record],
    pad: u32,
    norm: f64,
) -> colossal_core::Result<MicroBatch<'static, colossal_core::models::llama::AttnInputs>> {
    let ids: Vec<Vec<u32>> = rows.iter().map(|r| r.ids("input_ids")).collect();
    let labels: Vec<Vec<i64>> = rows.iter().map(|r| r.labels("labels")).collect();
    let dtype = policy.cfg.parallel.compute_dtype();
    let (inputs, ctx) = padded(&policy.model, &ids, pad, dtype, policy.device())
        .map_err(|e| colossal_core::msg!("{e}"))?;
    let targets = shifted_targets(&labels, inputs.dim(1)?);
    Ok(MicroBatch {
        inputs,
        ctx,
        loss_fn: Box::new(move |logits: &Tensor| Ok(lm_loss_sum(logits, &targets, norm)?)),
    })
}

impl Method for Sft {
    fn kind(&self) -> &'static str {
        "sft"
    }

    fn step(&mut self, policy: &mut Trainer, batch: &[&Record]) -> Result<Metrics> {
        let labels: Vec<Vec<i64>> = batch.iter().map(|r| r.labels("labels")).collect();
        let norm = count_learned(&labels).max(1) as f64;
        let mbs = policy.cfg.train.micro_batch_size;
        let mine = my_micro_batches(batch, mbs, policy.rank(), policy.ranks());
        let pad = self.pad;
        let mut m = step_metrics(
            policy.step_on(mine.len(), |me, i| sft_micro_batch(me, mine[i], pad, norm))?,
        );
        m.insert("tokens".into(), json!(norm));
        Ok(m)
    }

    fn evaluate(&mut self, policy: &Trainer, val: &[Record]) -> Result<Metrics> {
        let mut m = Metrics::new();
        if val.is_empty() {
            return Ok(m);
        }
        let mut count = 0.0f64;
        let sum = forward_each(policy, val, |chunk| {
            let labels: Vec<Vec<i64>> = chunk.iter().map(|r| r.labels("labels")).collect();
            count += count_learned(&labels) as f64;
            sft_micro_batch(policy, chunk, self.pad, 1.0)
        })?;
        let v = policy.sum_over_ranks(&[sum, count])?;
        if v[1] > 0.0 {
            m.insert("val_loss".into(), json!(v[0] / v[1]));
        }
        Ok(m)
    }

    fn curves(&self) -> Vec<(&'static str, Vec<&'static str>)> {
        vec![("loss.png", vec!["loss", "val_loss"])]
    }
}
