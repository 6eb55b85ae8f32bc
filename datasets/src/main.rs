//! `colossal-data`: preprocessing subcommands.

use std::path::PathBuf;

use std::io::Write;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use colossal_data::chat::raw::{Kind, RawFormat};
use colossal_data::pretrain::{self, PretrainArgs};
use colossal_data::sources::DocSplit;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "colossal-data", about = "colossal-rs data preparation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Text / jsonl files or folders → tokenized, packed Parquet shards + manifest.
    Pretrain {
        /// Input files or folders (repeatable).
        #[arg(long = "input", required = true)]
        inputs: Vec<PathBuf>,
        /// HF tokenizer.json (or a directory holding one).
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 2048)]
        seq_len: usize,
        /// Text field of jsonl records.
        #[arg(long, default_value = "text")]
        field: String,
        /// How plain-text files are cut into documents.
        #[arg(long, value_enum, default_value_t = DocSplit::Auto)]
        doc_split: DocSplit,
        #[arg(long, default_value_t = 0.01)]
        val_fraction: f64,
        #[arg(long, default_value_t = 8192)]
        rows_per_shard: usize,
        /// Do not prepend BOS to each document.
        #[arg(long)]
        no_bos: bool,
        /// Do not append EOS to each document.
        #[arg(long)]
        no_eos: bool,
    },
    /// Colossal-LLaMA vocabulary expansion: appends every piece of `--add` that `--base` lacks
    /// (shortest first, score 0) and writes tokenizer.model, tokenizer.json,
    /// tokenizer_config.json and special_tokens_map.json to `--out`.
    ExpandVocab {
        /// The base SentencePiece model (LLaMA's tokenizer.model).
        #[arg(long)]
        base: PathBuf,
        /// The SentencePiece model whose pieces are added.
        #[arg(
            long,
            required_unless_present = "train_add",
            conflicts_with = "train_add"
        )]
        add: Option<PathBuf>,
        /// Instead of --add: learn BPE pieces from this text corpus.
        #[arg(long, requires = "vocab_size")]
        train_add: Option<PathBuf>,
        /// Vocabulary size of the BPE model learned with --train-add.
        #[arg(long)]
        vocab_size: Option<usize>,
        #[arg(long)]
        out: PathBuf,
    },
    /// One JSON array of ids per input line (no BOS), with the tokenizer data preparation uses.
    Tokenize {
        /// A tokenizer directory (tokenizer.model preferred, else tokenizer.json) or file.
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        input: PathBuf,
    },
    /// Chat conversations → ids with labels on the assistant turns (Parquet).
    Sft(ChatPrep),
    /// Prompt + chosen + rejected → ids and labels of both continuations (Parquet).
    Preference(ChatPrep),
    /// Prompts (with the generation prompt) for PPO/GRPO rollouts, and reference answers.
    Prompt(ChatPrep),
}

#[derive(clap::Args)]
struct ChatPrep {
    /// Input JSONL files (`.gz` too); repeatable.
    #[arg(long = "input", required = true)]
    inputs: Vec<PathBuf>,
    /// Row layout: auto (TRL or ColossalChat schema) or a raw public format.
    #[arg(long, value_enum, default_value_t = RawFormat::Auto)]
    format: RawFormat,
    /// Tokenizer directory (tokenizer.model preferred, else tokenizer.json).
    #[arg(long)]
    tokenizer: PathBuf,
    /// A `.jinja` template file or a `tokenizer_config.json` with `chat_template`
    /// (default: the tokenizer directory's tokenizer_config.json).
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// Longest row in tokens: SFT rows are cut at the end, preference responses are cut,
    /// longer prompts are reported and skipped.
    #[arg(long, default_value_t = 512)]
    max_len: usize,
    #[arg(long, default_value_t = 0.05)]
    val_fraction: f64,
    #[arg(long)]
    out: PathBuf,
}

fn chat_prep(kind: Kind, a: ChatPrep) -> Result<()> {
    use colossal_data::chat::{encode::ChatEncoder, prep, template::ChatTemplate};
    let tok = colossal_data::tokenizer::LoadedTokenizer::load(&a.tokenizer)?;
    let template_path = match a.chat_template {
        Some(p) => p,
        None => {
            let cfg = a.tokenizer.join("tokenizer_config.json");
            let has = std::fs::read_to_string(&cfg).is_ok_and(|t| t.contains("\"chat_template\""));
            if !has {
                anyhow::bail!(
                    "--chat-template: {} has no chat_template; pass a template file (e.g. datasets/templates/llama2.jinja)",
                    cfg.display()
                );
            }
            cfg
        }
    };
    let template = ChatTemplate::load(&template_path)?;
    let enc = ChatEncoder::new(tok, template);
    let args = prep::PrepArgs {
        kind,
        inputs: a.inputs,
        format: a.format,
        max_len: a.max_len,
        val_fraction: a.val_fraction,
        out: a.out.clone(),
    };
    let summary = prep::run(&args, &enc)?;
    let m = &summary["manifest"];
    println!(
        "{} rows → {} (train {}, validation {})",
        m["kind"].as_str().unwrap_or(""),
        a.out.display(),
        m["train_rows"],
        m["validation_rows"]
    );
    for (file, r) in summary["report"]["files"].as_object().into_iter().flatten() {
        println!(
            "  {file}: {} lines, {} rows, {} written, {} truncated, not kept: {}",
            r["lines"], r["rows"], r["written"], r["truncated"], r["problems"]
        );
        for d in r["dropped"].as_array().into_iter().flatten().take(5) {
            println!("    {}", d.as_str().unwrap_or(""));
        }
    }
    println!(
        "  every row not kept: {}",
        a.out.join("report.json").display()
    );
    Ok(())
}

fn main() -> Result<()> {
    colossal_core::runtime::tune_allocator();
    match Cli::parse().cmd {
        Cmd::Pretrain {
            inputs,
            tokenizer,
            out,
            seq_len,
            field,
            doc_split,
            val_fraction,
            rows_per_shard,
            no_bos,
            no_eos,
        } => {
            let args = PretrainArgs {
                inputs,
                tokenizer,
                out: out.clone(),
                seq_len,
                field,
                doc_split,
                val_fraction,
                rows_per_shard,
                bos: !no_bos,
                eos: !no_eos,
            };
            let m = pretrain::run(&args)?;
            println!("{}", pretrain::describe(&m, &out));
        }
        Cmd::ExpandVocab {
            base,
            add,
            train_add,
            vocab_size,
            out,
        } => {
            use colossal_data::spm::{write_expanded, Addition};
            let addition = match (&add, &train_add, vocab_size) {
                (Some(model), _, _) => Addition::Model(model),
                (None, Some(corpus), Some(n)) => Addition::Corpus(corpus, n),
                _ => anyhow::bail!("give --add MODEL, or --train-add CORPUS with --vocab-size N"),
            };
            let added = write_expanded(&base, addition, &out)?;
            println!(
                "added {added} pieces to {} → {}",
                base.display(),
                out.display()
            );
        }
        Cmd::Tokenize { tokenizer, input } => {
            let tok = colossal_data::tokenizer::LoadedTokenizer::load(&tokenizer)?;
            let text = std::fs::read_to_string(&input)
                .with_context(|| format!("{}: cannot read", input.display()))?;
            let mut out = std::io::stdout().lock();
            for line in text.lines() {
                writeln!(out, "{}", serde_json::to_string(&tok.encode(line)?)?)?;
            }
        }
        Cmd::Sft(a) => chat_prep(Kind::Sft, a)?,
        Cmd::Preference(a) => chat_prep(Kind::Preference, a)?,
        Cmd::Prompt(a) => chat_prep(Kind::Prompt, a)?,
    }
    Ok(())
}
