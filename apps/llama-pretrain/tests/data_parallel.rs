//! Data parallel and ZeRO-1/2/3 over local ranks equal one rank: same global batch, same
//! per-step losses and pre-clip gradient norms and final parameters by name (f32, 1e-5
//! relative over 5 steps), with and without gradient accumulation; each rank sends
//! 2·Ψ·(N−1)/N elements per step and holds the ZeRO memory.

mod common;

use std::time::Duration;

use candle_core::Device;
use colossal_core::dist::{run_local, Communicator};
use colossal_core::train::Trainer;
use colossal_session::RunExt;
use common::{assert_same_run, config, flat, prepare, Run};

const STEPS: usize = 5;

/// Per-step losses and grad norms with the final parameters, bytes sent per step, memory and
/// bytes on disk (rank 0).
type RunResult = (Run, Vec<u64>, (u64, u64, u64), u64);

/// `STEPS` steps of a global batch of 8 on `ranks` local ranks; `extra` are more `--set`s.
fn run(
    data: &std::path::Path,
    out: &std::path::Path,
    ranks: usize,
    micro: usize,
    extra: &[&str],
) -> RunResult {
    let mbs = format!("train.micro_batch_size={micro}");
    // lr 1e-3: Adam divides by |g|, so elements with |g| near eps amplify f32 summation-order noise;
    // at the config's 1e-2 that noise alone reaches 1e-5 of the weights.
    let mut overrides = vec![
        "train.batch_size=8",
        &mbs,
        "train.lr=1e-3",
        "train.min_lr=1e-4",
    ];
    overrides.extend_from_slice(extra);
    let cfg = config(data, out, &overrides);
    let mut results = run_local(ranks, Duration::from_secs(60), |comm| {
        let comm: Box<dyn Communicator> = Box::new(comm);
        let mut t = Trainer::new_rank(cfg.clone(), None, Device::Cpu, (ranks > 1).then_some(comm))?;
        let mut run = Run::default();
        let mut bytes = Vec::new();
        for _ in 0..STEPS {
            run.step(t.train_step()?);
            bytes.push(t.last_step_comm_bytes);
        }
        run.params = flat(&t.full_params()?);
        Ok((run, bytes, t.memory_bytes(), t.offloaded_bytes()))
    })
    .unwrap();
    // Every rank ends with bit-identical parameters.
    for other in &results[1..] {
        assert_eq!(other.0.params, results[0].0.params, "ranks diverged");
    }
    results.swap_remove(0)
}

/// ZeRO-3 bytes per micro-batch: each parameter is all-gathered once per block using it in the
/// forward, again for each recomputed (non-last) block in the backward, and reduce-scattered
/// once; each such collective sends (N−1)·⌈len/N⌉ elements. Here the tied embedding serves the
/// first and the last block (3 gathers), decoder weights one block (2), the final norm only the
/// last block (1).
fn zero3_bytes(params: &[(String, Vec<f32>)], ranks: usize) -> f64 {
    params
        .iter()
        .map(|(name, v)| {
            let gathers = match name.as_str() {
                "model.embed_tokens.weight" => 3,
                "model.norm.weight" => 1,
                _ => 2,
            };
            ((gathers + 1) * (ranks - 1) * v.len().div_ceil(ranks) * 4) as f64
        })
        .sum()
}

fn rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn data_parallel_and_zero_match_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let (reference, ..) = run(&data, &tmp.path().join("ref"), 1, 8, &[]);
    let ref_params = &reference.params;
    let psi: usize = ref_params.iter().map(|(_, v)| v.len()).sum();
    for zero in [0u8, 1, 2, 3] {
        // (ranks, micro-batch): micro-batches per rank = 8 / micro / ranks.
        for (ranks, micro) in [(2, 4), (2, 2), (4, 2), (4, 1)] {
            let out = tmp.path().join(format!("z{zero}-dp{ranks}-{micro}"));
            let stage = format!("parallel.zero_stage={zero}");
            let (got, bytes, mem, _) = run(&data, &out, ranks, micro, &[&stage]);
            let accumulation = 8 / micro / ranks;
            let what =
                format!("zero={zero} dp={ranks} micro={micro} (accumulation {accumulation})");
            assert_same_run(&what, &got, &reference, 1e-5);
            println!(
                "{what}: bytes/step {}, memory (params, grads, optim) {mem:?}",
                bytes[0]
            );
            // Communication: all-reduce (DP), or reduce-scatter + all-gather (ZeRO), each
            // 2Ψ(N−1)/N; ZeRO-2 reduce-scatters every micro-batch.
            let unit = psi as f64 * (ranks - 1) as f64 / ranks as f64 * 4.0;
            let theory = match zero {
                2 => unit * (accumulation as f64 + 1.0),
                3 => zero3_bytes(ref_params, ranks) * accumulation as f64,
                _ => 2.0 * unit,
            };
            for b in bytes {
                let r = (b as f64 - theory).abs() / theory;
                assert!(r < 1e-3, "bytes sent {b} vs theory {theory} (off by {r:e})");
            }
            // Memory: moments 8·⌈Ψ/N⌉ from stage 1, gradient shard 4·⌈Ψ/N⌉ at stage 2.
            let shard = psi.div_ceil(ranks) as u64;
            let psi = psi as u64;
            let chunks: u64 = ref_params
                .iter()
                .map(|(_, v)| v.len().div_ceil(ranks) as u64)
                .sum();
            let want = match zero {
                0 => (4 * psi, 4 * psi, 8 * psi),
                1 => (4 * psi, 4 * psi, 8 * shard),
                2 => (4 * psi, 4 * shard, 8 * shard),
                _ => (4 * chunks, 4 * chunks, 8 * chunks),
            };
            assert_eq!(mem, want);
        }
    }
}

fn weights(dir: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    let (_, p) =
        colossal_core::checkpoint::llama::load_llama(dir, candle_core::DType::F32, &Device::Cpu)
            .unwrap();
    flat(&p)
}

#[test]
fn zero_checkpoints_resume_exactly_and_into_one_rank() {
    use colossal_session::train;
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    for stage in [2u8, 3] {
        let cfg = |out: &str, nproc: usize| {
            let n = format!("parallel.nproc={nproc}");
            let z = format!("parallel.zero_stage={stage}");
            let out = tmp.path().join(format!("z{stage}-{out}"));
            config(
                &data,
                &out,
                &[
                    "train.batch_size=8",
                    "train.micro_batch_size=2",
                    &z,
                    &n,
                    "train.lr=1e-3",
                ],
            )
        };
        // Same layout: 6 straight steps == 3 + resume 3, byte for byte (state gathered and re-sharded).
        let straight = train(cfg("straight", 2), None, None)
            .unwrap()
            .final_dir
            .unwrap();
        let half = train(cfg("split", 2), None, Some(3))
            .unwrap()
            .final_dir
            .unwrap();
        let resumed = train(cfg("split", 2), Some(&half), None)
            .unwrap()
            .final_dir
            .unwrap();
        for f in ["model.safetensors", "optimizer.safetensors"] {
            let (a, b) = (
                std::fs::read(straight.join(f)).unwrap(),
                std::fs::read(resumed.join(f)).unwrap(),
            );
            assert_eq!(a, b, "stage {stage}: {f}");
        }
        // Another layout: the ZeRO × 2 checkpoint resumed on one rank tracks a one-rank run.
        let one = train(cfg("one", 1), None, None).unwrap().final_dir.unwrap();
        // (The split run has pruned its step-3 checkpoint by now: save a fresh one.)
        let half = train(cfg("half", 2), None, Some(3))
            .unwrap()
            .final_dir
            .unwrap();
        let moved = train(cfg("moved", 1), Some(&half), None)
            .unwrap()
            .final_dir
            .unwrap();
        let (want, got) = (weights(&one), weights(&moved));
        assert_eq!(want.len(), got.len(), "parameters in the checkpoints");
        let worst = want
            .iter()
            .zip(&got)
            .map(|((n, a), (m, b))| {
                assert_eq!((n, a.len()), (m, b.len()), "same parameter, same length");
                rel(b, a)
            })
            .fold(0f32, f32::max);
        println!("ZeRO-{stage} x2 -> 1 rank resume: parameter rel diff {worst:e}");
        assert!(worst <= 1e-5, "{worst:e}");
    }
}

#[test]
fn a_crashed_rank_stops_the_run_with_its_name() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let cfg = config(
        &data,
        &tmp.path().join("o"),
        &["train.batch_size=8", "train.micro_batch_size=2"],
    );
    let started = std::time::Instant::now();
    let err = run_local(4, Duration::from_secs(20), |comm| {
        let rank = comm.rank();
        let mut t = Trainer::new_rank(cfg.clone(), None, Device::Cpu, Some(Box::new(comm)))?;
        if rank == 2 {
            t.fail_at_step = Some(2);
        }
        t.run(None).map(|_| ())
    })
    .unwrap_err()
    .to_string();
    println!("{err} (after {:?})", started.elapsed());
    assert!(
        err.contains("rank 2") && err.contains("injected failure"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the other ranks must not wait for the timeout"
    );
}

#[test]
fn cpu_and_disk_offload_train_like_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let (reference, ..) = run(&data, &tmp.path().join("ref"), 1, 8, &[]);
    let ref_params = &reference.params;
    let psi: u64 = ref_params.iter().map(|(_, v)| v.len() as u64).sum();
    let cases = [
        (1usize, 3u8),
        (1, 1),
        (2, 1),
        (2, 2),
        (2, 3),
        (4, 2),
        (4, 3),
    ];
    for offload in ["cpu", "disk"] {
        for (ranks, zero) in cases {
            let out = tmp.path().join(format!("{offload}-z{zero}-dp{ranks}"));
            let z = format!("parallel.zero_stage={zero}");
            let o = format!("parallel.offload=\"{offload}\"");
            // micro 4/N: accumulation 2 per rank at every N.
            let (got, _, mem, offloaded) = run(&data, &out, ranks, 4 / ranks, &[&z, &o]);
            let what = format!("{offload} offload zero={zero} x{ranks}");
            assert_same_run(&what, &got, &reference, 1e-5);
            println!("{what}: resident {mem:?}, on disk {offloaded} B");
            let shard = psi.div_ceil(ranks as u64);
            let chunks: u64 = ref_params
                .iter()
                .map(|(_, v)| v.len().div_ceil(ranks) as u64)
                .sum();
            let state = if zero == 3 { 12 * chunks } else { 8 * shard };
            if offload == "disk" {
                assert_eq!(mem.2, 0, "moments are not resident");
                assert_eq!(offloaded, state);
                assert!(out.join("offload/rank0").read_dir().unwrap().count() > 0);
            } else {
                assert_eq!(offloaded, 0);
                assert_eq!(mem.2, 8 * if zero == 3 { chunks } else { shard });
            }
        }
    }
}

#[test]
fn memory_budget_splits_state_between_memory_and_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let (reference, ..) = run(&data, &tmp.path().join("ref"), 1, 8, &[]);
    let psi: u64 = reference.params.iter().map(|(_, v)| v.len() as u64).sum();
    let state = 12 * psi; // ZeRO-3 on one rank: parameter chunks + two moments
    let budget = state / 2;
    let b = format!("parallel.memory_budget={budget}");
    let (got, _, mem, offloaded) = run(
        &data,
        &tmp.path().join("budget"),
        1,
        4,
        &["parallel.zero_stage=3", "parallel.offload=\"disk\"", &b],
    );
    let resident = mem.0 + mem.2;
    println!("budget {budget} B of {state} B: resident {resident} B, on disk {offloaded} B");
    assert_eq!(resident + offloaded, state);
    assert!(resident <= budget && resident > 0 && offloaded > 0);
    assert_same_run("memory budget", &got, &reference, 1e-5);
}
