//! `chat-rlhf`: SFT → reward model → PPO / DPO / GRPO → chat, on the colossal-rs trainer.

use anyhow::Result;
use chat_rlhf::config::ChatConfig;
use clap::{Parser, Subcommand};
use colossal_session::TrainArgs;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "chat-rlhf",
    about = "SFT, reward model, PPO, DPO family and GRPO for chat models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Supervised fine-tuning on `colossal-data sft` output.
    Sft(TrainArgs),
    /// Reward model on `colossal-data preference` output.
    Rm(TrainArgs),
    /// DPO, IPO, SimPO, ORPO or KTO (`[dpo] loss = …`) on preference data.
    Dpo(TrainArgs),
    /// PPO with a critic, reference and reward model (`[ppo]`) on prompt data.
    Ppo(TrainArgs),
    /// GRPO (`[grpo]`): group-relative advantages, GSM8K or reward-model rewards.
    Grpo(TrainArgs),
    /// Interactive chat with streamed tokens and the model's chat template.
    Chat(chat_rlhf::chat::ChatArgs),
    /// Mean reward / win-rate on held-out prompts, GSM8K accuracy.
    Eval(chat_rlhf::eval::EvalArgs),
}

fn train(method: &str, a: TrainArgs) -> Result<()> {
    let cfg: ChatConfig = a.load()?;
    let resume = a.resume_dir()?;
    let summary = chat_rlhf::run::train(method, &cfg, resume.as_deref(), a.max_steps)?;
    if summary.rank != 0 {
        return Ok(());
    }
    let first = summary.records.first();
    let last = summary.records.last();
    if let (Some(f), Some(l)) = (first, last) {
        println!("{method}: {} steps", summary.records.len());
        for key in [
            "loss",
            "val_loss",
            "accuracy",
            "val_accuracy",
            "reward_margin",
            "val_reward_margin",
            "reward_mean",
            "kl",
        ] {
            if let (Some(a), Some(b)) = (f[key].as_f64(), l[key].as_f64()) {
                println!("  {key}: first {a:.4} → last {b:.4}");
            } else if let Some(b) = l[key].as_f64() {
                println!("  {key}: {b:.4}");
            }
        }
    }
    if let Some(d) = &summary.final_dir {
        println!("checkpoint: {}", d.display());
    }
    println!(
        "metrics: {}",
        cfg.train.out_dir.join("metrics.jsonl").display()
    );
    Ok(())
}

fn main() -> Result<()> {
    colossal_core::runtime::tune_allocator();
    colossal_core::runtime::tune_threads();
    colossal_session::init_logging();
    match Cli::parse().cmd {
        Cmd::Sft(a) => train("sft", a),
        Cmd::Rm(a) => train("rm", a),
        Cmd::Dpo(a) => train("dpo", a),
        Cmd::Ppo(a) => train("ppo", a),
        Cmd::Grpo(a) => train("grpo", a),
        Cmd::Chat(a) => chat_rlhf::chat::run(&a),
        Cmd::Eval(a) => {
            let r = chat_rlhf::eval::run(&a)?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(())
        }
    }
}
