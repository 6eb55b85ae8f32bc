//! Ulysses and ring sequence parallelism through the trainer (`parallel.sp`,
//! `parallel.sp_mode`), alone and with data, tensor and pipeline parallelism: the same global
//! batch gives one rank's losses, pre-clip gradient norms and parameters (f32, 1e-5 relative,
//! 5 steps).

use std::path::Path;
use std::time::Duration;

use super::common::{assert_same_run, flat, prepare, Run};
use super::compare::layout_config;
use candle_core::Device;
use colossal_core::dist::{run_local, Communicator};
use colossal_core::train::Trainer;

const STEPS: usize = 5;

const MODEL: [&str; 7] = [
    "model.config.num_hidden_layers=2",
    "model.config.num_attention_heads=4",
    "model.config.num_key_value_heads=2",
    "train.batch_size=4",
    "train.micro_batch_size=2",
    "train.lr=1e-3",
    "train.min_lr=1e-4",
];

fn run(data: &Path, out: &Path, nproc: usize, extra: &[&str]) -> (Run, Option<f64>) {
    let cfg = layout_config(data, out, &MODEL, nproc, extra);
    let mut results = run_local(nproc, Duration::from_secs(120), |comm| {
        let comm: Box<dyn Communicator> = Box::new(comm);
        let mut t = Trainer::new_rank(cfg.clone(), None, Device::Cpu, (nproc > 1).then_some(comm))?;
        let mut run = Run::default();
        for _ in 0..STEPS {
            run.step(t.train_step()?);
        }
        let val = t.evaluate()?;
        run.params = flat(&t.full_params()?);
        Ok((run, val))
    })
    .unwrap();
    results.swap_remove(0)
}

#[test]
fn ulysses_and_ring_match_one_rank_alone_and_in_hybrids() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let (reference, ref_val) = run(&data, &tmp.path().join("ref"), 1, &[]);
    let layouts: [(&str, usize, &[&str]); 7] = [
        (
            "ulysses sp2",
            2,
            &["parallel.sp=2", "parallel.sp_mode=\"ulysses\""],
        ),
        (
            "ring sp2",
            2,
            &["parallel.sp=2", "parallel.sp_mode=\"ring\""],
        ),
        (
            "ring sp4",
            4,
            &["parallel.sp=4", "parallel.sp_mode=\"ring\""],
        ),
        (
            "dp2×ring sp2",
            4,
            &["parallel.sp=2", "parallel.sp_mode=\"ring\""],
        ),
        (
            "dp2×ulysses sp2 zero-2",
            4,
            &[
                "parallel.sp=2",
                "parallel.sp_mode=\"ulysses\"",
                "parallel.zero_stage=2",
            ],
        ),
        (
            "tp2×ulysses sp2",
            4,
            &[
                "parallel.tp=2",
                "parallel.sp=2",
                "parallel.sp_mode=\"ulysses\"",
            ],
        ),
        (
            "pp2×ring sp2",
            4,
            &[
                "parallel.pp=2",
                "parallel.sp=2",
                "parallel.sp_mode=\"ring\"",
            ],
        ),
    ];
    for (what, nproc, extra) in layouts {
        let out = tmp.path().join(what.replace([' ', '×'], "-"));
        let (got, val) = run(&data, &out, nproc, extra);
        assert_same_run(what, &got, &reference, 1e-5);
        let (v, rv) = (val.unwrap(), ref_val.unwrap());
        assert!(
            (v - rv).abs() < 1e-5 * rv,
            "{what}: validation loss {v} vs {rv}"
        );
        println!("{what}: validation loss {v:.6}");
    }
}
