//! `mpirun -n N llama-pretrain bench-collectives`: all-reduce time and bandwidth of f32
//! tensors with the MPI library's native collectives and with the ring over point-to-point
//! messages, in one job; rank 0 prints JSON lines and writes the file. Bus bandwidth is the
//! algorithm bandwidth × 2(N−1)/N (what each rank sends and receives in a ring), as NCCL's
//! tests report it.

use std::path::PathBuf;

use anyhow::{bail, Result};

#[derive(clap::Args, Debug)]
pub struct BenchCollectivesArgs {
    /// Tensor sizes in f32 elements.
    #[arg(long, value_delimiter = ',', default_value = "65536,1048576,8388608")]
    pub sizes: Vec<usize>,
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
    #[arg(long, default_value = "bench_collectives.json")]
    pub out: PathBuf,
}

#[cfg(feature = "mpi")]
pub fn run(a: &BenchCollectivesArgs) -> Result<()> {
    use std::time::{Duration, Instant};

    use candle_core::{Device, Tensor};
    use colossal_core::dist::{launched_by_mpirun, Communicator, MpiComm, ReduceOp};
    if !launched_by_mpirun() {
        bail!("bench-collectives measures MPI collectives: start it with mpirun -n N");
    }
    let mut comm = MpiComm::world(Duration::from_secs(300))?;
    let n = comm.size();
    let mut rows = Vec::new();
    for native in [true, false] {
        comm = comm.with_native_collectives(native);
        for &size in &a.sizes {
            let t = Tensor::ones(size, candle_core::DType::F32, &Device::Cpu)?;
            for _ in 0..2 {
                comm.all_reduce(&t, ReduceOp::Sum)?;
            }
            comm.barrier()?;
            let t0 = Instant::now();
            let mut out = t.clone();
            for _ in 0..a.reps {
                out = comm.all_reduce(&t, ReduceOp::Sum)?;
            }
            let s = t0.elapsed().as_secs_f64() / a.reps as f64;
            let got = out.narrow(0, 0, 1)?.to_vec1::<f32>()?[0];
            if got != n as f32 {
                bail!("all-reduce gave {got}, expected {n}");
            }
            let bytes = (4 * size) as f64;
            let algbw = bytes / s / 1e9;
            let row = format!(
                "{{\"collectives\": \"{}\", \"ranks\": {n}, \"elements\": {size}, \"seconds\": {s:.6}, \"algbw_gb_s\": {algbw:.3}, \"busbw_gb_s\": {:.3}}}",
                if native { "native" } else { "ring" },
                algbw * 2.0 * (n - 1) as f64 / n as f64
            );
            if comm.rank() == 0 {
                println!("{row}");
            }
            rows.push(row);
        }
    }
    if comm.rank() == 0 {
        std::fs::write(&a.out, format!("[\n  {}\n]\n", rows.join(",\n  ")))?;
    }
    Ok(())
}

#[cfg(not(feature = "mpi"))]
pub fn run(_: &BenchCollectivesArgs) -> Result<()> {
    bail!("bench-collectives needs a build with --features mpi (Open MPI and libclang)")
}
