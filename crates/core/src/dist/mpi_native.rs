//! The MPI library's own collectives (`MPI_Allreduce`, `MPI_Reduce_scatter_block`,
//! `MPI_Allgather`, `MPI_Alltoall`), used by the `mpi` backend unless
//! `parallel.mpi_collectives = "ring"`. The library picks its algorithm (and its summation
//! order, so results agree with the ring to rounding, not bit for bit). f32 only; other dtypes
//! take the ring. Bytes are counted as the ring would send them (2·(N−1)/N of an all-reduced
//! tensor), so `comm_bytes` means the same under both.

use candle_core::{DType, Tensor};
use mpi::collective::SystemOperation;
use mpi::traits::CommunicatorCollectives;

use super::comm::{all_to_all_chunk, ReduceOp};
use super::mpi::MpiComm;
use super::Communicator as _;
use crate::Result;

impl MpiComm {
    /// Whether a collective over `t` runs natively.
    pub(super) fn native_for(&self, t: &Tensor) -> bool {
        self.native && t.dtype() == DType::F32 && self.size() > 1
    }

    fn record_f32(&self, elems: usize) {
        self.stats.record_bytes(4 * elems as u64);
    }

    fn reduce(&self, send: &[f32], recv: &mut [f32], op: ReduceOp, scatter: bool) {
        let op_ = match op {
            ReduceOp::Max => SystemOperation::max(),
            ReduceOp::Sum | ReduceOp::Avg => SystemOperation::sum(),
        };
        if scatter {
            self.comm.reduce_scatter_block_into(send, recv, op_);
        } else {
            self.comm.all_reduce_into(send, recv, op_);
        }
        if op == ReduceOp::Avg {
            let n = self.size() as f32;
            recv.iter_mut().for_each(|x| *x /= n);
        }
    }

    pub(super) fn native_all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let send: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let mut recv = vec![0f32; send.len()];
        self.reduce(&send, &mut recv, op, false);
        let n = self.size();
        self.record_f32(2 * (n - 1) * send.len().div_ceil(n));
        Ok(Tensor::from_vec(recv, t.shape(), t.device())?)
    }

    pub(super) fn native_reduce_scatter_flat(
        &self,
        flat: &Tensor,
        chunk: usize,
        op: ReduceOp,
    ) -> Result<Tensor> {
        let send: Vec<f32> = flat.to_vec1()?;
        let mut recv = vec![0f32; chunk];
        self.reduce(&send, &mut recv, op, true);
        self.record_f32((self.size() - 1) * chunk);
        Ok(Tensor::from_vec(recv, chunk, flat.device())?)
    }

    pub(super) fn native_all_gather_flat(&self, mine: &Tensor, chunk: usize) -> Result<Tensor> {
        let send: Vec<f32> = mine.flatten_all()?.to_vec1()?;
        let mut recv = vec![0f32; chunk * self.size()];
        self.comm.all_gather_into(&send[..], &mut recv[..]);
        self.record_f32((self.size() - 1) * chunk);
        Ok(Tensor::from_vec(recv, chunk * self.size(), mine.device())?)
    }

    pub(super) fn native_all_to_all(&self, t: &Tensor) -> Result<Tensor> {
        let n = self.size();
        // Validates the split; MPI_Alltoall sends equal blocks of the flat data.
        all_to_all_chunk(t, n)?;
        let send: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let mut recv = vec![0f32; send.len()];
        self.comm.all_to_all_into(&send[..], &mut recv[..]);
        self.record_f32((n - 1) * send.len() / n);
        Ok(Tensor::from_vec(recv, t.shape(), t.device())?)
    }
}
