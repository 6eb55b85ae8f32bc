//! Tensor parallelism (Megatron 1D), applied to the plain model from outside.
//!
//! The model family's [`TpPlan`] says, by parameter path, how each weight is split over the
//! `tp` ranks (see [`super::plan`]): column-parallel projections (q, k, v, gate, up, LM head)
//! keep a slice of their output rows, row-parallel ones (o, down) a slice of their input
//! columns, the embedding a slice of the vocabulary; norms are replicated.
//! [`TensorParallel`] then fills the model's regions with each style's exchange:
//!
//! ```text
//!   x ─ norm ─ enter ─┬─ q,k,v (cols) ─ attention (local heads) ─ o (rows) ─ exit ─ + ─
//!                     (f: identity / all-reduce)                  (g: all-reduce / identity)
//! ```
//!
//! With `sequence_parallel` (Megatron-SP) the residual stream between regions is split along
//! the sequence instead of replicated: `enter` all-gathers the sequence (reduce-scatter in
//! backward), `exit` reduce-scatters it, and norm weights, now applied to a part of the
//! sequence, sum their gradients over the group.
//!
//! The LM head's logits stay split by vocabulary; [`vocab_parallel_cross_entropy`] computes
//! the loss from them without ever gathering a full row of logits.

use candle_core::{DType, Device, Tensor, Var};

use crate::dist::autograd::{copy_to, gather_from, gather_whole, reduce_from, scatter_reduce};
use crate::dist::{Communicator, Group, ReduceOp};
use crate::models::llama::{regions::lookup, Llama, LlamaConfig, Regions};
use crate::models::ModelFamily;
use crate::params::Params;
use crate::{Error, Result};

pub use super::plan::{Split, TpPlan, TpStyle};

/// Checks that the model splits evenly over `tp` ranks, naming the config field that does not.
pub fn validate(cfg: &LlamaConfig, tp: usize) -> Result<()> {
    let fields = [
        ("num_attention_heads", cfg.num_attention_heads),
        ("num_key_value_heads", cfg.num_kv_heads()),
        ("intermediate_size", cfg.intermediate_size),
        ("vocab_size", cfg.vocab_size),
    ];
    for (field, value) in fields {
        if !value.is_multiple_of(tp) {
            return Err(Error::Config(format!(
                "parallel.tp = {tp} does not divide the model's {field} = {value}"
            )));
        }
    }
    Ok(())
}

/// The model's plan, after checking that the model splits evenly over `tp` ranks and that the
/// plan covers exactly its parameters.
pub fn checked_plan<M: ModelFamily>(model: &M, tp: usize) -> Result<TpPlan> {
    model.check_tensor_parallel(tp)?;
    let plan = model.tp_plan();
    plan.check(&model.param_shapes(), tp)?;
    Ok(plan)
}

/// This rank's slices of full parameters (copies: the rank's optimizer updates them in place).
pub fn shard_params(full: &Params, plan: &TpPlan, rank: usize, size: usize) -> Result<Params> {
    let mut out = Params::new();
    for (name, var) in full.iter() {
        let t = var.as_tensor();
        let t = match plan.slice(name, t.dims(), rank, size) {
            Some(s) => t.narrow(s.dim, s.start, s.len)?.copy()?,
            None => t.copy()?,
        };
        out.insert(name, Var::from_tensor(&t)?);
    }
    Ok(out)
}

/// Reads only this rank's slices of an HF checkpoint's weights.
pub fn load_sharded<M: ModelFamily>(
    dir: &std::path::Path,
    model: &M,
    plan: &TpPlan,
    rank: usize,
    size: usize,
    device: &Device,
) -> Result<Params> {
    let wanted: Vec<_> = model
        .param_shapes()
        .into_iter()
        .map(|(n, s)| {
            let slice = plan.slice(&n, &s, rank, size);
            (n, s, slice)
        })
        .collect();
    let mut tensors = crate::checkpoint::hf::load_sliced(dir, &wanted, DType::F32, device)?;
    let mut params = Params::new();
    for (name, _, _) in &wanted {
        let t = tensors
            .remove(name)
            .expect("load_sliced returns every name");
        params.insert(name.clone(), Var::from_tensor(&t)?);
    }
    Ok(params)
}

/// The whole tensor from every rank's slice (a collective: all ranks call it in the same
/// order).
pub fn gather(
    name: &str,
    local: &Tensor,
    plan: &TpPlan,
    comm: &dyn Communicator,
) -> Result<Tensor> {
    match plan.split(name) {
        Split::Replicate => Ok(local.clone()),
        Split::Dim(dim) => {
            let stacked = comm.all_gather(&local.unsqueeze(0)?.contiguous()?)?;
            let parts: Vec<Tensor> = (0..comm.size())
                .map(|i| stacked.get(i))
                .collect::<candle_core::Result<_>>()?;
            Ok(Tensor::cat(&parts, dim)?)
        }
    }
}

/// The model's regions under tensor (and optionally Megatron sequence) parallelism.
#[derive(Clone)]
pub struct TensorParallel {
    group: Group,
    /// First vocabulary row this rank holds.
    vocab_start: usize,
    sequence_parallel: bool,
}

impl std::fmt::Debug for TensorParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorParallel")
            .field("rank", &self.group.rank())
            .field("size", &self.group.size())
            .field("sequence_parallel", &self.sequence_parallel)
            .finish()
    }
}

/// `model` with its regions split over `group` (the tensor-parallel axis of the mesh), after
/// checking its plan against its parameters.
pub fn parallelize(model: &Llama, group: Group, sequence_parallel: bool) -> Result<Llama> {
    checked_plan(model, group.size())?;
    let vocab_start = vocab_start(&model.cfg, group.rank(), group.size());
    let tp = TensorParallel {
        group,
        vocab_start,
        sequence_parallel,
    };
    Ok(model.with_regions(std::sync::Arc::new(tp)))
}

impl Regions for TensorParallel {
    /// Vocabulary-parallel lookup: rows outside this rank's slice contribute zeros, and the
    /// sum over ranks (all-reduce, or reduce-scatter into sequence slices) completes it.
    fn embed(&self, w: &Tensor, ids: &Tensor, pad: Option<u32>) -> Result<Tensor> {
        let rows = self.vocab_start..self.vocab_start + w.dim(0)?;
        let local = |id: u32| {
            rows.contains(&(id as usize))
                .then(|| (id as usize - rows.start) as u32)
        };
        let all: Vec<u32> = ids.flatten_all()?.to_vec1()?;
        let local_ids: Vec<u32> = all.iter().map(|&id| local(id).unwrap_or(0)).collect();
        let ours: Vec<f32> = all
            .iter()
            .map(|&id| local(id).map_or(0.0, |_| 1.0))
            .collect();
        let local_ids = Tensor::from_vec(local_ids, ids.dims(), ids.device())?;
        let ours = Tensor::from_vec(ours, ids.dims(), ids.device())?.to_dtype(w.dtype())?;
        let e = lookup(w, &local_ids, pad.and_then(local))?;
        let e = e.broadcast_mul(&ours.unsqueeze(2)?)?;
        if self.sequence_parallel {
            scatter_reduce(&e, 1, &self.group)
        } else {
            reduce_from(&e, &self.group)
        }
    }

    fn enter(&self, x: &Tensor) -> Result<Tensor> {
        if self.sequence_parallel {
            gather_from(x, 1, &self.group)
        } else {
            copy_to(x, &self.group)
        }
    }

    fn whole(&self, x: &Tensor) -> Result<Tensor> {
        if self.sequence_parallel {
            gather_whole(x, 1, &self.group)
        } else {
            Ok(x.clone())
        }
    }

    fn exit(&self, y: &Tensor) -> Result<Tensor> {
        if self.sequence_parallel {
            scatter_reduce(y, 1, &self.group)
        } else {
            reduce_from(y, &self.group)
        }
    }

    fn replicated(&self, w: &Tensor) -> Result<Tensor> {
        if self.sequence_parallel {
            copy_to(w, &self.group)
        } else {
            Ok(w.clone())
        }
    }
}

/// Sum of token cross-entropies from vocabulary-split logits (N, V/tp), and the number of
/// targets != `ignore`; this rank's slice starts at vocabulary row `vocab_start`. Only (N, 1)
/// statistics cross the group: the row max, the sum of exponentials and the target's logit.
pub fn vocab_parallel_cross_entropy(
    logits: &Tensor,
    targets: &[i64],
    ignore: i64,
    vocab_start: usize,
    group: &Group,
) -> Result<(Tensor, usize)> {
    let device = logits.device();
    let (n, v) = logits.dims2()?;
    let logits = logits.to_dtype(DType::F32)?;
    let local_max = logits.max_keepdim(1)?.detach().contiguous()?;
    let max = group.with(|c| c.all_reduce(&local_max, ReduceOp::Max))?;
    let shifted = logits.broadcast_sub(&max)?;
    let sum_exp = reduce_from(&shifted.exp()?.sum_keepdim(1)?, group)?;
    let (mut idx, mut here, mut keep) = (vec![0u32; n], vec![0f32; n], vec![0f32; n]);
    for (i, &t) in targets.iter().enumerate() {
        if t == ignore {
            continue;
        }
        keep[i] = 1.0;
        let local = t - vocab_start as i64;
        if (0..v as i64).contains(&local) {
            idx[i] = local as u32;
            here[i] = 1.0;
        }
    }
    let count = keep.iter().filter(|&&k| k > 0.0).count();
    let idx = Tensor::from_vec(idx, (n, 1), device)?;
    let here = Tensor::from_vec(here, (n, 1), device)?;
    let picked = reduce_from(&(shifted.gather(&idx, 1)? * here)?, group)?;
    let per_token = (sum_exp.log()? - picked)?.squeeze(1)?;
    let keep = Tensor::from_vec(keep, n, device)?;
    Ok(((per_token * keep)?.sum_all()?, count))
}

/// First vocabulary row held by tensor-parallel rank `rank` of `size`.
pub fn vocab_start(cfg: &LlamaConfig, rank: usize, size: usize) -> usize {
    rank * cfg.vocab_size / size
}
