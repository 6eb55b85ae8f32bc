//! Loading a tokenizer with its content hash: a SentencePiece `tokenizer.model` (encoded exactly
//! as the sentencepiece library does, see `spm`) or an HF `tokenizer.json`. A directory with
//! both uses `tokenizer.model`: for LLaMA-family models sentencepiece is the reference, and HF's
//! fast conversion splits differently where piece scores tie (expanded vocabularies).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

pub enum Backend {
    Spm(crate::spm::SpmBpe),
    Hf(Box<Tokenizer>),
}

pub struct LoadedTokenizer {
    pub backend: Backend,
    pub path: PathBuf,
    pub sha256: String,
}

impl LoadedTokenizer {
    pub fn load(path: &Path) -> Result<Self> {
        let file = match path.is_dir() {
            true if path.join("tokenizer.model").is_file() => path.join("tokenizer.model"),
            true => path.join("tokenizer.json"),
            false => path.to_path_buf(),
        };
        let bytes = std::fs::read(&file)
            .with_context(|| format!("{}: cannot read tokenizer", file.display()))?;
        let backend = if file.extension().is_some_and(|e| e == "model") {
            let model = crate::spm::ModelProto::parse(&bytes)
                .with_context(|| format!("{}: not a sentencepiece model", file.display()))?;
            let bpe = crate::spm::SpmBpe::new(&model)
                .with_context(|| format!("{}: unsupported sentencepiece model", file.display()))?;
            Backend::Spm(bpe)
        } else {
            let tokenizer = Tokenizer::from_bytes(&bytes).map_err(|e| {
                anyhow::anyhow!("{}: not an HF tokenizer.json: {e}", file.display())
            })?;
            Backend::Hf(Box::new(tokenizer))
        };
        let sha256 = format!("{:x}", Sha256::digest(&bytes));
        Ok(Self {
            backend,
            path: file,
            sha256,
        })
    }

    /// Ids of `text` without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.backend {
            Backend::Spm(s) => Ok(s.encode(text)),
            Backend::Hf(t) => {
                let enc = t
                    .encode(text, false)
                    .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
                Ok(enc.get_ids().to_vec())
            }
        }
    }

    pub fn encode_batch(&self, texts: &[String]) -> Result<Vec<Vec<u32>>> {
        match &self.backend {
            Backend::Spm(s) => Ok(texts.iter().map(|t| s.encode(t)).collect()),
            Backend::Hf(t) => {
                let encs = t
                    .encode_batch(texts.to_vec(), false)
                    .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
                Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
            }
        }
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.backend {
            Backend::Spm(s) => Ok(s.decode(ids)),
            Backend::Hf(t) => t
                .decode(ids, true)
                .map_err(|e| anyhow::anyhow!("decoding: {e}")),
        }
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        match &self.backend {
            Backend::Spm(s) => s.piece_id(token),
            Backend::Hf(t) => t.token_to_id(token),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match &self.backend {
            Backend::Spm(s) => s.vocab_size(),
            Backend::Hf(t) => t.get_vocab_size(true),
        }
    }
}
