//! Adapters in PEFT's layout: `adapter_config.json` (a `LoraConfig`) and
//! `adapter_model.safetensors` with tensors `base_model.model.<module>.lora_A.weight` (r, in)
//! and `.lora_B.weight` (out, r). Options PEFT has and this crate does not implement are
//! errors naming the option, never ignored.

use std::path::Path;

use candle_core::{DType, Tensor, Var};
use serde_json::{json, Value};

use super::{sites, LoraConfig, Site, Targets};
use crate::checkpoint::{atomic, hf};
use crate::params::Params;
use crate::{Error, Result};

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

/// Reads `adapter_config.json` into the options implemented here.
fn read_config(path: &Path) -> Result<LoraConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| Error::file(path, format!("not JSON: {e}")))?;
    let bad = |m: String| Error::file(path, m);
    match v.get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        other => return Err(bad(format!("peft_type {other:?}: only LORA adapters load"))),
    }
    // Options that change what the adapter computes: refused unless at their plain value.
    let plain = |key: &str, ok: &dyn Fn(&Value) -> bool| -> Result<()> {
        match v.get(key) {
            Some(x) if !ok(x) => Err(bad(format!("`{key}` = {x} is not implemented"))),
            _ => Ok(()),
        }
    };
    let is_false = |x: &Value| x.is_null() || x == &json!(false);
    let is_empty = |x: &Value| {
        x.is_null()
            || x.as_object().is_some_and(|o| o.is_empty())
            || x.as_array().is_some_and(|a| a.is_empty())
    };
    for key in ["use_dora", "fan_in_fan_out", "lora_bias", "use_qalora"] {
        plain(key, &is_false)?;
    }
    for key in [
        "rank_pattern",
        "alpha_pattern",
        "modules_to_save",
        "layers_to_transform",
        "layers_pattern",
        "target_parameters",
        "trainable_token_indices",
        "alora_invocation_tokens",
        "layer_replication",
        "exclude_modules",
    ] {
        plain(key, &is_empty)?;
    }
    plain("bias", &|x| x.is_null() || x == "none")?;
    let r = v
        .get("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("`r` is missing or not a positive integer".into()))?;
    let alpha = v
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| bad("`lora_alpha` is missing or not a number".into()))?;
    let targets = match v.get("target_modules") {
        Some(Value::String(s)) if s == "all-linear" => Targets::AllLinear,
        Some(Value::String(s)) => {
            return Err(bad(format!(
                "`target_modules` as a regular expression ({s:?}) is not implemented; list the module names"
            )))
        }
        Some(Value::Array(a)) => Targets::Names(
            a.iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("`target_modules` holds a non-string".into()))?,
        ),
        _ => return Err(bad("`target_modules` is missing".into())),
    };
    let cfg = LoraConfig {
        r: r as usize,
        alpha,
        targets,
        dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        use_rslora: v
            .get("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    };
    cfg.validate().map_err(|e| bad(e.to_string()))?;
    Ok(cfg)
}

/// Loads the adapter in `dir` onto a model whose Linear weights are `linears` (see
/// [`sites`]): the base parameters in `params` become frozen and the adapters trainable, in the
/// base weights' dtype. Every targeted module must have both tensors with the right shapes, and
/// every tensor must belong to one.
pub fn load_adapter(
    dir: &Path,
    linears: &[(String, Vec<usize>, bool)],
    params: &mut Params,
) -> Result<(LoraConfig, Vec<Site>)> {
    let cfg = read_config(&dir.join(ADAPTER_CONFIG))?;
    let sites =
        sites(&cfg, linears).map_err(|e| Error::file(dir.join(ADAPTER_CONFIG), e.to_string()))?;
    let path = dir.join(ADAPTER_WEIGHTS);
    if !path.exists() {
        return Err(Error::file(
            dir,
            format!("no {ADAPTER_WEIGHTS} (PEFT's pickled adapter_model.bin is not read)"),
        ));
    }
    let device = params.get(&linears[0].0)?.device().clone();
    let mut tensors = hf::read_tensors(std::slice::from_ref(&path), DType::F32, &device)?;
    let mut adapters = Vec::new();
    for s in &sites {
        let dtype = params.get(&format!("{}.weight", s.module))?.dtype();
        for (name, want) in [
            (s.a_name(), [cfg.r, s.in_features]),
            (s.b_name(), [s.out_features, cfg.r]),
        ] {
            let (t, _) =
                tensors
                    .remove(&format!("{PREFIX}{name}"))
                    .ok_or_else(|| Error::MissingTensor {
                        path: path.clone(),
                        name: format!("{PREFIX}{name}"),
                    })?;
            if t.dims() != want {
                return Err(Error::ShapeMismatch {
                    path: path.clone(),
                    name: format!("{PREFIX}{name}"),
                    found: t.dims().to_vec(),
                    expected: want.to_vec(),
                });
            }
            adapters.push((name, t.to_dtype(dtype)?));
        }
    }
    if let Some(extra) = tensors.keys().min() {
        return Err(Error::file(
            &path,
            format!("tensor `{extra}` is no LoRA pair of a targeted Linear layer"),
        ));
    }
    params.freeze_all();
    for (name, t) in adapters {
        params.insert(name, Var::from_tensor(&t)?);
    }
    Ok((cfg, sites))
}

/// Writes the adapters of `params` to `dir` in PEFT's layout (atomically: a crash leaves the
/// old directory or the new one). `base`: the base model's path or Hub name, recorded as
/// PEFT records it.
pub fn save_adapter(
    dir: &Path,
    cfg: &LoraConfig,
    sites: &[Site],
    params: &Params,
    base: Option<&str>,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for s in sites {
        for name in [s.a_name(), s.b_name()] {
            tensors.push((format!("{PREFIX}{name}"), params.get(&name)?.clone()));
        }
    }
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.targets.to_json(),
        "use_rslora": cfg.use_rslora,
        "use_dora": false,
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "rank_pattern": {},
        "alpha_pattern": {},
    });
    atomic::write_dir(dir, |tmp| -> Result<()> {
        let text = serde_json::to_string_pretty(&config).expect("plain JSON");
        std::fs::write(tmp.join(ADAPTER_CONFIG), text).map_err(|e| Error::io(tmp, e))?;
        hf::save_file(&tmp.join(ADAPTER_WEIGHTS), &tensors)
    })
}
