//! The DPO family (DPO, IPO, SimPO, ORPO) on preference pairs, and KTO on the pairs' answers
//! taken as unpaired desirable / undesirable examples. Reference log-probs are computed once
//! per micro-batch with the frozen starting model.

use std::cell::RefCell;
use std::rc::Rc;

use anyhow::Result;
use candle_core::{DType, Tensor};
use colossal_core::exec::{llama_inputs, on_output};
use colossal_core::models::llama::AttnInputs;
use colossal_core::parallel::pipeline_run::MicroBatch;
use colossal_core::train::Trainer;
use colossal_data::chat::prep::Record;
use serde_json::json;

use crate::config::LossChoice;
use crate::data::{forward_each, my_micro_batches, shifted_mask, trainer_inputs};
use crate::loss::preference::kto_per_example;
use crate::loss::{row_sum, PairLogps, PreferenceLoss};
use crate::reference::Reference;
use crate::session::{step_metrics, Method, Metrics};

pub struct Dpo {
    pub loss: LossChoice,
    pub pad: u32,
    /// The frozen start (needed by DPO, IPO and KTO).
    pub reference: Option<Reference>,
}

/// (pairs, margin > 0, margin sum, chosen reward sum, rejected reward sum, loss sum).
type Tally = Rc<RefCell<[f64; 6]>>;

impl Dpo {
    fn beta(&self) -> f64 {
        match self.loss {
            LossChoice::Pairwise(PreferenceLoss::Dpo { beta, .. })
            | LossChoice::Pairwise(PreferenceLoss::Ipo { beta })
            | LossChoice::Pairwise(PreferenceLoss::Simpo { beta, .. }) => beta,
            LossChoice::Pairwise(PreferenceLoss::Orpo { .. }) => 1.0,
            LossChoice::Kto { beta, .. } => beta,
        }
    }

    fn micro_batch(
        &self,
        policy: &Trainer,
        pairs: &[&Record],
        norm: f64,
        z0: f64,
        tally: Tally,
    ) -> colossal_core::Result<MicroBatch<'static, AttnInputs>> {
        let err = |e: anyhow::Error| colossal_core::msg!("{e:#}");
        let m = pairs.len();
        let rows: Vec<Vec<u32>> = pairs
            .iter()
            .map(|r| r.ids("chosen_input_ids"))
            .chain(pairs.iter().map(|r| r.ids("rejected_input_ids")))
            .collect();
        let labels: Vec<Vec<i64>> = pairs
            .iter()
            .map(|r| r.labels("chosen_labels"))
            .chain(pairs.iter().map(|r| r.labels("rejected_labels")))
            .collect();
        let (inputs, ctx) = trainer_inputs(policy, &rows, self.pad).map_err(err)?;
        let mask = shifted_mask(&labels, inputs.dim(1)?, policy.device()).map_err(err)?;
        let lens = mask.sum(1)?;
        let reference = match &self.reference {
            Some(r) => {
                let logps = r.token_logps(policy, &inputs, &ctx).map_err(err)?;
                Some(row_sum(&logps, &mask)?.detach())
            }
            None => None,
        };
        let (loss, beta) = (self.loss, self.beta());
        let split = move |t: &Tensor, lens: &Tensor| -> candle_core::Result<PairLogps> {
            Ok(PairLogps {
                chosen: t.narrow(0, 0, m)?,
                rejected: t.narrow(0, m, m)?,
                chosen_len: lens.narrow(0, 0, m)?,
                rejected_len: lens.narrow(0, m, m)?,
            })
        };
        let input_ids = inputs.clone();
        let layout = policy.output_layout();
        Ok(MicroBatch {
            inputs: llama_inputs(&inputs),
            ctx,
            loss_fn: on_output(move |logits: &Tensor| {
                let lp = layout.token_log_probs(logits, &input_ids)?;
                let seq = row_sum(&lp, &mask)?;
                let pol = split(&seq, &lens)?;
                let refp = match &reference {
                    Some(r) => Some(split(r, &lens)?),
                    None => None,
                };
                let per = match loss {
                    LossChoice::Pairwise(l) => l.per_pair(&pol, refp.as_ref())?,
                    LossChoice::Kto {
                        beta,
                        desirable_weight,
                        undesirable_weight,
                    } => {
                        let r = reference.as_ref().ok_or_else(|| {
                            candle_core::Error::Msg("KTO needs a reference".into())
                        })?;
                        let ratio = (&seq - r)?;
                        let desirable: Vec<bool> = (0..2 * m).map(|i| i < m).collect();
                        kto_per_example(
                            &ratio,
                            &desirable,
                            z0,
                            beta,
                            desirable_weight,
                            undesirable_weight,
                        )?
                    }
                };
                // Implicit rewards: β (log π − log π_ref), or β · average log π without a reference.
                let (rc, rr) = match &refp {
                    Some(r) => ((&pol.chosen - &r.chosen)?, (&pol.rejected - &r.rejected)?),
                    None => (
                        (&pol.chosen / &pol.chosen_len)?,
                        (&pol.rejected / &pol.rejected_len)?,
                    ),
                };
                let rc: Vec<f32> = (rc.detach() * beta)?.to_vec1()?;
                let rr: Vec<f32> = (rr.detach() * beta)?.to_vec1()?;
                let sum = per.sum_all()?;
                let mut t = tally.borrow_mut();
                t[0] += m as f64;
                for (c, r) in rc.iter().zip(&rr) {
                    t[1] += (c > r) as u8 as f64;
                    t[2] += (c - r) as f64;
                    t[3] += *c as f64;
                    t[4] += *r as f64;
                }
                t[5] += sum.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
                Ok((sum / norm)?)
            }),
        })
    }

    /// KTO's z0 over `batch` (0 for the pairwise losses, which have none).
    fn reference_point(&self, policy: &Trainer, batch: &[&Record]) -> Result<f64> {
        match (self.loss, &self.reference) {
            (LossChoice::Kto { .. }, Some(r)) => {
                crate::kto::reference_point(policy, r, batch, self.pad)
            }
            _ => Ok(0.0),
        }
    }

    fn report(prefix: &str, v: &[f64], m: &mut Metrics) {
        let n = v[0].max(1.0);
        m.insert(format!("{prefix}reward_accuracy"), json!(v[1] / n));
        m.insert(format!("{prefix}reward_margin"), json!(v[2] / n));
        m.insert(format!("{prefix}chosen_reward"), json!(v[3] / n));
        m.insert(format!("{prefix}rejected_reward"), json!(v[4] / n));
    }
}

impl Method for Dpo {
    fn kind(&self) -> &'static str {
        "preference"
    }

    fn step(&mut self, policy: &mut Trainer, batch: &[&Record]) -> Result<Metrics> {
        // KTO's examples are the answers: twice the pairs.
        let norm = match self.loss {
            LossChoice::Kto { .. } => 2.0 * batch.len() as f64,
            _ => batch.len() as f64,
        };
        let mine = my_micro_batches(
            batch,
            policy.cfg.train.micro_batch_size,
            policy.rank(),
            policy.ranks(),
        );
        let z0 = self.reference_point(policy, batch)?;
        let tally: Tally = Rc::default();
        let mut m = step_metrics(policy.step_on(mine.len(), |me, i| {
            self.micro_batch(me, mine[i], norm, z0, tally.clone())
        })?);
        let t = *tally.borrow();
        let v = policy.sum_over_ranks(&t)?;
        Self::report("", &v, &mut m);
        if let LossChoice::Kto { .. } = self.loss {
            m.insert("kl".into(), json!(z0));
        }
        Ok(m)
    }

    fn evaluate(&mut self, policy: &Trainer, val: &[Record]) -> Result<Metrics> {
        let mut m = Metrics::new();
        let rows: Vec<&Record> = val.iter().collect();
        let z0 = self.reference_point(policy, &rows)?;
        let tally: Tally = Rc::default();
        forward_each(policy, val, |chunk| {
            self.micro_batch(policy, chunk, 1.0, z0, tally.clone())
        })?;
        let v = policy.sum_over_ranks(&*tally.borrow())?;
        if v[0] > 0.0 {
            m.insert("val_loss".into(), json!(v[5] / v[0]));
            Self::report("val_", &v, &mut m);
        }
        Ok(m)
    }

    fn curves(&self) -> Vec<(&'static str, Vec<&'static str>)> {
        vec![
            ("loss.png", vec!["loss", "val_loss"]),
            (
                "reward_margin.png",
                vec!["reward_margin", "val_reward_margin"],
            ),
        ]
    }
}
