//! KTO's reference point z0 (Ethayarajh et al.; TRL's estimate): the policy's KL to the
//! reference measured on mismatched pairs — each prompt followed by the next example's
//! answer — averaged over the global batch, detached and clipped at 0. Mismatched answers keep
//! z0 from tracking how well the policy fits the examples it is being trained on.

use anyhow::Result;
use colossal_core::train::Trainer;
use colossal_data::chat::encode::IGNORE;
use colossal_data::chat::prep::Record;

use crate::data::{lockstep_micro_batches, shifted_mask, trainer_inputs};
use crate::loss::row_sum;
use crate::reference::Reference;

/// Prompt tokens (labels IGNORE) and answer tokens (the labelled rest) of a row.
fn split(ids: &[u32], labels: &[i64]) -> (Vec<u32>, Vec<u32>) {
    let start = labels
        .iter()
        .position(|&l| l != IGNORE)
        .unwrap_or(ids.len());
    (ids[..start].to_vec(), ids[start..].to_vec())
}

/// For pair k of `batch` (the KL rows of its chosen and of its rejected example): pair k's
/// prompt followed by pair k + 1's chosen (resp. rejected) answer, cut to `max_len`; labels on
/// the answer. Returns the rows and their labels for the pairs `which`.
pub fn kl_rows(
    batch: &[&Record],
    which: &[usize],
    max_len: usize,
) -> (Vec<Vec<u32>>, Vec<Vec<i64>>) {
    let n = batch.len();
    let mut rows = Vec::new();
    let mut labels = Vec::new();
    for side in ["chosen", "rejected"] {
        for &k in which {
            let ids = format!("{side}_input_ids");
            let lab = format!("{side}_labels");
            let (prompt, _) = split(&batch[k].ids(&ids), &batch[k].labels(&lab));
            let other = batch[(k + 1) % n];
            let (_, answer) = split(&other.ids(&ids), &other.labels(&lab));
            let mut row = prompt.clone();
            row.extend(&answer);
            row.truncate(max_len.max(prompt.len() + 1));
            let l = row
                .iter()
                .enumerate()
                .map(|(t, &x)| if t < prompt.len() { IGNORE } else { x as i64 })
                .collect();
            rows.push(row);
            labels.push(l);
        }
    }
    (rows, labels)
}

/// z0 for `batch` (every rank calls this with the same global batch and takes its share).
pub fn reference_point(
    policy: &Trainer,
    reference: &Reference,
    batch: &[&Record],
    pad: u32,
) -> Result<f64> {
    if batch.is_empty() {
        return Ok(0.0);
    }
    let max_len = batch
        .iter()
        .flat_map(|r| {
            [
                r.ids("chosen_input_ids").len(),
                r.ids("rejected_input_ids").len(),
            ]
        })
        .max()
        .unwrap_or(1);
    let index: Vec<usize> = (0..batch.len()).collect();
    let mbs = policy.cfg.train.micro_batch_size;
    let layout = policy.output_layout();
    let mut sum = 0.0f64;
    for (which, counted) in lockstep_micro_batches(policy, &index, mbs) {
        let (rows, labels) = kl_rows(batch, which, max_len);
        let (inputs, ctx) = trainer_inputs(policy, &rows, pad)?;
        let mask = shifted_mask(&labels, inputs.dim(1)?, policy.device())?;
        let pol = policy.forward_map(&inputs, &ctx, |out| {
            Ok(row_sum(&layout.token_log_probs(out, &inputs)?, &mask)?)
        })?;
        let refp = row_sum(&reference.token_logps(policy, &inputs, &ctx)?, &mask)?;
        if counted {
            sum += (pol - refp)?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    let total = policy.sum_over_ranks(&[sum])?[0];
    Ok((total / (2 * batch.len()) as f64).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn pair(prompt: &[u32], chosen: &[u32], rejected: &[u32]) -> Record {
        let mut lists = BTreeMap::new();
        for (side, answer) in [("chosen", chosen), ("rejected", rejected)] {
            let ids: Vec<i32> = prompt.iter().chain(answer).map(|&x| x as i32).collect();
            let labels: Vec<i32> = (0..ids.len())
                .map(|t| {
                    if t < prompt.len() {
                        IGNORE as i32
                    } else {
                        ids[t]
                    }
                })
                .collect();
            lists.insert(format!("{side}_input_ids"), ids);
            lists.insert(format!("{side}_labels"), labels);
        }
        Record {
            lists,
            texts: BTreeMap::new(),
            source: String::new(),
        }
    }

    #[test]
    fn kl_rows_put_each_prompt_before_the_next_pairs_answer() {
        let a = pair(&[1, 10, 11], &[20, 2], &[21, 2]);
        let b = pair(&[1, 12], &[30, 31, 2], &[32, 2]);
        let batch = [&a, &b];
        let (rows, labels) = kl_rows(&batch, &[0, 1], 16);
        assert_eq!(
            rows,
            vec![
                vec![1, 10, 11, 30, 31, 2], // a's prompt, b's chosen answer
                vec![1, 12, 20, 2],         // b's prompt, a's chosen answer
                vec![1, 10, 11, 32, 2],     // a's prompt, b's rejected answer
                vec![1, 12, 21, 2],
            ]
        );
        assert_eq!(labels[1], vec![IGNORE, IGNORE, 20, 2]);
        // Only this rank's pairs, cut to the longest original row.
        let (rows, _) = kl_rows(&batch, &[0], 5);
        assert_eq!(rows, vec![vec![1, 10, 11, 30, 31], vec![1, 10, 11, 32, 2]]);
    }
}
