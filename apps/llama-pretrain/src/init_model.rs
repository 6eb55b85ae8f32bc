//! `llama-pretrain init-model`: an HF LLaMA resized to an expanded tokenizer, as
//! Colossal-LLaMA's `init_model.py` does. Ids the base vocabulary has keep their rows; each new
//! token's input and output rows are the mean of the base model's rows for the pieces the base
//! tokenizer splits that token into (sentencepiece encoding of the piece text, no BOS).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use clap::Args;
use colossal_core::checkpoint::llama::{load_llama, save_llama};
use colossal_core::models::llama::Llama;
use colossal_core::params::Params;
use colossal_data::spm::{ModelProto, SpmBpe};

#[derive(Args)]
pub struct InitModelArgs {
    /// The base model (HF directory).
    #[arg(long)]
    pub base: PathBuf,
    /// The base tokenizer (tokenizer.model or its directory); default: the base model's.
    #[arg(long)]
    pub base_tokenizer: Option<PathBuf>,
    /// The expanded tokenizer directory (from `colossal-data expand-vocab`).
    #[arg(long)]
    pub tokenizer: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Shard weight files above this size (MB).
    #[arg(long, default_value_t = 2000)]
    pub max_shard_mb: usize,
}

fn model_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("tokenizer.model")
    } else {
        path.to_path_buf()
    }
}

/// For each new id (base size..), the base-vocabulary ids its piece splits into.
pub fn new_token_sources(base: &ModelProto, expanded: &ModelProto) -> Result<Vec<Vec<u32>>> {
    let n = base.pieces.len();
    if expanded.pieces.len() <= n {
        bail!(
            "the expanded tokenizer has {} pieces, not more than the base's {n}",
            expanded.pieces.len()
        );
    }
    for (i, (a, b)) in base.pieces.iter().zip(&expanded.pieces).enumerate() {
        if a.piece != b.piece {
            bail!(
                "piece {i} differs: base `{}`, expanded `{}` — not an expansion of this base",
                a.piece,
                b.piece
            );
        }
    }
    let bpe = SpmBpe::new(base)?;
    Ok(expanded.pieces[n..]
        .iter()
        .map(|p| bpe.encode(&p.piece))
        .collect())
}

/// `w` (V, H) grown to `rows` rows: new row i = mean of `w`'s rows `sources[i - V]`.
fn grow(w: &Tensor, sources: &[Vec<u32>]) -> Result<Tensor> {
    let mut parts = vec![w.clone()];
    for ids in sources {
        if ids.is_empty() {
            bail!("a new token encodes to no base ids");
        }
        let idx = Tensor::new(ids.as_slice(), w.device())?;
        parts.push(w.index_select(&idx, 0)?.mean_keepdim(0)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

pub fn run(args: &InitModelArgs) -> Result<()> {
    let (model, params) = load_llama(&args.base, DType::F32, &Device::Cpu)
        .with_context(|| format!("loading the base model {}", args.base.display()))?;
    let base_tok = model_file(args.base_tokenizer.as_deref().unwrap_or(&args.base));
    let base = ModelProto::load(&base_tok)?;
    let expanded = ModelProto::load(&model_file(&args.tokenizer))?;
    if model.cfg.vocab_size != base.pieces.len() {
        bail!(
            "{}: the base model's vocab_size {} is not the base tokenizer's {} pieces ({})",
            args.base.display(),
            model.cfg.vocab_size,
            base.pieces.len(),
            base_tok.display()
        );
    }
    let sources = new_token_sources(&base, &expanded)?;
    let mut cfg = model.cfg.clone();
    cfg.vocab_size = expanded.pieces.len();
    let resized = Llama::new(cfg)?;
    let mut out = Params::new();
    for (name, var) in params.iter() {
        let t = var.as_tensor();
        let t = if name == Llama::EMBED || name == "lm_head.weight" {
            grow(t, &sources)?
        } else {
            t.clone()
        };
        out.insert(name, Var::from_tensor(&t)?);
    }
    save_llama(&args.out, &resized, &out, args.max_shard_mb << 20)?;
    for file in [
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let src = args.tokenizer.join(file);
        if src.is_file() {
            std::fs::copy(&src, args.out.join(file))
                .with_context(|| format!("copying {}", src.display()))?;
        }
    }
    println!(
        "{} → {}: vocabulary {} → {} ({} new rows, each the mean of its pieces' rows under the base tokenizer)",
        args.base.display(),
        args.out.display(),
        base.pieces.len(),
        expanded.pieces.len(),
        sources.len()
    );
    Ok(())
}
