//! The `mpi` backend (cargo feature `mpi`): ranks are processes started by `mpirun` / `srun`, on
//! one host or many. Collectives are the MPI library's own (`mpi_native.rs`) or, with
//! `parallel.mpi_collectives = "ring"`, the same ring algorithms as the local backend over
//! point-to-point messages, so a run gives bit-identical results under either backend.
//!
//! Sends are non-blocking (`MPI_Isend` of an owned buffer, completed lazily), so a ring step in
//! which every rank sends before it receives cannot deadlock on large messages. Receives poll
//! with `MPI_Iprobe` until the timeout, so a rank that stops answering is named, never waited on
//! forever; a rank that exits makes `mpirun` end the job.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use mpi::environment::Universe;
use mpi::ffi;
use mpi::point_to_point::Source;
use mpi::topology::{Communicator as _, Group as _, SimpleCommunicator};
use mpi::traits::AsRaw;

use super::comm::{
    ring_all_gather_flat, ring_all_reduce, ring_all_to_all, ring_reduce_scatter_flat, CommStats,
    Communicator, ReduceOp,
};
use crate::{Error, Result};

struct Pending {
    request: ffi::MPI_Request,
    _buffer: Vec<u8>,
}

pub struct MpiComm {
    pub(super) comm: SimpleCommunicator,
    /// The library's collectives (default) or the ring over point-to-point messages.
    pub(super) native: bool,
    /// World rank of each member, for messages that name a rank.
    global: Vec<usize>,
    pending: RefCell<Vec<Pending>>,
    timeout: Duration,
    pub(super) stats: CommStats,
    // Declared last: dropped after `comm`, so MPI is finalized after every handle is freed.
    _universe: Arc<Universe>,
}

// SAFETY: MPI handles are plain integers/pointers into the MPI library; MPI is initialised with
// `MPI_THREAD_MULTIPLE` where available, and a communicator is used by one thread at a time
// (callers share it only behind a mutex, see `Group`).
unsafe impl Send for MpiComm {}

pub struct MpiGuard(#[allow(dead_code)] Arc<Universe>);

/// True when this process was started by an MPI launcher (Open MPI, MPICH/Hydra, Slurm).
pub fn launched_by_mpirun() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

/// Ends every process of the MPI job with `code` (MPI must be initialised).
pub fn mpi_abort(code: i32) -> ! {
    SimpleCommunicator::world().abort(code)
}

impl MpiComm {
    /// The same communicator with the MPI library's collectives (`true`, the default) or the
    /// ring over point-to-point messages (bit-identical to the local backend).
    pub fn with_native_collectives(mut self, native: bool) -> Self {
        self.native = native;
        self
    }

    /// Initialises MPI (once per process) and returns the world communicator.
    pub fn world(timeout: Duration) -> Result<MpiComm> {
        let (universe, _level) = mpi::initialize_with_threading(mpi::Threading::Multiple)
            .ok_or_else(|| {
                crate::msg!("MPI is already initialised: create the world communicator only once")
            })?;
        let comm = universe.world();
        let n = comm.size() as usize;
        Ok(MpiComm {
            comm,
            native: true,
            global: (0..n).collect(),
            pending: RefCell::new(Vec::new()),
            timeout,
            stats: CommStats::default(),
            _universe: Arc::new(universe),
        })
    }

    fn error(&self, msg: String) -> Error {
        Error::Comm {
            rank: self.global[self.rank()],
            msg,
        }
    }

    /// Keeps MPI initialised while held (MPI is finalised when the last communicator and
    /// guard are gone), e.g. so that a failed rank can still call `mpi_abort`.
    pub fn keep_alive(&self) -> MpiGuard {
        MpiGuard(self._universe.clone())
    }

    /// Frees completed sends.
    fn progress(&self) {
        self.pending.borrow_mut().retain_mut(|p| {
            let mut done = 0;
            // SAFETY: `request` came from MPI_Isend and has not completed yet.
            unsafe { ffi::MPI_Test(&mut p.request, &mut done, ffi::RSMPI_STATUS_IGNORE) };
            done == 0
        });
    }

    fn drain(&self) {
        for mut p in self.pending.borrow_mut().drain(..) {
            // SAFETY: as above; the buffer lives until the wait returns.
            unsafe { ffi::MPI_Wait(&mut p.request, ffi::RSMPI_STATUS_IGNORE) };
        }
    }
}

impl Drop for MpiComm {
    fn drop(&mut self) {
        self.drain();
    }
}

const DTYPES: [DType; 7] = [
    DType::F32,
    DType::BF16,
    DType::F16,
    DType::F64,
    DType::U32,
    DType::I64,
    DType::U8,
];

/// Message = dtype code, rank, dims (u64 LE each), then the raw elements.
fn encode(t: &Tensor) -> Result<Vec<u8>> {
    let code = DTYPES
        .iter()
        .position(|&d| d == t.dtype())
        .ok_or_else(|| crate::msg!("mpi: cannot send dtype {:?}", t.dtype()))?;
    let mut out = vec![code as u8, t.rank() as u8];
    for &d in t.dims() {
        out.extend_from_slice(&(d as u64).to_le_bytes());
    }
    let flat = t.flatten_all()?;
    macro_rules! raw {
        ($ty:ty) => {{
            let v = flat.to_vec1::<$ty>()?;
            // SAFETY: plain-old-data elements viewed as bytes; `v` outlives the borrow.
            let bytes = unsafe {
                std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(&v[..]))
            };
            out.extend_from_slice(bytes);
        }};
    }
    match t.dtype() {
        DType::F32 => raw!(f32),
        DType::BF16 => raw!(half::bf16),
        DType::F16 => raw!(half::f16),
        DType::F64 => raw!(f64),
        DType::U32 => raw!(u32),
        DType::I64 => raw!(i64),
        _ => raw!(u8),
    }
    Ok(out)
}

fn decode(bytes: &[u8]) -> Result<Tensor> {
    let bad = || crate::msg!("mpi: malformed message of {} bytes", bytes.len());
    let (&code, rest) = bytes.split_first().ok_or_else(bad)?;
    let (&rank, mut rest) = rest.split_first().ok_or_else(bad)?;
    let dtype = *DTYPES.get(code as usize).ok_or_else(bad)?;
    let mut dims = Vec::with_capacity(rank as usize);
    for _ in 0..rank {
        let (d, r) = rest.split_at_checked(8).ok_or_else(bad)?;
        dims.push(u64::from_le_bytes(d.try_into().expect("8 bytes")) as usize);
        rest = r;
    }
    Ok(Tensor::from_raw_buffer(rest, dtype, &dims, &Device::Cpu)?)
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }

    fn size(&self) -> usize {
        self.comm.size() as usize
    }

    fn send(&self, t: &Tensor, dst: usize) -> Result<()> {
        self.stats.record(t);
        self.progress();
        let buffer = encode(t)?;
        let count = i32::try_from(buffer.len())
            .map_err(|_| self.error(format!("message of {} bytes is over 2 GiB", buffer.len())))?;
        let mut request = std::mem::MaybeUninit::<ffi::MPI_Request>::uninit();
        // SAFETY: the buffer is moved into `pending` (its heap storage does not move) and kept
        // until MPI reports the send complete.
        let rc = unsafe {
            ffi::MPI_Isend(
                buffer.as_ptr() as *const _,
                count,
                ffi::RSMPI_UINT8_T,
                dst as i32,
                0,
                self.comm.as_raw(),
                request.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(self.error(format!(
                "MPI_Isend to rank {} failed ({rc})",
                self.global[dst]
            )));
        }
        self.pending.borrow_mut().push(Pending {
            // SAFETY: initialised by the successful MPI_Isend.
            request: unsafe { request.assume_init() },
            _buffer: buffer,
        });
        Ok(())
    }

    fn recv(&self, src: usize) -> Result<Tensor> {
        let start = Instant::now();
        let from = self.comm.process_at_rank(src as i32);
        let mut spins = 0u32;
        loop {
            if from.immediate_probe().is_some() {
                let (bytes, _) = from.receive_vec::<u8>();
                self.progress();
                return decode(&bytes);
            }
            self.progress();
            if start.elapsed() > self.timeout {
                return Err(self.error(format!(
                    "rank {} sent nothing within the {:?} timeout",
                    self.global[src], self.timeout
                )));
            }
            spins += 1;
            if spins > 1000 {
                std::thread::sleep(Duration::from_micros(50));
            } else {
                std::thread::yield_now();
            }
        }
    }

    fn stats(&self) -> &CommStats {
        &self.stats
    }

    fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        match self.native_for(t) {
            true => self.native_all_reduce(t, op),
            false => ring_all_reduce(self, t, op),
        }
    }

    fn reduce_scatter_flat(&self, flat: &Tensor, chunk: usize, op: ReduceOp) -> Result<Tensor> {
        match self.native_for(flat) {
            true => self.native_reduce_scatter_flat(flat, chunk, op),
            false => ring_reduce_scatter_flat(self, flat, chunk, op),
        }
    }

    fn all_gather_flat(&self, mine: &Tensor, chunk: usize) -> Result<Tensor> {
        match self.native_for(mine) {
            true => self.native_all_gather_flat(mine, chunk),
            false => ring_all_gather_flat(self, mine, chunk),
        }
    }

    fn all_to_all(&self, t: &Tensor) -> Result<Tensor> {
        match self.native_for(t) {
            true => self.native_all_to_all(t),
            false => ring_all_to_all(self, t),
        }
    }

    fn split(&self, members: &[usize]) -> Result<Box<dyn Communicator>> {
        if !members.contains(&self.rank()) {
            return Err(crate::msg!(
                "split: rank {} is not among {members:?}",
                self.rank()
            ));
        }
        let ranks: Vec<i32> = members.iter().map(|&m| m as i32).collect();
        let group = self.comm.group().include(&ranks);
        let comm = self
            .comm
            .split_by_subgroup(&group)
            .ok_or_else(|| self.error(format!("MPI_Comm_create_group over {members:?} failed")))?;
        Ok(Box::new(MpiComm {
            comm,
            native: self.native,
            global: members.iter().map(|&m| self.global[m]).collect(),
            pending: RefCell::new(Vec::new()),
            timeout: self.timeout,
            stats: CommStats::default(),
            _universe: self._universe.clone(),
        }))
    }
}
