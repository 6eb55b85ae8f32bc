//! Launch, for every app: one rank, local ranks as threads, or this process's rank of an MPI
//! job; each rank gets its communicator and its device. With `parallel.backend = "nccl"` the
//! communicator is NCCL on the rank's GPU, bootstrapped over the threads (one process, one
//! GPU per thread) or, under mpirun, over MPI (one GPU per process). A failing rank ends the
//! whole job: local ranks report the first failure by rank, an MPI rank aborts the job.

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
    let nccl_over_mpi = parallel.backend == Backend::Nccl && under_mpirun();
    if (parallel.backend == Backend::Mpi || nccl_over_mpi) && cfg!(feature = "mpi") {
        return launch_mpi(parallel, device, rank);
    }
    parallel.validate().map_err(Error::Config)?;
    let n = parallel.nproc;
    check_device(parallel, device, n)?;
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
        let comm: Box<dyn Communicator> = match parallel.backend {
            Backend::Nccl => nccl(Box::new(comm), &devices[r])?,
            _ => Box::new(comm),
        };
        rank(setup(Some(comm), r))
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
    check_device(&p, device, size)?;
    // Each process of the job takes its node-local rank's GPU.
    let local_rank = std::env::var("OMPI_COMM_WORLD_LOCAL_RANK")
        .or_else(|_| std::env::var("SLURM_LOCALID"))
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let device = device.device(local_rank)?;
    let comm = match (size > 1 || p.zero_stage > 0, p.backend) {
        (false, _) => None,
        (true, Backend::Nccl) => Some(nccl(Box::new(world), &device)?),
        (true, _) => Some(Box::new(world) as Box<dyn Communicator>),
    };
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

/// Whether this process is one of an mpirun/srun job's.
fn under_mpirun() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

/// The backend and the device must agree: NCCL ranks are GPUs, and GPU ranks exchange their
/// tensors over NCCL (the thread and MPI communicators move host tensors).
fn check_device(parallel: &ParallelConfig, device: DeviceSpec, nproc: usize) -> Result<()> {
    match (parallel.backend, device) {
        (Backend::Nccl, DeviceSpec::Cpu) => Err(Error::Config(
            "parallel.backend = \"nccl\" runs one GPU per rank: set train.device = \"cuda\", or use backend \"local\" or \"mpi\" on the CPU".into(),
        )),
        (Backend::Local | Backend::Mpi, DeviceSpec::Cuda(_)) if nproc > 1 => {
            Err(Error::Config(format!(
                "train.device = \"{device}\" with {nproc} ranks: GPU ranks exchange tensors over NCCL; set parallel.backend = \"nccl\" (parallel.backend = \"{}\" moves host tensors)",
                parallel.backend
            )))
        }
        _ => Ok(()),
    }
}

#[cfg(feature = "cuda")]
fn nccl(bootstrap: Box<dyn Communicator>, device: &Device) -> Result<Box<dyn Communicator>> {
    Ok(Box::new(crate::dist::NcclComm::new(bootstrap, device)?))
}

#[cfg(not(feature = "cuda"))]
fn nccl(_: Box<dyn Communicator>, _: &Device) -> Result<Box<dyn Communicator>> {
    unreachable!("parallel.validate refuses backend nccl in a build without cuda")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(parallel: &ParallelConfig, device: DeviceSpec) -> String {
        launch_ranks(parallel, device, |_| Ok(()))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn the_backend_and_the_device_must_agree_before_any_rank_starts() {
        let mut p = ParallelConfig {
            nproc: 2,
            ..ParallelConfig::default()
        };
        let e = refused(&p, DeviceSpec::Cuda(None));
        assert!(
            e.contains("2 ranks") && e.contains("set parallel.backend = \"nccl\""),
            "{e}"
        );
        p.backend = Backend::Nccl;
        let e = refused(&p, DeviceSpec::Cpu);
        let want = if cfg!(feature = "cuda") {
            "set train.device = \"cuda\""
        } else {
            "needs a build with `--features cuda`"
        };
        assert!(
            e.contains("parallel.backend = \"nccl\"") && e.contains(want),
            "{e}"
        );
    }
}
