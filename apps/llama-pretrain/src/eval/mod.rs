//! `llama-pretrain eval`: perplexity on a text file and multiple-choice accuracy by the
//! log-likelihood of the answer letter after k-shot prompts (MMLU, AGIEval Gaokao, CMMLU),
//! per subject and overall; JSON plus a printed table.

pub mod score;
pub mod tasks;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use colossal_core::checkpoint::llama::load_llama;
use colossal_core::models::llama::Llama;
use colossal_core::params::Params;
use colossal_data::tokenizer::LoadedTokenizer;
use serde_json::{json, Value};

#[derive(Args, Clone)]
pub struct EvalArgs {
    /// HF model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Tokenizer file or directory (default: the model directory).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Comma-separated: ppl, mmlu (test), mmlu-dev, agieval, cmmlu.
    #[arg(long, value_delimiter = ',', required = true)]
    pub tasks: Vec<String>,
    /// Folder with mmlu/, agieval_gaokao/, cmmlu_dev_NC/.
    #[arg(long, default_value = "../shared/data/eval")]
    pub data: PathBuf,
    /// Text for `ppl` (default: WikiText-2 test beside the eval data).
    #[arg(long)]
    pub ppl_file: Option<PathBuf>,
    #[arg(long, default_value_t = 5)]
    pub shots: usize,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// At most this many questions per subject.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Longest prompt / perplexity window in tokens (default: max_position_embeddings).
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Write the results here as JSON.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

struct Ctx {
    model: Llama,
    params: Params,
    tok: LoadedTokenizer,
    bos: Option<u32>,
    max_len: usize,
}

impl Ctx {
    fn ids(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = self.bos.into_iter().collect();
        ids.extend(self.tok.encode(text)?);
        Ok(ids)
    }
}

/// Accuracy of `subjects` with answers scored by letter log-likelihood.
fn multiple_choice(
    ctx: &Ctx,
    subjects: &[tasks::Subject],
    chinese: bool,
    args: &EvalArgs,
) -> Result<Value> {
    let cue = if chinese { "答案：" } else { "Answer: " };
    let letters: Vec<u32> = tasks::LETTERS
        .iter()
        .map(|l| -> Result<u32> {
            let ids = ctx.tok.encode(&format!("{cue}{l}"))?;
            ids.last()
                .copied()
                .context("empty encoding of an answer letter")
        })
        .collect::<Result<_>>()?;
    let (mut correct, mut total) = (0usize, 0usize);
    let mut per_subject = serde_json::Map::new();
    for s in subjects {
        let n = args.limit.unwrap_or(usize::MAX).min(s.questions.len());
        let mut prompts = Vec::with_capacity(n);
        for i in 0..n {
            // Fewer shots until the prompt fits; then keep its end.
            let mut k = args.shots;
            let mut ids = ctx.ids(&tasks::prompt(s, i, k, chinese))?;
            while ids.len() > ctx.max_len && k > 0 {
                k -= 1;
                ids = ctx.ids(&tasks::prompt(s, i, k, chinese))?;
            }
            if ids.len() > ctx.max_len {
                ids.drain(..ids.len() - ctx.max_len);
            }
            prompts.push(ids);
        }
        let logp =
            score::next_token_logprobs(&ctx.model, &ctx.params, &prompts, &letters, args.batch)?;
        let mut right = 0;
        for (q, lp) in s.questions.iter().zip(&logp) {
            let pred = (0..lp.len())
                .max_by(|&a, &b| lp[a].total_cmp(&lp[b]))
                .unwrap_or(0);
            right += usize::from(q.answers.contains(&pred));
        }
        let multi = s.questions[..n]
            .iter()
            .filter(|q| q.answers.len() > 1)
            .count();
        per_subject.insert(
            s.name.clone(),
            json!({"questions": n, "correct": right, "accuracy": right as f64 / n.max(1) as f64,
                   "multi_answer": multi}),
        );
        correct += right;
        total += n;
    }
    Ok(json!({
        "questions": total, "correct": correct, "accuracy": correct as f64 / total.max(1) as f64,
        "shots": args.shots, "subjects": per_subject,
    }))
}

fn load(args: &EvalArgs) -> Result<Ctx> {
    let (model, params) = load_llama(&args.model, DType::F32, &Device::Cpu)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let tok = match &args.tokenizer {
        Some(t) => LoadedTokenizer::load(t)?,
        None => LoadedTokenizer::load(&args.model).with_context(|| {
            format!(
                "--model {} has no tokenizer; pass --tokenizer DIR",
                args.model.display()
            )
        })?,
    };
    if tok.vocab_size() > model.cfg.vocab_size {
        bail!(
            "tokenizer {} has {} tokens, the model only {}",
            tok.path.display(),
            tok.vocab_size(),
            model.cfg.vocab_size
        );
    }
    let max_len = args.max_len.unwrap_or(model.cfg.max_position_embeddings);
    Ok(Ctx {
        bos: model.cfg.bos_token_id,
        model,
        params,
        tok,
        max_len,
    })
}

/// Runs the tasks; returns the results (also written to `args.out`) and prints a table.
pub fn run(args: &EvalArgs) -> Result<Value> {
    let ctx = load(args)?;
    let mut results = serde_json::Map::new();
    for task in &args.tasks {
        let d = &args.data;
        let r = match task.as_str() {
            "ppl" => {
                let file = args
                    .ppl_file
                    .clone()
                    .unwrap_or_else(|| d.join("../pretrain_text/wikitext-2-raw_wiki.test.raw"));
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("{}: cannot read", file.display()))?;
                let ids = ctx.tok.encode(&text)?;
                let (ppl, tokens) =
                    score::perplexity(&ctx.model, &ctx.params, &ids, ctx.max_len, args.batch)?;
                json!({"file": file, "perplexity": ppl, "tokens": tokens, "window": ctx.max_len})
            }
            "mmlu" => multiple_choice(&ctx, &tasks::mmlu(&d.join("mmlu"), true)?, false, args)?,
            "mmlu-dev" => {
                multiple_choice(&ctx, &tasks::mmlu(&d.join("mmlu"), false)?, false, args)?
            }
            "agieval" => multiple_choice(
                &ctx,
                &tasks::agieval(&d.join("agieval_gaokao"))?,
                true,
                args,
            )?,
            "cmmlu" => {
                let mut r =
                    multiple_choice(&ctx, &tasks::cmmlu(&d.join("cmmlu_dev_NC"))?, true, args)?;
                r["licence"] = json!("CMMLU is CC BY-NC-SA 4.0: non-commercial use only");
                r
            }
            other => bail!("--tasks: unknown task `{other}` (ppl, mmlu, mmlu-dev, agieval, cmmlu)"),
        };
        results.insert(task.clone(), r);
    }
    let out = json!({"model": args.model, "tasks": results});
    print_table(&out);
    if let Some(path) = &args.out {
        let text = serde_json::to_string_pretty(&out)?;
        colossal_core::checkpoint::atomic::write_file(path, text.as_bytes())?;
    }
    Ok(out)
}

fn print_table(out: &Value) {
    let Some(tasks) = out["tasks"].as_object() else {
        return;
    };
    for (task, r) in tasks {
        if let Some(p) = r["perplexity"].as_f64() {
            println!("{task}: perplexity {p:.3} over {} tokens", r["tokens"]);
            continue;
        }
        println!(
            "{task} ({}-shot): accuracy {:.4} ({}/{})",
            r["shots"],
            r["accuracy"].as_f64().unwrap_or(0.0),
            r["correct"],
            r["questions"]
        );
        if let Some(subjects) = r["subjects"].as_object() {
            for (name, s) in subjects {
                println!(
                    "  {name:<40} {:>6.3} {:>5}/{:<5}",
                    s["accuracy"].as_f64().unwrap_or(0.0),
                    s["correct"],
                    s["questions"]
                );
            }
        }
        if let Some(l) = r["licence"].as_str() {
            println!("  note: {l}");
        }
    }
}
