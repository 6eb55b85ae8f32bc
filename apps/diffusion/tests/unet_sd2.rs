//! The SD 2.x UNet layout against diffusers (`tests/data/sd2_unet`, made by
//! `scripts/fixtures/diffusion_sd2_unet.py`): linear projections, per-level head counts, two
//! transformer layers per block, upcast attention; every parameter trains.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::max_abs;
use diffusion::unet::UNet;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/sd2_unet")
}

#[test]
fn an_sd2_style_unet_matches_diffusers() {
    let (unet, p) = UNet::load(&dir().join("unet"), DType::F32, &Device::Cpu).unwrap();
    assert!(unet.cfg.use_linear_projection);
    let t: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir().join("reference.safetensors"), &Device::Cpu).unwrap();
    let ts: Vec<f64> = t["t"]
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
    let y = unet.forward(&p, &t["x"], &ts, &t["ehs"]).unwrap();
    let d: f32 = max_abs(&(&y - &t["y"]).unwrap());
    let m: f32 = max_abs(&t["y"]);
    println!("SD 2.x-style noise prediction: off by {d:.2e} (largest {m:.3})");
    assert!(
        d <= 1e-4 * m.max(1.0),
        "noise prediction off by {d} (largest {m})"
    );
    let grads = y.sqr().unwrap().mean_all().unwrap().backward().unwrap();
    for (name, var) in p.iter() {
        assert!(grads.get(var.as_tensor()).is_some(), "{name}: no gradient");
    }
}
