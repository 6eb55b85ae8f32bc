//! Collectives with backward rules, for use inside model code (tensor and sequence parallel).
//!
//! Convention (Megatron's): a tensor replicated across the group stands for one logical tensor,
//! and its gradient on every rank is that tensor's full gradient. Hence the pairs:
//!
//! | op                  | forward                  | backward                 |
//! |---------------------|--------------------------|--------------------------|
//! | `copy_to` (f)       | identity                 | all-reduce (sum)         |
//! | `reduce_from` (g)   | all-reduce (sum)         | identity                 |
//! | `gather_from`       | all-gather along `dim`   | reduce-scatter (sum)     |
//! | `scatter_reduce`    | reduce-scatter along dim | all-gather               |
//! | `split_to`          | keep own chunk of `dim`  | all-gather               |
//! | `all_to_all`        | all-to-all (s→g dims)    | all-to-all (g→s dims)    |
//! | `ring_shift`        | to rank+1, from rank−1   | to rank−1, from rank+1   |
//!
//! Each op is a Candle custom op: the forward runs the collective on its input (a host copy on
//! the CPU, the device tensor on a GPU), the backward runs the paired collective on the
//! incoming gradient.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use super::comm::{Communicator, ReduceOp};
use crate::Result;

/// A communicator shared by the ops of one model (custom ops must be `Send + Sync`).
#[derive(Clone)]
pub struct Group {
    comm: Arc<Mutex<Box<dyn Communicator>>>,
    rank: usize,
    size: usize,
}

impl Group {
    pub fn new(comm: Box<dyn Communicator>) -> Self {
        let (rank, size) = (comm.rank(), comm.size());
        Group {
            comm: Arc::new(Mutex::new(comm)),
            rank,
            size,
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Runs `f` with the communicator (collectives on one group are issued one at a time).
    pub fn with<R>(&self, f: impl FnOnce(&dyn Communicator) -> R) -> R {
        let guard = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        f(guard.as_ref())
    }

    pub fn bytes_sent(&self) -> u64 {
        self.with(|c| c.stats().bytes_sent())
    }
}

/// What one direction of an op does to its tensor.
#[derive(Clone, Copy, Debug)]
enum Collective {
    Identity,
    AllReduce,
    AllGather(usize),
    ReduceScatter(usize),
    Split(usize),
    AllToAll {
        scatter: usize,
        gather: usize,
    },
    /// Send to rank + k, receive from rank − k (mod size).
    Shift(usize),
}

impl Collective {
    fn run(self, g: &Group, t: &Tensor) -> Result<Tensor> {
        let n = g.size();
        match self {
            Collective::Identity => Ok(t.clone()),
            Collective::AllReduce => g.with(|c| c.all_reduce(t, ReduceOp::Sum)),
            Collective::AllGather(dim) => {
                let stacked = g.with(|c| c.all_gather(&t.unsqueeze(0)?.contiguous()?))?;
                let parts: Vec<Tensor> = (0..n)
                    .map(|i| stacked.get(i))
                    .collect::<candle_core::Result<_>>()?;
                Ok(Tensor::cat(&parts, dim)?)
            }
            Collective::ReduceScatter(dim) => {
                let stacked = Tensor::stack(&t.chunk_exact(n, dim)?, 0)?.contiguous()?;
                let mine = g.with(|c| c.reduce_scatter(&stacked, ReduceOp::Sum))?;
                Ok(mine.squeeze(0)?)
            }
            Collective::Split(dim) => Ok(t.chunk_exact(n, dim)?[g.rank()].contiguous()?),
            Collective::AllToAll { scatter, gather } => {
                let stacked = Tensor::stack(&t.chunk_exact(n, scatter)?, 0)?.contiguous()?;
                let got = g.with(|c| c.all_to_all(&stacked))?;
                let parts: Vec<Tensor> = (0..n)
                    .map(|i| got.get(i))
                    .collect::<candle_core::Result<_>>()?;
                Ok(Tensor::cat(&parts, gather)?.contiguous()?)
            }
            Collective::Shift(k) => g.with(|c| {
                let r = g.rank();
                c.send(t, (r + k) % n)?;
                c.recv((r + n - k % n) % n)
            }),
        }
    }
}

trait ChunkExact {
    fn chunk_exact(&self, n: usize, dim: usize) -> Result<Vec<Tensor>>;
}

impl ChunkExact for Tensor {
    fn chunk_exact(&self, n: usize, dim: usize) -> Result<Vec<Tensor>> {
        let len = self.dim(dim)?;
        if len % n != 0 {
            return Err(crate::msg!(
                "collective: dim {dim} of shape {:?} ({len}) is not divisible by the group size {n}",
                self.dims()
            ));
        }
        let c = len / n;
        Ok((0..n)
            .map(|i| self.narrow(dim, i * c, c))
            .collect::<candle_core::Result<_>>()?)
    }
}

struct CollectiveOp {
    group: Group,
    fwd: Collective,
    bwd: Collective,
}

pub(super) fn to_candle(e: crate::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// The host tensor a custom op's input storage describes.
pub(super) fn storage_tensor(s: &CpuStorage, l: &Layout) -> candle_core::Result<Tensor> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("collective op: input must be contiguous".into()))?;
    let dev = &candle_core::Device::Cpu;
    match s {
        CpuStorage::F32(v) => Tensor::from_slice(&v[start..end], l.shape(), dev),
        CpuStorage::BF16(v) => Tensor::from_slice(&v[start..end], l.shape(), dev),
        CpuStorage::F16(v) => Tensor::from_slice(&v[start..end], l.shape(), dev),
        _ => Err(candle_core::Error::Msg(
            "collective op: only f32, bf16 and f16 tensors are supported".into(),
        )),
    }
}

pub(super) fn into_storage(t: &Tensor) -> candle_core::Result<(CpuStorage, Shape)> {
    let flat = t.flatten_all()?;
    let s = match t.dtype() {
        DType::F32 => CpuStorage::F32(flat.to_vec1()?),
        DType::BF16 => CpuStorage::BF16(flat.to_vec1()?),
        DType::F16 => CpuStorage::F16(flat.to_vec1()?),
        d => candle_core::bail!("collective op: unsupported dtype {d:?}"),
    };
    Ok((s, t.shape().clone()))
}

impl CustomOp1 for CollectiveOp {
    fn name(&self) -> &'static str {
        "collective"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let input = storage_tensor(s, l)?;
        let out = self.fwd.run(&self.group, &input).map_err(to_candle)?;
        into_storage(&out)
    }

    /// On the GPU the collective runs on the device tensor (NCCL), no host copy.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let input = crate::cuda_op::tensor_of(s, l)?;
        let out = self.fwd.run(&self.group, &input).map_err(to_candle)?;
        crate::cuda_op::storage_of(&out.to_device(input.device())?)
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        self.bwd.run(&self.group, &g).map(Some).map_err(to_candle)
    }
}

fn apply(x: &Tensor, group: &Group, fwd: Collective, bwd: Collective) -> Result<Tensor> {
    if group.size() == 1 {
        return Ok(x.clone());
    }
    let op = CollectiveOp {
        group: group.clone(),
        fwd,
        bwd,
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

/// Megatron's f: identity forward, all-reduce backward (enters a tensor-parallel region).
pub fn copy_to(x: &Tensor, g: &Group) -> Result<Tensor> {
    apply(x, g, Collective::Identity, Collective::AllReduce)
}

/// Megatron's g: all-reduce forward, identity backward (leaves a row-parallel region).
pub fn reduce_from(x: &Tensor, g: &Group) -> Result<Tensor> {
    apply(x, g, Collective::AllReduce, Collective::Identity)
}

/// All-gather along `dim` forward, reduce-scatter backward (sequence-parallel entry).
pub fn gather_from(x: &Tensor, dim: usize, g: &Group) -> Result<Tensor> {
    apply(
        x,
        g,
        Collective::AllGather(dim),
        Collective::ReduceScatter(dim),
    )
}

/// All-gather along `dim` forward; backward keeps this rank's chunk of the gradient. For a
/// result every rank then uses alike (a replicated loss), whose gradient is whole everywhere.
pub fn gather_whole(x: &Tensor, dim: usize, g: &Group) -> Result<Tensor> {
    apply(x, g, Collective::AllGather(dim), Collective::Split(dim))
}

/// Reduce-scatter along `dim` forward, all-gather backward (sequence-parallel exit).
pub fn scatter_reduce(x: &Tensor, dim: usize, g: &Group) -> Result<Tensor> {
    apply(
        x,
        g,
        Collective::ReduceScatter(dim),
        Collective::AllGather(dim),
    )
}

/// Keeps this rank's chunk of `dim` forward, all-gathers the gradient backward.
pub fn split_to(x: &Tensor, dim: usize, g: &Group) -> Result<Tensor> {
    apply(x, g, Collective::Split(dim), Collective::AllGather(dim))
}

/// Passes `x` one rank along the ring (sent to rank + 1, received from rank − 1); the gradient
/// goes back the other way (ring attention's K/V rotation).
pub fn ring_shift(x: &Tensor, g: &Group) -> Result<Tensor> {
    let back = g.size() - 1;
    apply(x, g, Collective::Shift(1), Collective::Shift(back))
}

/// Splits `scatter` into chunks sent to each rank and concatenates what arrives along `gather`
/// (Ulysses: sequence-sharded → head-sharded); the backward is the inverse all-to-all.
pub fn all_to_all(x: &Tensor, scatter: usize, gather: usize, g: &Group) -> Result<Tensor> {
    apply(
        x,
        g,
        Collective::AllToAll { scatter, gather },
        Collective::AllToAll {
            scatter: gather,
            gather: scatter,
        },
    )
}
