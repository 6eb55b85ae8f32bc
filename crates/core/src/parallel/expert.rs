//! Expert parallelism: the experts of every mixture-of-experts layer are split over a group
//! of ranks that hold the same weights — data-parallel ones, and sequence-parallel ones, which
//! route their parts of the sequences (each holds `experts / ep` of them, by index). Every rank routes
//! its own tokens, sends each (token, slot) row to the rank holding its expert, runs its
//! experts on all rows that arrive — one matmul per expert over every rank's tokens — and
//! sends the outputs back to be weighted and summed where the tokens live: two variable-size
//! all-to-alls per layer forward, two backward ([`crate::dist::exchange`]).
//!
//! Parameters outside the experts stay replicated over the data-parallel group; an expert's
//! gradient is summed over the ranks holding the same expert (the expert-data group).

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::Tensor;

use crate::dist::Group;
use crate::{Error, Result};

/// This rank's part of the experts and the group that shares them out.
#[derive(Clone)]
pub struct ExpertParallel {
    pub group: Group,
    /// Experts per layer (all ranks together).
    pub experts: usize,
    traffic: Arc<Traffic>,
}

/// Rows this rank has exchanged with the other ranks of its group, counted at each plan.
#[derive(Default)]
struct Traffic {
    plans: AtomicU64,
    rows_sent: AtomicU64,
    rows_received: AtomicU64,
}

/// What the expert group has moved so far (one rank's view).
#[derive(Clone, Copy, Debug)]
pub struct ExpertTraffic {
    /// Bytes this rank sent over the expert-parallel group.
    pub bytes_sent: u64,
    /// Token exchanges planned (one per MoE layer per forward).
    pub plans: u64,
    /// Token rows sent to, and received from, other ranks in those forwards.
    pub rows_sent: u64,
    pub rows_received: u64,
    pub ranks: u64,
    pub experts_per_rank: u64,
}

impl ExpertTraffic {
    /// The bytes a forward and backward of every plan should send with activations of
    /// `hidden` values of `dtype_bytes`: per plan the per-expert counts to each other rank
    /// (f32), then forward the dispatched rows out and the combined rows back, and backward
    /// the same rows the other way. When every block was `recomputed` before its backward
    /// (ZeRO-3, activation checkpointing), each exchange was planned twice, with the same
    /// rows, for one backward.
    pub fn formula_bytes(&self, hidden: u64, dtype_bytes: u64, recomputed: bool) -> u64 {
        let counts = self.plans * (self.ranks - 1) * self.experts_per_rank * 4;
        let forward = self.rows_sent + self.rows_received;
        let backward = if recomputed { forward / 2 } else { forward };
        counts + (forward + backward) * hidden * dtype_bytes
    }
}

impl std::fmt::Debug for ExpertParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ExpertParallel(rank {} of {}, experts {:?} of {})",
            self.group.rank(),
            self.group.size(),
            self.local(),
            self.experts
        )
    }
}

/// Where each routed row goes this micro-batch, and what arrives.
pub struct Dispatch {
    /// The (token · k + slot) entries in sending order: by destination rank, then expert,
    /// then token.
    pub order: Vec<u32>,
    /// Rows sent to / received from each rank.
    pub send: Vec<usize>,
    pub recv: Vec<usize>,
    /// For each local expert, the received rows routed to it.
    pub rows_of: Vec<Vec<u32>>,
}

impl ExpertParallel {
    pub fn new(group: Group, experts: usize) -> Result<Self> {
        if !experts.is_multiple_of(group.size()) {
            return Err(Error::Config(format!(
                "parallel.ep = {} does not divide the model's num_local_experts = {experts}",
                group.size()
            )));
        }
        Ok(Self {
            group,
            experts,
            traffic: Arc::default(),
        })
    }

    pub fn traffic(&self) -> ExpertTraffic {
        let t = &self.traffic;
        ExpertTraffic {
            bytes_sent: self.group.bytes_sent(),
            plans: t.plans.load(Ordering::Relaxed),
            rows_sent: t.rows_sent.load(Ordering::Relaxed),
            rows_received: t.rows_received.load(Ordering::Relaxed),
            ranks: self.group.size() as u64,
            experts_per_rank: self.per_rank() as u64,
        }
    }

    pub fn per_rank(&self) -> usize {
        self.experts / self.group.size()
    }

    /// The experts this rank holds.
    pub fn local(&self) -> Range<usize> {
        let n = self.per_rank();
        self.group.rank() * n..(self.group.rank() + 1) * n
    }

    /// Whether parameter `name` belongs to an expert, and which.
    pub fn expert_of(name: &str) -> Option<usize> {
        let rest = name.split(".experts.").nth(1)?;
        rest.split('.').next()?.parse().ok()
    }

    /// Whether this rank holds parameter `name` (every non-expert one, its own experts').
    pub fn holds(&self, name: &str) -> bool {
        Self::expert_of(name).is_none_or(|e| self.local().contains(&e))
    }

    /// The exchange plan for the routed `slots` (indices into `chosen`, k experts per token
    /// flattened): the send order and counts here, and — after one small all-to-all of the
    /// per-expert counts — what arrives.
    pub fn plan(&self, chosen: &[u32], slots: &[u32]) -> Result<Dispatch> {
        let (n, per) = (self.group.size(), self.per_rank());
        let mut order = slots.to_vec();
        // Destination and expert order are both the expert index (experts are split by range).
        order.sort_by_key(|&s| chosen[s as usize]);
        let mut counts = vec![0f32; self.experts];
        for &s in slots {
            counts[chosen[s as usize] as usize] += 1.0;
        }
        let send: Vec<usize> = (0..n)
            .map(|j| counts[j * per..(j + 1) * per].iter().sum::<f32>() as usize)
            .collect();
        let table = Tensor::from_vec(counts, (n, per), &candle_core::Device::Cpu)?;
        let got = self
            .group
            .with(|c| c.all_to_all(&table))?
            .to_vec2::<f32>()?;
        let recv: Vec<usize> = got.iter().map(|r| r.iter().sum::<f32>() as usize).collect();
        let me = self.group.rank();
        let others = |v: &Vec<usize>| (v.iter().sum::<usize>() - v[me]) as u64;
        let t = &self.traffic;
        t.plans.fetch_add(1, Ordering::Relaxed);
        t.rows_sent.fetch_add(others(&send), Ordering::Relaxed);
        t.rows_received.fetch_add(others(&recv), Ordering::Relaxed);
        // Received rows: by source rank, then local expert.
        let mut rows_of = vec![Vec::new(); per];
        let mut row = 0u32;
        for from in &got {
            for (le, &c) in from.iter().enumerate() {
                rows_of[le].extend(row..row + c as u32);
                row += c as u32;
            }
        }
        Ok(Dispatch {
            order,
            send,
            recv,
            rows_of,
        })
    }
}
