//! What one rank computes the loss on: its micro-batch (its positions under sequence
//! parallelism) and the matching cross-entropy.

use candle_core::{DType, Tensor};

use super::engine::Engine;
use super::tensor_parallel::TpRank;
use crate::models::llama::Llama;
use crate::Result;
use colossal_kernels::Kernels;

/// Sum of token cross-entropies of `logits` (B, T, V) — vocabulary-parallel on a
/// tensor-parallel rank — divided by `norm`. `targets` cover every position, or with
/// `shifted` the first T − 1 (the next-token targets of a whole sequence).
pub(super) fn loss_of(
    kernels: Kernels,
    tp: Option<&TpRank>,
    logits: &Tensor,
    targets: &[i64],
    shifted: bool,
    norm: f64,
) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let rows = if shifted {
        logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?
    } else {
        logits.reshape((b * t, v))?
    };
    let (sum, _) = match tp {
        Some(tp) => tp.cross_entropy(kernels, &rows, targets)?,
        None => kernels.cross_entropy_sum(&rows, targets, super::batch::IGNORE)?,
    };
    Ok((sum / norm)?)
}

/// A micro-batch as one rank sees it.
pub(super) struct RankBatch {
    pub(super) ids: Tensor,
    pub(super) ctx: crate::models::llama::AttnInputs,
    pub(super) targets: Vec<i64>,
    /// `targets` are the next-token targets of the first T − 1 positions (no sequence split).
    pub(super) shifted: bool,
    pub(super) loss_tokens: usize,
}

impl Engine<Llama> {
    /// The micro-batch in compute precision; under ulysses/ring only this rank's positions,
    /// each with its own target.
    pub(super) fn rank_batch(&self, mb: super::LmBatch) -> Result<RankBatch> {
        let dtype = self.cfg.parallel.compute_dtype();
        let ctx = if dtype == DType::F32 {
            mb.inputs
        } else {
            mb.inputs.to_dtype(dtype)?
        };
        let Some(g) = &self.sp else {
            return Ok(RankBatch {
                ids: mb.ids,
                ctx,
                targets: mb.targets,
                shifted: true,
                loss_tokens: mb.loss_tokens,
            });
        };
        use crate::parallel::sequence::{local_positions, shard_inputs, shard_tokens};
        let (b, t) = mb.ids.dims2()?;
        let (sp, rank) = (g.size(), g.rank());
        let positions = local_positions(t, sp, rank)?;
        let ignore = super::batch::IGNORE;
        let targets: Vec<i64> = (0..b)
            .flat_map(|r| {
                let row = &mb.targets[r * (t - 1)..(r + 1) * (t - 1)];
                positions
                    .iter()
                    .map(move |&p| row.get(p).copied().unwrap_or(ignore))
            })
            .collect();
        Ok(RankBatch {
            ids: shard_tokens(&mb.ids, sp, rank)?,
            ctx: shard_inputs(&ctx, sp, rank)?,
            loss_tokens: targets.iter().filter(|&&x| x != ignore).count(),
            targets,
            shifted: false,
        })
    }
}

/// Sum of next-token cross-entropies of `logits` (B, T, V) against flattened targets,
/// divided by `norm`.
pub fn lm_loss(kernels: Kernels, logits: &Tensor, targets: &[i64], norm: f64) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let shifted = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
    let (sum, _) = kernels.cross_entropy_sum(&shifted, targets, super::batch::IGNORE)?;
    Ok((sum / norm)?)
}
