//! A model shaped like the next applications: skip connections crossing blocks (a UNet's
//! down block i feeding up block N−i) and a two-stream middle (an Evoformer's MSA and pair
//! streams), with a conditioning input that takes no gradient (a timestep embedding). Its
//! block-wise gradients equal whole-graph `backward()`, and it trains under data parallelism,
//! activation checkpointing, ZeRO-3 with disk offload and two pipeline stages with one rank's
//! losses, pre-clip gradient norms and parameters.

use std::time::Duration;

use candle_core::{DType, Device, Tensor, Var};
use colossal_core::dist::{run_local, Communicator, ReduceOp};
use colossal_core::exec::{
    grad_ready_block, Acts, BlockModel, Executor, FullParams, GradAccumulator, LossFn,
};
use colossal_core::optim::{clip_grad_norm, clip_to_norm};
use colossal_core::parallel::offload::Placement;
use colossal_core::parallel::pipeline::Schedule;
use colossal_core::parallel::pipeline_run::{MicroBatch, PipelineRank};
use colossal_core::parallel::{DataParallelSink, Zero3, Zero3GradSink, Zero3Source};
use colossal_core::params::{Grads, Params};
use colossal_core::Result;

use super::shared::{adamw, assert_same_params, copy_where, rel};

const D: usize = 8;
const ROWS: usize = 2;
const MICRO: usize = 4;
const STEPS: usize = 3;
const LR: f64 = 1e-2;
const MAX_NORM: f64 = 1.0;
const T: Duration = Duration::from_secs(60);

/// down0 → down1 → split into (msa, pair) → mix → up1 (+ skip1) → up0 (+ skip0).
struct SkipNet;

const NAMES: [&[&str]; 6] = [
    &["down0.w"],
    &["down1.w"],
    &["split.msa", "split.pair"],
    &["mix.msa", "mix.pair"],
    &["up1.w"],
    &["up0.w", "up0.b"],
];

impl BlockModel for SkipNet {
    type Ctx = ();

    fn num_blocks(&self) -> usize {
        NAMES.len()
    }

    fn block_param_names(&self, block: usize) -> Vec<String> {
        NAMES[block].iter().map(|s| s.to_string()).collect()
    }

    fn block_forward(&self, block: usize, p: &Params, x: &Acts, _: &()) -> Result<Acts> {
        let cond = x.get("cond")?.clone();
        let mut out = x.clone();
        match block {
            0 => {
                let h = (x.get("x")?.matmul(p.get("down0.w")?)? + &cond)?.tanh()?;
                out.take("x")?;
                out.insert("skip.0", h.clone());
                out.insert("h", h);
            }
            1 => {
                let h = x.get("h")?.matmul(p.get("down1.w")?)?.tanh()?;
                out.insert("skip.1", h.clone());
                out.insert("h", h);
            }
            2 => {
                let h = out.take("h")?;
                out.insert("msa", h.matmul(p.get("split.msa")?)?.tanh()?);
                out.insert("pair", (h.matmul(p.get("split.pair")?)? * &cond)?);
            }
            3 => {
                let msa = (x.get("msa")? + x.get("pair")?.matmul(p.get("mix.msa")?)?.tanh()?)?;
                let pair = (x.get("pair")? + msa.matmul(p.get("mix.pair")?)?)?;
                out.insert("msa", msa);
                out.insert("pair", pair);
            }
            4 => {
                let both = (out.take("msa")? + out.take("pair")?)?;
                let h = (both.matmul(p.get("up1.w")?)?.tanh()? + out.take("skip.1")?)?;
                out.insert("h", h);
            }
            _ => {
                let h = (x.get("h")? + x.get("skip.0")?)?;
                let y = h.matmul(p.get("up0.w")?)?.broadcast_add(p.get("up0.b")?)?;
                out = Acts::one("y", y);
            }
        }
        Ok(out)
    }

    fn takes_grad(&self, name: &str) -> bool {
        !matches!(name, "x" | "cond")
    }
}

fn init() -> Params {
    let mut p = Params::new();
    for (i, name) in NAMES.iter().flat_map(|n| n.iter()).enumerate() {
        let shape: &[usize] = if *name == "up0.b" { &[D] } else { &[D, D] };
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|k| (((k * 37 + i * 101) % 97) as f32 / 97.0 - 0.5) * 0.9)
            .collect();
        let t = Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
        p.insert(*name, Var::from_tensor(&t).unwrap());
    }
    p
}

fn tensor(seed: usize, f: impl Fn(usize) -> f32) -> Tensor {
    let v: Vec<f32> = (0..ROWS * D).map(|k| f(k * 13 + seed * 7)).collect();
    Tensor::from_vec(v, (ROWS, D), &Device::Cpu).unwrap()
}

/// Micro-batch `mb` of step `step`: inputs and regression target.
fn batch(step: usize, mb: usize) -> (Acts, Tensor) {
    let s = step * MICRO + mb;
    let x = tensor(s, |k| ((k % 11) as f32 / 11.0 - 0.5) * 2.0);
    let cond = tensor(s, |k| 1.0 + ((k % 5) as f32) * 0.1);
    let target = tensor(s, |k| (k % 7) as f32 / 7.0 - 0.5);
    (Acts::one("x", x).with("cond", cond), target)
}

fn loss_fn(target: Tensor) -> Box<LossFn<'static>> {
    let norm = (MICRO * ROWS * D) as f64;
    Box::new(move |out: &Acts| Ok(((out.get("y")? - &target)?.sqr()?.sum_all()? / norm)?))
}

/// Per step: the loss summed over micro-batches and the pre-clip gradient norm.
type Run = (Vec<f32>, Vec<f64>, Params);

fn one_rank(exec: Executor) -> Run {
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

fn assert_same_run(what: &str, got: &Run, want: &Run) {
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
        let (r, n) = (comm.rank(), comm.size());
        let params = init();
        let mut opt = adamw();
        let (mut losses, mut norms) = (Vec::new(), Vec::new());
        for step in 0..STEPS {
            let mut sink = DataParallelSink::new(&comm, 64, grad_ready_block(&SkipNet));
            let mine: Vec<usize> = (r..MICRO).step_by(n).collect();
            let mut loss = 0.0f32;
            for (i, &mb) in mine.iter().enumerate() {
                sink.last_micro_batch = i + 1 == mine.len();
                let (inputs, target) = batch(step, mb);
                loss += exec
                    .forward_backward(
                        &SkipNet,
                        &params,
                        &inputs,
                        &(),
                        &*loss_fn(target),
                        &mut sink,
                    )?
                    .loss;
            }
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

fn sum(comm: &dyn Communicator, x: f32) -> Result<f32> {
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
fn zero3_with_disk_offload_matches_one_rank() {
    let want = one_rank(Executor::default());
    let tmp = tempfile::tempdir().unwrap();
    let runs = run_local(2, T, |comm| {
        let (r, n) = (comm.rank(), comm.size());
        let dir = tmp.path().join(format!("rank{r}"));
        std::fs::create_dir_all(&dir).unwrap();
        let placement = Placement::disk(dir, 0);
        let mut z = Zero3::from_full(&init(), adamw(), r, n, &placement)?;
        assert!(z.offloaded_bytes() > 0, "state lives on disk");
        let block_params = (0..SkipNet.num_blocks())
            .map(|b| SkipNet.block_param_names(b))
            .collect();
        let (mut losses, mut norms) = (Vec::new(), Vec::new());
        for step in 0..STEPS {
            let mut sink = Zero3GradSink::new(&z, &comm, grad_ready_block(&SkipNet));
            let mut source = Zero3Source {
                zero: &z,
                comm: &comm,
                block_params: Vec::clone(&block_params),
                dtype: DType::F32,
            };
            let mut loss = 0.0f32;
            for mb in (r..MICRO).step_by(n) {
                let (inputs, target) = batch(step, mb);
                loss += Executor::default()
                    .forward_backward_with(
                        &SkipNet,
                        &mut source,
                        &inputs,
                        &(),
                        &*loss_fn(target),
                        &mut sink,
                    )?
                    .loss;
            }
            let chunks = sink.finish()?;
            let norm = z.grad_norm(&comm, &chunks)?;
            z.step(chunks, LR, MAX_NORM, norm)?;
            norms.push(norm);
            losses.push(sum(&comm, loss)?);
        }
        let (params, _) = z.gather_full(&comm)?;
        Ok((losses, norms, params))
    })
    .unwrap();
    for (r, run) in runs.iter().enumerate() {
        assert_same_run(&format!("zero3 + disk offload, rank {r}"), run, &want);
    }
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
