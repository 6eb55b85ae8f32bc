//! Mixtral's sparse mixture-of-experts block and its load-balancing loss, as transformers
//! computes them: router softmax over experts, top-k, the k weights renormalised, each expert
//! a SwiGLU MLP (`w2(silu(w1 x) · w3 x)`) run once on all the tokens routed to it.
//!
//! In training the loss needs every layer's routing, but the block-wise executor keeps no
//! layer's graph beyond its block. HF's loss is `E · Σ_{k,e} f_{k,e} · P_e` with `f` the
//! fraction of tokens sent to expert e in slot k and `P` the mean router probability, both
//! means over all layers' tokens, so it needs only three running sums, carried between blocks
//! as streams: Σ probabilities (with its gradient back to every router), Σ one-hot choices
//! and the token count (no gradient).

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Tensor};

use super::{AttnInputs, Llama};
use crate::dist::exchange;
use crate::exec::Acts;
use crate::parallel::expert::ExpertParallel;
use crate::params::Params;
use crate::Result;

/// Streams between blocks of a mixture-of-experts model.
pub const MOE_PROB: &str = "moe.prob";
pub const MOE_HOT: &str = "moe.hot";
pub const MOE_TOKENS: &str = "moe.tokens";
/// Σ over tokens of the squared log-sum-exp of the router logits (router z-loss).
pub const MOE_Z: &str = "moe.z";

/// Routed slots and those dropped for want of expert capacity, since the model was made.
#[derive(Debug, Default)]
pub struct MoeCounts {
    routed: AtomicU64,
    dropped: AtomicU64,
}

impl MoeCounts {
    fn record(&self, routed: usize, dropped: usize) {
        self.routed.fetch_add(routed as u64, Ordering::Relaxed);
        self.dropped.fetch_add(dropped as u64, Ordering::Relaxed);
    }

    /// (routed, dropped) so far.
    pub fn get(&self) -> (u64, u64) {
        (
            self.routed.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
        )
    }
}

/// One MoE layer's routing: the router logits (tokens, experts), their softmax, and the
/// chosen experts (k per token, most probable first).
pub struct Routing {
    pub logits: Tensor,
    pub probs: Tensor,
    pub chosen: Vec<u32>,
}

impl Llama {
    /// MoE layer `l` on the normed stream `h` (B, T, H): the output and the routing.
    pub(super) fn moe(&self, l: usize, p: &Params, h: &Tensor) -> Result<(Tensor, Routing)> {
        let c = &self.cfg;
        let (b, t, hidden) = h.dims3()?;
        let n = b * t;
        let experts = c.num_local_experts.unwrap_or(0);
        let k = c.experts_per_token();
        let pre = format!("model.layers.{l}.block_sparse_moe.");
        let x = h.reshape((1, n, hidden))?;
        let router = self
            .proj(p, &format!("{pre}gate.weight"), &x, None, None)?
            .squeeze(0)?;
        let probs = self.kernels.softmax(&router.to_dtype(DType::F32)?)?;
        // The selection is discrete (no gradient); the weights of the chosen experts are not.
        let chosen = top_k(&probs.to_vec2()?, k);
        let idx = Tensor::from_vec(chosen.clone(), (n, k), h.device())?;
        let top = probs.gather(&idx, 1)?;
        let top = top
            .broadcast_div(&top.sum_keepdim(1)?)?
            .to_dtype(h.dtype())?
            .flatten_all()?;
        let flat = x.squeeze(0)?;
        let slots = self.within_capacity(&chosen, n);
        self.moe_counts
            .record(chosen.len(), chosen.len() - slots.len());
        let routing = Routing {
            logits: router,
            probs,
            chosen,
        };
        if let Some(ep) = &self.ep {
            let out = self.moe_dispatched(l, p, ep, &flat, &routing.chosen, &slots, &top)?;
            return Ok((out.reshape((b, t, hidden))?, routing));
        }
        let chosen = &routing.chosen;
        let mut out = flat.zeros_like()?;
        for e in 0..experts as u32 {
            let (tokens, slots): (Vec<u32>, Vec<u32>) = slots
                .iter()
                .filter(|&&s| chosen[s as usize] == e)
                .map(|&s| (s / k as u32, s))
                .unzip();
            if tokens.is_empty() {
                continue;
            }
            let tokens = Tensor::new(tokens.as_slice(), h.device())?;
            let weight = top.index_select(&Tensor::new(slots.as_slice(), h.device())?, 0)?;
            let y = self.expert(l, e as usize, p, &flat.index_select(&tokens, 0)?)?;
            let y = y.broadcast_mul(&weight.unsqueeze(1)?)?;
            out = out.index_add(&tokens, &y, 0)?;
        }
        Ok((out.reshape((b, t, hidden))?, routing))
    }

    /// Expert `e` of layer `l` (a SwiGLU MLP) on rows `x` (rows, H), all in one matmul each.
    fn expert(&self, l: usize, e: usize, p: &Params, x: &Tensor) -> Result<Tensor> {
        let w = |m: &str| format!("model.layers.{l}.block_sparse_moe.experts.{e}.{m}.weight");
        let x = x.unsqueeze(0)?;
        let gate = self.proj(p, &w("w1"), &x, None, None)?;
        let up = self.proj(p, &w("w3"), &x, None, None)?;
        let act = self.kernels.swiglu(&gate, &up)?;
        Ok(self.proj(p, &w("w2"), &act, None, None)?.squeeze(0)?)
    }

    /// The experts under expert parallelism: this rank's rows `flat` (N, H) go to the ranks
    /// holding their experts, this rank's experts run on every rank's rows sent to them, and
    /// the outputs come back to be weighted by `top` (N·k) and summed per token.
    #[allow(clippy::too_many_arguments)]
    fn moe_dispatched(
        &self,
        l: usize,
        p: &Params,
        ep: &ExpertParallel,
        flat: &Tensor,
        chosen: &[u32],
        slots: &[u32],
        top: &Tensor,
    ) -> Result<Tensor> {
        let k = self.cfg.experts_per_token();
        let dev = flat.device();
        let plan = ep.plan(chosen, slots)?;
        let tokens: Vec<u32> = plan.order.iter().map(|&s| s / k as u32).collect();
        let tokens = Tensor::new(tokens.as_slice(), dev)?;
        let sent = flat.index_select(&tokens, 0)?;
        let arrived = exchange(&sent, &plan.send, &plan.recv, &ep.group)?;
        // Tied to `arrived` even when no row arrives, so every rank runs the backward
        // exchange its peers wait for.
        let mut done = (&arrived * 0.0)?;
        for (le, rows) in plan.rows_of.iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let rows = Tensor::new(rows.as_slice(), dev)?;
            let e = ep.local().start + le;
            let y = self.expert(l, e, p, &arrived.index_select(&rows, 0)?)?;
            done = done.index_add(&rows, &y, 0)?;
        }
        let back = exchange(&done, &plan.recv, &plan.send, &ep.group)?;
        let weight = top.index_select(&Tensor::new(plan.order.as_slice(), dev)?, 0)?;
        let y = back.broadcast_mul(&weight.unsqueeze(1)?)?;
        Ok(flat.zeros_like()?.index_add(&tokens, &y, 0)?)
    }

    /// The routed slots (token · k + j) each expert takes within its capacity, in slot order:
    /// all of them without `capacity_factor`; with it, at most ⌈factor · N · k / E⌉ per
    /// expert, every token's first choice before any second choice, tokens in order.
    pub fn within_capacity(&self, chosen: &[u32], n: usize) -> Vec<u32> {
        let Some(factor) = self.cfg.capacity_factor else {
            return (0..chosen.len() as u32).collect();
        };
        let k = self.cfg.experts_per_token();
        let experts = self.cfg.num_local_experts.unwrap_or(1);
        let capacity = (factor * (n * k) as f64 / experts as f64).ceil() as usize;
        let mut taken = vec![0usize; experts];
        let mut keep = vec![false; chosen.len()];
        for j in 0..k {
            for i in 0..n {
                let e = chosen[i * k + j] as usize;
                if taken[e] < capacity {
                    taken[e] += 1;
                    keep[i * k + j] = true;
                }
            }
        }
        (0..chosen.len() as u32)
            .filter(|&s| keep[s as usize])
            .collect()
    }

    /// Adds layer `routing`'s sums over the valid tokens of `inp` to the streams of `x`,
    /// into `out`.
    pub fn add_routing_streams(
        &self,
        x: &Acts,
        routing: &Routing,
        inp: &AttnInputs,
        out: &mut Acts,
    ) -> Result<()> {
        let experts = self.cfg.num_local_experts.unwrap_or(1);
        let k = self.cfg.experts_per_token();
        let n = routing.probs.dim(0)?;
        let dev = routing.probs.device();
        let valid = inp.token_valid(n)?;
        let mut hot = vec![0f32; k * experts];
        for (slot, &e) in routing.chosen.iter().enumerate() {
            hot[(slot % k) * experts + e as usize] += valid[slot / k];
        }
        let count = valid.iter().sum::<f32>();
        let w = Tensor::from_vec(valid, (n, 1), dev)?;
        let prob = routing.probs.broadcast_mul(&w)?.sum(0)?;
        let hot = Tensor::from_vec(hot, (k, experts), dev)?;
        let count = Tensor::new(&[count], dev)?;
        let mut sums = vec![(MOE_PROB, prob), (MOE_HOT, hot), (MOE_TOKENS, count)];
        if self.cfg.router_z_loss_coef.is_some_and(|c| c > 0.0) {
            let lse = routing.logits.to_dtype(DType::F32)?.log_sum_exp(1)?;
            let z = lse.sqr()?.unsqueeze(1)?.broadcast_mul(&w)?.sum_all()?;
            sums.push((MOE_Z, z.reshape(1)?));
        }
        for (name, t) in sums {
            let sum = match x.get(name) {
                Ok(before) => (before + t)?,
                Err(_) => t,
            };
            out.insert(name, sum);
        }
        Ok(())
    }

    /// The load-balancing loss from the streams the last block passes on (`None` for a dense
    /// model), times `router_aux_loss_coef`: what a training step adds to each micro-batch's
    /// loss.
    pub fn aux_loss_of_streams(&self, out: &Acts) -> Result<Option<Tensor>> {
        let (Ok(prob), Ok(hot), Ok(count)) =
            (out.get(MOE_PROB), out.get(MOE_HOT), out.get(MOE_TOKENS))
        else {
            return Ok(None);
        };
        let coef = self.cfg.router_aux_loss_coef.unwrap_or(0.0);
        let experts = self.cfg.num_local_experts.unwrap_or(1) as f64;
        // Under sequence parallelism each rank's sums cover its part of the sequence.
        let whole = |t: &Tensor| self.regions.sequence_sum(t);
        let ((prob, ranks), (hot, _), (count, _)) = (whole(prob)?, whole(hot)?, whole(count)?);
        let total = count.to_vec1::<f32>()?[0].max(1.0) as f64;
        let loss = hot.broadcast_mul(&prob.unsqueeze(0)?)?.sum_all()?;
        let mut loss = (loss * (coef * experts / (total * total)))?;
        if let (Ok(z), Some(zc)) = (out.get(MOE_Z), self.cfg.router_z_loss_coef) {
            let (z, _) = whole(z)?;
            loss = (loss + (z.sum_all()? * (zc / total))?)?;
        }
        if ranks > 1 {
            // Every rank of the sequence holds the whole loss: each adds 1/ranks of its value
            // (the ranks' losses sum to it) but all of its gradient, which reaches only that
            // rank's own tokens.
            let share = (&loss * (1.0 / ranks as f64))?;
            loss = (share + ((&loss - loss.detach())? * (1.0 - 1.0 / ranks as f64))?)?;
        }
        Ok(Some(loss))
    }
}

impl super::LlamaConfig {
    /// Mixture-of-experts fields: a possible top-k, no expert biases, and the optional knobs
    /// (z-loss, capacity) only with experts.
    pub(super) fn validate_moe(&self) -> Result<()> {
        let bad = |m: String| Err(crate::Error::Config(m));
        if let Some(e) = self.num_local_experts {
            let k = self.experts_per_token();
            if e == 0 || k == 0 || k > e {
                return bad(format!(
                    "num_experts_per_tok {k} must be between 1 and num_local_experts {e}"
                ));
            }
            if self.mlp_bias {
                return bad("mlp_bias with experts: Mixtral's experts have no bias".into());
            }
        }
        let moe_knobs = [
            ("router_z_loss_coef", self.router_z_loss_coef),
            ("capacity_factor", self.capacity_factor),
        ];
        for (k, v) in moe_knobs {
            match (v, self.num_local_experts) {
                (Some(v), _) if !(v.is_finite() && v >= 0.0) => {
                    return bad(format!("`{k}` = {v}: expected a number ≥ 0"))
                }
                (Some(v), None) if v != 0.0 => {
                    return bad(format!(
                        "`{k}` = {v} needs num_local_experts (a mixture of experts)"
                    ))
                }
                _ => {}
            }
        }
        if self.capacity_factor == Some(0.0) {
            return bad(
                "`capacity_factor` = 0 would drop every token (leave it out for no capacity)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// HF's `load_balancing_loss_func`: over the tokens of every layer (where `mask` (B, T) is 1),
/// the fraction routed to each expert (per top-k slot) times the mean router probability,
/// summed, times the number of experts. Unscaled (the trainer multiplies by
/// `router_aux_loss_coef`).
pub fn load_balancing_loss(
    model: &Llama,
    router_logits: &[Tensor],
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let experts = model.cfg.num_local_experts.unwrap_or(1);
    let k = model.cfg.experts_per_token();
    let logits = Tensor::cat(router_logits, 0)?.to_dtype(DType::F32)?;
    let n = logits.dim(0)?;
    let probs = model.kernels.softmax(&logits)?;
    // one_hot(topk) as (N, k, E).
    let mut hot = vec![0f32; n * k * experts];
    for (slot, &e) in top_k(&probs.to_vec2()?, k).iter().enumerate() {
        hot[slot * experts + e as usize] = 1.0;
    }
    let hot = Tensor::from_vec(hot, (n, k, experts), logits.device())?;
    let weights = match mask {
        // Every layer sees the same tokens: the mask repeats per layer.
        Some(m) => {
            let m = m.to_dtype(DType::F32)?.flatten_all()?;
            Tensor::cat(&vec![m; router_logits.len()], 0)?
        }
        None => Tensor::ones(n, DType::F32, logits.device())?,
    };
    let total = weights.sum_all()?;
    let tokens_per_expert = hot
        .broadcast_mul(&weights.reshape((n, 1, 1))?)?
        .sum(0)?
        .broadcast_div(&total)?;
    let prob_per_expert = probs
        .broadcast_mul(&weights.reshape((n, 1))?)?
        .sum(0)?
        .broadcast_div(&total)?;
    let loss = tokens_per_expert
        .broadcast_mul(&prob_per_expert.unsqueeze(0)?)?
        .sum_all()?;
    Ok((loss * experts as f64)?)
}

/// The `k` most probable experts of each row, most probable first (ties: the lower index),
/// flattened row by row.
fn top_k(rows: &[Vec<f32>], k: usize) -> Vec<u32> {
    let mut chosen = Vec::with_capacity(rows.len() * k);
    for r in rows {
        let mut order: Vec<u32> = (0..r.len() as u32).collect();
        order.sort_by(|&a, &b| r[b as usize].total_cmp(&r[a as usize]).then(a.cmp(&b)));
        chosen.extend_from_slice(&order[..k]);
    }
    chosen
}
