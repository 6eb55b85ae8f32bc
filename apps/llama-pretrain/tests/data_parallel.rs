//! Data parallel over local ranks equals one rank: same global batch, same per-step losses and
//! final parameters (f32, 1e-5 relative over 5 steps), with and without gradient accumulation;
//! and each rank sends 2·Ψ·(N−1)/N gradient elements per step.

mod common;

use std::time::Duration;

use candle_core::Device;
use colossal_core::dist::{run_local, Communicator};
use colossal_core::train::Trainer;
use common::{config, prepare};

const STEPS: usize = 5;

/// Per-step losses, final parameters by name, bytes sent per step (rank 0).
type RunResult = (Vec<f32>, Vec<(String, Vec<f32>)>, Vec<u64>);

fn run(data: &std::path::Path, out: &std::path::Path, ranks: usize, micro: usize) -> RunResult {
    let mbs = format!("train.micro_batch_size={micro}");
    // lr 1e-3: Adam divides by |g|, so elements with |g| near eps amplify f32 summation-order noise;
    // at the config's 1e-2 that noise alone reaches 1e-5 of the weights.
    let cfg = config(
        data,
        out,
        &[
            "train.batch_size=8",
            &mbs,
            "train.lr=1e-3",
            "train.min_lr=1e-4",
        ],
    );
    let mut results = run_local(ranks, Duration::from_secs(60), |comm| {
        let comm: Box<dyn Communicator> = Box::new(comm);
        let mut t = Trainer::new_rank(cfg.clone(), None, Device::Cpu, (ranks > 1).then_some(comm))?;
        let mut losses = Vec::new();
        let mut bytes = Vec::new();
        for _ in 0..STEPS {
            losses.push(t.train_step()?.0);
            bytes.push(t.last_step_comm_bytes);
        }
        let params = t
            .params
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    v.as_tensor()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                )
            })
            .collect::<Vec<_>>();
        Ok((losses, params, bytes))
    })
    .unwrap();
    // Every rank ends with bit-identical parameters.
    for other in &results[1..] {
        assert_eq!(other.1, results[0].1, "ranks diverged");
    }
    results.swap_remove(0)
}

fn rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn data_parallel_matches_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let (ref_losses, ref_params, _) = run(&data, &tmp.path().join("ref"), 1, 8);
    let psi: usize = ref_params.iter().map(|(_, v)| v.len()).sum();
    // (ranks, micro-batch): micro-batches per rank = 8 / micro / ranks.
    for (ranks, micro) in [(2, 4), (2, 2), (4, 2), (4, 1)] {
        let (losses, params, bytes) = run(
            &data,
            &tmp.path().join(format!("dp{ranks}-{micro}")),
            ranks,
            micro,
        );
        let accumulation = 8 / micro / ranks;
        let dl = rel(&losses, &ref_losses);
        let dp = params
            .iter()
            .zip(&ref_params)
            .map(|((n, a), (m, b))| {
                assert_eq!(n, m);
                rel(a, b)
            })
            .fold(0f32, f32::max);
        println!("dp={ranks} micro={micro} (accumulation {accumulation}): loss rel diff {dl:e}, param rel diff {dp:e}, bytes/step {bytes:?}");
        assert!(dl <= 1e-5, "losses {losses:?} vs {ref_losses:?}");
        assert!(dp <= 1e-5, "parameters differ by {dp:e}");
        let theory = 2.0 * psi as f64 * (ranks - 1) as f64 / ranks as f64 * 4.0;
        for b in bytes {
            let r = (b as f64 - theory).abs() / theory;
            assert!(
                r < 1e-3,
                "bytes sent {b} vs theory {theory} (ratio off by {r:e})"
            );
        }
    }
}
