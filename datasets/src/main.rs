//! `colossal-data`: preprocessing subcommands.

use std::path::PathBuf;

use std::io::Write;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
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
    }
    Ok(())
}
