//! Pipeline parallelism against one rank: pp ∈ {2, 4} × the four schedules × micro-batches
//! ∈ {4, 8} give one rank's losses and updated parameters (f32, 1e-5 relative, 5 AdamW
//! steps), tied embeddings included; the measured bubble is printed beside the theory.

use std::time::Duration;

use candle_core::{Device, Tensor};
use colossal_core::dist::{run_local, Communicator, ReduceOp};
use colossal_core::exec::{
    llama_inputs, on_output, BlockModel, Executor, FullParams, GradAccumulator,
};
use colossal_core::models::llama::{init_params, AttnInputs, Llama, LlamaConfig};
use colossal_core::nn::cross_entropy_sum;
use colossal_core::parallel::pipeline::{self, Schedule};
use colossal_core::parallel::pipeline_run::{MicroBatch, PipelineRank};
use colossal_core::parallel::weight_grad;

use super::shared::{adamw, copy_where, rel};
use colossal_core::params::Params;

const T: Duration = Duration::from_secs(60);
const STEPS: usize = 5;
const LEN: usize = 8;

fn config(tie: bool) -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 8,
        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": tie,
        "initializer_range": 0.2
    }))
    .unwrap()
}

/// Micro-batch `mb` of step `step`: one row of LEN tokens and its next-token targets.
fn micro_batch(step: usize, mb: usize) -> (Tensor, Vec<i64>) {
    let ids: Vec<u32> = (0..LEN)
        .map(|i| ((i * 7 + (step % 2) * 13 + mb * 5 + i * i) % 96) as u32)
        .collect();
    let targets = ids[1..].iter().map(|&x| x as i64).collect();
    (
        Tensor::from_vec(ids, (1, LEN), &Device::Cpu).unwrap(),
        targets,
    )
}

fn loss_fn(targets: Vec<i64>, norm: f64) -> impl Fn(&Tensor) -> colossal_core::Result<Tensor> {
    move |logits: &Tensor| {
        let (b, t, v) = logits.dims3()?;
        let rows = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
        Ok((cross_entropy_sum(&rows, &targets, -100)?.0 / norm)?)
    }
}

fn reference(model: &Llama, init: &Params, m: usize) -> (Vec<f32>, Params) {
    let params = copy_where(init, |_| true);
    let mut opt = adamw();
    let inp = AttnInputs::causal(&model.cfg, &model.rope, 1, LEN, None, &Device::Cpu).unwrap();
    let norm = (m * (LEN - 1)) as f64;
    let mut losses = Vec::new();
    for step in 0..STEPS {
        let mut acc = GradAccumulator::default();
        let mut loss = 0.0;
        for mb in 0..m {
            let (ids, targets) = micro_batch(step, mb);
            let f = loss_fn(targets, norm);
            let out = Executor::default()
                .lm_forward_backward(model, &params, &ids, &inp, &f, &mut acc)
                .unwrap();
            loss += out.loss;
        }
        losses.push(loss);
        opt.step(&params, &acc.grads, 1e-3).unwrap();
    }
    (losses, params)
}

fn check(tie: bool, schedule: Schedule, p: usize, m: usize) {
    let model = Llama::new(config(tie)).unwrap();
    let init = init_params(&model, 4, &Device::Cpu).unwrap();
    let (ref_losses, ref_params) = reference(&model, &init, m);
    let layers = model.cfg.num_hidden_layers;
    let stages = pipeline::partition(layers, schedule.chunks() * p, None).unwrap();
    let zb = schedule == Schedule::ZbH1;
    let results = run_local(p, T, |comm| {
        // Zero-bubble: the projections' weight gradients wait for the W pass (one stash per
        // rank: it records which backward is running).
        let (zb_model, stash) = weight_grad::defer_weight_grads(&model);
        let rank = PipelineRank {
            model: if zb { &zb_model } else { &model },
            executor: Executor::default(),
            comm: &comm,
            schedule,
            stages: stages.clone(),
            stash: zb.then(|| stash.clone()),
        };
        let names: Vec<String> = rank
            .blocks()
            .iter()
            .flat_map(|&b| model.block_param_names(b))
            .collect();
        let params = copy_where(&init, |n| names.iter().any(|x| x == n));
        let inp = AttnInputs::causal(&model.cfg, &model.rope, 1, LEN, None, &Device::Cpu)?;
        let norm = (m * (LEN - 1)) as f64;
        let mut opt = adamw();
        let (mut losses, mut bubbles) = (Vec::new(), Vec::new());
        for step in 0..STEPS {
            let mbs: Vec<MicroBatch<'_, AttnInputs>> = (0..m)
                .map(|mb| {
                    let (ids, targets) = micro_batch(step, mb);
                    MicroBatch {
                        inputs: llama_inputs(&ids),
                        ctx: inp.clone(),
                        loss_fn: on_output(loss_fn(targets, norm)),
                    }
                })
                .collect();
            let mut acc = GradAccumulator::default();
            let report = rank.run(&mut FullParams(&params), &mbs, &mut acc)?;
            rank.sync_tied(&mut acc.grads, Llama::EMBED)?;
            let loss = comm.all_reduce(
                &Tensor::new(&[report.loss_sum], &Device::Cpu)?,
                ReduceOp::Sum,
            )?;
            losses.push(loss.to_vec1::<f32>()?[0]);
            bubbles.push(report.bubble());
            opt.step(&params, &acc.grads, 1e-3)?;
        }
        Ok((losses, params, bubbles))
    })
    .unwrap();
    let mut bubble = 0.0;
    for (r, (losses, params, bubbles)) in results.iter().enumerate() {
        for (a, b) in losses.iter().zip(&ref_losses) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs(),
                "{schedule:?} p{p} m{m} rank {r}: {losses:?} vs {ref_losses:?}"
            );
        }
        for (name, var) in params.iter() {
            let d = rel(var.as_tensor(), ref_params.get(name).unwrap());
            assert!(
                d < 1e-5,
                "{schedule:?} p{p} m{m} tie {tie} rank {r} {name}: {d:e}"
            );
        }
        bubble += bubbles.iter().skip(1).sum::<f64>() / (STEPS - 1) as f64 / p as f64;
    }
    let covered: usize = results.iter().map(|(_, p, _)| p.len()).sum();
    assert!(
        covered >= ref_params.len(),
        "every parameter lives on some stage"
    );
    println!(
        "{schedule:?} pp {p} micro-batches {m}: bubble measured {bubble:.3}, unit-cost replay {:.3}, theory {:.3}",
        pipeline::replay(&schedule, p, m).unwrap(),
        schedule.theoretical_bubble(p, m)
    );
}

const SCHEDULES: [Schedule; 4] = [
    Schedule::GPipe,
    Schedule::OneFOneB,
    Schedule::Interleaved { chunks: 2 },
    Schedule::ZbH1,
];

#[test]
fn pp2_matches_one_rank_under_every_schedule() {
    for schedule in SCHEDULES {
        for m in [4, 8] {
            check(false, schedule, 2, m);
        }
    }
}

#[test]
fn pp4_matches_one_rank_under_every_schedule() {
    for schedule in SCHEDULES {
        for m in [4, 8] {
            check(false, schedule, 4, m);
        }
    }
}

#[test]
fn tied_embeddings_sum_their_gradients_across_first_and_last_stage() {
    check(true, Schedule::OneFOneB, 2, 4);
    check(true, Schedule::Interleaved { chunks: 2 }, 4, 4);
    check(true, Schedule::ZbH1, 2, 4);
}
