//! The causal-LM trainer: the generic [`Engine`] over a LLaMA plus what only language
//! modelling needs — the packed pretraining data and its validation split, rank batches of
//! token sequences, NEFTune — and the LM step that ties them together.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use candle_core::Tensor;

use super::batch::{causal_lm_batch, count_targets};
use super::engine::Engine;
use super::neftune::{Neftune, NoiseOn};
use super::rank_batch::loss_of;
use crate::data::PackedDataset;
use crate::exec::{llama_inputs, on_output};
use crate::models::llama::{AttnInputs, Llama};
use crate::parallel::pipeline_run::MicroBatch;
use crate::Result;

pub struct Trainer {
    pub engine: Engine<Llama>,
    /// The packed pretraining data (`None` when the caller brings its own batches).
    pub(super) train_data: Option<PackedDataset>,
    pub(super) val_data: Option<PackedDataset>,
    /// NEFTune's switch (on during training steps), when `train.neftune_alpha > 0`.
    pub(super) neftune: Option<Arc<Neftune>>,
}

impl Deref for Trainer {
    type Target = Engine<Llama>;

    fn deref(&self) -> &Engine<Llama> {
        &self.engine
    }
}

impl DerefMut for Trainer {
    fn deref_mut(&mut self) -> &mut Engine<Llama> {
        &mut self.engine
    }
}

impl Trainer {
    /// Tokens per sequence of the pretraining data (0 without it).
    pub fn seq_len(&self) -> usize {
        self.train_data.as_ref().map_or(0, |d| d.manifest.seq_len)
    }

    /// One optimizer step over the next global batch of the pretraining data. Returns (loss,
    /// grad norm, lr).
    pub fn train_step(&mut self) -> Result<(f32, f64, f64)> {
        let (bs, mbs) = (self.cfg.train.batch_size, self.cfg.train.micro_batch_size);
        let (rank, ranks) = (self.rank(), self.ranks());
        let shuffle = self.cfg.data.shuffle;
        let cursor = self.state.cursor;
        let batch = self
            .train_data
            .as_mut()
            .ok_or_else(|| crate::msg!("this trainer was built without pretraining data"))?
            .batch(cursor, bs, shuffle)?;
        let aware = self.cfg.data.boundary_aware;
        // Normalise by the global batch's target count, so accumulation and any number of
        // ranks compute the same mean as one big batch.
        let norm = count_targets(&batch.seqs, aware).max(1) as f64;
        // Rank r runs micro-batches r, r + N, r + 2N, … of the global batch.
        let mine: Vec<_> = batch.seqs.chunks(mbs).skip(rank).step_by(ranks).collect();
        // Embedding noise for this step's forward passes only (seeded by the step: resumable).
        let noise = NoiseOn::start(
            self.neftune.as_deref(),
            self.cfg.train.seed ^ self.state.step.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let engine = &self.engine;
        let backward = engine.accumulate(mine.len(), |i| {
            let lm = causal_lm_batch(&engine.model, mine[i], aware, engine.device())?;
            let mb = engine.rank_batch(lm)?;
            let (targets, shifted, tp) = (mb.targets, mb.shifted, engine.tp.clone());
            let kernels = engine.model.kernels;
            Ok(MicroBatch {
                inputs: llama_inputs(&mb.ids),
                ctx: mb.ctx,
                loss_fn: on_output(move |logits: &Tensor| {
                    loss_of(kernels, tp.as_ref(), logits, &targets, shifted, norm)
                }),
            })
        })?;
        drop(noise);
        let out = self.engine.apply(backward)?;
        self.state.cursor += bs as u64;
        self.state.tokens_seen += (bs * self.seq_len()) as u64;
        Ok(out)
    }

    /// One optimizer step on micro-batches someone else built (`make(self, i)` gives this
    /// rank's i-th of `n`, whole sequences: under sequence parallelism each rank runs its
    /// positions). Each one's `loss_fn` maps this rank's model output to its share of the
    /// global loss (a sum divided by a global count), the same on every rank of a model
    /// replica ([`super::OutputLayout`] makes whole per-token quantities of the output), so N
    /// ranks step exactly as one would. The RLHF trainers drive the parallel machinery
    /// through this.
    pub fn step_on<F>(&mut self, n: usize, mut make: F) -> Result<(f32, f64, f64)>
    where
        F: FnMut(&Self, usize) -> Result<MicroBatch<'static, AttnInputs>>,
    {
        let layout = self.output_layout();
        let me = &*self;
        let mut backward = me.engine.accumulate(n, |i| {
            let mb = make(me, i)?;
            let (inputs, ctx) = layout.shard(&mb.inputs, &mb.ctx)?;
            Ok(MicroBatch {
                inputs,
                ctx,
                loss_fn: mb.loss_fn,
            })
        })?;
        // Every sequence-parallel rank computed the whole loss; the sum counted it sp times.
        backward.loss /= self.sp.as_ref().map_or(1, |g| g.size()) as f32;
        self.engine.apply(backward)
    }
}
