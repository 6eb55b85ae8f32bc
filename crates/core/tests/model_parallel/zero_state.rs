//! ZeRO's sharded state wherever it is placed — host memory, disk files, or tensors on the
//! compute device (what a GPU run uses: shards, gradient shards and moments updated there by
//! tensor ops) — trains the multi-stream test model with one rank's losses, pre-clip gradient
//! norms and parameters. The device path runs on the CPU device unless
//! `COLOSSAL_TEST_DEVICE=cuda` (scripts/gpu_check.sh) puts the ZeRO-1/2 state on GPU 0: the
//! same tensor code either way.

use candle_core::{DType, Device};
use colossal_core::dist::{run_local, Communicator};
use colossal_core::exec::{grad_ready_block, BlockModel, Executor};
use colossal_core::parallel::offload::Placement;
use colossal_core::parallel::{FlatLayout, Zero3, Zero3GradSink, Zero3Source};
use colossal_core::parallel::{ZeroGradSink, ZeroOptimizer};

use super::multi_stream::{assert_same_run, one_rank, rank_step, sum, Run};
use super::shared::adamw;
use super::skipnet::{batch, init, loss_fn, SkipNet, LR, MAX_NORM, MICRO, STEPS, T};

/// ZeRO-3 over two ranks, rank r's state at `placement(r)`. Asserts where the state lives.
pub fn zero3_run(placement: impl Fn(usize) -> Placement + Sync, on_device: bool) -> Vec<Run> {
    run_local(2, T, |comm| {
        let (r, n) = (comm.rank(), comm.size());
        let mut z = Zero3::from_full(&init(), &adamw(), r, n, &placement(r))?;
        assert_eq!(z.on_device(), on_device, "where ZeRO-3 keeps its chunks");
        let block_params = (0..SkipNet.num_blocks())
            .map(|b| SkipNet.block_param_names(b))
            .collect();
        let (mut losses, mut norms) = (Vec::new(), Vec::new());
        for step in 0..STEPS {
            let mut sink = Zero3GradSink::new(&z, &comm, grad_ready_block(&SkipNet));
            let mut source = Zero3Source {
                shards: vec![(&z, &comm)],
                block_params: Vec::clone(&block_params),
                dtype: DType::F32,
            };
            let mut loss = 0.0f32;
            for mb in (r..MICRO).step_by(n) {
                let (inputs, target) = batch(step, mb);
                let lf = loss_fn(target);
                let exec = Executor::default();
                loss += exec
                    .forward_backward_with(&SkipNet, &mut source, &inputs, &(), &*lf, &mut sink)?
                    .loss;
            }
            let chunks = sink.finish()?;
            assert!(chunks.values().all(|c| c.is_device() == on_device));
            let norm = z.grad_norm(&comm, &chunks)?;
            z.step(chunks, LR, MAX_NORM, norm)?;
            norms.push(norm);
            losses.push(sum(&comm, loss)?);
        }
        let (params, _) = z.gather_full(&comm)?;
        Ok((losses, norms, params))
    })
    .unwrap()
}

/// ZeRO stage 1 or 2 over two ranks, the moments and gradient shard at `placement`.
fn zero12_run(stage: u8, placement: Placement) -> Vec<Run> {
    let on_device = matches!(placement, Placement::Device(_));
    run_local(2, T, |comm| {
        let r = comm.rank();
        let params = init();
        let layout = FlatLayout::new(&params, comm.size());
        let mut z = ZeroOptimizer::from_full(stage, layout, r, &adamw(), &placement)?;
        assert_eq!(
            z.on_device(),
            on_device,
            "where ZeRO-{stage} keeps its moments"
        );
        let (mut losses, mut norms) = (Vec::new(), Vec::new());
        for step in 0..STEPS {
            let ready = grad_ready_block(&SkipNet);
            let mut sink = ZeroGradSink::new(&comm, &z.layout, stage, ready, 64, &placement)?;
            let exec = Executor::default();
            let loss = rank_step(exec, &comm, step, &params, &mut sink, |s, last| {
                s.last_micro_batch = last
            })?;
            let shard = sink.finish()?;
            assert_eq!(shard.is_device(), on_device, "the gradient shard's place");
            let norm = z.grad_norm(&comm, &shard)?;
            z.step(&comm, &params, shard, LR, MAX_NORM, norm)?;
            norms.push(norm);
            losses.push(sum(&comm, loss)?);
        }
        Ok((losses, norms, params))
    })
    .unwrap()
}

/// Where the device-placed state goes: the CPU device, or GPU 0 when asked.
fn state_device() -> Device {
    match std::env::var("COLOSSAL_TEST_DEVICE").as_deref() {
        Ok("cuda") => Device::new_cuda(0).expect("COLOSSAL_TEST_DEVICE=cuda needs a GPU build"),
        _ => Device::Cpu,
    }
}

#[test]
fn zero3_with_disk_offload_matches_one_rank() {
    let want = one_rank(Executor::default());
    let tmp = tempfile::tempdir().unwrap();
    let runs = zero3_run(
        |r| Placement::disk(tmp.path().join(format!("rank{r}")), 0),
        false,
    );
    for (r, run) in runs.iter().enumerate() {
        assert_same_run(&format!("zero3 + disk offload, rank {r}"), run, &want);
    }
}

#[test]
fn zero_state_on_the_device_matches_one_rank() {
    let want = one_rank(Executor::default());
    let dev = || Placement::Device(state_device());
    // ZeRO-3 gathers its weights where its chunks are, and this model's inputs are on the CPU.
    let cpu = || Placement::Device(Device::Cpu);
    for (r, run) in zero3_run(|_| cpu(), true).iter().enumerate() {
        assert_same_run(&format!("zero3, state on the device, rank {r}"), run, &want);
    }
    for stage in [1, 2] {
        for (placement, what) in [(Placement::Memory, "host"), (dev(), "device")] {
            for (r, run) in zero12_run(stage, placement).iter().enumerate() {
                let name = format!("zero{stage}, state on the {what}, rank {r}");
                assert_same_run(&name, run, &want);
            }
        }
    }
}
