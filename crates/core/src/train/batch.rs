//! Packed sequences → model inputs, targets and attention tables.

use candle_core::{Device, Tensor};

use crate::data::PackedSequence;
use crate::models::llama::{AttnInputs, Llama};
use crate::Result;

pub const IGNORE: i64 = -100;

pub struct LmBatch {
    pub ids: Tensor,
    pub inputs: AttnInputs,
    /// Next-token targets, flattened (B·(T-1)), `IGNORE` where no loss is taken.
    pub targets: Vec<i64>,
    pub loss_tokens: usize,
}

/// Number of loss targets `causal_lm_batch` would produce, without building tensors.
pub fn count_targets(seqs: &[PackedSequence], boundary_aware: bool) -> usize {
    seqs.iter()
        .map(|s| {
            let t = s.input_ids.len().saturating_sub(1);
            let crossing = if boundary_aware {
                s.doc_starts.iter().filter(|&&p| p > 0).count()
            } else {
                0
            };
            t - crossing
        })
        .sum()
}

/// Causal-LM batch. With `boundary_aware`, positions restart at each document start, tokens
/// attend only within their document and no target crosses a document boundary.
pub fn causal_lm_batch(
    model: &Llama,
    seqs: &[PackedSequence],
    boundary_aware: bool,
    device: &Device,
) -> Result<LmBatch> {
    let t = seqs.first().map_or(0, |s| s.input_ids.len());
    let mut flat = Vec::with_capacity(seqs.len() * t);
    let mut positions = Vec::with_capacity(seqs.len());
    let mut segments = Vec::with_capacity(seqs.len());
    let mut targets = Vec::with_capacity(seqs.len() * t.saturating_sub(1));
    for s in seqs {
        if s.input_ids.len() != t {
            return Err(crate::msg!(
                "packed sequences of unequal length {} and {t}",
                s.input_ids.len()
            ));
        }
        flat.extend_from_slice(&s.input_ids);
        let mut seg = vec![0u32; t];
        let mut pos = vec![0u32; t];
        let mut current = 0u32;
        let mut start = 0usize;
        for i in 0..t {
            if boundary_aware && i > 0 && s.doc_starts.binary_search(&(i as u32)).is_ok() {
                current += 1;
                start = i;
            }
            seg[i] = current;
            pos[i] = (i - start) as u32;
        }
        for i in 1..t {
            let crosses = boundary_aware && seg[i] != seg[i - 1];
            targets.push(if crosses {
                IGNORE
            } else {
                s.input_ids[i] as i64
            });
        }
        positions.push(pos);
        segments.push(seg);
    }
    let ids = Tensor::from_vec(flat, (seqs.len(), t), device)?;
    let segs = boundary_aware.then_some(segments.as_slice());
    let inputs = AttnInputs::new(&model.cfg, &model.rope, &positions, 0, None, segs, device)?;
    let loss_tokens = targets.iter().filter(|&&x| x != IGNORE).count();
    Ok(LmBatch {
        ids,
        inputs,
        targets,
        loss_tokens,
    })
}
