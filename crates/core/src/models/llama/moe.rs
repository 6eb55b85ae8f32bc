//! Mixtral's sparse mixture-of-experts block and its load-balancing loss, as transformers
//! computes them: router softmax over experts, top-k, the k weights renormalised, each expert
//! a SwiGLU MLP (`w2(silu(w1 x) · w3 x)`) run once on all the tokens routed to it.

use candle_core::{DType, Tensor};

use super::Llama;
use crate::params::Params;
use crate::Result;

impl Llama {
    /// MoE layer `l` on the normed stream `h` (B, T, H): the output and the router logits
    /// (B·T, experts).
    pub(super) fn moe(&self, l: usize, p: &Params, h: &Tensor) -> Result<(Tensor, Tensor)> {
        let c = &self.cfg;
        let (b, t, hidden) = h.dims3()?;
        let n = b * t;
        let experts = c.num_local_experts.unwrap_or(0);
        let k = c.experts_per_token();
        let pre = format!("model.layers.{l}.block_sparse_moe.");
        let x = h.reshape((1, n, hidden))?;
        let router = self
            .proj(p, &format!("{pre}gate.weight"), &x, None)?
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
        let mut out = flat.zeros_like()?;
        for e in 0..experts as u32 {
            let (tokens, slots): (Vec<u32>, Vec<u32>) = chosen
                .iter()
                .enumerate()
                .filter(|(_, &c)| c == e)
                .map(|(i, _)| ((i / k) as u32, i as u32))
                .unzip();
            if tokens.is_empty() {
                continue;
            }
            let tokens = Tensor::new(tokens.as_slice(), h.device())?;
            let weight = top.index_select(&Tensor::new(slots.as_slice(), h.device())?, 0)?;
            let xe = flat.index_select(&tokens, 0)?.unsqueeze(0)?;
            let w = |m: &str| format!("{pre}experts.{e}.{m}.weight");
            let gate = self.proj(p, &w("w1"), &xe, None)?;
            let up = self.proj(p, &w("w3"), &xe, None)?;
            let act = self.kernels.swiglu(&gate, &up)?;
            let y = self.proj(p, &w("w2"), &act, None)?.squeeze(0)?;
            let y = y.broadcast_mul(&weight.unsqueeze(1)?)?;
            out = out.index_add(&tokens, &y, 0)?;
        }
        Ok((out.reshape((b, t, hidden))?, router))
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
