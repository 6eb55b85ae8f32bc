//! What the diffusion tests share: where the fixtures are, reading them, and the error
//! measure the fixture README suggests. Each test binary uses part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

/// `../shared` (data and fixtures).
pub fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

/// `../shared/fixtures/sd_tiny`: a tiny SD pipeline and diffusers' outputs on it.
pub fn fixture() -> PathBuf {
    shared().join("fixtures/sd_tiny")
}

pub fn tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture().join("reference.safetensors"), &Device::Cpu).unwrap()
}

pub fn reference() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// max |x|.
pub fn max_abs(x: &Tensor) -> f32 {
    x.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

/// max |a − b| over max(1, max |b|).
pub fn err(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap()) / max_abs(b).max(1.0)
}

/// max |a − b| over max |b| (the scale of a small tensor such as a gradient).
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap()) / max_abs(b).max(1e-12)
}

/// Asserts `e < tol`, printing the figure (`--nocapture` shows what each check measured).
pub fn close(what: &str, e: f32, tol: f32) {
    println!("{what}: {e:.2e} (tolerance {tol:.0e})");
    assert!(e < tol, "{what}: {e} is not below {tol}");
}

/// A `captions.jsonl` folder with the first `n` emoji.
pub fn tiny_data(dir: &std::path::Path, n: usize) {
    let src = shared().join("data/t2i_images/noto_emoji_32px");
    let text = std::fs::read_to_string(src.join("captions.jsonl")).unwrap();
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let mut lines = Vec::new();
    for line in text.lines().take(n) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let file = v["file"].as_str().unwrap();
        std::fs::copy(src.join(file), dir.join(file)).unwrap();
        lines.push(line.to_string());
    }
    std::fs::write(dir.join("captions.jsonl"), lines.join("\n")).unwrap();
}
