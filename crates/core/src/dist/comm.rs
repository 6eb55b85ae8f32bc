//! The communicator trait. Backends provide point-to-point `send`/`recv` and group creation;
//! the collectives are ring algorithms on top (a backend with native collectives overrides
//! them). Ring all-reduce = reduce-scatter + all-gather, so each rank sends 2·(N−1)/N of the
//! tensor — the figure the accounting tests assert.

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::Tensor;

use crate::Result;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Avg,
    Max,
}

/// Bytes and messages this rank has sent.
#[derive(Debug, Default)]
pub struct CommStats {
    bytes_sent: AtomicU64,
    messages: AtomicU64,
}

impl CommStats {
    pub fn record(&self, t: &Tensor) {
        let bytes = t.elem_count() * t.dtype().size_in_bytes();
        self.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
        self.messages.fetch_add(1, Ordering::Relaxed);
    }

    /// For backends whose native collectives move `bytes` without a tensor per message.
    pub fn record_bytes(&self, bytes: u64) {
        self.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
        self.messages.fetch_add(1, Ordering::Relaxed);
    }

    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }

    pub fn messages(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }
}

pub trait Communicator: Send {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Sends a copy of `t` to `dst` (never blocks on the receiver).
    fn send(&self, t: &Tensor, dst: usize) -> Result<()>;
    /// Next tensor from `src`; fails if `src` is gone or nothing arrives within the timeout.
    fn recv(&self, src: usize) -> Result<Tensor>;
    fn stats(&self) -> &CommStats;
    /// A communicator over `members` (ranks of this communicator, including this rank).
    /// Every member must call it with the same list.
    fn split(&self, members: &[usize]) -> Result<Box<dyn Communicator>>;

    /// Elementwise reduction across ranks; every rank gets the result.
    fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        ring_all_reduce(self, t, op)
    }

    /// `t` (N·c, …) split along dim 0; rank r gets chunk r reduced over ranks.
    fn reduce_scatter(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let n = self.size();
        let rows = t.dim(0)?;
        if rows % n != 0 {
            return Err(crate::msg!(
                "reduce_scatter: dim 0 ({rows}) is not divisible by {n} ranks"
            ));
        }
        let mut dims = t.dims().to_vec();
        dims[0] = rows / n;
        let chunk = t.elem_count() / n;
        let mine = self.reduce_scatter_flat(&t.flatten_all()?, chunk, op)?;
        Ok(mine.reshape(dims)?)
    }

    /// Concatenation along dim 0 of every rank's `t` (all the same shape), in rank order.
    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let mut dims = t.dims().to_vec();
        if dims.is_empty() {
            dims.push(1);
        }
        dims[0] *= self.size();
        let full = self.all_gather_flat(&t.flatten_all()?, t.elem_count())?;
        Ok(full.reshape(dims)?)
    }

    /// `root`'s tensor on every rank.
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if self.rank() == root {
            for dst in (0..self.size()).filter(|&d| d != root) {
                self.send(t, dst)?;
            }
            Ok(t.clone())
        } else {
            self.recv(root)
        }
    }

    /// Splits dim 0 into N chunks, sends chunk j to rank j, concatenates what arrives.
    fn all_to_all(&self, t: &Tensor) -> Result<Tensor> {
        ring_all_to_all(self, t)
    }

    fn barrier(&self) -> Result<()> {
        let one = Tensor::new(&[1f32], &candle_core::Device::Cpu)?;
        self.all_reduce(&one, ReduceOp::Sum).map(|_| ())
    }

    /// Reduce-scatter of a flat tensor of `n·chunk` elements: rank r ends with chunk r.
    fn reduce_scatter_flat(&self, flat: &Tensor, chunk: usize, op: ReduceOp) -> Result<Tensor> {
        ring_reduce_scatter_flat(self, flat, chunk, op)
    }

    /// All-gather of `chunk`-element pieces; the result is the concatenation in rank order.
    fn all_gather_flat(&self, mine: &Tensor, chunk: usize) -> Result<Tensor> {
        ring_all_gather_flat(self, mine, chunk)
    }
}

/// Rows per destination of an all-to-all of `t` over `n` ranks.
pub(crate) fn all_to_all_chunk(t: &Tensor, n: usize) -> Result<usize> {
    let rows = t.dim(0)?;
    if rows % n != 0 {
        return Err(crate::msg!(
            "all_to_all: dim 0 ({rows}) is not divisible by {n} ranks"
        ));
    }
    Ok(rows / n)
}

fn pad(flat: &Tensor, len: usize) -> Result<Tensor> {
    let have = flat.elem_count();
    if have == len {
        return Ok(flat.clone());
    }
    let zeros = Tensor::zeros(len - have, flat.dtype(), flat.device())?;
    Ok(Tensor::cat(&[flat, &zeros], 0)?)
}

// The collectives as rings of point-to-point messages: the local backend's, and the MPI
// backend's when `parallel.mpi_collectives = "ring"` (bit-identical results across backends).

pub(crate) fn ring_all_reduce<C: Communicator + ?Sized>(
    c: &C,
    t: &Tensor,
    op: ReduceOp,
) -> Result<Tensor> {
    let n = c.size();
    if n == 1 {
        return Ok(t.clone());
    }
    let flat = t.flatten_all()?;
    let len = flat.elem_count();
    let chunk = len.div_ceil(n);
    let padded = pad(&flat, chunk * n)?;
    let mine = c.reduce_scatter_flat(&padded, chunk, op)?;
    let full = c.all_gather_flat(&mine, chunk)?;
    Ok(full.narrow(0, 0, len)?.reshape(t.shape())?)
}

pub(crate) fn ring_all_to_all<C: Communicator + ?Sized>(c: &C, t: &Tensor) -> Result<Tensor> {
    let (n, r) = (c.size(), c.rank());
    let rows = all_to_all_chunk(t, n)?;
    for dst in (0..n).filter(|&d| d != r) {
        c.send(&t.narrow(0, dst * rows, rows)?.contiguous()?, dst)?;
    }
    let parts: Vec<Tensor> = (0..n)
        .map(|src| {
            if src == r {
                Ok(t.narrow(0, r * rows, rows)?)
            } else {
                c.recv(src)
            }
        })
        .collect::<Result<_>>()?;
    Ok(Tensor::cat(&parts, 0)?)
}

pub(crate) fn ring_reduce_scatter_flat<C: Communicator + ?Sized>(
    c: &C,
    flat: &Tensor,
    chunk: usize,
    op: ReduceOp,
) -> Result<Tensor> {
    let (n, r) = (c.size(), c.rank());
    let mut chunks: Vec<Tensor> = (0..n)
        .map(|i| flat.narrow(0, i * chunk, chunk))
        .collect::<candle_core::Result<_>>()?;
    if n > 1 {
        let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
        for s in 0..n - 1 {
            let send_idx = (r + 2 * n - s - 1) % n;
            let recv_idx = (r + 2 * n - s - 2) % n;
            c.send(&chunks[send_idx].contiguous()?, next)?;
            let got = c.recv(prev)?;
            chunks[recv_idx] = match op {
                ReduceOp::Max => chunks[recv_idx].maximum(&got)?,
                _ => (&chunks[recv_idx] + got)?,
            };
        }
    }
    let mine = chunks.swap_remove(r);
    Ok(match op {
        ReduceOp::Avg => (mine / n as f64)?,
        _ => mine,
    })
}

pub(crate) fn ring_all_gather_flat<C: Communicator + ?Sized>(
    c: &C,
    mine: &Tensor,
    chunk: usize,
) -> Result<Tensor> {
    let (n, r) = (c.size(), c.rank());
    let mut chunks: Vec<Option<Tensor>> = vec![None; n];
    chunks[r] = Some(mine.clone());
    let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
    for s in 0..n.saturating_sub(1) {
        let send_idx = (r + n - s) % n;
        let recv_idx = (r + 2 * n - s - 1) % n;
        c.send(chunks[send_idx].as_ref().expect("held"), next)?;
        chunks[recv_idx] = Some(c.recv(prev)?);
    }
    let parts: Vec<Tensor> = chunks.into_iter().map(|c| c.expect("gathered")).collect();
    debug_assert!(parts.iter().all(|p| p.elem_count() == chunk));
    Ok(Tensor::cat(&parts, 0)?)
}
