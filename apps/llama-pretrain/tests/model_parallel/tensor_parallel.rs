//! Tensor parallelism through the trainer (`parallel.tp`, `parallel.sp_mode`): the same global
//! batch on tp 2 and 4, Megatron-SP and dp2×tp2 (plain and with ZeRO 1, 2, 3) gives one rank's
//! losses, pre-clip gradient norms and parameters (f32, 1e-5 relative, 5 steps); a
//! tensor-parallel checkpoint is whole and resumes at another tp, or under ZeRO-3.

use std::path::Path;
use std::time::Duration;

use super::common::{assert_same_run, config, flat, prepare, Run};
use super::compare::layout_config;
use candle_core::Device;
use colossal_core::dist::{run_local, Communicator};
use colossal_core::train::Trainer;

const STEPS: usize = 5;

/// 4 query and 4 KV heads, so tp 4 splits them.
const MODEL: [&str; 6] = [
    "model.config.num_attention_heads=4",
    "model.config.num_key_value_heads=4",
    "train.batch_size=8",
    "train.micro_batch_size=2",
    "train.lr=1e-3",
    "train.min_lr=1e-4",
];

/// Losses and grad norms of `steps` steps and the whole final parameters, on `nproc` ranks.
fn run(
    data: &Path,
    out: &Path,
    nproc: usize,
    extra: &[&str],
    resume: Option<&Path>,
    steps: usize,
) -> Run {
    let cfg = layout_config(data, out, &MODEL, nproc, extra);
    let mut results = run_local(nproc, Duration::from_secs(60), |comm| {
        let comm: Box<dyn Communicator> = Box::new(comm);
        let mut t = Trainer::new_rank(
            cfg.clone(),
            resume,
            Device::Cpu,
            (nproc > 1).then_some(comm),
        )?;
        let mut run = Run::default();
        for _ in 0..steps {
            run.step(t.train_step()?);
            // A layout with several ranks must have communicated.
            assert_eq!(t.last_step_comm_bytes > 0, nproc > 1);
        }
        run.params = flat(&t.full_params()?);
        t.save_checkpoint()?;
        Ok(run)
    })
    .unwrap();
    for other in &results[1..] {
        assert_eq!(
            other.losses, results[0].losses,
            "ranks report different losses"
        );
        assert_eq!(
            other.norms, results[0].norms,
            "ranks report different grad norms"
        );
    }
    results.swap_remove(0)
}

fn assert_close(what: &str, got: &Run, want: &Run) {
    assert_same_run(what, got, want, 1e-5);
}

#[test]
fn tensor_parallel_layouts_match_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let reference = run(&data, &tmp.path().join("ref"), 1, &[], None, STEPS);
    let layouts: [(&str, usize, &[&str]); 7] = [
        ("tp2", 2, &["parallel.tp=2"]),
        ("tp4", 4, &["parallel.tp=4"]),
        (
            "tp2 megatron-sp",
            2,
            &["parallel.tp=2", "parallel.sp_mode=\"megatron\""],
        ),
        ("dp2×tp2", 4, &["parallel.tp=2"]),
        (
            "dp2×tp2 zero1",
            4,
            &["parallel.tp=2", "parallel.zero_stage=1"],
        ),
        (
            "dp2×tp2 zero2",
            4,
            &["parallel.tp=2", "parallel.zero_stage=2"],
        ),
        (
            "dp2×tp2 zero3",
            4,
            &["parallel.tp=2", "parallel.zero_stage=3"],
        ),
    ];
    for (what, nproc, extra) in layouts {
        let out = tmp.path().join(what.replace([' ', '×'], "-"));
        let got = run(&data, &out, nproc, extra, None, STEPS);
        assert_close(what, &got, &reference);
    }
}

#[test]
fn tensor_parallel_checkpoint_resumes_at_another_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let reference = run(&data, &tmp.path().join("ref"), 1, &[], None, 4);
    let out = tmp.path().join("tp2");
    let first = run(&data, &out, 2, &["parallel.tp=2"], None, 2);
    let ckpt = out.join("checkpoints/step-0000002");
    let zero3 = ["parallel.tp=2", "parallel.zero_stage=3"];
    for (what, nproc, extra) in [
        ("tp4", 4, &["parallel.tp=4"][..]),
        ("one rank", 1, &[][..]),
        ("dp2×tp2 zero3", 4, &zero3[..]),
    ] {
        let dir = tmp.path().join(format!("resume-{nproc}"));
        let rest = run(&data, &dir, nproc, extra, Some(&ckpt), 2);
        let whole = Run {
            losses: first.losses.iter().chain(&rest.losses).copied().collect(),
            norms: first.norms.iter().chain(&rest.norms).copied().collect(),
            params: rest.params,
        };
        assert_close(&format!("tp2 → {what}"), &whole, &reference);
    }
}

#[test]
fn kv_heads_that_do_not_split_name_the_setting() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    // The shared config has 2 query heads and 1 KV head.
    let cfg = config(
        &data,
        &tmp.path().join("o"),
        &["parallel.nproc=2", "parallel.tp=2"],
    );
    let err = run_local(2, Duration::from_secs(30), |comm| {
        Trainer::new_rank(
            cfg.clone(),
            None,
            Device::Cpu,
            Some(Box::new(comm) as Box<dyn Communicator>),
        )
        .map(|_| ())
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("parallel.tp = 2") && err.contains("num_key_value_heads = 1"),
        "{err}"
    );
}
