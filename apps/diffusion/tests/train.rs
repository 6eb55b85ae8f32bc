//! `diffusion train` end to end on eight emoji: the loss falls; two data-parallel ranks train
//! as one (same losses, gradient norms and weights: noise and timesteps depend on the example's
//! place in the stream, not on the rank); a resumed run continues exactly, EMA included; and
//! the run leaves a loss curve, sample grids and a diffusers pipeline folder.

mod common;

use std::path::Path;

use candle_core::{Device, Tensor};
use colossal_core::config::parse_config;
use common::{max_abs, shared, tiny_data};
use diffusion::train::{train, DiffusionConfig};

fn config(data: &Path, out: &Path, extra: &[String]) -> DiffusionConfig {
    let text = format!(
        r#"
[model]
pretrained = "{}"
[data]
path = "{}"
resolution = 32
random_flip = true
[diffusion]
snr_gamma = 5.0
noise_offset = 0.05
ema_decay = 0.9
sample_prompts = ["grinning face with smiling eyes", "copyright sign"]
sample_steps = 3
[train]
out_dir = "{}"
batch_size = 4
micro_batch_size = 1
max_steps = 4
lr = 2e-3
schedule = "constant"
grad_clip = 1.0
# The conv biases before a GroupNorm get only rounding noise for a gradient; Adam's default
# eps (1e-8) would blow that up to lr-sized, layout-dependent steps.
eps = 1e-6
eval_every = 2
save_every = 2
"#,
        shared().join("fixtures/sd_tiny").display(),
        data.display(),
        out.display()
    );
    parse_config(&text, "test", extra).unwrap()
}

fn weights(dir: &Path) -> Vec<(String, Tensor)> {
    let mut v: Vec<_> = candle_core::safetensors::load(
        dir.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
    .into_iter()
    .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The largest difference over every weight (names and count equal), and where.
fn max_diff(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> (f32, String) {
    assert_eq!(a.len(), b.len());
    let mut worst = (0.0, String::new());
    for ((na, ta), (nb, tb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        let d: f32 = max_abs(&(ta - tb).unwrap());
        if d > worst.0 {
            worst = (d, na.clone());
        }
    }
    worst
}

#[test]
fn training_runs_alike_on_two_ranks_resumes_exactly_and_leaves_its_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    tiny_data(&data, 8);
    let one_dir = tmp.path().join("one");
    let one = train(config(&data, &one_dir, &[]), None, None).unwrap();
    let two_dir = tmp.path().join("two");
    let set = |s: &str| vec![s.to_string()];
    let two = train(
        config(&data, &two_dir, &set("parallel.nproc=2")),
        None,
        None,
    )
    .unwrap();
    let (l1, l2) = (one.series("loss"), two.series("loss"));
    let (g1, g2) = (one.series("grad_norm"), two.series("grad_norm"));
    assert_eq!(l1.len(), 4);
    for s in 0..4 {
        println!(
            "step {s}: loss {:.7} vs {:.7}, grad norm {:.7} vs {:.7}",
            l2[s], l1[s], g2[s], g1[s]
        );
        assert!(
            (l1[s] - l2[s]).abs() <= 1e-6 * l1[s].abs().max(1.0),
            "loss at step {s}"
        );
        assert!(
            (g1[s] - g2[s]).abs() <= 1e-5 * g1[s],
            "grad norm at step {s}"
        );
    }
    let last = |d: &Path| d.join("checkpoints/step-0000004");
    let (d, at) = max_diff(&weights(&last(&one_dir)), &weights(&last(&two_dir)));
    assert!(d <= 1e-5, "dp2 weights differ by {d} ({at})");

    // Resume from step 2: the same last two steps, weights and EMA.
    let resumed_dir = tmp.path().join("resumed");
    let first = train(config(&data, &resumed_dir, &[]), None, Some(2)).unwrap();
    assert_eq!(first.series("loss").len(), 2);
    let ckpt = resumed_dir.join("checkpoints/step-0000002");
    let rest = train(config(&data, &resumed_dir, &[]), Some(&ckpt), None).unwrap();
    let lr = rest.series("loss");
    assert_eq!(lr.len(), 2);
    for s in 0..2 {
        assert!(
            (lr[s] - l1[s + 2]).abs() <= 1e-6 * l1[s + 2].abs().max(1.0),
            "resumed loss at step {}",
            s + 2
        );
    }
    let (d, at) = max_diff(&weights(&last(&resumed_dir)), &weights(&last(&one_dir)));
    println!(
        "resumed weights: largest difference {d} ({at}); losses {lr:?} vs {:?}",
        &l1[2..]
    );
    assert_eq!(d, 0.0, "resumed weights ({at})");
    let ema = |d: &Path| weights(&last(d).join("ema"));
    assert_eq!(
        max_diff(&ema(&resumed_dir), &ema(&one_dir)).0,
        0.0,
        "resumed EMA"
    );

    // What a person opens.
    for f in [
        "loss.png",
        "metrics.jsonl",
        "samples/step-000002.png",
        "samples/step-000004.png",
    ] {
        assert!(one_dir.join(f).exists(), "{f}");
    }
    let pipe = one_dir.join("pipeline");
    for f in [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "tokenizer/vocab.json",
        "scheduler/scheduler_config.json",
    ] {
        assert!(pipe.join(f).exists(), "pipeline/{f}");
    }
    // The exported UNet is the EMA, and it loads as a pipeline that samples.
    assert_eq!(
        max_diff(&weights(&pipe.join("unet")), &ema(&one_dir)).0,
        0.0
    );
    let mut p = diffusion::pipeline::Pipeline::load(&pipe, None, &Device::Cpu).unwrap();
    let opts = diffusion::pipeline::SampleOptions {
        steps: 2,
        guidance: 2.0,
        height: 32,
        width: 32,
        seed: 1,
    };
    let (img, _) = p.generate(&["red heart".to_string()], &opts, None).unwrap();
    assert_eq!(img.dims(), [1, 3, 32, 32]);
}

#[test]
fn the_loss_falls_on_a_few_examples() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    tiny_data(&data, 4);
    let extra: Vec<String> = [
        "train.max_steps=25",
        "train.eval_every=0",
        "train.save_every=0",
        "diffusion.ema_decay=0.0",
        "diffusion.sample_prompts=[]",
        "train.lr=3e-3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let s = train(config(&data, &tmp.path().join("out"), &extra), None, None).unwrap();
    let l = s.series("loss");
    let (first, last) = (
        l[..5].iter().sum::<f64>() / 5.0,
        l[l.len() - 5..].iter().sum::<f64>() / 5.0,
    );
    println!("mean loss of the first 5 steps {first:.4}, of the last 5 {last:.4}");
    assert!(last < 0.7 * first, "loss {first:.4} → {last:.4}");
}

/// fp16 compute (with dynamic loss scaling) on fp32 master weights: the run tracks fp32
/// closely and is not fp32. (candle's CPU matmul has no bf16; on a GPU bf16 takes this path.)
#[test]
fn fp16_training_tracks_fp32() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    tiny_data(&data, 4);
    let extra = |p: &str| -> Vec<String> {
        [
            "train.max_steps=3",
            "train.eval_every=0",
            "train.save_every=0",
            "diffusion.sample_prompts=[]",
            p,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let run = |name: &str, precision: &str| {
        let cfg = config(&data, &tmp.path().join(name), &extra(precision));
        train(cfg, None, None).unwrap().series("loss")
    };
    let (f, b) = (
        run("fp32", "parallel.precision=\"fp32\""),
        run("fp16", "parallel.precision=\"fp16\""),
    );
    for s in 0..3 {
        println!("step {s}: fp16 {:.6} vs fp32 {:.6}", b[s], f[s]);
        assert!((b[s] - f[s]).abs() < 0.03 * f[s], "fp16 strays at step {s}");
    }
    assert!(
        f.iter().zip(&b).any(|(x, y)| x != y),
        "fp16 gave fp32's losses exactly"
    );
}
