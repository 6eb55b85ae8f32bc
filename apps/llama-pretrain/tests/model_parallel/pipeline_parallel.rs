//! Pipeline parallelism through the trainer (`parallel.pp`, `parallel.pp_schedule`) and the
//! hybrids: the same global batch gives one rank's losses and parameters (f32, 1e-5 relative,
//! 5 steps) at pp 2 under every schedule, pp 4, dp2×pp2 with ZeRO-2, tp2×pp2 and dp2×tp2×pp2
//! (8 local ranks). The tied embedding lives on the first and the last stage.

use std::path::Path;
use std::time::Duration;

use super::common::{assert_same_run, flat, Run};
use super::common::{config, prepare};
use super::compare::layout_config;
use candle_core::Device;
use colossal_core::dist::{run_local, Communicator};
use colossal_core::train::Trainer;

const STEPS: usize = 5;

/// 4 layers, 4 query and KV heads (so tp 2 and pp 4 both split), 8 micro-batches of 1.
const MODEL: [&str; 7] = [
    "model.config.num_hidden_layers=4",
    "model.config.num_attention_heads=4",
    "model.config.num_key_value_heads=4",
    "train.batch_size=8",
    "train.micro_batch_size=1",
    "train.lr=1e-3",
    "train.min_lr=1e-4",
];

/// Losses, grad norms, whole final parameters (from world rank 0) and rank 0's measured bubble.
fn run(data: &Path, out: &Path, nproc: usize, extra: &[&str]) -> (Run, f64) {
    let cfg = layout_config(data, out, &MODEL, nproc, extra);
    let mut results = run_local(nproc, Duration::from_secs(120), |comm| {
        let comm: Box<dyn Communicator> = Box::new(comm);
        let comm = (nproc > 1).then_some(comm);
        let mut t = Trainer::new_rank(cfg.clone(), None, Device::Cpu, comm)?;
        let mut run = Run::default();
        let mut bubble = 0.0;
        for _ in 0..STEPS {
            run.step(t.train_step()?);
            bubble += t.last_bubble.unwrap_or(0.0) / STEPS as f64;
        }
        run.params = flat(&t.full_params()?);
        Ok((run, bubble))
    })
    .unwrap();
    results.swap_remove(0)
}

fn assert_close(what: &str, (got, bubble): &(Run, f64), (want, _): &(Run, f64)) {
    assert_same_run(what, got, want, 1e-5);
    println!("{what}: rank-0 bubble {bubble:.3}");
}

#[test]
fn every_schedule_and_hybrid_matches_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let reference = run(&data, &tmp.path().join("ref"), 1, &[]);
    let layouts: [(&str, usize, &[&str]); 9] = [
        (
            "pp2 gpipe",
            2,
            &["parallel.pp=2", "parallel.pp_schedule=\"gpipe\""],
        ),
        ("pp2 1f1b", 2, &["parallel.pp=2"]),
        (
            "pp2 interleaved",
            2,
            &["parallel.pp=2", "parallel.pp_schedule=\"interleaved\""],
        ),
        (
            "pp2 zbh1",
            2,
            &["parallel.pp=2", "parallel.pp_schedule=\"zbh1\""],
        ),
        ("pp4 1f1b", 4, &["parallel.pp=4"]),
        (
            "dp2×pp2 zero-2",
            4,
            &["parallel.pp=2", "parallel.zero_stage=2"],
        ),
        ("tp2×pp2", 4, &["parallel.pp=2", "parallel.tp=2"]),
        ("dp2×tp2×pp2", 8, &["parallel.pp=2", "parallel.tp=2"]),
        (
            "dp2×tp2×pp2 zbh1",
            8,
            &[
                "parallel.pp=2",
                "parallel.tp=2",
                "parallel.pp_schedule=\"zbh1\"",
            ],
        ),
    ];
    for (what, nproc, extra) in layouts {
        let out = tmp.path().join(what.replace([' ', '×'], "-"));
        let got = run(&data, &out, nproc, extra);
        assert_close(what, &got, &reference);
    }
}

#[test]
fn zero3_with_pipeline_is_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let cfg = config(
        &data,
        tmp.path(),
        &["parallel.nproc=4", "parallel.pp=2", "parallel.zero_stage=3"],
    );
    let err = cfg.parallel.validate().unwrap_err();
    assert!(
        err.contains("parallel.pp = 2") && err.contains("parallel.zero_stage = 3"),
        "{err}"
    );
}
