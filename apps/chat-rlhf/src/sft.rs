//! Supervised fine-tuning on chat data: next-token cross-entropy on the assistant tokens
//! only, averaged over the global batch's learned tokens.

use anyhow::Result;
use candle_core::Tensor;
use colossal_core::exec::{llama_inputs, on_output};
use colossal_core::parallel::pipeline_run::MicroBatch;
use colossal_core::train::Trainer;
use colossal_data::chat::prep::Record;
use serde_json::json;

use crate::data::{count_learned, forward_each, my_micro_batches, shifted_mask, trainer_inputs};
use crate::loss::masked_sum;
use crate::session::{step_metrics, Method, Metrics};

pub struct Sft {
    pub pad: u32,
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
    let err = |e: anyhow::Error| colossal_core::msg!("{e:#}");
    let (inputs, ctx) = trainer_inputs(policy, &ids, pad).map_err(err)?;
    let mask = shifted_mask(&labels, inputs.dim(1)?, policy.device()).map_err(err)?;
    let layout = policy.output_layout();
    let ids = inputs.clone();
    Ok(MicroBatch {
        inputs: llama_inputs(&inputs),
        ctx,
        // Σ −log p over the learned tokens (vocabulary- and sequence-split alike).
        loss_fn: on_output(move |logits: &Tensor| {
            let lp = layout.token_log_probs(logits, &ids)?;
            Ok((masked_sum(&lp, &mask)?.neg()? / norm)?)
        }),
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
