//! A model shaped like the next applications: skip connections crossing blocks (a UNet's
//! down block i feeding up block N−i) and a two-stream middle (an Evoformer's MSA and pair
//! streams), with a conditioning input that takes no gradient (a timestep embedding). Its
//! block-wise gradients equal whole-graph `backward()`, and it trains under data parallelism,
//! activation checkpointing, ZeRO (`zero_state.rs`) and two pipeline stages with one rank's
//! losses, pre-clip gradient norms and parameters.

use candle_core::{DType, Device, Tensor};
use colossal_core::dist::{run_local, Communicator, ReduceOp};
use colossal_core::exec::{
    grad_ready_block, BlockModel, Executor, FullParams, GradAccumulator, Hooks,
};
use colossal_core::optim::{clip_grad_norm, clip_to_norm};
use colossal_core::parallel::pipeline::Schedule;
use colossal_core::parallel::pipeline_run::{MicroBatch, PipelineRank};
use colossal_core::parallel::DataParallelSink;
use colossal_core::params::{Grads, Params};
use colossal_core::Result;

use super::shared::{adamw, assert_same_params, copy_where, rel};
use super::skipnet::{batch, init, loss_fn, SkipNet, LR, MAX_NORM, MICRO, STEPS, T};

/// Per step: the loss summed over micro-batches and the pre-clip gradient norm.
pub type Run = (Vec<f32>, Vec<f64>, Params);

pub fn one_rank(exec: Executor) -> Run {
    let params = init();
    let mut opt = adamw();
    let (mut losses, mut norms) = (Vec::new(), Vec::new());
    for step in 0..STEPS {
        let mut acc = GradAccumulator::default();
        let mut loss = 0.0;
        for mb in 0..MICRO {
            let (inputs, target) = batch(step, mb);
            let out = exec
                .forward_backward(&SkipNet, &params, &inputs, &(), &*loss_fn(target), &mut acc)
                .unwrap();
            loss += out.loss;
        }
        norms.push(clip_grad_norm(&mut acc.grads, MAX_NORM).unwrap());
        losses.push(loss);
        opt.step(&params, &acc.grads, LR).unwrap();
    }
    (losses, norms, params)
}

pub fn assert_same_run(what: &str, got: &Run, want: &Run) {
    for s in 0..STEPS {
        let (l, lw) = (got.0[s], want.0[s]);
        let (n, nw) = (got.1[s], want.1[s]);
        println!("{what} step {s}: loss {l:.7} vs {lw:.7}, grad norm {n:.7} vs {nw:.7}");
        assert!(
            (l - lw).abs() <= 1e-6 * lw.abs().max(1.0),
            "{what}: loss at step {s}"
        );
        assert!((n - nw).abs() <= 1e-6 * nw, "{what}: grad norm at step {s}");
    }
    assert_same_params(what, &got.2, &want.2, 1e-6);
}

#[test]
fn blockwise_gradients_equal_whole_graph_backward() {
    let params = init();
    let (inputs, target) = batch(0, 0);
    // Whole graph: the same blocks, nothing detached.
    let mut x = inputs.clone();
    for b in 0..SkipNet.num_blocks() {
        x = SkipNet.block_forward(b, &params, &x, &()).unwrap();
    }
    let whole = loss_fn(target.clone())(&x).unwrap().backward().unwrap();
    for ckpt in [false, true] {
        let mut acc = GradAccumulator::default();
        Executor {
            activation_checkpointing: ckpt,
        }
        .forward_backward(
            &SkipNet,
            &params,
            &inputs,
            &(),
            &*loss_fn(target.clone()),
            &mut acc,
        )
        .unwrap();
        assert_eq!(
            acc.grads.len(),
            params.len(),
            "every parameter has a gradient"
        );
        for (name, var) in params.iter() {
            let want = whole.get(var.as_tensor()).unwrap();
            let got = acc.grads.get(name).unwrap();
            let e = rel(got, want);
            println!("checkpointing={ckpt} {name}: relative difference {e:e}");
            assert!(e <= 1e-6, "{name}: {e:e}");
            assert!(
                got.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0
            );
        }
    }
}

fn data_parallel(exec: Executor) -> Run {
    let runs = run_local(2, T, |comm| {
        let params = init();
        let mut opt = adamw();
        let (mut losses, mut norms) = (Vec::new(), Vec::new());
        for step in 0..STEPS {
            let mut sink = DataParallelSink::new(&comm, 64, grad_ready_block(&SkipNet));
            let loss = rank_step(exec, &comm, step, &params, &mut sink, |s, last| {
                s.last_micro_batch = last
            })?;
            let mut grads = sink.finish()?;
            norms.push(clip_grad_norm(&mut grads, MAX_NORM)?);
            losses.push(sum(&comm, loss)?);
            opt.step(&params, &grads, LR)?;
        }
        Ok((losses, norms, params))
    })
    .unwrap();
    assert_same_params("dp rank 0 vs rank 1", &runs[0].2, &runs[1].2, 0.0);
    runs.into_iter().next().unwrap()
}

/// This rank's share of step `step`'s micro-batches (round-robin over ranks) through `exec`,
/// `mark(sink, last)` before each so the sink knows the last; returns the summed local loss.
pub fn rank_step<H: Hooks>(
    exec: Executor,
    comm: &dyn Communicator,
    step: usize,
    params: &Params,
    sink: &mut H,
    mark: impl Fn(&mut H, bool),
) -> Result<f32> {
    let mine: Vec<usize> = (comm.rank()..MICRO).step_by(comm.size()).collect();
    let mut loss = 0.0f32;
    for (i, &mb) in mine.iter().enumerate() {
        mark(sink, i + 1 == mine.len());
        let (inputs, target) = batch(step, mb);
        let lf = loss_fn(target);
        loss += exec
            .forward_backward(&SkipNet, params, &inputs, &(), &*lf, sink)?
            .loss;
    }
    Ok(loss)
}

pub fn sum(comm: &dyn Communicator, x: f32) -> Result<f32> {
    let t = comm.all_reduce(&Tensor::new(&[x], &Device::Cpu)?, ReduceOp::Sum)?;
    Ok(t.to_vec1::<f32>()?[0])
}

#[test]
fn data_parallel_with_and_without_checkpointing_matches_one_rank() {
    let want = one_rank(Executor::default());
    assert_same_run("dp2", &data_parallel(Executor::default()), &want);
    let ckpt = Executor {
        activation_checkpointing: true,
    };
    assert_same_run("checkpointing, one rank", &one_rank(ckpt), &want);
    assert_same_run("dp2 + checkpointing", &data_parallel(ckpt), &want);
}

#[test]
fn two_pipeline_stages_match_one_rank() {
    let want = one_rank(Executor::default());
    for schedule in [Schedule::GPipe, Schedule::OneFOneB] {
        // The cut after block 2 sends x's successors: h is gone, msa, pair, both skips and the
        // conditioning cross; only the first four take a gradient back.
        let runs = run_local(2, T, |comm| {
            let rank = PipelineRank {
                model: &SkipNet,
                executor: Executor::default(),
                comm: &comm,
                schedule,
                stages: vec![0..3, 3..6],
                stash: None,
            };
            let names: Vec<String> = rank
                .blocks()
                .iter()
                .flat_map(|&b| SkipNet.block_param_names(b))
                .collect();
            let params = copy_where(&init(), |n| names.iter().any(|x| x == n));
            let mut opt = adamw();
            let (mut losses, mut norms) = (Vec::new(), Vec::new());
            for step in 0..STEPS {
                let mbs: Vec<MicroBatch<'_, ()>> = (0..MICRO)
                    .map(|mb| {
                        let (inputs, target) = batch(step, mb);
                        MicroBatch {
                            inputs,
                            ctx: (),
                            loss_fn: loss_fn(target),
                        }
                    })
                    .collect();
                let mut acc = GradAccumulator::default();
                let report = rank.run(&mut FullParams(&params), &mbs, &mut acc)?;
                let norm = global_norm(&comm, &acc.grads)?;
                clip_to_norm(&mut acc.grads, MAX_NORM, norm)?;
                opt.step(&params, &acc.grads, LR)?;
                norms.push(norm);
                losses.push(sum(&comm, report.loss_sum)?);
            }
            Ok((losses, norms, params))
        })
        .unwrap();
        // Each stage holds its blocks' parameters; together they are the whole model.
        let mut whole = Params::new();
        for run in &runs {
            for (name, var) in run.2.iter() {
                whole.insert(name, var.clone());
            }
        }
        let run = (runs[0].0.clone(), runs[0].1.clone(), whole);
        assert_same_run(&format!("pp2 {schedule:?}"), &run, &want);
    }
}

/// ‖g‖ over the gradients every stage holds.
fn global_norm(comm: &dyn Communicator, grads: &Grads) -> Result<f64> {
    let mut local = 0f64;
    for name in grads.names() {
        let g = grads.get(name).expect("listed");
        local += g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    let t = comm.all_reduce(&Tensor::new(&[local], &Device::Cpu)?, ReduceOp::Sum)?;
    Ok(t.to_vec1::<f64>()?[0].sqrt())
}
