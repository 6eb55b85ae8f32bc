//! The points where a parallel plan may act on the model, named by what the model is doing
//! there. The plain model ([`Local`]) computes everything here; `parallel::tensor` and
//! `parallel::sequence` supply implementations that insert collectives, as torchtitan's
//! parallel styles do around modules. The model itself never sees a rank.

use std::fmt::Debug;

use candle_core::{DType, Tensor};

use super::AttnInputs;
use crate::Result;
use colossal_kernels::Kernels;

/// Every region defaults to the wrapped regions ([`Regions::inner`]) when there are some, else
/// to the one-rank computation; an implementation overrides only what it changes.
pub trait Regions: Send + Sync + Debug {
    /// The regions this one wraps (a wrapper changes some regions and passes the rest on).
    fn inner(&self) -> Option<&dyn Regions> {
        None
    }

    /// Embedding lookup of `ids` (B, T) in the table `w` named `name` → (B, T, H); rows of
    /// `pad` get no gradient.
    fn embed(&self, name: &str, w: &Tensor, ids: &Tensor, pad: Option<u32>) -> Result<Tensor> {
        match self.inner() {
            Some(r) => r.embed(name, w, ids, pad),
            None => lookup(w, ids, pad),
        }
    }

    /// The activation `x` as the projections named `readers` (their weights' parameter
    /// names) read it: a parallel plan's styles for those weights say how it is exchanged
    /// (a column-split projection needs it whole on every rank).
    fn input(&self, readers: &[&str], x: &Tensor) -> Result<Tensor> {
        match self.inner() {
            Some(r) => r.input(readers, x),
            None => Ok(x.clone()),
        }
    }

    /// `x @ W^T` for the weight named `name` (this rank's part of it).
    fn linear(&self, name: &str, x: &Tensor, w: &Tensor, kernels: Kernels) -> Result<Tensor> {
        match self.inner() {
            Some(r) => r.linear(name, x, w, kernels),
            None => Ok(kernels.linear(x, w)?),
        }
    }

    /// The output `y` of the projection whose weight is `name`, before its bias, as the rest
    /// of the model reads it (a row-split projection's partial sums are completed here).
    fn output(&self, name: &str, y: &Tensor) -> Result<Tensor> {
        match self.inner() {
            Some(r) => r.output(name, y),
            None => Ok(y.clone()),
        }
    }

    /// A LoRA adapter's low-rank term B(A·x) beside the projection whose weight is `name`,
    /// laid out as the model reads that projection's output (after [`Regions::output`]).
    fn lora(&self, name: &str, x: &Tensor, a: &Tensor, b: &Tensor, k: Kernels) -> Result<Tensor> {
        match self.inner() {
            Some(r) => r.lora(name, x, a, b, k),
            None => Ok(k.linear(&k.linear(x, a)?, b)?),
        }
    }

    /// A sum over this rank's tokens as the sum over the whole sequence, and how many ranks
    /// share the sequence: under sequence parallelism an all-reduce whose gradient is each
    /// rank's own (the sum stands for one logical tensor, replicated).
    fn sequence_sum(&self, x: &Tensor) -> Result<(Tensor, usize)> {
        match self.inner() {
            Some(r) => r.sequence_sum(x),
            None => Ok((x.clone(), 1)),
        }
    }

    /// Where this rank's `n` input features of the projection `name` sit in its whole input:
    /// (first feature, whole width).
    fn input_features(&self, name: &str, n: usize) -> (usize, usize) {
        match self.inner() {
            Some(r) => r.input_features(name, n),
            None => (0, n),
        }
    }

    /// Whole token rows from this rank's part of them `ids` (B, T), and the positions of
    /// this rank's part (`None`: it holds whole rows). Under sequence parallelism a
    /// collective.
    fn whole_sequences(&self, ids: &Tensor) -> Result<(Tensor, Option<Vec<usize>>)> {
        match self.inner() {
            Some(r) => r.whole_sequences(ids),
            None => Ok((ids.clone(), None)),
        }
    }

    /// The parameter `name` used outside a projection (norm weights, biases), as this rank
    /// applies it.
    fn param(&self, name: &str, w: &Tensor) -> Result<Tensor> {
        match self.inner() {
            Some(r) => r.param(name, w),
            None => Ok(w.clone()),
        }
    }

    /// Attention of q (B, Hq, T, D) over k, v (B, Hkv, T, D) → (B, Hq, T, D); q is already
    /// scaled by 1/√D.
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        inp: &AttnInputs,
        kernels: Kernels,
    ) -> Result<Tensor> {
        match self.inner() {
            Some(r) => r.attention(q, k, v, inp, kernels),
            None => attend(q, k, v, inp, kernels),
        }
    }
}

/// Everything on one rank.
#[derive(Debug, Default, Clone, Copy)]
pub struct Local;

impl Regions for Local {}

/// Rows `ids` (B, T) of `w` → (B, T, H). Rows of `pad` are detached, as torch's
/// `padding_idx` gives that row no gradient.
pub fn lookup(w: &Tensor, ids: &Tensor, pad: Option<u32>) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let flat = ids.flatten_all()?;
    let e = w.index_select(&flat, 0)?;
    let e = match pad {
        Some(pad) => {
            let is_pad = flat.eq(pad)?.unsqueeze(1)?.broadcast_as(e.shape())?;
            is_pad.where_cond(&e.detach(), &e)?
        }
        None => e,
    };
    Ok(e.reshape((b, t, w.dim(1)?))?)
}

/// Attention as the inputs allow: the fused kernel over the structural mask (no T × T matrix
/// kept) where it applies, else eager attention over the dense bias.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    inp: &AttnInputs,
    kernels: Kernels,
) -> Result<Tensor> {
    if let Some(mask) = &inp.mask {
        if let Some(out) = kernels.attention(q, k, v, mask)? {
            return Ok(out);
        }
    }
    attention(q, k, v, &inp.bias()?, kernels)
}

/// Eager attention with an additive f32 bias (B, 1, Tq, Tk); grouped KV heads are repeated.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    kernels: Kernels,
) -> Result<Tensor> {
    let n_rep = q.dim(1)? / k.dim(1)?;
    let k = repeat_kv(k, n_rep)?;
    let v = repeat_kv(v, n_rep)?;
    let scores = q.matmul(&k.t()?)?;
    let dtype = scores.dtype();
    let scores = scores.to_dtype(DType::F32)?.broadcast_add(bias)?;
    let probs = kernels.softmax(&scores)?.to_dtype(dtype)?;
    Ok(probs.matmul(&v)?)
}

pub fn repeat_kv(x: &Tensor, n_rep: usize) -> candle_core::Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, kvh, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kvh, n_rep, t, d))?
        .reshape((b, kvh * n_rep, t, d))
}
