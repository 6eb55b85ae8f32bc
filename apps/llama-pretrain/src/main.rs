//! `llama-pretrain`: LLaMA (continued) pretraining on the colossal-rs core.

mod bench;
mod bench_capacity;
mod bench_collectives;
mod bench_moe;
mod bench_parallel;
mod eval;
mod init_model;

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::{Parser, Subcommand};
use colossal_core::checkpoint::llama::load_llama;
use colossal_core::config::load_config;
use colossal_core::models::llama::Llama;
use colossal_core::models::llama::{generate, GenerateOptions, Sampling};
use colossal_core::params::Params;
use colossal_core::train::{SampleConfig, TrainConfig};
use colossal_session::train;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "llama-pretrain", about = "LLaMA pretraining on colossal-rs")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train from a TOML config.
    Train {
        #[arg(long)]
        config: PathBuf,
        /// Override a config key: section.key=value (repeatable).
        #[arg(long = "set")]
        overrides: Vec<String>,
        /// Output directory (same as --set train.out_dir=DIR).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Stop after this optimizer step (the schedule still spans train.max_steps).
        #[arg(long)]
        max_steps: Option<usize>,
        /// Resume from a checkpoint directory, or from the newest checkpoint of an output dir.
        #[arg(long)]
        resume: Option<PathBuf>,
    },
    /// Tokens/s and GFLOP/s of one training step on a fixed tiny config; writes JSON.
    Bench(bench::BenchArgs),
    /// Step time, model-state bytes and bytes sent per rank for N local ranks × ZeRO stages.
    BenchParallel(bench_parallel::BenchParallelArgs),
    /// A mixture of experts' step time and tokens/s at expert-parallel degrees 1, 2, 4.
    BenchMoe(bench_moe::BenchMoeArgs),
    /// All-reduce bandwidth with MPI's native collectives and the ring (under mpirun).
    BenchCollectives(bench_collectives::BenchCollectivesArgs),
    /// Largest model trainable within a memory budget, without offload and with disk offload.
    BenchCapacity(bench_capacity::BenchCapacityArgs),
    /// Resize an HF LLaMA to an expanded tokenizer (new rows: mean of their pieces' rows).
    InitModel(init_model::InitModelArgs),
    /// Perplexity and multiple-choice accuracy (MMLU, AGIEval Gaokao, CMMLU).
    Eval(eval::EvalArgs),
}

fn main() -> Result<()> {
    colossal_core::runtime::tune_allocator();
    colossal_core::runtime::tune_threads();
    colossal_session::init_logging();
    match Cli::parse().cmd {
        Cmd::Train {
            config,
            mut overrides,
            out,
            max_steps,
            resume,
        } => {
            if let Some(out) = out {
                overrides.push(format!("train.out_dir=\"{}\"", out.display()));
            }
            let cfg: TrainConfig = load_config(&config, &overrides)?;
            let resume = resume
                .as_deref()
                .map(colossal_session::resolve_resume)
                .transpose()?;
            let sample = cfg.sample.clone();
            let out_dir = cfg.train.out_dir.clone();
            let summary = train(cfg, resume.as_deref(), max_steps)?;
            if summary.rank != 0 {
                return Ok(()); // under mpirun, rank 0 reports
            }
            if let (Some(first), Some(last)) = (summary.first_loss, summary.last_loss) {
                println!(
                    "train loss: first step {first:.4} -> last step {last:.4} ({} steps)",
                    summary.steps
                );
            }
            if let Some(v) = summary.last_val_loss {
                println!("validation loss {v:.4}, perplexity {:.2}", v.exp());
            }
            if let Some(dir) = &summary.final_dir {
                println!("checkpoint: {}", dir.display());
            }
            println!("metrics: {}", out_dir.join("metrics.jsonl").display());
            println!("loss curve: {}", out_dir.join("loss.png").display());
            if let (Some(s), Some(dir)) = (sample, &summary.final_dir) {
                let (model, params) = load_llama(dir, candle_core::DType::F32, &Device::Cpu)?;
                let text = sample_text(&model, &params, &s)?;
                println!("sample> {}{}", s.prompt, text);
                std::fs::write(
                    out_dir.join("sample.txt"),
                    format!("{}{}\n", s.prompt, text),
                )
                .with_context(|| format!("writing {}", out_dir.join("sample.txt").display()))?;
            }
        }
        Cmd::Bench(args) => bench::run(&args)?,
        Cmd::BenchParallel(args) => bench_parallel::run(&args)?,
        Cmd::BenchCapacity(args) => bench_capacity::run(&args)?,
        Cmd::BenchMoe(args) => bench_moe::run(&args)?,
        Cmd::BenchCollectives(args) => bench_collectives::run(&args)?,
        Cmd::InitModel(args) => init_model::run(&args)?,
        Cmd::Eval(args) => {
            eval::run(&args)?;
        }
    }
    Ok(())
}

fn sample_text(model: &Llama, params: &Params, s: &SampleConfig) -> Result<String> {
    let path = if s.tokenizer.is_dir() {
        s.tokenizer.join("tokenizer.json")
    } else {
        s.tokenizer.clone()
    };
    let tok = tokenizers::Tokenizer::from_file(&path)
        .map_err(|e| anyhow::anyhow!("sample.tokenizer {}: {e}", path.display()))?;
    let mut ids: Vec<u32> = model.cfg.bos_token_id.into_iter().collect();
    ids.extend(
        tok.encode(s.prompt.as_str(), false)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .get_ids(),
    );
    let sampling = if s.temperature > 0.0 {
        Sampling::Sample {
            temperature: s.temperature,
            top_k: Some(50),
            top_p: Some(0.95),
            seed: 0,
        }
    } else {
        Sampling::Greedy
    };
    let opts = GenerateOptions {
        max_new_tokens: s.max_new_tokens,
        sampling,
        stop_ids: model.cfg.eos_ids(),
        pad_id: model.cfg.pad_token_id.unwrap_or(0),
    };
    let (new, _) = generate(model, params, &[ids], &opts, &Device::Cpu)?;
    // Decode prompt + continuation together so word-boundary spaces come out right.
    let prompt_ids = tok
        .encode(s.prompt.as_str(), false)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut all = prompt_ids.get_ids().to_vec();
    let plen = tok
        .decode(&all, true)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .len();
    all.extend(&new[0]);
    let text = tok.decode(&all, true).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(text.get(plen..).unwrap_or(&text).to_string())
}
