//! `chat-rlhf eval`: greedy answers to held-out prompts, scored by a reward model (mean reward,
//! and win-rate against a baseline model's answers) and, for prompts with a reference answer
//! (GSM8K), accuracy. Writes the numbers as JSON and every answer as JSONL.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use colossal_core::checkpoint::llama::load_llama;
use colossal_core::models::llama::Llama;
use colossal_core::params::Params;
use colossal_data::chat::prep::{read_records, Record};
use colossal_data::tokenizer::LoadedTokenizer;
use serde_json::{json, Value};

use crate::config::GenerationSection;
use crate::data::padded;
use crate::reference::Frozen;
use crate::reward::rewards;
use crate::rollout::{gsm8k_reward, rollout, Rollout};

#[derive(Args, Clone)]
pub struct EvalArgs {
    /// HF model directory to evaluate.
    #[arg(long)]
    pub model: PathBuf,
    /// A `colossal-data prompt` directory.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Which split of it: validation (held out) or train.
    #[arg(long, default_value = "validation")]
    pub split: String,
    /// Tokenizer directory (decodes answers).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Reward model (`LlamaForSequenceClassification`) for mean reward and win-rate.
    #[arg(long)]
    pub reward_model: Option<PathBuf>,
    /// A second model whose answers the first is compared with (win-rate by reward).
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 0)]
    pub pad_id: u32,
    /// Results JSON (answers go beside it as `.answers.jsonl`).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

fn answers(
    model: &Llama,
    params: &Params,
    prompts: &[&Record],
    a: &EvalArgs,
) -> Result<Vec<Rollout>> {
    let gen = GenerationSection {
        max_new_tokens: a.max_new_tokens,
        temperature: 0.0,
        top_k: None,
        top_p: None,
    };
    prompts
        .chunks(a.batch.max(1))
        .map(|c| rollout(model, params, c, 1, &gen, a.pad_id, 0, &Device::Cpu))
        .collect()
}

fn scores(rm: &Frozen, ros: &[Rollout], pad: u32) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    for ro in ros {
        let (ids, ctx) = padded(&rm.model, &ro.rows, pad, DType::F32, &Device::Cpu, 1)?;
        out.extend(rewards(&rm.forward(&ids, &ctx)?, &ro.last_index())?.to_vec1::<f32>()?);
    }
    Ok(out)
}

pub fn run(a: &EvalArgs) -> Result<Value> {
    let file = a.prompts.join(format!("{}.parquet", a.split));
    let records =
        read_records(&file).with_context(|| format!("--prompts {}", a.prompts.display()))?;
    let take = a.limit.unwrap_or(records.len()).min(records.len());
    let prompts: Vec<&Record> = records.iter().take(take).collect();
    anyhow::ensure!(!prompts.is_empty(), "{}: no prompts", file.display());
    let tok = LoadedTokenizer::load(&a.tokenizer)?;
    let (model, params) = load_llama(&a.model, DType::F32, &Device::Cpu)?;
    let ros = answers(&model, &params, &prompts, a)?;
    let texts: Vec<String> = ros
        .iter()
        .flat_map(|ro| {
            (0..ro.len()).map(|b| {
                tok.decode(&ro.rows[b][ro.prompt_lens[b]..])
                    .unwrap_or_default()
            })
        })
        .collect();
    let mut result = json!({ "model": a.model.display().to_string(), "prompts": prompts.len(), "split": a.split });
    let graded: Vec<f32> = prompts
        .iter()
        .zip(&texts)
        .filter_map(|(p, t)| {
            p.texts
                .get("answer")
                .cloned()
                .flatten()
                .map(|ans| gsm8k_reward(t, &ans))
        })
        .collect();
    if !graded.is_empty() {
        result["gsm8k_questions"] = json!(graded.len());
        result["gsm8k_accuracy"] = json!(graded.iter().sum::<f32>() as f64 / graded.len() as f64);
    }
    let mut mine_scores = None;
    if let Some(rm_dir) = &a.reward_model {
        let rm = Frozen::load(rm_dir, &Device::Cpu)?;
        let s = scores(&rm, &ros, a.pad_id)?;
        result["mean_reward"] = json!(s.iter().map(|&x| x as f64).sum::<f64>() / s.len() as f64);
        if let Some(base) = &a.baseline {
            let (bm, bp) = load_llama(base, DType::F32, &Device::Cpu)?;
            let b = scores(&rm, &answers(&bm, &bp, &prompts, a)?, a.pad_id)?;
            let wins: f64 = s
                .iter()
                .zip(&b)
                .map(|(x, y)| {
                    if x > y {
                        1.0
                    } else if x == y {
                        0.5
                    } else {
                        0.0
                    }
                })
                .sum();
            result["baseline"] = json!(base.display().to_string());
            result["baseline_mean_reward"] =
                json!(b.iter().map(|&x| x as f64).sum::<f64>() / b.len() as f64);
            result["win_rate"] = json!(wins / s.len() as f64);
        }
        mine_scores = Some(s);
    } else if a.baseline.is_some() {
        anyhow::bail!("--baseline needs --reward-model to compare answers");
    }
    if let Some(out) = &a.out {
        let json = serde_json::to_string_pretty(&result)?;
        colossal_core::checkpoint::atomic::write_file(out, json.as_bytes())?;
        let mut lines = Vec::new();
        for (i, t) in texts.iter().enumerate() {
            let prompt = tok.decode(&prompts[i].ids("input_ids"))?;
            let mut row = json!({"prompt": prompt, "answer": t});
            if let Some(s) = &mine_scores {
                row["reward"] = json!(s[i]);
            }
            writeln!(lines, "{row}")?;
        }
        colossal_core::checkpoint::atomic::write_file(
            &out.with_extension("answers.jsonl"),
            &lines,
        )?;
    }
    Ok(result)
}
