//! What the engine measures of itself for the metrics record: bytes sent over its groups, the
//! memory it holds per the layout's formulas, what it keeps on disk.

use super::engine::Engine;
use crate::models::ModelFamily;
use crate::parallel::{Zero3, ZeroOptimizer};

impl<M: ModelFamily> Engine<M> {
    /// What the engine measured of the last step, for its metrics record: bytes this rank
    /// sent, the memory it holds (parameters, gradients, optimizer state; resident and
    /// offloaded; a frozen base), the loss scale and a skipped step under fp16, the
    /// pipeline's bubble.
    pub fn last_step_metrics(&self) -> serde_json::Map<String, serde_json::Value> {
        use serde_json::json;
        let mut rec = serde_json::Map::new();
        rec.insert("comm_bytes".into(), json!(self.last_step_comm_bytes));
        if let Some(sc) = &self.state.loss_scaler {
            rec.insert("loss_scale".into(), json!(sc.scale));
        }
        if self.last_step_skipped {
            rec.insert("skipped".into(), json!(true));
        }
        if let (Some(b), Some(pp)) = (self.last_bubble, &self.pp) {
            let t = &self.cfg.train;
            let m = t.batch_size / t.micro_batch_size / self.ranks();
            rec.insert("pp_bubble".into(), json!(b));
            let theory = pp.schedule.theoretical_bubble(pp.comm.size(), m);
            rec.insert("pp_bubble_theory".into(), json!(theory));
        }
        let (mp, mg, mo) = self.memory_bytes();
        rec.insert("mem_params_bytes".into(), json!(mp));
        rec.insert("mem_grads_bytes".into(), json!(mg));
        rec.insert("mem_optim_bytes".into(), json!(mo));
        if self.params.is_frozen_any() {
            // A LoRA's base: dense, or codes and scales where it rests quantised.
            rec.insert("mem_frozen_bytes".into(), json!(self.params.frozen_bytes()));
        }
        rec.insert("offloaded_bytes".into(), json!(self.offloaded_bytes()));
        for (name, value) in self.model.counters() {
            rec.insert(name.into(), json!(value));
        }
        rec
    }

    /// What the expert-parallel group has exchanged so far (`None` without `parallel.ep`).
    pub fn expert_traffic(&self) -> Option<crate::parallel::expert::ExpertTraffic> {
        self.ep.as_ref().map(|e| e.ep.traffic())
    }

    /// Bytes this rank has sent over all its groups.
    pub(super) fn bytes_sent(&self) -> u64 {
        self.comm.as_ref().map_or(0, |c| c.stats().bytes_sent())
            + self.tp.as_ref().map_or(0, |t| t.group.bytes_sent())
            + self.pp.as_ref().map_or(0, |p| p.comm.stats().bytes_sent())
            + self.ep.as_ref().map_or(0, |e| e.bytes_sent())
    }

    /// Bytes of model state this rank keeps on disk.
    pub fn offloaded_bytes(&self) -> u64 {
        let ep = self.ep.as_ref();
        self.zero3
            .as_ref()
            .map(Zero3::offloaded_bytes)
            .or(self.zero.as_ref().map(ZeroOptimizer::offloaded_bytes))
            .unwrap_or(0)
            + ep.and_then(|e| e.zero.as_ref())
                .map_or(0, ZeroOptimizer::offloaded_bytes)
            + ep.and_then(|e| e.zero3.as_ref())
                .map_or(0, Zero3::offloaded_bytes)
    }

    /// Bytes this rank holds in memory for (parameters, gradients, optimizer moments), fp32.
    pub fn memory_bytes(&self) -> (u64, u64, u64) {
        if let Some(z) = &self.zero3 {
            let (p, g, o) = z.memory();
            let experts = self.ep.as_ref().and_then(|e| e.zero3.as_ref());
            let (ep, eg, eo) = experts.map_or((0, 0, 0), Zero3::memory);
            return (p + ep, g + eg, o + eo);
        }
        match (&self.zero, self.ep.as_ref().and_then(|e| e.zero.as_ref())) {
            (Some(z), Some(e)) => {
                let ((p, g, o), (ep, eg, eo)) = (z.memory(), e.memory());
                (p + ep, g + eg, o + eo)
            }
            (Some(z), None) => z.memory(),
            (None, _) => {
                let psi = self.params.num_elements() as u64;
                (4 * psi, 4 * psi, 8 * psi)
            }
        }
    }
}
