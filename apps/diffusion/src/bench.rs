//! `diffusion bench`: peak resident memory and time of one UNet training step at an SD-shaped
//! configuration (SD 1.x's block layout, two ResNets per level, 8 heads, 77 text tokens of
//! width 768, channels scaled by `--width`), plain fp32 against the memory-saving setup (ZeRO-3
//! with the state offloaded, activation checkpointing, half-precision compute). Each setup runs
//! in a child process, whose peak RSS (VmHWM) is its own; results go to JSON.
//!
//! On a CPU the offload target is disk (offloading to host memory saves nothing when the
//! model already lives there) and the half precision is fp16 (candle's CPU matmul has no bf16).

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use colossal_core::config::parse_config;
use colossal_core::exec::{Acts, LossFn};
use colossal_core::parallel::pipeline_run::MicroBatch;
use colossal_core::train::{Engine, Origin, TrainConfig};
use serde_json::json;

use diffusion::unet::{Text, UNet, UNetConfig, UNetCtx};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Channels of the first level (SD: 320); the levels are ×1, ×2, ×4, ×4.
    #[arg(long, default_value_t = 64)]
    pub width: usize,
    /// Latent side (SD at 512 px: 64).
    #[arg(long, default_value_t = 32)]
    pub latent: usize,
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    #[arg(long, default_value = "diffusion-bench.json")]
    pub out: PathBuf,
    /// Where the offloaded state goes.
    #[arg(long, default_value = "diffusion_bench_offload")]
    pub offload_dir: PathBuf,
    /// Internal: run one setup and print its figures.
    #[arg(long, hide = true)]
    pub setup: Option<String>,
}

/// The setups compared: name and `[train]`/`[parallel]` overrides.
fn setups(a: &BenchArgs) -> Vec<(&'static str, Vec<String>)> {
    vec![
        ("fp32", vec![]),
        (
            "zero3_offload_ckpt_fp16",
            vec![
                "parallel.zero_stage=3".into(),
                "parallel.offload=\"disk\"".into(),
                format!(
                    "parallel.offload_dir={:?}",
                    a.offload_dir.display().to_string()
                ),
                "parallel.precision=\"fp16\"".into(),
                "train.activation_checkpointing=true".into(),
            ],
        ),
    ]
}

fn unet_config(a: &BenchArgs) -> Result<UNetConfig> {
    let w = a.width;
    let text = json!({
        "sample_size": a.latent, "in_channels": 4, "out_channels": 4,
        "block_out_channels": [w, 2 * w, 4 * w, 4 * w],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 2, "cross_attention_dim": 768, "attention_head_dim": 8,
        "norm_num_groups": 32.min(w),
    });
    UNetConfig::from_json(&text.to_string()).map_err(anyhow::Error::msg)
}

fn peak_rss() -> Result<u64> {
    colossal_core::runtime::peak_rss_bytes().context("no VmHWM in /proc/self/status")
}

/// Child: one setup's training step on random inputs.
fn run_setup(a: &BenchArgs, name: &str) -> Result<()> {
    let Some((_, overrides)) = setups(a).into_iter().find(|(n, _)| *n == name) else {
        bail!("--setup {name}: unknown");
    };
    let out = std::env::temp_dir().join(format!("diffusion-bench-{}", std::process::id()));
    let text = format!(
        "[train]\nout_dir = {:?}\nbatch_size = {}\nmicro_batch_size = {}\nmax_steps = 10\nlr = 1e-4\n",
        out.display().to_string(),
        a.batch,
        a.batch
    );
    let cfg: TrainConfig = parse_config(&text, "bench", &overrides)?;
    let dtype = cfg.parallel.compute_dtype();
    let model = UNet::new(unet_config(a)?)?;
    let params: usize = model
        .param_shapes()
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let mut e = Engine::new_rank(cfg, Origin::Fresh { model, seed: 0 }, Device::Cpu, None)?;
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (a.batch, 4, a.latent, a.latent), &dev)?;
    let target = Tensor::randn(0f32, 1.0, x.dims(), &dev)?;
    let text = Tensor::randn(0f32, 1.0, (a.batch, 77, 768), &dev)?;
    let started = Instant::now();
    let (loss, _, _) = e.step(1, |_| {
        let target = target.clone();
        let loss_fn: Box<LossFn<'static>> = Box::new(move |o: &Acts| {
            Ok(((o.get("pred")?.to_dtype(DType::F32)? - &target)?
                .sqr()?
                .mean_all())?)
        });
        Ok(MicroBatch {
            inputs: Acts::one("x", x.to_dtype(dtype)?),
            ctx: UNetCtx {
                text: Text::Hidden(text.to_dtype(dtype)?),
                t: (0..a.batch).map(|i| (100 + 300 * i) as f64).collect(),
            },
            loss_fn,
        })
    })?;
    let step_s = started.elapsed().as_secs_f64();
    let offloaded = e.offloaded_bytes();
    drop(e);
    std::fs::remove_dir_all(&out).ok();
    std::fs::remove_dir_all(&a.offload_dir).ok();
    println!(
        "{}",
        json!({"setup": name, "params": params, "loss": loss, "step_s": step_s,
               "peak_rss_bytes": peak_rss()?, "offloaded_bytes": offloaded})
    );
    Ok(())
}

pub fn run(a: &BenchArgs) -> Result<()> {
    if let Some(name) = &a.setup {
        return run_setup(a, name);
    }
    let exe = std::env::current_exe()?;
    let mut rows = Vec::new();
    for (name, _) in setups(a) {
        let out = Command::new(&exe)
            .args(["bench", "--setup", name])
            .args([
                "--width",
                &a.width.to_string(),
                "--latent",
                &a.latent.to_string(),
            ])
            .args(["--batch", &a.batch.to_string()])
            .arg("--offload-dir")
            .arg(&a.offload_dir)
            .env("RUST_LOG", "warn")
            .output()?;
        if !out.status.success() {
            bail!(
                "setup {name} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let row: serde_json::Value = serde_json::from_slice(
            out.stdout
                .rsplit(|&b| b == b'\n')
                .find(|l| !l.is_empty())
                .unwrap_or(b"{}"),
        )?;
        println!(
            "{name:<26} peak RSS {:>8.1} MiB  step {:>6.2} s  offloaded {:>7.1} MiB",
            row["peak_rss_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            row["step_s"].as_f64().unwrap_or(0.0),
            row["offloaded_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        );
        rows.push(row);
    }
    let rss = |i: usize| rows[i]["peak_rss_bytes"].as_f64().unwrap_or(f64::NAN);
    let ratio = rss(0) / rss(1);
    println!(
        "UNet {} parameters, latent {}², batch {}: peak memory ratio fp32 / saving setup = {ratio:.2}× (the seed claims 5.6× on GPUs)",
        rows[0]["params"], a.latent, a.batch
    );
    let doc = json!({"width": a.width, "latent": a.latent, "batch": a.batch, "setups": rows, "memory_ratio": ratio});
    std::fs::write(&a.out, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!("{}", a.out.display());
    Ok(())
}
