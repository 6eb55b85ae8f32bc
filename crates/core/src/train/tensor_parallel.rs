//! What the trainer does differently on a tensor-parallel rank: the loss from vocabulary-split
//! logits, the gradient norm over split and replicated parameters, and moving weights and Adam
//! moments between whole (checkpoints) and split (training) form.

use candle_core::{Device, Tensor, Var};

use crate::dist::Group;
use crate::models::ModelFamily;
use crate::optim::{AdamW, Moment};
use crate::parallel::tensor::{self, TpPlan};
use crate::params::Params;
use crate::Result;

#[derive(Clone)]
pub struct TpRank {
    pub group: Group,
    pub plan: TpPlan,
    pub vocab_start: usize,
}

impl TpRank {
    pub fn new<M: ModelFamily>(group: Group, model: &M) -> Result<Self> {
        let plan = tensor::checked_plan(model, group.size())?;
        // The first vocabulary row here: where this rank's slice of the vocabulary-parallel
        // embedding starts (the split the output head's logits follow).
        let vocab_start = model
            .param_shapes()
            .iter()
            .filter(|(n, _)| plan.style(n) == tensor::TpStyle::VocabParallel)
            .find_map(|(n, s)| plan.slice(n, s, group.rank(), group.size()))
            .map_or(0, |s| s.start);
        Ok(Self {
            group,
            plan,
            vocab_start,
        })
    }

    pub fn rank(&self) -> usize {
        self.group.rank()
    }

    pub fn size(&self) -> usize {
        self.group.size()
    }

    /// Sum of token cross-entropies of rows (N, V/tp) of this rank's vocabulary slice, and
    /// the number of targets: the fused kernel with the row statistics all-reduced over the
    /// group where it applies, else the composition of autograd collectives.
    pub fn cross_entropy(
        &self,
        kernels: colossal_kernels::Kernels,
        rows: &Tensor,
        targets: &[i64],
    ) -> Result<(Tensor, usize)> {
        let reduce = |op: crate::dist::ReduceOp| -> colossal_kernels::Reduce {
            let group = self.group.clone();
            Box::new(move |buf: &mut [f32]| {
                let t = Tensor::new(&*buf, &Device::Cpu)?;
                let all = group
                    .with(|c| c.all_reduce(&t, op))
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                buf.copy_from_slice(&all.to_vec1::<f32>()?);
                Ok(())
            })
        };
        let split = colossal_kernels::VocabSplit {
            start: self.vocab_start,
            all_max: reduce(crate::dist::ReduceOp::Max),
            all_sum: reduce(crate::dist::ReduceOp::Sum),
        };
        let ignore = super::batch::IGNORE;
        if let Some(out) = kernels.cross_entropy_sum_split(rows, targets, ignore, split)? {
            return Ok(out);
        }
        tensor::vocab_parallel_cross_entropy(
            rows,
            targets,
            super::batch::IGNORE,
            self.vocab_start,
            &self.group,
        )
    }

    /// This rank's slices of whole parameters.
    pub fn shard(&self, full: &Params) -> Result<Params> {
        tensor::shard_params(full, &self.plan, self.rank(), self.size())
    }

    /// Reads this rank's slices straight from an HF checkpoint.
    pub fn load<M: ModelFamily>(
        &self,
        dir: &std::path::Path,
        model: &M,
        device: &Device,
    ) -> Result<Params> {
        tensor::load_sharded(dir, model, &self.plan, self.rank(), self.size(), device)
    }

    /// Whole parameters from every rank's slices (a collective over the group), frozen ones
    /// (a LoRA's base) whole and frozen.
    pub fn gather(&self, local: &Params) -> Result<Params> {
        let mut full = Params::new();
        for (name, var) in local.iter() {
            let t = self.gather_tensor(name, var.as_tensor())?;
            full.insert(name, Var::from_tensor(&t)?);
        }
        for (name, t) in local.frozen() {
            full.insert_frozen(name, self.gather_tensor(name, t)?);
        }
        Ok(full)
    }

    fn gather_tensor(&self, name: &str, t: &Tensor) -> Result<Tensor> {
        self.group.with(|c| tensor::gather(name, t, &self.plan, c))
    }

    /// Whole Adam moments from every rank's (collective); `local` gives the slice shapes.
    pub fn gather_moments(&self, opt: &AdamW, local: &Params) -> Result<AdamW> {
        let mut out = AdamW::new(opt.cfg.clone());
        out.step = opt.step;
        for (name, var) in local.iter() {
            for (src, dst) in [(&opt.m, &mut out.m), (&opt.v, &mut out.v)] {
                let data = Moment::host_or_zeros(src.get(name), var.as_tensor().elem_count())?;
                let t = Tensor::from_vec(data, var.as_tensor().dims(), &Device::Cpu)?;
                let whole = self.gather_tensor(name, &t)?;
                dst.insert(name.to_string(), whole.flatten_all()?.to_vec1()?.into());
            }
        }
        Ok(out)
    }

    /// Keeps this rank's slice of whole Adam moments (after a resume); `full` gives shapes.
    pub fn shard_moments(&self, opt: &mut AdamW, full: &Params) -> Result<()> {
        for (name, var) in full.iter() {
            let dims = var.as_tensor().dims();
            let Some(slice) = self.plan.slice(name, dims, self.rank(), self.size()) else {
                continue;
            };
            for moments in [&mut opt.m, &mut opt.v] {
                if let Some(data) = moments.remove(name) {
                    let t = Tensor::from_vec(data.into_host()?, dims, &Device::Cpu)?;
                    let mine = t.narrow(slice.dim, slice.start, slice.len)?;
                    moments.insert(name.to_string(), mine.flatten_all()?.to_vec1()?.into());
                }
            }
        }
        Ok(())
    }
}
