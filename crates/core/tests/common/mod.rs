#![allow(dead_code)]
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// `../shared` beside the checkout (override with COLOSSAL_SHARED).
pub fn shared() -> PathBuf {
    if let Ok(p) = std::env::var("COLOSSAL_SHARED") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

pub fn fixture(rel: &str) -> PathBuf {
    let p = shared().join("fixtures").join(rel);
    assert!(
        p.exists(),
        "fixture {} missing (set COLOSSAL_SHARED)",
        p.display()
    );
    p
}

pub fn load_tensors(path: &std::path::Path) -> HashMap<String, Tensor> {
    colossal_core::checkpoint::hf::read_tensors(&[path.to_path_buf()], DType::F32, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, (t, _))| (k, t))
        .collect()
}

pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    max_abs(&(a - b).unwrap())
}

/// Asserts max|a-b| <= rel * max(1, max|b|) and returns the observed relative error.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, rel: f32) -> f32 {
    let scale = max_abs(b).max(1.0);
    let d = max_diff(a, b) / scale;
    assert!(d <= rel, "{what}: relative error {d:e} > {rel:e}");
    d
}

/// A JSON array of integer rows (input ids, masks, labels).
/// A JSON list of token ids.
pub fn ids_1d(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("a list of ids")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

pub fn ids_2d(v: &serde_json::Value) -> Vec<Vec<i64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect()
        })
        .collect()
}

/// An attention mask read as bytes.
pub fn mask_of(v: &serde_json::Value) -> Vec<Vec<u8>> {
    ids_2d(v)
        .iter()
        .map(|r| r.iter().map(|&x| x as u8).collect())
        .collect()
}

/// Zeroes padded positions (B, T, ·) so only valid ones are compared.
pub fn masked(t: &Tensor, mask: &[Vec<u8>]) -> Tensor {
    let m: Vec<f32> = mask.concat().iter().map(|&x| x as f32).collect();
    let m = Tensor::from_vec(m, (mask.len(), mask[0].len(), 1), &Device::Cpu).unwrap();
    t.broadcast_mul(&m).unwrap()
}

/// Runs `cmd`, asserting success (stderr in the message); returns its output.
pub fn run_ok(cmd: &mut std::process::Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A fixture's batch as a LLaMA takes it (`input_ids`, `attention_mask`, `labels` in
/// `reference`): ids (B, T), attention inputs, next-token targets (labels shifted), the mask.
pub fn lm_batch(
    model: &colossal_core::models::llama::Llama,
    reference: &serde_json::Value,
) -> (
    Tensor,
    colossal_core::models::llama::AttnInputs,
    Vec<i64>,
    Vec<Vec<u8>>,
) {
    let ids = ids_2d(&reference["input_ids"]);
    let mask = mask_of(&reference["attention_mask"]);
    let labels = ids_2d(&reference["labels"]);
    let (b, t) = (ids.len(), ids[0].len());
    let flat: Vec<u32> = ids.concat().iter().map(|&x| x as u32).collect();
    let ids = Tensor::from_vec(flat, (b, t), &Device::Cpu).unwrap();
    let inp = colossal_core::models::llama::AttnInputs::causal(
        &model.cfg,
        &model.rope,
        b,
        t,
        Some(&mask),
        &Device::Cpu,
    )
    .unwrap();
    let targets: Vec<i64> = labels.iter().flat_map(|r| r[1..].to_vec()).collect();
    (ids, inp, targets, mask)
}

/// `n` greedy ids after `prompt` from the contiguous-cache generator.
pub fn greedy_ids(
    model: &colossal_core::models::llama::Llama,
    params: &colossal_core::params::Params,
    prompt: &[u32],
    n: usize,
) -> Vec<u32> {
    use colossal_core::models::llama::{generate, GenerateOptions, Sampling};
    let opts = GenerateOptions {
        max_new_tokens: n,
        sampling: Sampling::Greedy,
        stop_ids: vec![],
        pad_id: 0,
    };
    let (mut out, _) = generate(model, params, &[prompt.to_vec()], &opts, &Device::Cpu).unwrap();
    out.swap_remove(0)
}
