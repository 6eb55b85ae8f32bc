//! Tensor parallelism (Megatron 1D), applied to the plain model from outside.
//!
//! The model family's [`TpPlan`] says, by parameter path, how each weight is split over the
//! `tp` ranks (see [`super::plan`]): column-parallel projections (q, k, v, gate, up, LM head)
//! keep a slice of their output rows, row-parallel ones (o, down) a slice of their input
//! columns, the embedding a slice of the vocabulary; norms are replicated.
//! [`TensorParallel`] then fills the model's regions with each style's exchange, looked up
//! by the parameter each region touches:
//!
//! ```text
//!   x ─ norm ─ input ─┬─ q,k,v (Colwise) ─ attention (local heads) ─ o (Rowwise) ─ output ─ + ─
//!                     (f: identity / all-reduce)                     (g: all-reduce / identity)
//! ```
//!
//! With `sequence_parallel` (Megatron-SP) the residual stream between regions is split along
//! the sequence instead of replicated: a Colwise input all-gathers the sequence
//! (reduce-scatter in backward), a Rowwise output reduce-scatters it, and Replicate norm
//! weights, now applied to a part of the sequence, sum their gradients over the group.
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
use colossal_kernels::Kernels;

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
    let mut shapes = model.param_shapes();
    if let Some((cfg, sites)) = model.adapters() {
        for s in sites {
            shapes.push((s.a_name(), vec![cfg.r, s.in_features]));
            shapes.push((s.b_name(), vec![s.out_features, cfg.r]));
        }
    }
    plan.check(&shapes, tp)?;
    Ok(plan)
}

/// This rank's slices of full parameters (copies: the rank's optimizer updates them in place),
/// frozen ones (a LoRA's base) sliced alike and kept frozen.
pub fn shard_params(full: &Params, plan: &TpPlan, rank: usize, size: usize) -> Result<Params> {
    let mine = |name: &str, t: &Tensor| -> Result<Tensor> {
        Ok(match plan.slice(name, t.dims(), rank, size) {
            Some(s) => t.narrow(s.dim, s.start, s.len)?.copy()?,
            None => t.copy()?,
        })
    };
    let mut out = Params::new();
    for (name, var) in full.iter() {
        out.insert(name, Var::from_tensor(&mine(name, var.as_tensor())?)?);
    }
    for (name, t) in full.frozen() {
        out.insert_frozen(name, mine(name, t)?);
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

/// The model's regions under tensor (and optionally Megatron sequence) parallelism: each
/// region asks the plan for the style of the parameter it touches, and the style decides the
/// exchange (the table in [`super::plan`]).
#[derive(Clone)]
pub struct TensorParallel {
    group: Group,
    plan: TpPlan,
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
    if let (Some(e), true) = (model.cfg.num_local_experts, sequence_parallel) {
        // Each rank would route only its slice of the sequence through whole experts.
        return Err(Error::Config(format!(
            "parallel.sp_mode = \"megatron\" with a mixture-of-experts model (num_local_experts = {e}) is not implemented: use tensor parallelism without it"
        )));
    }
    let plan = checked_plan(model, group.size())?;
    let vocab_start = vocab_start(&model.cfg, group.rank(), group.size());
    let tp = TensorParallel {
        group,
        plan,
        vocab_start,
        sequence_parallel,
    };
    Ok(model.with_regions(std::sync::Arc::new(tp)))
}

impl TensorParallel {
    /// The one style every reader of an activation has (the exchange is done once for all).
    /// A vocabulary-split table read as a projection (tied LM head) splits its output rows,
    /// as a column-split one does.
    fn readers_style(&self, readers: &[&str]) -> Result<TpStyle> {
        let styles: Vec<TpStyle> = readers
            .iter()
            .map(|r| match self.plan.style(r) {
                TpStyle::VocabParallel => TpStyle::Colwise,
                s => s,
            })
            .collect();
        match styles.split_first() {
            Some((&first, rest)) if rest.iter().all(|&s| s == first) => Ok(first),
            Some(_) => Err(Error::Config(format!(
                "tensor-parallel plan: the projections {readers:?} read one activation but have different styles {styles:?}"
            ))),
            None => Err(Error::Config(
                "tensor-parallel plan: an activation with no reader".into(),
            )),
        }
    }
}

impl Regions for TensorParallel {
    /// `VocabParallel`: rows outside this rank's slice contribute zeros, and the sum over
    /// ranks (all-reduce, or reduce-scatter into sequence slices) completes every row.
    fn embed(&self, name: &str, w: &Tensor, ids: &Tensor, pad: Option<u32>) -> Result<Tensor> {
        let style = self.plan.style(name);
        if style != TpStyle::VocabParallel {
            return Err(Error::Config(format!(
                "tensor-parallel plan: embedding `{name}` is {style:?}; only VocabParallel embeddings are implemented"
            )));
        }
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

    /// `Colwise` readers need the activation whole on every rank, and its gradient summed
    /// over the group (Megatron's f; under SP the sequence is all-gathered, reduce-scattered
    /// in backward). `Replicate` readers compute alike everywhere, so under SP the sequence
    /// is gathered and each rank's gradient is already whole. `Rowwise` readers take this
    /// rank's split as it comes.
    fn input(&self, readers: &[&str], x: &Tensor) -> Result<Tensor> {
        match (self.readers_style(readers)?, self.sequence_parallel) {
            (TpStyle::Colwise, false) => copy_to(x, &self.group),
            (TpStyle::Colwise, true) => gather_from(x, 1, &self.group),
            (TpStyle::Replicate, true) => gather_whole(x, 1, &self.group),
            _ => Ok(x.clone()),
        }
    }

    /// A `Rowwise` projection's partial sums are summed over the group (Megatron's g; under
    /// SP reduce-scattered into sequence slices); other styles' outputs stay as they are.
    fn output(&self, name: &str, y: &Tensor) -> Result<Tensor> {
        match (self.plan.style(name), self.sequence_parallel) {
            (TpStyle::Rowwise, false) => reduce_from(y, &self.group),
            (TpStyle::Rowwise, true) => scatter_reduce(y, 1, &self.group),
            _ => Ok(y.clone()),
        }
    }

    /// LoRA beside a split projection, its pair split as the plan says (see
    /// [`Llama::tp_plan`]). Column-split: each rank's B rows see only its output slice, so the
    /// whole A's gradient is summed over the group (Megatron's f on the weight). Row-split:
    /// A·x over this rank's input columns is a partial sum, completed as the base's output is;
    /// the whole B then applies alike everywhere (under SP to this rank's sequence slice,
    /// so its gradient is summed).
    fn lora(&self, name: &str, x: &Tensor, a: &Tensor, b: &Tensor, k: Kernels) -> Result<Tensor> {
        let low = |x: &Tensor, a: &Tensor, b: &Tensor| -> Result<Tensor> {
            Ok(k.linear(&k.linear(x, a)?, b)?)
        };
        match self.plan.style(name) {
            TpStyle::Colwise | TpStyle::VocabParallel => low(x, &copy_to(a, &self.group)?, b),
            TpStyle::Rowwise => {
                let h = self.output(name, &k.linear(x, a)?)?;
                let b = match self.sequence_parallel {
                    true => copy_to(b, &self.group)?,
                    false => b.clone(),
                };
                Ok(k.linear(&h, &b)?)
            }
            TpStyle::Replicate => low(x, a, b),
        }
    }

    /// A row-split projection reads this rank's slice of the input features.
    fn input_features(&self, name: &str, n: usize) -> (usize, usize) {
        match self.plan.style(name) {
            TpStyle::Rowwise => (self.group.rank() * n, self.group.size() * n),
            _ => (0, n),
        }
    }

    /// A `Replicate` parameter applied to this rank's sequence slice (SP) gets only that
    /// slice's gradient, so its gradient is summed over the group; a split parameter (a
    /// column-split bias) is applied to this rank's features only.
    fn param(&self, name: &str, w: &Tensor) -> Result<Tensor> {
        match (self.plan.style(name), self.sequence_parallel) {
            (TpStyle::Replicate, true) => copy_to(w, &self.group),
            _ => Ok(w.clone()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::run_local;

    /// The plan's style of the parameter a region touches decides that region's exchange.
    #[test]
    fn each_region_takes_its_exchange_from_the_style_of_its_parameter() {
        let plan = TpPlan::new(&[
            ("a.weight", TpStyle::Colwise),
            ("b.weight", TpStyle::Rowwise),
            ("n.weight", TpStyle::Replicate),
        ]);
        let out = run_local(2, std::time::Duration::from_secs(30), |comm| {
            let rank = comm.rank();
            let tp = TensorParallel {
                group: Group::new(Box::new(comm)),
                plan: plan.clone(),
                vocab_start: 0,
                sequence_parallel: false,
            };
            let y = Tensor::new(&[rank as f32 + 1.0], &Device::Cpu)?;
            let summed = tp.output("b.weight", &y)?.to_vec1::<f32>()?;
            let kept = tp.output("a.weight", &y)?.to_vec1::<f32>()?;
            let mixed = tp.input(&["a.weight", "b.weight"], &y).unwrap_err();
            Ok((summed, kept, mixed.to_string()))
        })
        .unwrap();
        for (rank, (summed, kept, mixed)) in out.into_iter().enumerate() {
            assert_eq!(summed, [3.0], "a Rowwise output is summed over the group");
            assert_eq!(kept, [rank as f32 + 1.0], "a Colwise output stays split");
            assert!(
                mixed.contains("\"a.weight\", \"b.weight\"") && mixed.contains("different styles"),
                "{mixed}"
            );
        }
    }
}
