//! `mpirun -n 2 llama-pretrain train --set parallel.backend="mpi"` gives the same run as two
//! local (thread) ranks: with `mpi_collectives = "ring"` per-step losses, communication bytes
//! and final weights bit for bit (both backends run the same ring collectives); with the MPI
//! library's native collectives (the default) the same bytes and losses and weights within
//! rounding. Needs Open MPI: `.ci/run` installs it.
#![cfg(feature = "mpi")]

mod common;

use std::path::Path;
use std::process::Command;

use common::{config_text, prepare};

fn metrics(out: &Path) -> Vec<(f64, u64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| {
            (
                v["loss"].as_f64().unwrap(),
                v["comm_bytes"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn train(cfg: &Path, out: &Path, mpi: bool, extra: &[&str]) {
    let bin = env!("CARGO_BIN_EXE_llama-pretrain");
    let mut cmd = if mpi {
        let mut c = Command::new("mpirun");
        c.args(["--allow-run-as-root", "--oversubscribe", "-n", "2", bin]);
        c
    } else {
        Command::new(bin)
    };
    cmd.args(["train", "--config"])
        .arg(cfg)
        .arg("--out")
        .arg(out);
    let backend = if mpi {
        "parallel.backend=\"mpi\""
    } else {
        "parallel.nproc=2"
    };
    for s in [backend, "train.batch_size=8", "train.max_steps=5"]
        .iter()
        .chain(extra)
    {
        cmd.args(["--set", s]);
    }
    let res = cmd.output().unwrap_or_else(|e| {
        panic!("cannot start {cmd:?}: {e} (the mpi feature needs Open MPI's mpirun on PATH)")
    });
    assert!(
        res.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr)
    );
}

#[test]
fn mpirun_two_processes_match_two_local_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let cfg = tmp.path().join("run.toml");
    std::fs::write(&cfg, config_text(&data, &tmp.path().join("unused"), 32000)).unwrap();
    for zero in ["0", "2", "3"] {
        let z = format!("parallel.zero_stage={zero}");
        let (local, mpi) = (
            tmp.path().join(format!("local{zero}")),
            tmp.path().join(format!("mpi{zero}")),
        );
        train(&cfg, &local, false, &[&z]);
        train(&cfg, &mpi, true, &[&z, "parallel.mpi_collectives=\"ring\""]);
        let (a, b) = (metrics(&local), metrics(&mpi));
        println!("zero {zero}: local {a:?}\n        mpi   {b:?}");
        assert_eq!(a.len(), 5);
        assert_eq!(a, b, "losses and bytes per step");
        let last = |d: &Path| std::fs::read(d.join("checkpoints/step-0000005/model.safetensors"));
        assert_eq!(last(&local).unwrap(), last(&mpi).unwrap(), "final weights");
    }
}

fn weights(dir: &Path) -> Vec<f32> {
    let bytes = std::fs::read(dir.join("checkpoints/step-0000005/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<&str> = st.names();
    names.sort();
    names
        .iter()
        .flat_map(|n| {
            st.tensor(n)
                .unwrap()
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn native_mpi_collectives_match_the_ring_within_rounding() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let cfg = tmp.path().join("run.toml");
    std::fs::write(&cfg, config_text(&data, &tmp.path().join("unused"), 32000)).unwrap();
    for zero in ["0", "3"] {
        let z = format!("parallel.zero_stage={zero}");
        let (local, mpi) = (
            tmp.path().join(format!("local{zero}")),
            tmp.path().join(format!("native{zero}")),
        );
        train(&cfg, &local, false, &[&z]);
        train(&cfg, &mpi, true, &[&z]);
        let (a, b) = (metrics(&local), metrics(&mpi));
        println!("zero {zero}: ring   {a:?}\n        native {b:?}");
        assert_eq!(a.len(), 5);
        for ((la, ba), (lb, bb)) in a.iter().zip(&b) {
            assert!(
                (la - lb).abs() <= 1e-6 * la.abs().max(1.0),
                "loss {la} vs {lb}"
            );
            assert_eq!(ba, bb, "bytes counted alike");
        }
        let (wa, wb) = (weights(&local), weights(&mpi));
        assert_eq!(wa.len(), wb.len());
        let worst = wa
            .iter()
            .zip(&wb)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        println!("zero {zero}: largest weight difference {worst:e}");
        assert!(worst <= 1e-6, "weights differ by {worst:e}");
    }
}

#[test]
fn a_failing_mpi_rank_ends_the_job_with_its_name() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let cfg = tmp.path().join("run.toml");
    std::fs::write(&cfg, config_text(&data, &tmp.path().join("unused"), 32000)).unwrap();
    // Rank 1 fails at step 2 (test hook) while rank 0 waits on it inside a collective.
    let started = std::time::Instant::now();
    let res = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-n", "2"])
        .arg(env!("CARGO_BIN_EXE_llama-pretrain"))
        .args(["train", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(tmp.path().join("fail"))
        .args([
            "--set",
            "parallel.backend=\"mpi\"",
            "--set",
            "parallel.timeout_s=60",
        ])
        .env("COLOSSAL_TEST_FAIL_AT", "1:2")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    println!("{err}");
    assert!(!res.status.success());
    assert!(
        err.contains("rank 1 failed: injected failure at step 2"),
        "{err}"
    );
    assert!(
        started.elapsed().as_secs() < 50,
        "ended by abort, not by the timeout"
    );
}
