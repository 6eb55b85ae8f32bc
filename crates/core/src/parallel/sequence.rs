//! Sequence parallelism for long contexts: each of the `sp` ranks holds a part of every
//! sequence, and attention, the only place where tokens meet, is computed across ranks.
//!
//! * **Ulysses** (DeepSpeed): before attention an all-to-all turns "all heads, my tokens" into
//!   "my heads, all tokens"; attention runs locally; a second all-to-all turns it back.
//! * **Ring** (Liu et al.): queries stay put and each rank's keys and values travel once around
//!   the ring; every block of scores is folded into a running (max, sum, output) — the online
//!   softmax — so no rank ever holds more than one block of scores.
//!
//! Causal attention makes late tokens costlier than early ones, so the sequence is cut into
//! 2·sp chunks and rank r holds chunks r and 2·sp−1−r: every rank gets the same work.
//! Weights are replicated; their gradients, each from a part of the sequence, are summed over
//! the sp group like data-parallel gradients.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{DType, Tensor, D};

use crate::dist::autograd::{all_to_all, gather_whole, reduce_from, ring_shift};
use crate::dist::Group;
use crate::models::llama::regions::{attention, repeat_kv};
use crate::models::llama::{AttnInputs, Kernels, Llama, Regions};
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpMode {
    Ulysses,
    Ring,
    /// Dynamic axial parallelism of two-stream (MSA and pair) models: the family splits its
    /// streams itself.
    Axial,
}

/// Positions (of a sequence of `t` tokens) held by `rank` of `sp`: chunks r and 2·sp−1−r.
pub fn local_positions(t: usize, sp: usize, rank: usize) -> Result<Vec<usize>> {
    if !t.is_multiple_of(2 * sp) {
        return Err(Error::Config(format!(
            "sequence length {t} must be a multiple of 2 × parallel.sp = {}",
            2 * sp
        )));
    }
    let c = t / (2 * sp);
    Ok([rank, 2 * sp - 1 - rank]
        .iter()
        .flat_map(|&chunk| chunk * c..(chunk + 1) * c)
        .collect())
}

/// Positions in the order the group concatenates them (rank 0's, then rank 1's, …).
pub fn gathered_order(t: usize, sp: usize) -> Result<Vec<usize>> {
    let mut order = Vec::with_capacity(t);
    for r in 0..sp {
        order.extend(local_positions(t, sp, r)?);
    }
    Ok(order)
}

/// `x` (B, T_local, …) of every rank of `g` as whole sequences (B, T, …) in position order:
/// all-gathered (the backward keeps this rank's part of the gradient), then reordered.
pub fn whole_sequences(x: &Tensor, g: &Group) -> Result<Tensor> {
    let t = x.dim(1)? * g.size();
    let gathered = gather_whole(&x.contiguous()?, 1, g)?;
    // Gathered index i holds position order[i]; position p is at index inverse[p].
    let mut inverse = vec![0u32; t];
    for (i, p) in gathered_order(t, g.size())?.into_iter().enumerate() {
        inverse[p] = i as u32;
    }
    let inverse = Tensor::from_vec(inverse, t, x.device())?;
    Ok(gathered.index_select(&inverse, 1)?)
}

fn index(v: &[usize], device: &candle_core::Device) -> Result<Tensor> {
    let v: Vec<u32> = v.iter().map(|&i| i as u32).collect();
    Ok(Tensor::from_vec(v.clone(), v.len(), device)?)
}

/// This rank's attention inputs: rotary tables of its own positions, and the mask over the
/// whole sequence in gathered order (rows and columns permuted alike).
pub fn shard_inputs(inp: &AttnInputs, sp: usize, rank: usize) -> Result<AttnInputs> {
    let t = inp.cos.dim(1)?;
    let dev = inp.cos.device();
    let positions = local_positions(t, sp, rank)?;
    let mine = index(&positions, dev)?;
    let order = index(&gathered_order(t, sp)?, dev)?;
    // Rows in gathered order: only the dense bias describes them.
    let mut out = AttnInputs::with_bias(
        inp.cos.index_select(&mine, 1)?,
        inp.sin.index_select(&mine, 1)?,
        inp.bias()?
            .index_select(&order, 2)?
            .index_select(&order, 3)?
            .contiguous()?,
    );
    // Which of this rank's tokens are padding (a mixture of experts' load-balancing loss
    // weighs tokens by it).
    if inp.mask.as_ref().is_some_and(|m| m.past_len == 0) {
        let whole = inp.token_valid(inp.cos.dim(0)? * t)?;
        let rows = whole.chunks(t);
        let mine = rows.flat_map(|row| positions.iter().map(|&p| row[p]));
        out.query_valid = Some(std::sync::Arc::new(mine.collect()));
    }
    Ok(out)
}

/// Columns (dim 1) of `x` (B, T, …) at this rank's positions.
pub fn shard_tokens(x: &Tensor, sp: usize, rank: usize) -> Result<Tensor> {
    let mine = index(&local_positions(x.dim(1)?, sp, rank)?, x.device())?;
    Ok(x.index_select(&mine, 1)?)
}

/// The model's attention region under sequence parallelism; every other region is the
/// model's own (`inner`, e.g. tensor parallel).
#[derive(Clone)]
pub struct SequenceParallel {
    inner: Arc<dyn Regions>,
    group: Group,
    mode: SpMode,
    /// Largest block of attention scores (elements per batch row and head) formed so far.
    pub peak_block: Arc<AtomicUsize>,
}

impl std::fmt::Debug for SequenceParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SequenceParallel({:?}, {} ranks)",
            self.mode,
            self.group.size()
        )
    }
}

/// `model` with attention computed across the sp group; returns the regions too (to read
/// `peak_block`).
pub fn parallelize(model: &Llama, group: Group, mode: SpMode) -> Result<(Llama, SequenceParallel)> {
    let (sp, heads) = (group.size(), model.cfg.num_attention_heads);
    if let Some(f) = model.cfg.capacity_factor {
        return Err(Error::Config(format!(
            "parallel.sp = {sp} with capacity_factor = {f} is not implemented: expert capacity \
             ranks every token of a micro-batch, which sequence parallelism splits"
        )));
    }
    if mode == SpMode::Axial {
        return Err(Error::Config(
            "parallel.sp_mode = \"dap\" splits the MSA and pair streams of AlphaFold-style models; a LLaMA takes ulysses or ring".into(),
        ));
    }
    if mode == SpMode::Ulysses && !heads.is_multiple_of(sp) {
        return Err(Error::Config(format!(
            "parallel.sp = {sp} does not divide the model's num_attention_heads = {heads} (Ulysses splits heads)"
        )));
    }
    let regions = SequenceParallel {
        inner: model.regions.clone(),
        group,
        mode,
        peak_block: Arc::new(AtomicUsize::new(0)),
    };
    Ok((model.with_regions(Arc::new(regions.clone())), regions))
}

impl SequenceParallel {
    fn note_block(&self, rows: usize, cols: usize) {
        self.peak_block.fetch_max(rows * cols, Ordering::Relaxed);
    }

    fn ulysses(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: &Tensor,
        kernels: Kernels,
    ) -> Result<Tensor> {
        let g = &self.group;
        // KV heads that do not split over the group travel repeated to the query heads.
        let n_rep = if k.dim(1)?.is_multiple_of(g.size()) {
            1
        } else {
            q.dim(1)? / k.dim(1)?
        };
        let heads_for_tokens = |x: &Tensor| all_to_all(x, 1, 2, g);
        let q = heads_for_tokens(q)?;
        let k = heads_for_tokens(&repeat_kv(k, n_rep)?)?;
        let v = heads_for_tokens(&repeat_kv(v, n_rep)?)?;
        self.note_block(q.dim(2)?, k.dim(2)?);
        let out = attention(&q, &k, &v, bias, kernels)?;
        all_to_all(&out, 2, 1, g)
    }

    fn ring(&self, q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (sp, rank) = (self.group.size(), self.group.rank());
        let tl = q.dim(2)?;
        let c = tl / 2;
        let n_rep = q.dim(1)? / k.dim(1)?;
        // Global chunk ids of rank r's two halves, and where its rows sit in `bias`.
        let chunks = |r: usize| [r, 2 * sp - 1 - r];
        let q_parts = [q.narrow(2, 0, c)?, q.narrow(2, c, c)?];
        let mut state: [Option<Online>; 2] = [None, None];
        let (mut k, mut v) = (k.clone(), v.clone());
        for step in 0..sp {
            if step > 0 {
                k = ring_shift(&k, &self.group)?;
                v = ring_shift(&v, &self.group)?;
            }
            let src = (rank + sp - step) % sp;
            for (qi, q_part) in q_parts.iter().enumerate() {
                for kj in 0..2 {
                    // Causal: a chunk never attends to a later one.
                    if chunks(src)[kj] > chunks(rank)[qi] {
                        continue;
                    }
                    let kb = repeat_kv(&k.narrow(2, kj * c, c)?, n_rep)?;
                    let vb = repeat_kv(&v.narrow(2, kj * c, c)?, n_rep)?;
                    let b =
                        bias.narrow(2, rank * tl + qi * c, c)?
                            .narrow(3, src * tl + kj * c, c)?;
                    self.note_block(c, c);
                    let scores = q_part.matmul(&kb.t()?)?;
                    let scores = scores.to_dtype(DType::F32)?.broadcast_add(&b)?;
                    state[qi] = Some(Online::fold(state[qi].take(), &scores, &vb)?);
                }
            }
        }
        let [a, b] = state.map(|s| s.expect("every chunk attends to itself").finish());
        Ok(Tensor::cat(&[a?, b?], 2)?)
    }
}

/// Running softmax-weighted sum over blocks of keys: row max `m`, normaliser `l`, output `o`.
struct Online {
    m: Tensor,
    l: Tensor,
    o: Tensor,
}

impl Online {
    fn fold(prev: Option<Online>, scores: &Tensor, v: &Tensor) -> Result<Online> {
        let block_max = scores.max_keepdim(D::Minus1)?.detach();
        let m = match &prev {
            Some(p) => p.m.maximum(&block_max)?,
            None => block_max,
        };
        let p = scores.broadcast_sub(&m)?.exp()?;
        let l = p.sum_keepdim(D::Minus1)?;
        let o = p.to_dtype(v.dtype())?.matmul(v)?;
        Ok(match prev {
            None => Online { m, l, o },
            Some(prev) => {
                let scale = (prev.m - &m)?.exp()?;
                Online {
                    l: (prev.l * &scale)?.add(&l)?,
                    o: prev.o.broadcast_mul(&scale.to_dtype(v.dtype())?)?.add(&o)?,
                    m,
                }
            }
        })
    }

    fn finish(self) -> Result<Tensor> {
        Ok(self.o.broadcast_div(&self.l.to_dtype(self.o.dtype())?)?)
    }
}

impl Regions for SequenceParallel {
    fn inner(&self) -> Option<&dyn Regions> {
        Some(self.inner.as_ref())
    }

    fn whole_sequences(&self, ids: &Tensor) -> Result<(Tensor, Option<Vec<usize>>)> {
        let (sp, rank) = (self.group.size(), self.group.rank());
        // Token ids travel as f32 (exact below 2^24).
        let whole = whole_sequences(&ids.to_dtype(DType::F32)?, &self.group)?;
        let positions = local_positions(whole.dim(1)?, sp, rank)?;
        Ok((whole.to_dtype(DType::U32)?, Some(positions)))
    }

    fn sequence_sum(&self, x: &Tensor) -> Result<(Tensor, usize)> {
        Ok((reduce_from(x, &self.group)?, self.group.size()))
    }

    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        inp: &AttnInputs,
        kernels: Kernels,
    ) -> Result<Tensor> {
        match self.mode {
            SpMode::Ulysses => self.ulysses(q, k, v, &inp.bias()?, kernels),
            SpMode::Ring => self.ring(q, k, v, &inp.bias()?),
            SpMode::Axial => unreachable!("parallelize refuses axial parallelism"),
        }
    }
}
