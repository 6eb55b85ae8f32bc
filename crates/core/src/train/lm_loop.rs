//! The language-model loop on top of the trainer's step: evaluation on the validation split,
//! and `run` — steps, evaluations, checkpoints, metrics, the loss curve, a sample at the end.

use std::time::Instant;

use candle_core::{Device, Tensor};
use serde_json::json;

use super::batch::causal_lm_batch;
use super::rank_batch::loss_of;
use super::trainer::{RunSummary, Trainer};
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
        for b in (0..batches).skip(rank).step_by(ranks) {
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
            count += mb.loss_tokens;
            let (targets, shifted, tp) = (mb.targets, mb.shifted, self.tp.as_ref());
            if self.pp.is_some() {
                staged.push(crate::parallel::pipeline_run::MicroBatch {
                    inputs: llama_inputs(&mb.ids),
                    ctx: mb.ctx,
                    loss_fn: on_output(move |l: &Tensor| loss_of(tp, l, &targets, shifted, 1.0)),
                });
                continue;
            }
            let out = self.executor.forward_with(
                &self.model,
                &mut weights,
                &llama_inputs(&mb.ids),
                &mb.ctx,
            )?;
            let l = loss_of(tp, out.single()?, &targets, shifted, 1.0)?;
            sum += l.to_scalar::<f32>()? as f64;
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

    /// Trains until `stop_at` (default `train.max_steps`), evaluating and checkpointing as
    /// configured; always checkpoints at the end and plots the loss curve.
    pub fn run(&mut self, stop_at: Option<usize>) -> Result<RunSummary> {
        let t = self.cfg.train.clone();
        let end = stop_at.unwrap_or(t.max_steps).min(t.max_steps) as u64;
        let main = self.is_main();
        let metrics_path = t.out_dir.join("metrics.jsonl");
        let (mut metrics, bar) =
            super::metrics::run_outputs(&t.out_dir, main, self.state.step, end)?;
        let tokens_per_step = (t.batch_size * self.seq_len()) as f64;
        let mut summary = RunSummary {
            first_loss: None,
            last_loss: None,
            last_val_loss: None,
            steps: 0,
            final_dir: None,
            rank: self.world_rank,
        };
        tracing::info!(
            params = self.params.num_elements(),
            start = self.state.step,
            end,
            "training"
        );
        while self.state.step < end {
            let started = Instant::now();
            let (loss, grad_norm, lr) = self.train_step()?;
            let secs = started.elapsed().as_secs_f64();
            let step = self.state.step;
            summary.first_loss.get_or_insert(loss);
            summary.last_loss = Some(loss);
            summary.steps += 1;
            let mut rec = json!({
                "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "tokens": self.state.tokens_seen, "tokens_per_s": tokens_per_step / secs,
                "step_s": secs, "comm_bytes": self.last_step_comm_bytes,
            });
            if let Some(sc) = &self.state.loss_scaler {
                rec["loss_scale"] = json!(sc.scale);
            }
            if self.last_step_skipped {
                rec["skipped"] = json!(true);
            }
            if let (Some(b), Some(pp)) = (self.last_bubble, &self.pp) {
                let m = t.batch_size / t.micro_batch_size / self.ranks();
                rec["pp_bubble"] = json!(b);
                rec["pp_bubble_theory"] = json!(pp.schedule.theoretical_bubble(pp.comm.size(), m));
            }
            let (mp, mg, mo) = self.memory_bytes();
            rec["mem_params_bytes"] = json!(mp);
            rec["mem_grads_bytes"] = json!(mg);
            rec["mem_optim_bytes"] = json!(mo);
            rec["offloaded_bytes"] = json!(self.offloaded_bytes());
            let last = step == end;
            if (t.eval_every > 0 && step.is_multiple_of(t.eval_every as u64)) || last {
                if let Some(v) = self.evaluate()? {
                    rec["val_loss"] = json!(v);
                    rec["val_ppl"] = json!(v.exp());
                    summary.last_val_loss = Some(v);
                    tracing::info!(step, val_loss = v, val_ppl = v.exp(), "evaluation");
                }
            }
            if let Some(m) = metrics.as_mut() {
                m.write(&rec)?;
            }
            bar.set_position(step);
            bar.set_message(format!(
                "loss {loss:.4} lr {lr:.2e} {:.0} tok/s",
                tokens_per_step / secs
            ));
            let save = (t.save_every > 0 && step.is_multiple_of(t.save_every as u64)) || last;
            if save {
                if let Some(dir) = self.save_checkpoint()? {
                    summary.final_dir = Some(dir);
                }
            }
        }
        bar.finish();
        if main && metrics_path.exists() {
            let png = t.out_dir.join("loss.png");
            if let Err(e) = super::plot_loss_curve(&metrics_path, &png) {
                tracing::warn!("loss curve not drawn: {e}");
            }
        }
        Ok(summary)
    }
}
