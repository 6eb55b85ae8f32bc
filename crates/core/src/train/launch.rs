//! Launch, for every app: one rank, local ranks as threads, or this process's rank of an MPI
//! job; each rank gets its communicator and its device. A failing rank ends the whole job:
//! local ranks report the first failure by rank, an MPI rank aborts the job.

use candle_core::Device;

use super::{Backend, DeviceSpec, ParallelConfig};
use crate::dist::{run_local, Communicator};
use crate::{Error, Result};

/// What one rank starts with.
pub struct RankSetup {
    /// The world communicator (`None` for a lone local rank).
    pub comm: Option<Box<dyn Communicator>>,
    pub device: Device,
    /// The layout, validated; under mpirun `nproc` is the job's size.
    pub parallel: ParallelConfig,
    pub world_rank: usize,
}

/// Runs `rank` on every rank `parallel` asks for, on `device`. Returns rank 0's result (under
/// MPI, this process's).
pub fn launch_ranks<T, F>(parallel: &ParallelConfig, device: DeviceSpec, rank: F) -> Result<T>
where
    T: Send,
    F: Fn(RankSetup) -> Result<T> + Sync,
{
    // Under mpirun the world size is parallel.nproc: checked once it is known.
    if parallel.backend == Backend::Mpi && cfg!(feature = "mpi") {
        return launch_mpi(parallel, device, rank);
    }
    parallel.validate().map_err(Error::Config)?;
    let n = parallel.nproc;
    // Before any data or weights are read: a device we cannot have ends the run at once.
    let devices = (0..n)
        .map(|r| device.device(r))
        .collect::<Result<Vec<Device>>>()?;
    let setup = |comm: Option<Box<dyn Communicator>>, world_rank: usize| RankSetup {
        comm,
        device: devices[world_rank].clone(),
        parallel: parallel.clone(),
        world_rank,
    };
    if n == 1 {
        return rank(setup(None, 0));
    }
    let timeout = std::time::Duration::from_secs(parallel.timeout_s);
    let mut out = run_local(n, timeout, |comm| {
        let r = comm.rank();
        rank(setup(Some(Box::new(comm)), r))
    })?;
    Ok(out.swap_remove(0))
}

#[cfg(feature = "mpi")]
fn launch_mpi<T, F>(parallel: &ParallelConfig, device: DeviceSpec, rank: F) -> Result<T>
where
    F: Fn(RankSetup) -> Result<T>,
{
    use crate::dist::MpiComm;
    let timeout = std::time::Duration::from_secs(parallel.timeout_s);
    let native = parallel.mpi_collectives == super::MpiCollectives::Native;
    let world = MpiComm::world(timeout)?.with_native_collectives(native);
    let _mpi = world.keep_alive();
    let (world_rank, size) = (world.rank(), world.size());
    let mut p = parallel.clone();
    if p.nproc != 1 && p.nproc != size {
        return Err(Error::Config(format!(
            "parallel.nproc = {} but mpirun started {size} processes",
            p.nproc
        )));
    }
    p.nproc = size;
    p.validate()
        .map_err(|e| Error::Config(format!("{e} (mpirun started {size} processes)")))?;
    // Each process of the job takes its node-local rank's GPU.
    let local_rank = std::env::var("OMPI_COMM_WORLD_LOCAL_RANK")
        .or_else(|_| std::env::var("SLURM_LOCALID"))
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let device = device.device(local_rank)?;
    let comm = (size > 1 || p.zero_stage > 0).then(|| Box::new(world) as Box<dyn Communicator>);
    let run = rank(RankSetup {
        comm,
        device,
        parallel: p,
        world_rank,
    });
    match run {
        Ok(v) => Ok(v),
        Err(e) if size > 1 => {
            // Peers may be blocked in a receive: end the whole job now, naming this rank.
            eprintln!("rank {world_rank} failed: {e}");
            // mpirun forwards each rank's stderr through a pipe; give it a moment to carry
            // the message out before the abort tears the job down.
            std::thread::sleep(std::time::Duration::from_millis(500));
            crate::dist::mpi_abort(1)
        }
        Err(e) => Err(e),
    }
}

#[cfg(not(feature = "mpi"))]
fn launch_mpi<T, F>(_: &ParallelConfig, _: DeviceSpec, _: F) -> Result<T>
where
    F: Fn(RankSetup) -> Result<T>,
{
    unreachable!("launch_ranks takes the MPI path only with the mpi feature")
}
