//! What one rank holds of the model's output — a slice of the vocabulary under tensor
//! parallelism, some positions under sequence parallelism — and how to make whole-sequence,
//! whole-vocabulary per-token quantities of it (log-probabilities, entropies, values) that
//! every rank of a model replica then holds alike.
//!
//! Such quantities feed losses that every rank computes alike (a DPO margin, a PPO ratio), so
//! their gradient is whole on each rank: the collectives here pass back only each rank's own
//! part (its positions, the terms of its vocabulary slice), never a sum over the group.

use candle_core::{DType, Tensor};

use crate::dist::autograd::reduce_from;
use crate::dist::{Group, ReduceOp};
use crate::exec::Acts;
use crate::models::llama::AttnInputs;
use crate::parallel::sequence::{local_positions, shard_inputs, shard_tokens, whole_sequences};
use crate::Result;

#[derive(Clone, Default)]
pub struct OutputLayout {
    /// The tensor-parallel group and the first vocabulary row of this rank's slice.
    pub(super) vocab: Option<(Group, usize)>,
    /// The sequence-parallel group (ulysses or ring).
    pub(super) sp: Option<Group>,
    /// Ranks the residual stream's sequence is cut over inside the model (Megatron-SP: the
    /// tensor-parallel group; the output is whole again).
    pub(super) inner_seq_split: usize,
}

/// Statistics of a row of logits split over ranks: the detached max and Σ exp(logit − max),
/// both whole.
struct Normaliser {
    shifted: Tensor,
    sum_exp: Tensor,
}

impl OutputLayout {
    /// Sequence lengths must be a multiple of this (sequence parallelism cuts 2·sp chunks).
    pub fn seq_multiple(&self) -> usize {
        let outer = self.sp.as_ref().map_or(1, |g| 2 * g.size());
        let inner = self.inner_seq_split.max(1);
        (1..=inner)
            .map(|k| outer * k)
            .find(|m| m.is_multiple_of(inner))
            .unwrap_or(outer * inner)
    }

    /// This rank's positions of whole-sequence model inputs (all of them without sequence
    /// parallelism): every input is split along its sequence dimension (1).
    pub fn shard(&self, inputs: &Acts, ctx: &AttnInputs) -> Result<(Acts, AttnInputs)> {
        match &self.sp {
            None => Ok((inputs.clone(), ctx.clone())),
            Some(g) => Ok((
                inputs.map(|t| shard_tokens(t, g.size(), g.rank()))?,
                shard_inputs(ctx, g.size(), g.rank())?,
            )),
        }
    }

    /// Positions of a sequence of `t` this rank's output covers, in its order.
    fn positions(&self, t: usize) -> Result<Vec<usize>> {
        match &self.sp {
            None => Ok((0..t).collect()),
            Some(g) => local_positions(t, g.size(), g.rank()),
        }
    }

    /// This rank's per-position output (B, T_local, …) as whole sequences (B, T, …).
    pub fn whole_positions(&self, x: &Tensor) -> Result<Tensor> {
        match &self.sp {
            Some(g) => whole_sequences(x, g),
            None => Ok(x.clone()),
        }
    }

    /// Log-probability of each next token of the whole sequences `ids` (B, T): (B, T − 1),
    /// position t scoring `ids[t + 1]`, from this rank's logits (B, T_local, V_local).
    pub fn token_log_probs(&self, logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let (b, tl, v) = logits.dims3()?;
        let t = ids.dim(1)?;
        let positions = self.positions(t)?;
        let all: Vec<Vec<u32>> = ids.to_dtype(DType::U32)?.to_vec2()?;
        // The last position has no next token: any index, cut off below.
        let targets: Vec<i64> = all
            .iter()
            .flat_map(|row| {
                positions
                    .iter()
                    .map(move |&p| row.get(p + 1).map_or(0, |&x| x as i64))
            })
            .collect();
        let vocab_start = self.vocab.as_ref().map_or(0, |(_, s)| *s);
        let (mut idx, mut here) = (vec![0u32; b * tl], vec![0f32; b * tl]);
        for (i, &target) in targets.iter().enumerate() {
            let local = target - vocab_start as i64;
            if (0..v as i64).contains(&local) {
                idx[i] = local as u32;
                here[i] = 1.0;
            }
        }
        let dev = logits.device();
        let idx = Tensor::from_vec(idx, (b, tl, 1), dev)?;
        let here = Tensor::from_vec(here, (b, tl, 1), dev)?;
        let n = self.normaliser(logits)?;
        let picked = self.over_vocab((n.shifted.gather(&idx, 2)? * here)?)?;
        let lp = (picked - n.sum_exp.log()?)?.squeeze(2)?;
        Ok(self.whole_positions(&lp)?.narrow(1, 0, t - 1)?)
    }

    /// Entropy of each position's next-token distribution: (B, T).
    pub fn entropy(&self, logits: &Tensor) -> Result<Tensor> {
        let n = self.normaliser(logits)?;
        // H = log Σ e^s − Σ e^s · s / Σ e^s, with s the logits less their max.
        let weighted = self.over_vocab((n.shifted.exp()? * &n.shifted)?.sum_keepdim(2)?)?;
        let h = (n.sum_exp.log()? - (weighted / &n.sum_exp)?)?.squeeze(2)?;
        self.whole_positions(&h)
    }

    fn normaliser(&self, logits: &Tensor) -> Result<Normaliser> {
        let logits = logits.to_dtype(DType::F32)?;
        let local_max = logits.max_keepdim(2)?.detach().contiguous()?;
        let max = match &self.vocab {
            Some((g, _)) => g.with(|c| c.all_reduce(&local_max, ReduceOp::Max))?,
            None => local_max,
        };
        let shifted = logits.broadcast_sub(&max)?;
        let sum_exp = self.over_vocab(shifted.exp()?.sum_keepdim(2)?)?;
        Ok(Normaliser { shifted, sum_exp })
    }

    /// Sums a per-rank part over the vocabulary slices (forward); each rank's part gets the
    /// whole result's gradient.
    fn over_vocab(&self, x: Tensor) -> Result<Tensor> {
        match &self.vocab {
            Some((g, _)) => reduce_from(&x, g),
            None => Ok(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn one_rank_log_probs_and_entropy_are_log_softmax() {
        let dev = Device::Cpu;
        let logits = Var::from_tensor(
            &Tensor::from_vec(
                vec![0.0f32, 1.0, 2.0, 1.0, 1.0, 1.0, 5.0, 5.0, 5.0],
                (1, 3, 3),
                &dev,
            )
            .unwrap(),
        )
        .unwrap();
        let ids = Tensor::from_vec(vec![7u32, 2, 0], (1, 3), &dev).unwrap();
        let layout = OutputLayout::default();
        let lp: Vec<Vec<f32>> = layout
            .token_log_probs(&logits, &ids)
            .unwrap()
            .to_vec2()
            .unwrap();
        let z0 = (1f32 + 1f32.exp() + 2f32.exp()).ln();
        assert!((lp[0][0] - (2.0 - z0)).abs() < 1e-6);
        assert!((lp[0][1] + 3f32.ln()).abs() < 1e-6);
        let h: Vec<Vec<f32>> = layout.entropy(&logits).unwrap().to_vec2().unwrap();
        assert!((h[0][1] - 3f32.ln()).abs() < 1e-6);
        let p: Vec<f32> = [0.0f32, 1.0, 2.0].iter().map(|x| (x - z0).exp()).collect();
        let h0: f32 = -p.iter().map(|q| q * q.ln()).sum::<f32>();
        assert!((h[0][0] - h0).abs() < 1e-6);
    }
}
