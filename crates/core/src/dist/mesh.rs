//! The process mesh: world ranks laid out as a 4-D grid `pp × dp × sp × tp` (tp fastest, so
//! tensor-parallel peers are neighbours — on GPUs, the same host) and one communicator per axis.

use super::comm::Communicator;
use crate::{Error, Result};

/// Degrees of parallelism; their product is the world size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParallelDims {
    pub dp: usize,
    pub tp: usize,
    pub pp: usize,
    pub sp: usize,
}

/// A rank's position on each axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Coords {
    pub pp: usize,
    pub dp: usize,
    pub sp: usize,
    pub tp: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    Pp,
    Dp,
    Sp,
    Tp,
}

impl ParallelDims {
    pub fn new(dp: usize, tp: usize, pp: usize, sp: usize) -> Self {
        ParallelDims { dp, tp, pp, sp }
    }

    /// Checks every degree is ≥ 1 and the product equals `world`.
    pub fn validate(&self, world: usize) -> Result<()> {
        for (name, d) in [
            ("dp", self.dp),
            ("tp", self.tp),
            ("pp", self.pp),
            ("sp", self.sp),
        ] {
            if d == 0 {
                return Err(Error::Config(format!("parallel.{name} must be at least 1")));
            }
        }
        if self.world() != world {
            return Err(Error::Config(format!(
                "parallel: dp {} × tp {} × pp {} × sp {} = {} but the world has {world} ranks \
                 (parallel.nproc or the launcher's -n)",
                self.dp,
                self.tp,
                self.pp,
                self.sp,
                self.world()
            )));
        }
        Ok(())
    }

    pub fn world(&self) -> usize {
        self.dp * self.tp * self.pp * self.sp
    }

    fn degree(&self, axis: Axis) -> usize {
        match axis {
            Axis::Pp => self.pp,
            Axis::Dp => self.dp,
            Axis::Sp => self.sp,
            Axis::Tp => self.tp,
        }
    }

    pub fn coords(&self, rank: usize) -> Coords {
        let tp = rank % self.tp;
        let sp = (rank / self.tp) % self.sp;
        let dp = (rank / (self.tp * self.sp)) % self.dp;
        let pp = rank / (self.tp * self.sp * self.dp);
        Coords { pp, dp, sp, tp }
    }

    pub fn rank(&self, c: Coords) -> usize {
        ((c.pp * self.dp + c.dp) * self.sp + c.sp) * self.tp + c.tp
    }

    /// World ranks that differ from `rank` only in data and sequence coordinates: they hold
    /// the same weights, so their gradients are summed together.
    pub fn data_members(&self, rank: usize) -> Vec<usize> {
        let c = self.coords(rank);
        (0..self.dp)
            .flat_map(|dp| (0..self.sp).map(move |sp| Coords { dp, sp, ..c }))
            .map(|m| self.rank(m))
            .collect()
    }

    /// World ranks that differ from `rank` only along `axis`, in axis order.
    pub fn axis_members(&self, rank: usize, axis: Axis) -> Vec<usize> {
        let c = self.coords(rank);
        (0..self.degree(axis))
            .map(|i| {
                let mut m = c;
                match axis {
                    Axis::Pp => m.pp = i,
                    Axis::Dp => m.dp = i,
                    Axis::Sp => m.sp = i,
                    Axis::Tp => m.tp = i,
                }
                self.rank(m)
            })
            .collect()
    }
}

/// This rank's view of the mesh: its coordinates and a communicator for each axis.
pub struct ProcessMesh {
    pub dims: ParallelDims,
    pub coords: Coords,
    pub world: Box<dyn Communicator>,
    pub pp: Box<dyn Communicator>,
    pub dp: Box<dyn Communicator>,
    pub sp: Box<dyn Communicator>,
    pub tp: Box<dyn Communicator>,
    /// The data × sequence group ([`ParallelDims::data_members`]).
    pub dp_sp: Box<dyn Communicator>,
}

impl ProcessMesh {
    /// Collective over `world`: every rank must call it. Axis groups are created in the fixed
    /// order pp, dp, sp, tp, each rank joining the one group of each axis that contains it.
    pub fn new(world: Box<dyn Communicator>, dims: ParallelDims) -> Result<Self> {
        dims.validate(world.size())?;
        let rank = world.rank();
        let axis =
            |a: Axis| -> Result<Box<dyn Communicator>> { world.split(&dims.axis_members(rank, a)) };
        let (pp, dp, sp, tp) = (
            axis(Axis::Pp)?,
            axis(Axis::Dp)?,
            axis(Axis::Sp)?,
            axis(Axis::Tp)?,
        );
        let dp_sp = world.split(&dims.data_members(rank))?;
        Ok(ProcessMesh {
            dims,
            coords: dims.coords(rank),
            world,
            pp,
            dp,
            sp,
            tp,
            dp_sp,
        })
    }

    pub fn axis(&self, a: Axis) -> &dyn Communicator {
        match a {
            Axis::Pp => self.pp.as_ref(),
            Axis::Dp => self.dp.as_ref(),
            Axis::Sp => self.sp.as_ref(),
            Axis::Tp => self.tp.as_ref(),
        }
    }
}
