//! A second model family through the one engine every trainer uses: the skip-connection,
//! two-stream test model trains in `Engine` exactly as the hand-written loop of
//! `multi_stream.rs` does, under data parallelism, ZeRO 2 and 3 (with disk offload and
//! activation checkpointing) and pipeline stages (alone and with data parallelism); it
//! checkpoints and resumes exactly in either checkpoint format; and a parallel style the
//! family does not implement is an error naming it.

use std::path::Path;

use candle_core::Device;
use colossal_core::dist::{run_local, Communicator};
use colossal_core::exec::Executor;
use colossal_core::parallel::pipeline_run::MicroBatch;
use colossal_core::train::{Engine, Origin, TrainConfig};
use colossal_core::Result;

use super::multi_stream::{assert_same_run, one_rank, Run};
use super::skipnet::{batch, init, loss_fn, SkipNet, LR, MAX_NORM, MICRO, STEPS, T};

/// The hand-written loop's optimizer and schedule, with `parallel` (TOML lines) and `train`
/// extras.
fn config(out: &Path, train: &str, parallel: &str) -> TrainConfig {
    let text = format!(
        r#"
[train]
out_dir = "{}"
batch_size = {MICRO}
micro_batch_size = 1
max_steps = {STEPS}
lr = {LR}
schedule = "constant"
beta1 = 0.9
beta2 = 0.95
eps = 1e-8
weight_decay = 0.1
no_decay = ["norm"]
grad_clip = {MAX_NORM}
{train}
[parallel]
{parallel}
"#,
        out.display()
    );
    toml::from_str(&text).unwrap()
}

/// Steps `from..to` on this rank's micro-batches: r, r + N, … of the global batch.
fn steps(e: &mut Engine<SkipNet>, from: usize, to: usize, run: &mut Run) -> Result<()> {
    for step in from..to {
        let mine: Vec<usize> = (e.rank()..MICRO).step_by(e.ranks()).collect();
        let (loss, norm, _) = e.step(mine.len(), |i| {
            let (inputs, target) = batch(step, mine[i]);
            Ok(MicroBatch {
                inputs,
                ctx: (),
                loss_fn: loss_fn(target),
            })
        })?;
        run.0.push(loss);
        run.1.push(norm);
    }
    Ok(())
}

/// `n` ranks from the test's initial weights for all steps; world rank 0's run (its
/// parameters whole).
fn engine_run(n: usize, train: &str, parallel: &str) -> Run {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), train, &format!("nproc = {n}\n{parallel}"));
    let mut runs = run_local(n, T, |comm| {
        let comm = (n > 1).then(|| Box::new(comm) as Box<dyn Communicator>);
        let origin = Origin::Whole {
            model: SkipNet,
            params: init(),
        };
        let mut e = Engine::new_rank(cfg.clone(), origin, Device::Cpu, comm)?;
        let mut run: Run = Default::default();
        steps(&mut e, 0, STEPS, &mut run)?;
        run.2 = e.full_params()?;
        Ok(run)
    })
    .unwrap();
    runs.swap_remove(0)
}

#[test]
fn the_engine_trains_a_new_family_as_the_hand_written_loop() {
    let want = one_rank(Executor::default());
    assert_same_run("engine, one rank", &engine_run(1, "", ""), &want);
    let ckpt = "activation_checkpointing = true";
    assert_same_run("engine, checkpointing", &engine_run(1, ckpt, ""), &want);
}

#[test]
fn the_engine_runs_the_new_family_in_every_parallel_layout() {
    let want = one_rank(Executor::default());
    let ckpt = "activation_checkpointing = true";
    let layouts = [
        ("dp2", "", "dp = 2"),
        ("dp2 zero2", "", "zero_stage = 2"),
        (
            "dp2 zero3 disk offload + ckpt",
            ckpt,
            "zero_stage = 3\noffload = \"disk\"",
        ),
        ("pp2 gpipe", "", "pp = 2\npp_schedule = \"gpipe\""),
        ("dp2 x pp2 1f1b", "", "pp = 2\npp_schedule = \"1f1b\""),
    ];
    for (what, train, parallel) in layouts {
        let n = if what.starts_with("dp2 x") { 4 } else { 2 };
        assert_same_run(what, &engine_run(n, train, parallel), &want);
    }
}

#[test]
fn the_engine_checkpoints_and_resumes_a_new_family_exactly() {
    let want = one_rank(Executor::default());
    for (format, parallel) in [("hf", "zero_stage = 1"), ("distributed", "pp = 2")] {
        let tmp = tempfile::tempdir().unwrap();
        let train = format!("checkpoint_format = \"{format}\"");
        let cfg = config(tmp.path(), &train, &format!("nproc = 2\n{parallel}"));
        let first = run_local(2, T, |comm| {
            let origin = Origin::Whole {
                model: SkipNet,
                params: init(),
            };
            let comm = Some(Box::new(comm) as Box<dyn Communicator>);
            let mut e = Engine::new_rank(cfg.clone(), origin, Device::Cpu, comm)?;
            let mut run: Run = Default::default();
            steps(&mut e, 0, 2, &mut run)?;
            Ok((run, e.save_checkpoint()?))
        })
        .unwrap();
        let dir = first[0].1.clone().expect("rank 0 wrote the checkpoint");
        let config_json = std::fs::read_to_string(dir.join("config.json")).unwrap();
        assert!(config_json.contains("skipnet"), "{config_json}");
        let resumed = run_local(2, T, |comm| {
            let comm = Some(Box::new(comm) as Box<dyn Communicator>);
            let mut e =
                Engine::<SkipNet>::new_rank(cfg.clone(), Origin::Resume(&dir), Device::Cpu, comm)?;
            assert_eq!(e.state.step, 2);
            let mut run = first[0].0.clone();
            steps(&mut e, 2, STEPS, &mut run)?;
            run.2 = e.full_params()?;
            Ok(run)
        })
        .unwrap();
        assert_same_run(&format!("{format} checkpoint, resumed"), &resumed[0], &want);
    }
}

#[test]
fn a_fresh_start_streams_into_zero3_shards_as_one_rank_initialises() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |n: usize, parallel: &str| -> Run {
        let cfg = config(tmp.path(), "", &format!("nproc = {n}\n{parallel}"));
        let mut runs = run_local(n, T, |comm| {
            let comm = (n > 1).then(|| Box::new(comm) as Box<dyn Communicator>);
            let origin = Origin::Fresh {
                model: SkipNet,
                seed: 7,
            };
            let mut e = Engine::new_rank(cfg.clone(), origin, Device::Cpu, comm)?;
            let mut run: Run = Default::default();
            steps(&mut e, 0, STEPS, &mut run)?;
            run.2 = e.full_params()?;
            Ok(run)
        })
        .unwrap();
        runs.swap_remove(0)
    };
    let want = run(1, "");
    let (a, b) = (init(), &want.2);
    assert!(
        a.iter().any(|(n, v)| {
            let d = (v.as_tensor() - b.get(n).unwrap()).unwrap();
            d.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        }),
        "a fresh start is not the test's fixed weights"
    );
    assert_same_run("fresh, dp2 zero3", &run(2, "zero_stage = 3"), &want);
}

#[test]
fn parallel_styles_the_family_lacks_are_errors_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("tp = 2", "tensor parallelism (parallel.tp > 1)"),
        ("sp = 2\nsp_mode = \"ulysses\"", "sequence parallelism"),
        (
            "pp = 2\npp_schedule = \"zbh1\"",
            "parallel.pp_schedule = \"zbh1\"",
        ),
    ];
    for (parallel, what) in cases {
        let cfg = config(tmp.path(), "", &format!("nproc = 2\n{parallel}"));
        let errors = run_local(2, T, |comm| {
            let origin = Origin::Whole {
                model: SkipNet,
                params: init(),
            };
            let comm = Some(Box::new(comm) as Box<dyn Communicator>);
            Ok(Engine::new_rank(cfg.clone(), origin, Device::Cpu, comm)
                .err()
                .map(|e| e.to_string()))
        })
        .unwrap();
        let e = errors[0].clone().expect("an error");
        println!("{parallel}: {e}");
        assert!(
            e.contains(what) && e.contains("not implemented for the skipnet model family"),
            "{e}"
        );
    }
}
