//! ZeRO stages 1 and 2 over the data-parallel group.
//!
//! All parameters, in checkpoint order, form one flat vector of Ψ elements padded to N·s;
//! rank r owns elements [r·s, (r+1)·s) and keeps the AdamW moments of that shard only.
//! Complete gradients are reduce-scattered into the owners' shards, each owner updates its shard,
//! and the updated shards are all-gathered back into every rank's full parameters.
//!
//! Per-rank memory (fp32, Ψ parameters, N ranks, s = ⌈Ψ/N⌉):
//! * stage 0 (plain DP): parameters 4Ψ + gradients 4Ψ + moments 8Ψ = 16Ψ bytes;
//! * stage 1: parameters 4Ψ + gradients 4Ψ (accumulated locally, reduced in the last
//!   micro-batch) + moments 8s ≈ 8Ψ + 8Ψ/N;
//! * stage 2: parameters 4Ψ + gradient shard 4s (plus one bucket in flight; every
//!   micro-batch's gradients are reduce-scattered as they complete) + moments 8s ≈ 4Ψ + 12Ψ/N.
//!
//! Communication per step and rank: reduce-scatter Ψ(N−1)/N + all-gather Ψ(N−1)/N elements
//! = 2Ψ(N−1)/N, as plain DP's all-reduce (stage 2 with k micro-batches per rank sends the
//! reduce-scatter k times: this trades traffic for the gradient memory).

use std::collections::HashMap;
use std::ops::Range;

use candle_core::{DType, Device, Tensor};

use super::offload::{Placement, StateBuf};
use super::state_ops::{adam_update, SqSum};
use crate::dist::{Communicator, ReduceOp};
use crate::exec::Hooks;
use crate::optim::{AdamW, AdamWConfig, AdamWKernel};
use crate::params::{Grads, Params};
use crate::Result;

#[derive(Clone, Debug)]
pub struct FlatEntry {
    pub name: String,
    pub offset: usize,
    pub len: usize,
}

/// Where each parameter sits in the flat vector, and the shard size.
#[derive(Clone, Debug)]
pub struct FlatLayout {
    pub entries: Vec<FlatEntry>,
    index: HashMap<String, usize>,
    pub numel: usize,
    pub shard: usize,
    pub ranks: usize,
}

impl FlatLayout {
    pub fn new(params: &Params, ranks: usize) -> Self {
        let mut entries = Vec::new();
        let mut offset = 0;
        for (name, var) in params.iter() {
            let len = var.elem_count();
            entries.push(FlatEntry {
                name: name.to_string(),
                offset,
                len,
            });
            offset += len;
        }
        let index = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        Self {
            entries,
            index,
            numel: offset,
            shard: offset.div_ceil(ranks),
            ranks,
        }
    }

    pub fn shard_range(&self, rank: usize) -> Range<usize> {
        rank * self.shard..(rank + 1) * self.shard
    }

    /// Part of parameter `name`'s range inside rank `rank`'s shard, as flat indices.
    fn overlap(&self, name: &str, rank: usize) -> Option<Range<usize>> {
        let e = &self.entries[*self.index.get(name)?];
        let s = self.shard_range(rank);
        let (a, b) = (e.offset.max(s.start), (e.offset + e.len).min(s.end));
        (a < b).then_some(a..b)
    }

    /// (entry, flat range) for every parameter piece inside `rank`'s shard.
    pub fn pieces(&self, rank: usize) -> Vec<(&FlatEntry, Range<usize>)> {
        self.entries
            .iter()
            .filter_map(|e| self.overlap(&e.name, rank).map(|r| (e, r)))
            .collect()
    }
}

/// Gradient sink for stages 1 and 2: complete gradients go, bucket by bucket, to the ranks
/// owning their elements; this rank keeps the sum for its own shard.
pub struct ZeroGradSink<'a> {
    comm: &'a dyn Communicator,
    layout: &'a FlatLayout,
    stage: u8,
    ready_at: HashMap<String, usize>,
    bucket_bytes: usize,
    pub last_micro_batch: bool,
    local: Grads,
    /// Complete gradients waiting to be sent, flattened to f32 where they were computed.
    bucket: Vec<(String, Tensor)>,
    bucket_len: usize,
    shard_grad: StateBuf,
}

impl<'a> ZeroGradSink<'a> {
    pub fn new(
        comm: &'a dyn Communicator,
        layout: &'a FlatLayout,
        stage: u8,
        ready_at: HashMap<String, usize>,
        bucket_bytes: usize,
        placement: &Placement,
    ) -> Result<Self> {
        // The shard's gradient sum lives with the moments on a device; on the host it is
        // transient and small, so never on disk.
        let at = match placement {
            Placement::Device(d) => Placement::Device(d.clone()),
            _ => Placement::Memory,
        };
        let shard_grad = StateBuf::new(&at, "grad", vec![0.0; layout.shard])?;
        Ok(Self {
            comm,
            layout,
            stage,
            ready_at,
            bucket_bytes: bucket_bytes.max(1),
            last_micro_batch: false,
            local: Grads::new(),
            bucket: Vec::new(),
            bucket_len: 0,
            shard_grad,
        })
    }

    /// Sends each peer the bucket's elements it owns and adds what peers send for ours.
    fn flush(&mut self) -> Result<()> {
        let (me, n) = (self.comm.rank(), self.comm.size());
        let part = |rank: usize, bucket: &[(String, Tensor)]| -> Result<Option<Tensor>> {
            let mut pieces = Vec::new();
            for (name, g) in bucket {
                if let Some(r) = self.layout.overlap(name, rank) {
                    let off = self.layout.entries[self.layout.index[name]].offset;
                    pieces.push(g.narrow(0, r.start - off, r.len())?);
                }
            }
            Ok(match pieces.len() {
                0 => None,
                1 => pieces.pop(),
                _ => Some(Tensor::cat(&pieces, 0)?),
            })
        };
        for peer in (0..n).filter(|&p| p != me) {
            if let Some(data) = part(peer, &self.bucket)? {
                self.comm.send(&data, peer)?;
            }
        }
        // Every peer sends its copy of the same elements (the bucket holds the same parameters
        // on every rank), so nothing arrives when this rank owns none of them.
        let Some(mine) = part(me, &self.bucket)? else {
            self.bucket.clear();
            self.bucket_len = 0;
            return Ok(());
        };
        let mut incoming = vec![mine];
        for peer in (0..n).filter(|&p| p != me) {
            incoming.push(self.comm.recv(peer)?);
        }
        // Destination offsets of this rank's pieces, in bucket order.
        let shard_start = self.layout.shard_range(me).start;
        for data in incoming {
            let mut k = 0;
            for (name, _) in &self.bucket {
                if let Some(r) = self.layout.overlap(name, me) {
                    let piece = data.narrow(0, k, r.len())?;
                    self.shard_grad.add_at(r.start - shard_start, &piece)?;
                    k += r.len();
                }
            }
        }
        self.bucket.clear();
        self.bucket_len = 0;
        Ok(())
    }

    /// This rank's gradient shard, summed over ranks and micro-batches.
    pub fn finish(mut self) -> Result<StateBuf> {
        self.flush()?;
        if !self.local.is_empty() {
            return Err(crate::msg!("ZeRO: the last micro-batch was never marked"));
        }
        Ok(self.shard_grad)
    }
}

impl Hooks for ZeroGradSink<'_> {
    fn after_backward(&mut self, block: usize, grads: Vec<(String, Tensor)>) -> Result<()> {
        let reduce_now = self.stage >= 2 || self.last_micro_batch;
        let mut complete = Vec::new();
        for (name, g) in grads {
            if reduce_now && self.ready_at.get(&name).is_none_or(|&b| b == block) {
                complete.push(name.clone());
            }
            self.local.accumulate(&name, g)?;
        }
        for name in complete {
            let g = self.local.take(&name).expect("just accumulated");
            let g = g.to_dtype(DType::F32)?.flatten_all()?;
            self.bucket_len += g.elem_count() * 4;
            self.bucket.push((name, g));
            if self.bucket_len >= self.bucket_bytes {
                self.flush()?;
            }
        }
        Ok(())
    }
}

/// AdamW over this rank's shard of the flat parameters.
pub struct ZeroOptimizer {
    pub stage: u8,
    pub layout: FlatLayout,
    pub adam: AdamW,
    rank: usize,
    m: StateBuf,
    v: StateBuf,
    pub placement: Placement,
}

impl ZeroOptimizer {
    /// Takes this rank's shard of a full optimizer's moments (fresh or loaded from a checkpoint).
    /// `placement`: the moments in memory or in files on disk.
    pub fn from_full(
        stage: u8,
        layout: FlatLayout,
        rank: usize,
        full: &AdamW,
        placement: &Placement,
    ) -> Result<Self> {
        let mut m = vec![0.0; layout.shard];
        let mut v = vec![0.0; layout.shard];
        let start = layout.shard_range(rank).start;
        for (e, r) in layout.pieces(rank) {
            let src = r.start - e.offset..r.end - e.offset;
            let dst = r.start - start..r.end - start;
            if let Some(fm) = full.m.get(&e.name) {
                m[dst.clone()].copy_from_slice(&fm.host()?[src.clone()]);
            }
            if let Some(fv) = full.v.get(&e.name) {
                v[dst].copy_from_slice(&fv.host()?[src]);
            }
        }
        let adam = AdamW {
            cfg: full.cfg.clone(),
            step: full.step,
            m: HashMap::new(),
            v: HashMap::new(),
        };
        let m = StateBuf::new(placement, "exp_avg", m)?;
        let v = StateBuf::new(placement, "exp_avg_sq", v)?;
        Ok(Self {
            stage,
            layout,
            adam,
            rank,
            m,
            v,
            placement: placement.clone(),
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.adam.cfg
    }

    /// L2 norm of the whole gradient, from every rank's shard.
    pub fn grad_norm(&self, comm: &dyn Communicator, grad: &StateBuf) -> Result<f64> {
        let mut sq = SqSum::default();
        sq.add_all(grad, 1.0)?;
        let local = sq.total()?;
        let total = comm.all_reduce(&Tensor::new(&[local], &Device::Cpu)?, ReduceOp::Sum)?;
        Ok(total.to_vec1::<f64>()?[0].sqrt())
    }

    /// Clips by the global `norm` (see [`Self::grad_norm`]), updates this shard, all-gathers the
    /// result into every parameter.
    pub fn step(
        &mut self,
        comm: &dyn Communicator,
        params: &Params,
        mut grad: StateBuf,
        lr: f64,
        max_norm: f64,
        norm: f64,
    ) -> Result<()> {
        if max_norm > 0.0 {
            let coef = (max_norm / (norm + 1e-6)).min(1.0);
            if coef < 1.0 {
                grad.scale(coef)?;
            }
        }
        self.adam.step += 1;
        let k = AdamWKernel::new(&self.adam.cfg, self.adam.step, lr);
        let start = self.layout.shard_range(self.rank).start;
        let pieces = self.layout.pieces(self.rank);
        let mut shard = self.param_shard(params, &pieces)?;
        for (e, r) in pieces {
            let decay = self.adam.decay_factor(&e.name, lr);
            let d = r.start - start..r.end - start;
            adam_update(&k, decay, d, &mut shard, &grad, &mut self.m, &mut self.v)?;
        }
        self.m.release()?;
        self.v.release()?;
        let full = comm.all_gather(&shard.tensor()?)?;
        for e in &self.layout.entries {
            let var = params.var(&e.name)?;
            let t = full
                .narrow(0, e.offset, e.len)?
                .reshape(var.shape())?
                .to_dtype(var.dtype())?;
            var.set(&t.to_device(var.device())?)?;
        }
        Ok(())
    }

    /// This rank's shard of the flat parameters (f32, zero padding after the last piece), where
    /// the moments live. `pieces` tile the shard in order from its start.
    fn param_shard(
        &self,
        params: &Params,
        pieces: &[(&FlatEntry, Range<usize>)],
    ) -> Result<StateBuf> {
        let piece = |e: &FlatEntry, r: &Range<usize>| -> Result<Tensor> {
            let p = params.get(&e.name)?.flatten_all()?;
            Ok(p.narrow(0, r.start - e.offset, r.len())?
                .to_dtype(DType::F32)?)
        };
        let used: usize = pieces.iter().map(|(_, r)| r.len()).sum();
        if let StateBuf::Dev(m) = &self.m {
            let mut parts = pieces
                .iter()
                .map(|(e, r)| Ok(piece(e, r)?.to_device(m.device())?))
                .collect::<Result<Vec<_>>>()?;
            if used < self.layout.shard {
                parts.push(Tensor::zeros(
                    self.layout.shard - used,
                    DType::F32,
                    m.device(),
                )?);
            }
            return Ok(StateBuf::Dev(Tensor::cat(&parts, 0)?.contiguous()?));
        }
        let mut shard = Vec::with_capacity(self.layout.shard);
        for (e, r) in pieces {
            shard.extend(piece(e, r)?.to_vec1::<f32>()?);
        }
        shard.resize(self.layout.shard, 0.0);
        Ok(StateBuf::Mem(shard))
    }

    /// The full moments (all-gathered), as a plain `AdamW` for checkpointing.
    pub fn gather_full(&self, comm: &dyn Communicator) -> Result<AdamW> {
        let m = comm.all_gather(&self.m.tensor()?)?.to_vec1::<f32>()?;
        let v = comm.all_gather(&self.v.tensor()?)?.to_vec1::<f32>()?;
        let mut full = AdamW::new(self.adam.cfg.clone());
        full.step = self.adam.step;
        for e in &self.layout.entries {
            full.m.insert(
                e.name.clone(),
                m[e.offset..e.offset + e.len].to_vec().into(),
            );
            full.v.insert(
                e.name.clone(),
                v[e.offset..e.offset + e.len].to_vec().into(),
            );
        }
        Ok(full)
    }

    /// Bytes this rank holds for (parameters, gradients, optimizer moments), per the formulas
    /// in the module docs (fp32).
    pub fn memory(&self) -> (u64, u64, u64) {
        let psi = self.layout.numel as u64;
        let grads = if self.stage >= 2 {
            4 * self.layout.shard as u64
        } else {
            4 * psi
        };
        (
            4 * psi,
            grads,
            self.m.resident_bytes() + self.v.resident_bytes(),
        )
    }

    /// Whether the moments live on a device.
    pub fn on_device(&self) -> bool {
        self.m.is_device() && self.v.is_device()
    }

    /// Bytes of moments kept on disk.
    pub fn offloaded_bytes(&self) -> u64 {
        self.m.offloaded_bytes() + self.v.offloaded_bytes()
    }
}
