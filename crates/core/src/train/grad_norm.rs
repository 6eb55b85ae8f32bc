//! The global gradient norm when gradients are spread over ranks: ZeRO shards over data
//! parallel, tensor-parallel slices, pipeline stages. Each rank sums the squares it holds,
//! weighted so that every element of the logical gradient counts once, and the sums meet in
//! all-reduces over the groups that split the model.

use candle_core::{DType, Device, Tensor};

use super::expert_parallel::EpRank;
use super::tensor_parallel::TpRank;
use crate::dist::{Communicator, ReduceOp};
use crate::parallel::tensor::Split;
use crate::parallel::{FlatLayout, SqSum, StateBuf};
use crate::params::Grads;
use crate::Result;

pub(super) struct NormGroups<'a> {
    pub tp: Option<&'a TpRank>,
    /// Expert parallelism and the data-parallel group its norm is summed over.
    pub ep: Option<(&'a EpRank, &'a dyn Communicator)>,
    pub pp: Option<&'a dyn Communicator>,
    /// Weights a later stage holds second copies of (tied embeddings): counted on the
    /// first stage only.
    pub duplicates: &'a [String],
}

impl NormGroups<'_> {
    fn weight(&self, name: &str) -> f64 {
        if self.duplicates.iter().any(|d| d == name) {
            return 0.0;
        }
        let ep = self
            .ep
            .map_or(1.0, |(e, dp)| e.norm_weight(name, dp.size()));
        ep * match self.tp {
            // Every tensor-parallel rank holds the whole of a replicated weight.
            Some(t) if t.plan.split(name) == Split::Replicate => 1.0 / t.size() as f64,
            _ => 1.0,
        }
    }

    fn total(&self, local: f64, dp_sharded: Option<&dyn Communicator>) -> Result<f64> {
        let mut sq = local;
        let tp = self.tp.map(|t| &t.group);
        let sum = |c: &dyn Communicator, x: f64| -> Result<f64> {
            let t = c.all_reduce(&Tensor::new(&[x], &Device::Cpu)?, ReduceOp::Sum)?;
            Ok(t.to_vec1::<f64>()?[0])
        };
        if let Some(c) = dp_sharded {
            sq = sum(c, sq)?;
        }
        if let Some(g) = tp {
            sq = g.with(|c| sum(c, sq))?;
        }
        if let Some((_, dp)) = self.ep {
            sq = sum(dp, sq)?;
        }
        if let Some(c) = self.pp {
            sq = sum(c, sq)?;
        }
        Ok(sq.sqrt())
    }

    /// Norm from whole (data-parallel reduced) gradients.
    pub fn of_grads(&self, grads: &Grads) -> Result<f64> {
        let mut names: Vec<&String> = grads.names().collect();
        names.sort();
        let mut local = 0f64;
        for name in names {
            let g = grads.get(name).expect("listed");
            let sq = g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
            local += self.weight(name) * sq;
        }
        self.total(local, None)
    }

    /// Norm from this rank's ZeRO-3 gradient chunks (zero-padded, so padding adds nothing).
    /// Summed over `dp`, every element counts once, experts' too: each is in one chunk of the
    /// one expert-data group holding it.
    pub fn of_chunks(
        &self,
        chunks: &std::collections::HashMap<String, StateBuf>,
        dp: &dyn Communicator,
    ) -> Result<f64> {
        let plain = NormGroups { ep: None, ..*self };
        let mut names: Vec<&String> = chunks.keys().collect();
        names.sort();
        let mut sq = SqSum::default();
        for name in names {
            sq.add_all(&chunks[name], plain.weight(name))?;
        }
        plain.total(sq.total()?, Some(dp))
    }

    /// Norm from this rank's ZeRO shard of the flat gradient.
    pub fn of_shard(
        &self,
        layout: &FlatLayout,
        rank: usize,
        shard: &StateBuf,
        dp: &dyn Communicator,
    ) -> Result<f64> {
        let mut sq = SqSum::default();
        self.add_shard(&mut sq, layout, rank, shard)?;
        self.total(sq.total()?, Some(dp))
    }

    /// Norm from ZeRO shards under expert parallelism: `dense` (layout, rank, shard) over the
    /// data-parallel group `dp`, `experts` over an expert-data group. Summed over `dp`, every
    /// element counts once: each non-expert one is in one rank's shard, and each expert's in one
    /// shard of the one expert-data group that holds it.
    pub fn of_expert_shards(
        &self,
        dense: (&FlatLayout, usize, &StateBuf),
        experts: (&FlatLayout, usize, &StateBuf),
        dp: &dyn Communicator,
    ) -> Result<f64> {
        // Shards count whole: no replica weighting by the expert-parallel layout.
        let plain = NormGroups { ep: None, ..*self };
        let mut sq = SqSum::default();
        for (layout, rank, shard) in [dense, experts] {
            plain.add_shard(&mut sq, layout, rank, shard)?;
        }
        plain.total(sq.total()?, Some(dp))
    }

    fn add_shard(
        &self,
        sq: &mut SqSum,
        layout: &FlatLayout,
        rank: usize,
        shard: &StateBuf,
    ) -> Result<()> {
        let start = layout.shard_range(rank).start;
        for (entry, range) in layout.pieces(rank) {
            let w = self.weight(&entry.name);
            sq.add(shard, range.start - start..range.end - start, w)?;
        }
        Ok(())
    }
}
