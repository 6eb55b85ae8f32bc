//! Distributed checkpoints reshard: train at tp2×pp2 writing per-rank slices, resume at dp4,
//! at tp4 and at one rank; the following steps match an uninterrupted tp2×pp2 run (1e-5).
//! Converted to a whole HF directory, the checkpoint gives the trained model's logits.

use std::path::Path;
use std::time::Duration;

use super::common::prepare;
use super::compare::layout_config;
use candle_core::{DType, Device, Tensor};
use colossal_core::checkpoint::llama::load_llama;
use colossal_core::dist::{run_local, Communicator};
use colossal_core::models::llama::{AttnInputs, Llama};
use colossal_core::train::{distributed_to_whole, load_distributed, whole_to_distributed, Trainer};

const MODEL: [&str; 8] = [
    "model.config.num_hidden_layers=4",
    "model.config.num_attention_heads=4",
    "model.config.num_key_value_heads=4",
    "train.batch_size=8",
    "train.micro_batch_size=2",
    "train.lr=1e-3",
    "train.min_lr=1e-4",
    "train.checkpoint_format=\"distributed\"",
];

/// Losses of `steps` steps on `nproc` ranks (resuming from `resume`), then a checkpoint.
fn run(
    data: &Path,
    out: &Path,
    nproc: usize,
    extra: &[&str],
    resume: Option<&Path>,
    steps: usize,
) -> Vec<f32> {
    let cfg = layout_config(data, out, &MODEL, nproc, extra);
    let mut results = run_local(nproc, Duration::from_secs(120), |comm| {
        let comm: Box<dyn Communicator> = Box::new(comm);
        let mut t = Trainer::new_rank(
            cfg.clone(),
            resume,
            Device::Cpu,
            (nproc > 1).then_some(comm),
        )?;
        let mut losses = Vec::new();
        for _ in 0..steps {
            losses.push(t.train_step()?.0);
        }
        t.save_checkpoint()?;
        Ok(losses)
    })
    .unwrap();
    results.swap_remove(0)
}

fn close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: steps");
    for (a, b) in got.iter().zip(want) {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs(),
            "{what}: {got:?} vs {want:?}"
        );
    }
    println!("{what}: {got:?} (uninterrupted {want:?})");
}

#[test]
fn tp2_pp2_checkpoint_resumes_at_dp4_tp4_and_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let tp2pp2 = ["parallel.tp=2", "parallel.pp=2"];
    let whole = run(&data, &tmp.path().join("whole"), 4, &tp2pp2, None, 4);
    let out = tmp.path().join("first");
    let first = run(&data, &out, 4, &tp2pp2, None, 2);
    close("first 2 steps", &first, &whole[..2]);
    let ckpt = out.join("checkpoints/step-0000002");
    let files: Vec<_> = std::fs::read_dir(ckpt.join("dist"))
        .unwrap()
        .flatten()
        .collect();
    // 4 ranks each wrote their slices (+ metadata), plus the index; no whole model file.
    assert_eq!(files.len(), 9, "{files:?}");
    assert!(!ckpt.join("model.safetensors").exists());
    for (what, nproc, extra) in [
        ("resumed at dp4", 4, &[][..]),
        ("resumed at tp4", 4, &["parallel.tp=4"][..]),
        ("resumed at one rank", 1, &[][..]),
        (
            "resumed at pp4 zbh1",
            4,
            &["parallel.pp=4", "parallel.pp_schedule=\"zbh1\""][..],
        ),
    ] {
        let dir = tmp.path().join(what.replace(' ', "-"));
        let rest = run(&data, &dir, nproc, extra, Some(&ckpt), 2);
        close(what, &rest, &whole[2..]);
    }

    // Whole HF directory and back: the same logits, and the round trip resumes too.
    let hf = tmp.path().join("hf");
    distributed_to_whole::<Llama>(&ckpt, &hf, 1 << 30).unwrap();
    let back = tmp.path().join("back");
    whole_to_distributed::<Llama>(&hf, &back).unwrap();
    let rest = run(
        &data,
        &tmp.path().join("from-back"),
        2,
        &["parallel.tp=2"],
        Some(&back),
        2,
    );
    close(
        "round trip hf → distributed, resumed at tp2",
        &rest,
        &whole[2..],
    );
    let (model, params) = load_llama(&hf, DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 200, 31000, 7]], &Device::Cpu).unwrap();
    let inp = AttnInputs::causal(&model.cfg, &model.rope, 1, 6, None, &Device::Cpu).unwrap();
    let logits = model.forward(&params, &ids, &inp).unwrap();
    // The same model from the one-rank resume's starting point: load the distributed
    // checkpoint whole.
    let mut opt = colossal_core::optim::AdamW::new(colossal_core::optim::AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        no_decay: vec![],
    });
    let direct = load_distributed(&ckpt, &model, None, None, &mut opt).unwrap();
    assert_eq!(opt.m.len(), params.len(), "moments of every weight");
    let want = model.forward(&direct, &ids, &inp).unwrap();
    let diff = (logits - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
}
