//! Loading an HF `tokenizer.json` (file or directory) with its content hash.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

pub struct LoadedTokenizer {
    pub tokenizer: Tokenizer,
    pub path: PathBuf,
    pub sha256: String,
}

impl LoadedTokenizer {
    pub fn load(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        let bytes = std::fs::read(&file)
            .with_context(|| format!("{}: cannot read tokenizer", file.display()))?;
        let tokenizer = Tokenizer::from_bytes(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: not an HF tokenizer.json: {e}", file.display()))?;
        let sha256 = format!("{:x}", Sha256::digest(&bytes));
        Ok(Self {
            tokenizer,
            path: file,
            sha256,
        })
    }

    /// Ids of `text` without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn encode_batch(&self, texts: &[String]) -> Result<Vec<Vec<u32>>> {
        let encs = self
            .tokenizer
            .encode_batch(texts.to_vec(), false)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| anyhow::anyhow!("decoding: {e}"))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }
}
