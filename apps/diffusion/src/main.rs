//! `diffusion`: Stable Diffusion training and sampling on colossal-rs, on diffusers folders.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::{Parser, Subcommand};
use colossal_core::config::load_config;
use colossal_core::train::list_checkpoints;
use diffusion::data::save_grid;
use diffusion::pipeline::{Pipeline, SampleOptions};
use diffusion::scheduler::{Scheduler, SchedulerKind};
use diffusion::train::{train, DiffusionConfig, SampleScheduler};

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
    /// Train the UNet of a diffusers folder on captioned images (TOML config).
    Train {
        #[arg(long)]
        config: PathBuf,
        /// Override a config key: section.key=value (repeatable).
        #[arg(long = "set")]
        overrides: Vec<String>,
        /// Stop after this optimizer step (the schedule still spans train.max_steps).
        #[arg(long)]
        max_steps: Option<usize>,
        /// Resume from a checkpoint directory, or from the newest checkpoint of an output dir.
        #[arg(long)]
        resume: Option<PathBuf>,
    },
    /// DreamBooth: fine-tune the UNet on one subject's images (`[dreambooth]`), with prior
    /// preservation on class images the model generates.
    Dreambooth {
        #[arg(long)]
        config: PathBuf,
        #[arg(long = "set")]
        overrides: Vec<String>,
        #[arg(long)]
        max_steps: Option<usize>,
        #[arg(long)]
        resume: Option<PathBuf>,
    },
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
        #[arg(long)]
        out: PathBuf,
    },
}

fn resolve_resume(p: PathBuf) -> Result<PathBuf> {
    if p.join("trainer_state.json").exists() {
        return Ok(p);
    }
    list_checkpoints(&p)
        .pop()
        .with_context(|| format!("--resume {}: no checkpoint there", p.display()))
}

fn run_train(
    cfg: DiffusionConfig,
    resume: Option<PathBuf>,
    max_steps: Option<usize>,
) -> Result<()> {
    let out = cfg.train.out_dir.clone();
    let resume = resume.map(resolve_resume).transpose()?;
    let summary = train(cfg, resume.as_deref(), max_steps)?;
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

fn main() -> Result<()> {
    colossal_core::runtime::tune_allocator();
    colossal_core::runtime::tune_threads();
    colossal_session::init_logging();
    match Cli::parse().cmd {
        Cmd::Train {
            config,
            overrides,
            max_steps,
            resume,
        } => {
            let cfg: DiffusionConfig = load_config(&config, &overrides)?;
            anyhow::ensure!(
                cfg.data.is_some(),
                "{}: diffusion train needs [data] (one subject's images: diffusion dreambooth)",
                config.display()
            );
            run_train(cfg, resume, max_steps)?;
        }
        Cmd::Dreambooth {
            config,
            overrides,
            max_steps,
            resume,
        } => {
            let cfg: DiffusionConfig = load_config(&config, &overrides)?;
            anyhow::ensure!(
                cfg.dreambooth.is_some(),
                "{}: diffusion dreambooth needs [dreambooth] (captioned images: diffusion train)",
                config.display()
            );
            run_train(cfg, resume, max_steps)?;
        }
        Cmd::Sample {
            model,
            prompts,
            scheduler,
            steps,
            guidance,
            size,
            seed,
            out,
        } => {
            let mut pipe = Pipeline::load(&model, None, &Device::Cpu)?;
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
