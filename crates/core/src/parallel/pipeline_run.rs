//! Executes one rank's pipeline schedule with the block-wise executor: each F runs a chunk of
//! blocks and sends its output on, each B runs the chunk's backward from the gradient that
//! came back and sends the input gradient further back. Messages carry a (kind, stage,
//! micro-batch) header, so a rank may receive them in any order its schedule needs; each
//! carries the whole set of tensors between blocks (or their gradients), by name.

use std::collections::HashMap;
use std::ops::Range;
use std::time::Instant;

use candle_core::{Device, Tensor};

use std::sync::Arc;

use super::pipeline::{stage_of, Op, Schedule};
use super::weight_grad::WeightGradStash;
use crate::dist::Communicator;
use crate::exec::{Acts, BlockModel, ChunkState, Executor, Hooks, LossFn, ParamSource};
use crate::params::Grads;
use crate::Result;

const ACTIVATION: u32 = 0;
const GRADIENT: u32 = 1;

type Key = (u32, usize, usize);

/// Point-to-point messages with a header; out-of-order arrivals wait in `pending`.
struct Mailbox<'a> {
    comm: &'a dyn Communicator,
    pending: HashMap<Key, Acts>,
}

impl Mailbox<'_> {
    /// Header (kind, stage, micro-batch, count), then each tensor's name and the tensor.
    fn send(&self, dst: usize, (kind, stage, mb): Key, acts: &Acts) -> Result<()> {
        let n = acts.len() as f32;
        let header = Tensor::new(&[kind as f32, stage as f32, mb as f32, n], &Device::Cpu)?;
        self.comm.send(&header, dst)?;
        for (name, t) in acts.iter() {
            let bytes: Vec<f32> = name.bytes().map(f32::from).collect();
            self.comm.send(&Tensor::new(bytes, &Device::Cpu)?, dst)?;
            self.comm.send(&t.contiguous()?, dst)?;
        }
        Ok(())
    }

    fn recv(&mut self, src: usize, key: Key) -> Result<Acts> {
        loop {
            if let Some(t) = self.pending.remove(&key) {
                return Ok(t);
            }
            let h: Vec<f32> = self.comm.recv(src)?.to_vec1()?;
            let mut acts = Acts::new();
            for _ in 0..h[3] as usize {
                let name: Vec<f32> = self.comm.recv(src)?.to_vec1()?;
                let name: String = name.iter().map(|&b| b as u8 as char).collect();
                acts.insert(&name, self.comm.recv(src)?);
            }
            self.pending
                .insert((h[0] as u32, h[1] as usize, h[2] as usize), acts);
        }
    }
}

/// One micro-batch: the model's inputs, its per-batch context and, for the last stage, the loss.
pub struct MicroBatch<'a, C> {
    pub inputs: Acts,
    pub ctx: C,
    pub loss_fn: Box<LossFn<'a>>,
}

/// What one rank measured while running its schedule.
#[derive(Clone, Debug, Default)]
pub struct StageReport {
    /// Sum of the losses of the micro-batches (last stage; 0 elsewhere).
    pub loss_sum: f32,
    /// Seconds spent computing (F, B, W) and in total, waits included.
    pub busy_s: f64,
    pub total_s: f64,
}

impl StageReport {
    /// Fraction of the run this rank was idle.
    pub fn bubble(&self) -> f64 {
        1.0 - self.busy_s / self.total_s.max(1e-12)
    }
}

/// This rank's part of a pipeline: the model, the schedule, and the blocks of every stage.
pub struct PipelineRank<'a, M: BlockModel> {
    pub model: &'a M,
    pub executor: Executor,
    /// The pipeline-parallel group.
    pub comm: &'a dyn Communicator,
    pub schedule: Schedule,
    /// Blocks of each global stage (`schedule.chunks() × pp` of them).
    pub stages: Vec<Range<usize>>,
    /// Under a zero-bubble schedule: where the model's projections leave their weight
    /// gradients during B, for W to compute (see [`super::weight_grad`]).
    pub stash: Option<Arc<WeightGradStash>>,
}

impl<M: BlockModel> PipelineRank<'_, M> {
    /// Blocks this rank runs, over all its chunks.
    pub fn blocks(&self) -> Vec<usize> {
        let (p, r) = (self.comm.size(), self.comm.rank());
        (0..self.schedule.chunks())
            .flat_map(|c| self.stages[stage_of(c, r, p)].clone())
            .collect()
    }

    /// Runs forward and backward of all micro-batches; parameter gradients go to `hooks`.
    pub fn run(
        &self,
        source: &mut dyn ParamSource,
        mbs: &[MicroBatch<'_, M::Ctx>],
        hooks: &mut dyn Hooks,
    ) -> Result<StageReport> {
        let (p, r) = (self.comm.size(), self.comm.rank());
        let last = self.stages.len() - 1;
        let (prev, next) = ((r + p - 1) % p, (r + 1) % p);
        let mut mail = Mailbox {
            comm: self.comm,
            pending: HashMap::new(),
        };
        let mut states: HashMap<(usize, usize), ChunkState> = HashMap::new();
        let mut report = StageReport::default();
        let started = Instant::now();
        for op in self.schedule.ops(r, p, mbs.len())? {
            match op {
                Op::F { chunk, mb } => {
                    let (state, loss, busy) =
                        self.forward_chunk(&mut mail, source, chunk, mb, mbs, hooks)?;
                    report.busy_s += busy;
                    report.loss_sum += loss.unwrap_or(0.0);
                    states.insert((chunk, mb), state);
                }
                Op::B { chunk, mb } => {
                    let s = stage_of(chunk, r, p);
                    let grad_out = if s == last {
                        None
                    } else {
                        Some(mail.recv(next, (GRADIENT, s, mb))?)
                    };
                    let state = states.remove(&(chunk, mb)).expect("F before B");
                    let t0 = Instant::now();
                    let deferring = self.schedule == Schedule::ZbH1;
                    if let (true, Some(stash)) = (deferring, &self.stash) {
                        stash.begin((chunk, mb));
                    }
                    let grad_in = self.executor.chunk_backward(
                        self.model,
                        source,
                        state,
                        grad_out.as_ref(),
                        &mbs[mb].ctx,
                        hooks,
                    );
                    if let Some(stash) = &self.stash {
                        stash.end();
                    }
                    let grad_in = grad_in?;
                    report.busy_s += t0.elapsed().as_secs_f64();
                    if s > 0 {
                        let g = grad_in.expect("a chunk after block 0 has an input gradient");
                        mail.send(prev, (GRADIENT, s - 1, mb), &g)?;
                    }
                }
                Op::W { chunk, mb } => {
                    let Some(stash) = &self.stash else {
                        return Err(crate::msg!(
                            "the zbh1 schedule needs the model's weight gradients deferrable (PipelineRank::stash)"
                        ));
                    };
                    let t0 = Instant::now();
                    let blocks = self.stages[stage_of(chunk, r, p)].clone();
                    // Hand each weight gradient to the sink with the block that owns it.
                    for (name, g) in stash.take((chunk, mb))? {
                        let block = blocks
                            .clone()
                            .find(|&b| self.model.block_param_names(b).contains(&name))
                            .ok_or_else(|| {
                                crate::msg!("deferred gradient for {name} outside its chunk")
                            })?;
                        hooks.after_backward(block, vec![(name, g)])?;
                    }
                    report.busy_s += t0.elapsed().as_secs_f64();
                }
            }
        }
        report.total_s = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Forward only (evaluation): every micro-batch through every stage; returns the sum of
    /// the losses on the last stage (0 elsewhere).
    pub fn forward_only(
        &self,
        source: &mut dyn ParamSource,
        mbs: &[MicroBatch<'_, M::Ctx>],
    ) -> Result<f32> {
        let mut mail = Mailbox {
            comm: self.comm,
            pending: HashMap::new(),
        };
        let mut nothing = crate::exec::GradAccumulator::default();
        let mut loss = 0.0;
        for mb in 0..mbs.len() {
            for chunk in 0..self.schedule.chunks() {
                let (_, l, _) =
                    self.forward_chunk(&mut mail, source, chunk, mb, mbs, &mut nothing)?;
                loss += l.unwrap_or(0.0);
            }
        }
        Ok(loss)
    }

    /// F of (chunk, micro-batch): input from the previous stage (or the batch itself), the
    /// chunk's forward, output on to the next stage. Returns the chunk's state, the loss when
    /// the chunk ends the model, and the seconds spent computing.
    fn forward_chunk(
        &self,
        mail: &mut Mailbox<'_>,
        source: &mut dyn ParamSource,
        chunk: usize,
        mb: usize,
        mbs: &[MicroBatch<'_, M::Ctx>],
        hooks: &mut dyn Hooks,
    ) -> Result<(ChunkState, Option<f32>, f64)> {
        let (p, r) = (self.comm.size(), self.comm.rank());
        let s = stage_of(chunk, r, p);
        let last = s + 1 == self.stages.len();
        let input = if s == 0 {
            mbs[mb].inputs.clone()
        } else {
            mail.recv((r + p - 1) % p, (ACTIVATION, s, mb))?
        };
        let t0 = Instant::now();
        let loss_fn = last.then_some(&*mbs[mb].loss_fn);
        let blocks = self.stages[s].clone();
        let (out, state) = self.executor.chunk_forward(
            self.model,
            source,
            blocks,
            &input,
            &mbs[mb].ctx,
            loss_fn,
            hooks,
        )?;
        let busy = t0.elapsed().as_secs_f64();
        let loss = state.loss_value()?;
        if loss.is_none() {
            mail.send((r + 1) % p, (ACTIVATION, s + 1, mb), &out)?;
        }
        Ok((state, loss, busy))
    }

    /// Sums the gradient of a weight used by the first and the last stage (tied embeddings)
    /// between the two ranks holding them (a collective of the pipeline group).
    pub fn sync_tied(&self, grads: &mut Grads, name: &str) -> Result<()> {
        let (p, r) = (self.comm.size(), self.comm.rank());
        let (first, last) = (&self.stages[0], &self.stages[self.stages.len() - 1]);
        let uses = |range: &Range<usize>| {
            range
                .clone()
                .any(|b| self.model.block_param_names(b).iter().any(|n| n == name))
        };
        if p == 1 || !uses(first) || !uses(last) {
            return Ok(());
        }
        // Stage 0 is on rank 0, the last stage on rank p − 1.
        let peer = match r {
            0 => p - 1,
            x if x == p - 1 => 0,
            _ => return Ok(()),
        };
        let mine = grads.get(name).cloned();
        let mine = mine.ok_or_else(|| crate::msg!("no gradient for tied weight {name}"))?;
        self.comm.send(&mine, peer)?;
        let theirs = self.comm.recv(peer)?;
        // Same order of addition on both ranks, so both hold bit-identical sums.
        let sum = if r == 0 {
            (&mine + &theirs)?
        } else {
            (&theirs + &mine)?
        };
        grads.set(name, sum);
        Ok(())
    }
}
