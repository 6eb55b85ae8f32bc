//! LoRA adapters in the file diffusers' `save_lora_weights` writes (what
//! `train_dreambooth_lora.py` produces and `load_lora_weights` reads), merged into a pipeline's
//! weights for sampling: W ← W + strength · (α / r) · up · down.
//!
//! Keys are `unet.<module>` or `text_encoder.<module>`, then `.lora.down.weight` /
//! `.lora.up.weight` (diffusers) or `.lora_A.weight` / `.lora_B.weight` (PEFT). α / r comes from
//! a per-module `.alpha` entry, else from the `lora_adapter_metadata` JSON
//! (`unet.lora_alpha`, `unet.r`), else it is 1 — what diffusers assumes then. Anything else
//! (kohya key names, DoRA, per-module rank or alpha patterns, convolution LoRA) is an error
//! naming it, never skipped.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use colossal_core::params::Params;
use serde_json::Value;

use crate::error::{Error, Result};

/// One adapted linear layer: `down` (r, in), `up` (out, r), and its α / r.
#[derive(Debug)]
pub struct Adapter {
    /// The module path inside its model, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.
    pub module: String,
    pub down: Tensor,
    pub up: Tensor,
    pub scale: f64,
}

/// The adapters of a LoRA file, by the model they adapt.
#[derive(Debug, Default)]
pub struct LoraWeights {
    pub unet: Vec<Adapter>,
    pub text_encoder: Vec<Adapter>,
}

#[derive(Default)]
struct Parts {
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<f64>,
}

impl LoraWeights {
    /// Reads a `pytorch_lora_weights.safetensors` file, or the one inside a folder.
    pub fn read(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("pytorch_lora_weights.safetensors")
        } else {
            path.to_path_buf()
        };
        let bytes = std::fs::read(&file).map_err(|e| Error::file(&file, e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::file(&file, format!("not a safetensors file: {e}")))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::file(&file, format!("not a safetensors file: {e}")))?;
        let meta = match header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("lora_adapter_metadata"))
        {
            Some(s) => serde_json::from_str::<Value>(s).map_err(|e| {
                Error::file(&file, format!("lora_adapter_metadata is not JSON: {e}"))
            })?,
            None => Value::Null,
        };
        let mut modules: BTreeMap<(String, String), Parts> = BTreeMap::new();
        for (key, view) in st.tensors() {
            let (model, rest) = key
                .split_once('.')
                .filter(|(m, _)| *m == "unet" || *m == "text_encoder")
                .ok_or_else(|| {
                    Error::file(&file, format!("key `{key}` is not under `unet.` or `text_encoder.` (only diffusers' and PEFT's key names are read)"))
                })?;
            let (module, part) = [".lora.down.weight", ".lora.up.weight", ".lora_A.weight", ".lora_B.weight", ".alpha"]
                .iter()
                .find_map(|s| rest.strip_suffix(s).map(|m| (m, *s)))
                .ok_or_else(|| Error::file(&file, format!("key `{key}`: not a LoRA down/up weight or alpha (DoRA and other variants are not supported)")))?;
            let t = tensor(&view).map_err(|e| Error::file(&file, format!("`{key}`: {e}")))?;
            let slot = modules
                .entry((model.to_string(), module.to_string()))
                .or_default();
            match part {
                ".lora.down.weight" | ".lora_A.weight" => slot.down = Some(t),
                ".lora.up.weight" | ".lora_B.weight" => slot.up = Some(t),
                _ => slot.alpha = Some(t.flatten_all()?.to_vec1::<f32>()?[0] as f64),
            }
        }
        let mut out = LoraWeights::default();
        for ((model, module), parts) in modules {
            let (Some(down), Some(up)) = (parts.down, parts.up) else {
                return Err(Error::file(
                    &file,
                    format!("{model}.{module}: needs both a down and an up weight"),
                ));
            };
            let (r, r_up) = (down.dims()[0], *up.dims().last().unwrap_or(&0));
            if down.rank() != 2 || up.rank() != 2 || r != r_up {
                return Err(Error::file(&file, format!(
                    "{model}.{module}: down {:?} and up {:?} are not (r, in) and (out, r) (convolution LoRA is not supported)",
                    down.dims(),
                    up.dims()
                )));
            }
            let scale = match parts.alpha {
                Some(a) => a / r as f64,
                None => metadata_scale(&meta, &model, r).map_err(|e| Error::file(&file, e))?,
            };
            let a = Adapter {
                module,
                down,
                up,
                scale,
            };
            match model.as_str() {
                "unet" => out.unet.push(a),
                _ => out.text_encoder.push(a),
            }
        }
        if out.unet.is_empty() && out.text_encoder.is_empty() {
            return Err(Error::file(&file, "holds no LoRA weights"));
        }
        Ok(out)
    }
}

/// α / r from `lora_adapter_metadata` for `model`, or 1 where it gives none.
fn metadata_scale(meta: &Value, model: &str, r: usize) -> std::result::Result<f64, String> {
    let get = |k: &str| meta.get(format!("{model}.{k}"));
    for k in ["rank_pattern", "alpha_pattern"] {
        if get(k).is_some_and(|v| v.as_object().is_some_and(|o| !o.is_empty())) {
            return Err(format!(
                "lora_adapter_metadata: {model}.{k} (per-module rank or alpha) is not supported"
            ));
        }
    }
    if get("use_dora").and_then(Value::as_bool) == Some(true) {
        return Err(format!(
            "lora_adapter_metadata: {model}.use_dora: DoRA is not supported"
        ));
    }
    match (
        get("lora_alpha").and_then(Value::as_f64),
        get("r").and_then(Value::as_u64),
    ) {
        (Some(alpha), Some(meta_r)) if meta_r as usize == r => Ok(alpha / r as f64),
        (Some(_), Some(meta_r)) => Err(format!(
            "lora_adapter_metadata: {model}.r = {meta_r} but the weights have rank {r}"
        )),
        (Some(alpha), None) => Ok(alpha / r as f64),
        _ => Ok(1.0),
    }
}

fn tensor(view: &safetensors::tensor::TensorView<'_>) -> Result<Tensor> {
    let dims = view.shape().to_vec();
    let data = view.data();
    let t = match view.dtype() {
        safetensors::Dtype::F32 => {
            let v: Vec<f32> = data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            Tensor::from_vec(v, dims, &Device::Cpu)?
        }
        safetensors::Dtype::F16 | safetensors::Dtype::BF16 => {
            let dt = if view.dtype() == safetensors::Dtype::F16 {
                DType::F16
            } else {
                DType::BF16
            };
            Tensor::from_raw_buffer(data, dt, &dims, &Device::Cpu)?.to_dtype(DType::F32)?
        }
        other => {
            return Err(Error::Config(format!(
                "dtype {other:?} is not a LoRA weight dtype"
            )))
        }
    };
    Ok(t)
}

/// Adds each adapter's `strength · scale · up · down` to `<module>.weight` in `params`; a module
/// the model does not have, or a shape that does not fit, is an error naming it. Returns how
/// many weights changed.
pub fn merge(adapters: &[Adapter], params: &Params, strength: f64, what: &str) -> Result<usize> {
    for a in adapters {
        let name = format!("{}.weight", a.module);
        let var = params.var(&name).map_err(|_| {
            Error::Config(format!(
                "LoRA for {what}: the model has no `{name}` to adapt"
            ))
        })?;
        let (out_f, in_f) = (a.up.dims()[0], a.down.dims()[1]);
        if var.dims() != [out_f, in_f] {
            return Err(Error::Config(format!(
                "LoRA for {what}: `{name}` is {:?}, the adapter makes ({out_f}, {in_f})",
                var.dims()
            )));
        }
        let delta = a.up.matmul(&a.down)?.affine(strength * a.scale, 0.0)?;
        let w = (var.as_tensor().to_dtype(DType::F32)? + delta.to_device(var.device())?)?;
        var.set(&w.to_dtype(var.dtype())?)?;
    }
    Ok(adapters.len())
}

/// The file diffusers' `save_lora_weights` writes and `load_lora_weights(folder)` reads.
pub const LORA_FILE: &str = "pytorch_lora_weights.safetensors";

/// Writes trained adapters as diffusers saves them: keys `unet.<module>.lora_A.weight` /
/// `.lora_B.weight` (PEFT's names, f32) — a jointly trained text encoder's already carry
/// `text_encoder.` — and α, r and the target modules in the `lora_adapter_metadata` JSON,
/// prefixed by the model each applies to. Atomic.
pub fn save_lora(path: &Path, lora: &colossal_core::lora::Adapters, params: &Params) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut models = Vec::new();
    for s in &lora.sites {
        let key = match s.module.starts_with(crate::unet::TEXT_PREFIX) {
            true => s.module.clone(),
            false => format!("unet.{}", s.module),
        };
        let model = key.split_once('.').map_or("unet", |(m, _)| m);
        if !models.contains(&model.to_string()) {
            models.push(model.to_string());
        }
        for (name, part) in [(s.a_name(), "lora_A"), (s.b_name(), "lora_B")] {
            let t = params.get(&name)?.to_dtype(DType::F32)?;
            tensors.push((format!("{key}.{part}.weight"), t));
        }
    }
    let cfg = &lora.cfg;
    let mut meta = serde_json::Map::new();
    for m in &models {
        let entries = serde_json::json!({
            "r": cfg.r, "lora_alpha": cfg.alpha, "target_modules": cfg.targets.to_json(),
            "lora_dropout": cfg.dropout, "use_dora": false, "use_rslora": cfg.use_rslora,
            "bias": "none", "peft_type": "LORA", "init_lora_weights": true,
        });
        for (k, v) in entries.as_object().expect("an object") {
            meta.insert(format!("{m}.{k}"), v.clone());
        }
    }
    let meta = serde_json::Value::Object(meta).to_string();
    let bytes = colossal_core::checkpoint::hf::to_safetensors_bytes_with(
        &tensors,
        &[("lora_adapter_metadata", meta)],
    )?;
    colossal_core::checkpoint::atomic::write_file(path, &bytes)?;
    Ok(())
}
