//! The all-to-all of expert parallelism: every rank sends a different number of rows to each
//! rank (the tokens routed to the experts it holds) and receives a different number back.
//! Forward sends `send[j]` rows to rank j and returns what arrives, in rank order; backward
//! sends each gradient row back where its row came from — the same exchange with the counts
//! swapped.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::autograd::{into_storage, storage_tensor, to_candle, Group};
use super::Communicator;
use crate::Result;

/// Rows `send[j]` of `t` (in order) to rank j; `recv[i]` rows arrive from rank i. Empty parts
/// are not sent.
pub fn exchange_rows(
    c: &dyn Communicator,
    t: &Tensor,
    send: &[usize],
    recv: &[usize],
) -> Result<Tensor> {
    let (n, r) = (c.size(), c.rank());
    if send.len() != n || recv.len() != n || t.dim(0)? != send.iter().sum::<usize>() {
        return Err(crate::msg!(
            "exchange: {} rows split as {send:?} over {n} ranks (receiving {recv:?})",
            t.dim(0)?
        ));
    }
    let starts: Vec<usize> = send
        .iter()
        .scan(0, |s, &k| {
            *s += k;
            Some(*s - k)
        })
        .collect();
    for dst in (0..n).filter(|&d| d != r && send[d] > 0) {
        c.send(&t.narrow(0, starts[dst], send[dst])?.contiguous()?, dst)?;
    }
    let mut parts = Vec::with_capacity(n);
    for src in (0..n).filter(|&s| recv[s] > 0) {
        let part = match src == r {
            true => t.narrow(0, starts[r], send[r])?,
            false => c.recv(src)?,
        };
        if part.dim(0)? != recv[src] {
            return Err(crate::msg!(
                "exchange: expected {} rows from rank {src}, got {}",
                recv[src],
                part.dim(0)?
            ));
        }
        parts.push(part);
    }
    if parts.is_empty() {
        let mut dims = t.dims().to_vec();
        dims[0] = 0;
        return Ok(Tensor::zeros(dims, t.dtype(), t.device())?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

struct ExchangeOp {
    group: Group,
    send: Vec<usize>,
    recv: Vec<usize>,
}

impl CustomOp1 for ExchangeOp {
    fn name(&self) -> &'static str {
        "expert-exchange"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let input = storage_tensor(s, l)?;
        let out = self
            .group
            .with(|c| exchange_rows(c, &input, &self.send, &self.recv))
            .map_err(to_candle)?;
        into_storage(&out)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let input = crate::cuda_op::tensor_of(s, l)?;
        let out = self
            .group
            .with(|c| exchange_rows(c, &input, &self.send, &self.recv))
            .map_err(to_candle)?;
        crate::cuda_op::storage_of(&out.to_device(input.device())?)
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        self.group
            .with(|c| exchange_rows(c, &g, &self.recv, &self.send))
            .map(Some)
            .map_err(to_candle)
    }
}

/// [`exchange_rows`] over `group`, with its backward (rows of `x` (rows, …) go to the ranks
/// `send` says; the result holds `recv`'s rows).
pub fn exchange(x: &Tensor, send: &[usize], recv: &[usize], group: &Group) -> Result<Tensor> {
    let op = ExchangeOp {
        group: group.clone(),
        send: send.to_vec(),
        recv: recv.to_vec(),
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}
