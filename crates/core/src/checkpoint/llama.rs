//! LLaMA in a Hugging Face model directory: `config.json`, `generation_config.json`, weights.

use std::path::Path;

use candle_core::{DType, Device, Var};

use super::{atomic, hf};
use crate::models::llama::{Llama, LlamaConfig};
use crate::params::Params;
use crate::{Error, Result};

/// Loads config and weights (converted to `dtype`) from an HF directory.
pub fn load_llama(dir: &Path, dtype: DType, device: &Device) -> Result<(Llama, Params)> {
    if !dir.is_dir() {
        return Err(Error::file(dir, "model directory not found"));
    }
    let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
    let model = Llama::new(cfg)?;
    let shapes = model.param_shapes();
    let mut tensors = hf::load_expected(dir, &shapes, dtype, device)?;
    let mut params = Params::new();
    for (name, _) in &shapes {
        let t = tensors.remove(name).expect("loaded");
        params.insert(name.clone(), Var::from_tensor(&t)?);
    }
    Ok((model, params))
}

/// Writes `dir` (created if needed) in HF layout. Weights above `max_shard_bytes` are sharded.
pub fn save_llama(
    dir: &Path,
    model: &Llama,
    params: &Params,
    max_shard_bytes: usize,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tensors: Vec<_> = model
        .param_shapes()
        .into_iter()
        .map(|(n, _)| Ok((n.clone(), params.get(&n)?.clone())))
        .collect::<Result<_>>()?;
    let dtype = tensors
        .first()
        .map(|(_, t)| t.dtype())
        .unwrap_or(DType::F32);
    save_config(dir, model, dtype)?;
    hf::save_model(dir, &tensors, max_shard_bytes)
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
