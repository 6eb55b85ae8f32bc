//! LLaMA in a Hugging Face model directory: `config.json`, `generation_config.json`, weights.

use std::path::Path;

use candle_core::{DType, Device};

use super::atomic;
use crate::models::llama::Llama;
use crate::models::ModelFamily;
use crate::params::Params;
use crate::{Error, Result};

/// Loads config and weights (converted to `dtype`) from an HF directory.
pub fn load_llama(dir: &Path, dtype: DType, device: &Device) -> Result<(Llama, Params)> {
    Llama::load(dir, dtype, device)
}

/// Writes `dir` (created if needed) in HF layout. Weights above `max_shard_bytes` are sharded.
pub fn save_llama(
    dir: &Path,
    model: &Llama,
    params: &Params,
    max_shard_bytes: usize,
) -> Result<()> {
    model.save(dir, params, max_shard_bytes)
}

/// `config.json` and `generation_config.json` (weights stored as `dtype`).
pub fn save_config(dir: &Path, model: &Llama, dtype: DType) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut cfg = model.cfg.clone();
    cfg.dtype = Some(hf_dtype_name(dtype).to_string());
    let json = serde_json::to_string_pretty(&cfg.to_hf_json()).expect("json");
    atomic::write_file(&dir.join("config.json"), json.as_bytes())?;
    let mut gen = serde_json::Map::new();
    if let Some(b) = cfg.bos_token_id {
        gen.insert("bos_token_id".into(), b.into());
    }
    if let Some(e) = &cfg.eos_token_id {
        gen.insert("eos_token_id".into(), e.clone());
    }
    if let Some(p) = cfg.pad_token_id {
        gen.insert("pad_token_id".into(), p.into());
    }
    let gen = serde_json::to_string_pretty(&gen).expect("json");
    atomic::write_file(&dir.join("generation_config.json"), gen.as_bytes())
}

pub fn hf_dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}
