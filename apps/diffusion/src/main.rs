//! `diffusion`: Stable Diffusion training and sampling on colossal-rs, on diffusers folders.

mod bench;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::{Parser, Subcommand};
use colossal_session::TrainArgs;
use diffusion::data::save_grid;
use diffusion::pipeline::{Pipeline, SampleOptions};
use diffusion::scheduler::{Scheduler, SchedulerKind};
use diffusion::train::{train, DiffusionConfig, SampleScheduler};
use diffusion::unet::UNet;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "diffusion",
    about = "Stable Diffusion training and sampling on colossal-rs"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train the UNet of a diffusers folder on captioned images (`[data]`).
    Train(TrainArgs),
    /// DreamBooth: fine-tune the UNet on one subject's images (`[dreambooth]`), with prior
    /// preservation on class images the model generates.
    Dreambooth(TrainArgs),
    /// The UNet alone, for checking against diffusers: reads `sample` (B, C, H, W), `timestep`
    /// (B; float or integer) and `encoder_hidden_states` (B, S, D) from a safetensors file,
    /// writes `noise_pred`.
    Forward {
        /// A `unet/` folder.
        #[arg(long)]
        unet: PathBuf,
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Peak memory and step time of one UNet training step at an SD-shaped config: fp32 vs
    /// ZeRO-3 + offload + activation checkpointing + half precision (JSON).
    Bench(bench::BenchArgs),
    /// Sample images from a diffusers folder into one PNG grid.
    Sample {
        /// A diffusers Stable Diffusion folder.
        #[arg(long)]
        model: PathBuf,
        /// One image per prompt (repeatable).
        #[arg(long = "prompt", required = true)]
        prompts: Vec<String>,
        /// ddpm | ddim | euler | euler_ancestral | dpmpp_two_m (default: the folder's).
        #[arg(long)]
        scheduler: Option<String>,
        #[arg(long, default_value_t = 25)]
        steps: usize,
        #[arg(long, default_value_t = 7.5)]
        guidance: f64,
        /// Image side in pixels (default: the UNet's sample size × the VAE's scale).
        #[arg(long)]
        size: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// A LoRA as diffusers saves it (`pytorch_lora_weights.safetensors`, or its folder),
        /// merged into the UNet and text encoder before sampling.
        #[arg(long)]
        lora: Option<PathBuf>,
        /// How much of the LoRA to merge (1 = as trained).
        #[arg(long, default_value_t = 1.0, requires = "lora")]
        lora_scale: f64,
        #[arg(long)]
        out: PathBuf,
    },
}

/// Runs `diffusion train` (`dreambooth` false) or `diffusion dreambooth` and prints where
/// its outputs are.
fn run_train(a: &TrainArgs, dreambooth: bool) -> Result<()> {
    let cfg: DiffusionConfig = a.load()?;
    let (section, other) = match dreambooth {
        true => ("[dreambooth]", "captioned images: diffusion train"),
        false => ("[data]", "one subject's images: diffusion dreambooth"),
    };
    anyhow::ensure!(
        cfg.dreambooth.is_some() == dreambooth && cfg.data.is_some() != dreambooth,
        "{}: this command needs {section} ({other})",
        a.config.display()
    );
    let out = cfg.train.out_dir.clone();
    let summary = train(cfg, a.resume_dir()?.as_deref(), a.max_steps)?;
    if summary.rank != 0 {
        return Ok(());
    }
    let losses = summary.series("loss");
    if let (Some(first), Some(last)) = (losses.first(), losses.last()) {
        println!(
            "train loss: first step {first:.4} -> last step {last:.4} ({} steps)",
            losses.len()
        );
    }
    if let Some(dir) = &summary.final_dir {
        println!("checkpoint: {}", dir.display());
    }
    println!("diffusers pipeline: {}", out.join("pipeline").display());
    println!("loss curve: {}", out.join("loss.png").display());
    println!("sample grids: {}", out.join("samples").display());
    Ok(())
}

/// `diffusion forward`.
fn forward(unet: &Path, input: &Path, out: &Path) -> Result<()> {
    let (model, params) = UNet::load(unet, DType::F32, &Device::Cpu)?;
    let t = candle_core::safetensors::load(input, &Device::Cpu)
        .with_context(|| format!("reading {}", input.display()))?;
    let get = |name: &str| {
        t.get(name)
            .with_context(|| format!("{}: tensor `{name}` is missing", input.display()))
    };
    let timesteps: Vec<f64> = get("timestep")?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()?;
    let sample = get("sample")?.to_dtype(DType::F32)?;
    let text = get("encoder_hidden_states")?.to_dtype(DType::F32)?;
    let pred = model.forward(&params, &sample, &timesteps, &text)?;
    candle_core::safetensors::save(&HashMap::from([("noise_pred".to_string(), pred)]), out)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("noise_pred: {}", out.display());
    Ok(())
}

fn main() -> Result<()> {
    colossal_core::runtime::tune_allocator();
    colossal_core::runtime::tune_threads();
    colossal_session::init_logging();
    match Cli::parse().cmd {
        Cmd::Train(a) => run_train(&a, false)?,
        Cmd::Dreambooth(a) => run_train(&a, true)?,
        Cmd::Forward { unet, input, out } => forward(&unet, &input, &out)?,
        Cmd::Bench(a) => bench::run(&a)?,
        Cmd::Sample {
            model,
            prompts,
            scheduler,
            steps,
            guidance,
            size,
            seed,
            lora,
            lora_scale,
            out,
        } => {
            let mut pipe = Pipeline::load(&model, None, &Device::Cpu)?;
            if let Some(path) = &lora {
                let weights = diffusion::lora::LoraWeights::read(path)?;
                let (u, t) = pipe.apply_lora(&weights, lora_scale)?;
                println!(
                    "LoRA {}: {u} UNet and {t} text-encoder weights merged at {lora_scale}",
                    path.display()
                );
            }
            if let Some(name) = scheduler {
                let choice: SampleScheduler = serde_json::from_value(name.clone().into())
                    .map_err(|_| anyhow::anyhow!("--scheduler {name}: expected ddpm, ddim, euler, euler_ancestral or dpmpp_two_m"))?;
                let mut cfg = pipe.scheduler.cfg.clone();
                cfg.kind = choice.kind();
                if cfg.kind != SchedulerKind::Ddpm {
                    cfg.variance_type = None;
                }
                pipe.scheduler = Scheduler::new(cfg)?;
            }
            let side = size.unwrap_or(pipe.unet.cfg.sample_size * pipe.latent_scale());
            let opts = SampleOptions {
                steps,
                guidance,
                height: side,
                width: side,
                seed,
            };
            let (images, _) = pipe.generate(&prompts, &opts, None)?;
            let cols = (prompts.len() as f64).sqrt().ceil() as usize;
            save_grid(&images, cols, &out)?;
            println!("{} image(s): {}", prompts.len(), out.display());
        }
    }
    Ok(())
}
