//! Evaluation of a causal LM on the validation split (the run loop itself is
//! `colossal_session`'s).

use candle_core::{Device, Tensor};

use super::batch::causal_lm_batch;
use super::rank_batch::loss_of;
use super::trainer::Trainer;
use crate::data::PackedDataset;
use crate::dist::ReduceOp;
use crate::exec::{llama_inputs, on_output};
use crate::Result;

impl Trainer {
    /// Mean validation loss per target token over `eval_batches` batches (0 = all).
    pub fn evaluate(&mut self) -> Result<Option<f64>> {
        let Some(mut val) = self.val_data.take() else {
            return Ok(None);
        };
        let result = self.evaluate_on(&mut val);
        self.val_data = Some(val);
        result
    }

    fn evaluate_on(&self, val: &mut PackedDataset) -> Result<Option<f64>> {
        let mbs = self.cfg.train.micro_batch_size;
        let batches = match self.cfg.train.eval_batches {
            0 => val.len().div_ceil(mbs),
            n => n.min(val.len().div_ceil(mbs)),
        };
        let (rank, ranks) = (self.rank(), self.ranks());
        let dtype = self.cfg.parallel.compute_dtype();
        let mut weights = self.weights(dtype)?;
        let (mut sum, mut count) = (0.0f64, 0usize);
        let mut staged = Vec::new();
        // Every rank runs the same number of rounds when forwards are collectives, a rank past
        // the end repeating a batch it does not count.
        let rounds = match self.forwards_in_lockstep() {
            true => batches.div_ceil(ranks) * ranks,
            false => batches,
        };
        for b in (0..rounds).skip(rank).step_by(ranks) {
            let counted = b < batches;
            let b = b % batches.max(1);
            let start = b * mbs;
            let n = mbs.min(val.len() - start);
            // A fixed seeded shuffle: the same representative subset at every evaluation
            // (files are concatenated in order, so the first sequences are one source).
            let batch = val.batch(start as u64, n, true)?;
            let mb = self.rank_batch(causal_lm_batch(
                &self.model,
                &batch.seqs,
                self.cfg.data.boundary_aware,
                &self.device,
            )?)?;
            if counted {
                count += mb.loss_tokens;
            }
            let (targets, shifted, tp) = (mb.targets, mb.shifted, self.tp.as_ref());
            let kernels = self.model.kernels;
            if self.pp.is_some() {
                staged.push(crate::parallel::pipeline_run::MicroBatch {
                    inputs: llama_inputs(&mb.ids),
                    ctx: mb.ctx,
                    loss_fn: on_output(move |l: &Tensor| {
                        let w = if counted { 1.0 } else { 0.0 };
                        Ok((loss_of(kernels, tp, l, &targets, shifted, 1.0)? * w)?)
                    }),
                });
                continue;
            }
            let out = self.executor.forward_with(
                &self.model,
                &mut weights,
                &llama_inputs(&mb.ids),
                &mb.ctx,
            )?;
            let l = loss_of(kernels, tp, out.output()?, &targets, shifted, 1.0)?;
            if counted {
                sum += l.to_scalar::<f32>()? as f64;
            }
        }
        if let Some(pp) = &self.pp {
            let local = pp
                .runner(&self.model, self.executor)
                .forward_only(&mut weights, &staged)?;
            let t = Tensor::new(&[local as f64], &Device::Cpu)?;
            sum = pp.comm.all_reduce(&t, ReduceOp::Sum)?.to_vec1::<f64>()?[0];
        }
        if let Some(c) = &self.comm {
            let t = Tensor::new(&[sum, count as f64], &Device::Cpu)?;
            let v = c.all_reduce(&t, ReduceOp::Sum)?.to_vec1::<f64>()?;
            (sum, count) = (v[0], v[1] as usize);
        }
        Ok((count > 0).then(|| sum / count as f64))
    }
}
