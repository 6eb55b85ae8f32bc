//! Launch: one rank, local ranks as threads, or this process's rank of an MPI job.

use std::path::Path;

use candle_core::Device;

use super::trainer::{RunSummary, Trainer};
use super::{Backend, TrainConfig};
use crate::dist::{run_local, Communicator};
use crate::{Error, Result};

/// Runs training as configured: one rank in this thread, `parallel.nproc` local ranks as
/// threads, or this process's rank of an MPI job. Returns rank 0's summary (under MPI, each
/// process returns its own; `RunSummary::rank` tells which).
pub fn train(
    cfg: TrainConfig,
    resume: Option<&Path>,
    stop_at: Option<usize>,
) -> Result<RunSummary> {
    // Under mpirun the world size is parallel.nproc: checked once it is known.
    if cfg.parallel.backend == Backend::Mpi && cfg!(feature = "mpi") {
        return train_mpi(cfg, resume, stop_at);
    }
    cfg.parallel.validate().map_err(Error::Config)?;
    let n = cfg.parallel.nproc;
    // Before any data or weights are read: a device we cannot have ends the run at once.
    let devices = (0..n)
        .map(|r| cfg.train.device.device(r))
        .collect::<Result<Vec<Device>>>()?;
    if n == 1 {
        return Trainer::new(cfg, resume, devices[0].clone())?.run(stop_at);
    }
    let timeout = std::time::Duration::from_secs(cfg.parallel.timeout_s);
    let mut out = run_local(n, timeout, |comm| {
        let device = devices[comm.rank()].clone();
        let comm: Box<dyn Communicator> = Box::new(comm);
        Trainer::new_rank(cfg.clone(), resume, device, Some(comm))?.run(stop_at)
    })?;
    Ok(out.swap_remove(0))
}

#[cfg(feature = "mpi")]
fn train_mpi(
    mut cfg: TrainConfig,
    resume: Option<&Path>,
    stop_at: Option<usize>,
) -> Result<RunSummary> {
    use crate::dist::MpiComm;
    let timeout = std::time::Duration::from_secs(cfg.parallel.timeout_s);
    let world = MpiComm::world(timeout)?;
    let _mpi = world.keep_alive();
    let (rank, size) = (world.rank(), world.size());
    let p = &mut cfg.parallel;
    if p.nproc != 1 && p.nproc != size {
        return Err(Error::Config(format!(
            "parallel.nproc = {} but mpirun started {size} processes",
            p.nproc
        )));
    }
    p.nproc = size;
    p.validate()
        .map_err(|e| Error::Config(format!("{e} (mpirun started {size} processes)")))?;
    let comm: Option<Box<dyn Communicator>> =
        (size > 1 || p.zero_stage > 0).then(|| Box::new(world) as Box<dyn Communicator>);
    // Test hook for the mpirun failure test: COLOSSAL_TEST_FAIL_AT="RANK:STEP".
    let fail_at = std::env::var("COLOSSAL_TEST_FAIL_AT").ok().and_then(|v| {
        let (r, s) = v.split_once(':')?;
        (r.parse() == Ok(rank)).then(|| s.parse().ok())?
    });
    // Each process of the job takes its node-local rank's GPU.
    let local_rank = std::env::var("OMPI_COMM_WORLD_LOCAL_RANK")
        .or_else(|_| std::env::var("SLURM_LOCALID"))
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let device = cfg.train.device.device(local_rank)?;
    let run = Trainer::new_rank(cfg, resume, device, comm).and_then(|mut t| {
        t.fail_at_step = fail_at;
        t.run(stop_at)
    });
    match run {
        Ok(s) => Ok(s),
        Err(e) if size > 1 => {
            // Peers may be blocked in a receive: end the whole job now, naming this rank.
            eprintln!("rank {rank} failed: {e}");
            // mpirun forwards each rank's stderr through a pipe; give it a moment to carry
            // the message out before the abort tears the job down.
            std::thread::sleep(std::time::Duration::from_millis(500));
            crate::dist::mpi_abort(1)
        }
        Err(e) => Err(e),
    }
}

#[cfg(not(feature = "mpi"))]
fn train_mpi(_: TrainConfig, _: Option<&Path>, _: Option<usize>) -> Result<RunSummary> {
    unreachable!("ParallelConfig::validate rejects backend = mpi without the mpi feature")
}
