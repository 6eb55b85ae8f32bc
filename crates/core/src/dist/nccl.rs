//! The `nccl` backend (cargo feature `cuda`): GPU ranks, collectives by NCCL on each device's
//! candle stream. It is bootstrapped over another communicator (local threads or MPI), which
//! carries rank 0's NCCL unique id to the others.
//!
//! NCCL provides the collectives natively (overriding the trait's ring algorithms, whose
//! send-before-receive pattern would deadlock NCCL's blocking point-to-point). Byte counts are
//! recorded as the ring algorithm's per-rank traffic, which is what NCCL's ring moves. Tensors
//! on the host are copied to the device and the result copied back, so CPU-side callers work.
//!
//! A peer that dies leaves NCCL waiting: the launcher (mpirun) ends the job when a process
//! exits; set `NCCL_TIMEOUT`/watchdogs at the launcher level for hangs inside a kernel.

use candle_core::backend::BackendStorage;
use candle_core::cuda::{cudarc, CudaDType};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor,
};
use cudarc::driver::{CudaSlice, CudaView, DeviceRepr, ValidAsZeroBits};
use cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp as NcclOp};

use super::comm::{all_to_all_chunk, CommStats, Communicator, ReduceOp};
use crate::{Error, Result};

pub struct NcclComm {
    comm: Comm,
    /// The rank's own device (the same instance its tensors live on: candle treats two
    /// handles of one GPU as different devices).
    device: Device,
    /// Used to create sub-communicators (their unique ids travel over it).
    bootstrap: Box<dyn Communicator>,
    stats: CommStats,
}

// SAFETY: the NCCL communicator and CUDA stream are used by one thread at a time (callers share
// a communicator only behind a mutex, see `Group`).
unsafe impl Send for NcclComm {}

fn nccl_err(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("nccl: {e:?}"))
}

/// A forward-only custom op whose CUDA body is `f`.
struct CudaOp<F>(F);

impl<F> CustomOp1 for CudaOp<F>
where
    F: Fn(&CudaStorage, &Layout) -> candle_core::Result<(CudaStorage, Shape)>,
{
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("nccl: tensor is on the host (it should have been moved to the GPU)")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        (self.0)(s, l)
    }
}

/// Runs `f(input view, output buffer of out_len)` for element type `T`.
fn typed<T, F>(
    s: &CudaStorage,
    l: &Layout,
    out_len: usize,
    f: F,
) -> candle_core::Result<CudaStorage>
where
    T: CudaDType + NcclType + DeviceRepr + ValidAsZeroBits,
    F: FnOnce(CudaView<'_, T>, &mut CudaSlice<T>) -> candle_core::Result<()>,
{
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("nccl: input must be contiguous".into()))?;
    let src = s.as_cuda_slice::<T>()?.slice(start..end);
    let dev: CudaDevice = s.device().clone();
    let mut dst = dev.alloc_zeros::<T>(out_len)?;
    f(src, &mut dst)?;
    Ok(CudaStorage::wrap_cuda_slice(dst, dev))
}

/// Dispatches on the storage dtype; `$body` sees `$src: CudaView<T>` and `$dst: &mut CudaSlice<T>`.
macro_rules! by_dtype {
    ($s:expr, $l:expr, $len:expr, |$src:ident, $dst:ident| $body:expr) => {
        match $s.dtype() {
            DType::F32 => typed::<f32, _>($s, $l, $len, |$src, $dst| $body),
            DType::BF16 => typed::<half::bf16, _>($s, $l, $len, |$src, $dst| $body),
            DType::F16 => typed::<half::f16, _>($s, $l, $len, |$src, $dst| $body),
            DType::I64 => typed::<i64, _>($s, $l, $len, |$src, $dst| $body),
            DType::U32 => typed::<u32, _>($s, $l, $len, |$src, $dst| $body),
            DType::U8 => typed::<u8, _>($s, $l, $len, |$src, $dst| $body),
            d => candle_core::bail!("nccl: unsupported dtype {d:?}"),
        }
    };
}

fn nccl_op(op: ReduceOp) -> NcclOp {
    match op {
        ReduceOp::Sum => NcclOp::Sum,
        ReduceOp::Avg => NcclOp::Avg,
        ReduceOp::Max => NcclOp::Max,
    }
}

const DTYPES: [DType; 6] = [
    DType::F32,
    DType::BF16,
    DType::F16,
    DType::I64,
    DType::U32,
    DType::U8,
];

impl NcclComm {
    /// Collective over `bootstrap`: one NCCL rank per member, each on its GPU `device`.
    pub fn new(bootstrap: Box<dyn Communicator>, device: &Device) -> Result<Self> {
        let stream = device
            .as_cuda_device()
            .map_err(|_| crate::msg!("nccl: rank device {device:?} is not a GPU"))?
            .cuda_stream();
        let (rank, size) = (bootstrap.rank(), bootstrap.size());
        let id = if rank == 0 {
            let id = Id::new().map_err(|e| crate::msg!("ncclGetUniqueId: {e:?}"))?;
            let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            bootstrap.broadcast(&Tensor::from_vec(bytes, 128, &Device::Cpu)?, 0)?;
            id
        } else {
            let got: Vec<u8> = bootstrap
                .broadcast(&Tensor::zeros(128, DType::U8, &Device::Cpu)?, 0)?
                .to_vec1()?;
            let mut raw = [0 as std::ffi::c_char; 128];
            raw.iter_mut().zip(&got).for_each(|(r, &b)| *r = b as _);
            Id::uninit(raw)
        };
        let comm = Comm::from_rank(stream, rank, size, id).map_err(|e| Error::Comm {
            rank,
            msg: format!("ncclCommInitRank: {e:?}"),
        })?;
        Ok(NcclComm {
            comm,
            device: device.clone(),
            bootstrap,
            stats: CommStats::default(),
        })
    }

    fn to_gpu(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.to_device(&self.device)?.contiguous()?)
    }

    /// `t` moved to the GPU, `f` applied, the result moved back to `t`'s device.
    fn native(
        &self,
        t: &Tensor,
        f: impl Fn(&CudaStorage, &Layout) -> candle_core::Result<(CudaStorage, Shape)>,
    ) -> Result<Tensor> {
        let out = self.to_gpu(t)?.apply_op1_no_bwd(&CudaOp(f))?;
        Ok(out.to_device(t.device())?)
    }

    /// Sends `t` to `dst` and receives a tensor of the same shape from `src`, as one NCCL group.
    pub fn send_recv(&self, t: &Tensor, dst: usize, src: usize) -> Result<Tensor> {
        self.stats.record(t);
        let comm = &self.comm;
        self.native(t, |s, l| {
            let st = by_dtype!(s, l, l.shape().elem_count(), |src_v, out| {
                let mut g = comm.group();
                g.send(src_v, dst as i32).map_err(nccl_err)?;
                g.recv(out.as_view_mut(), src as i32).map_err(nccl_err)?;
                drop(g);
                Ok(())
            })?;
            Ok((st, l.shape().clone()))
        })
    }

    fn record_ring(&self, bytes: usize, factor: f64) {
        let n = self.size() as f64;
        self.stats
            .record_bytes((bytes as f64 * factor * (n - 1.0) / n) as u64);
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn size(&self) -> usize {
        self.comm.world_size()
    }

    /// A header (dtype, rank, dims) then the data; `recv` must be called by `dst` in order.
    fn send(&self, t: &Tensor, dst: usize) -> Result<()> {
        let code = DTYPES
            .iter()
            .position(|&d| d == t.dtype())
            .ok_or_else(|| crate::msg!("nccl: cannot send dtype {:?}", t.dtype()))?;
        let mut header = vec![code as i64, t.rank() as i64];
        header.extend(t.dims().iter().map(|&d| d as i64));
        header.resize(8, 0);
        if t.rank() > 6 {
            return Err(crate::msg!(
                "nccl: cannot send a tensor of rank {}",
                t.rank()
            ));
        }
        for part in [Tensor::new(header, &self.device)?, self.to_gpu(t)?] {
            self.stats.record(&part);
            let comm = &self.comm;
            part.apply_op1_no_bwd(&CudaOp(|s: &CudaStorage, l: &Layout| {
                // The op's output is a 1-element placeholder; the send is the effect.
                let st = by_dtype!(s, l, 1, |v, _out| comm
                    .send(&v, dst as i32)
                    .map_err(nccl_err));
                Ok((st?, Shape::from(1)))
            }))?;
        }
        Ok(())
    }

    fn recv(&self, src: usize) -> Result<Tensor> {
        let comm = &self.comm;
        let receive = |dtype: DType, dims: &[usize]| -> Result<Tensor> {
            let like = Tensor::zeros(dims, dtype, &self.device)?;
            Ok(
                like.apply_op1_no_bwd(&CudaOp(|s: &CudaStorage, l: &Layout| {
                    let st = by_dtype!(s, l, l.shape().elem_count(), |_v, out| {
                        comm.recv(out, src as i32).map(|_| ()).map_err(nccl_err)
                    })?;
                    Ok((st, l.shape().clone()))
                }))?,
            )
        };
        let header: Vec<i64> = receive(DType::I64, &[8])?.to_vec1()?;
        let dtype = *DTYPES
            .get(header[0] as usize)
            .ok_or_else(|| crate::msg!("nccl: malformed header {header:?}"))?;
        let dims: Vec<usize> = header[2..2 + header[1] as usize]
            .iter()
            .map(|&d| d as usize)
            .collect();
        receive(dtype, &dims)
    }

    fn stats(&self) -> &CommStats {
        &self.stats
    }

    fn split(&self, members: &[usize]) -> Result<Box<dyn Communicator>> {
        let sub = self.bootstrap.split(members)?;
        Ok(Box::new(NcclComm::new(sub, &self.device)?))
    }

    fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.record_ring(t.elem_count() * t.dtype().size_in_bytes(), 2.0);
        let comm = &self.comm;
        self.native(t, |s, l| {
            let n = l.shape().elem_count();
            let st = by_dtype!(s, l, n, |v, out| comm
                .all_reduce(&v, out, &nccl_op(op))
                .map(|_| ())
                .map_err(nccl_err))?;
            Ok((st, l.shape().clone()))
        })
    }

    fn reduce_scatter_flat(&self, flat: &Tensor, chunk: usize, op: ReduceOp) -> Result<Tensor> {
        self.record_ring(flat.elem_count() * flat.dtype().size_in_bytes(), 1.0);
        let comm = &self.comm;
        self.native(flat, |s, l| {
            let st = by_dtype!(s, l, chunk, |v, out| comm
                .reduce_scatter(&v, out, &nccl_op(op))
                .map(|_| ())
                .map_err(nccl_err))?;
            Ok((st, Shape::from(chunk)))
        })
    }

    fn all_gather_flat(&self, mine: &Tensor, chunk: usize) -> Result<Tensor> {
        let n = self.size();
        self.record_ring(chunk * n * mine.dtype().size_in_bytes(), 1.0);
        let comm = &self.comm;
        self.native(mine, |s, l| {
            let st = by_dtype!(s, l, chunk * n, |v, out| comm
                .all_gather(&v, out)
                .map(|_| ())
                .map_err(nccl_err))?;
            Ok((st, Shape::from(chunk * n)))
        })
    }

    /// Every rank passes a tensor of the root's shape and dtype (non-roots' values are ignored).
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if self.rank() == root {
            self.stats.record(t);
        }
        let (comm, me) = (&self.comm, self.rank());
        self.native(t, |s, l| {
            let st = by_dtype!(s, l, l.shape().elem_count(), |v, out| {
                let send = (me == root).then_some(&v);
                comm.broadcast(send, out, root as i32)
                    .map(|_| ())
                    .map_err(nccl_err)
            })?;
            Ok((st, l.shape().clone()))
        })
    }

    fn all_to_all(&self, t: &Tensor) -> Result<Tensor> {
        let (n, r) = (self.size(), self.rank());
        let c = all_to_all_chunk(t, n)?;
        let mut parts: Vec<Option<Tensor>> = vec![None; n];
        parts[r] = Some(t.narrow(0, r * c, c)?);
        for k in 1..n {
            let (dst, src) = ((r + k) % n, (r + n - k) % n);
            let piece = t.narrow(0, dst * c, c)?.contiguous()?;
            parts[src] = Some(self.send_recv(&piece, dst, src)?);
        }
        let parts: Vec<Tensor> = parts.into_iter().map(|p| p.expect("filled")).collect();
        Ok(Tensor::cat(&parts, 0)?)
    }

    fn barrier(&self) -> Result<()> {
        let one = Tensor::new(&[1f32], &self.device)?;
        self.all_reduce(&one, ReduceOp::Sum).map(|_| ())
    }
}
