//! `diffusion forward` reproduces the fixture's `unet.noise_pred` from a safetensors input
//! (integer timesteps, as diffusers scripts often save them).

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use common::{err, fixture, tensors};

#[test]
fn diffusion_forward_reproduces_the_fixture() {
    let t = tensors();
    let tmp = tempfile::tempdir().unwrap();
    let (input, out) = (
        tmp.path().join("in.safetensors"),
        tmp.path().join("out.safetensors"),
    );
    let timestep = Tensor::new(&[10i64, 500], &Device::Cpu).unwrap();
    let inputs = HashMap::from([
        ("sample".to_string(), t["unet.latents"].clone()),
        ("timestep".to_string(), timestep),
        (
            "encoder_hidden_states".to_string(),
            t["encoder_hidden_states"].clone(),
        ),
    ]);
    candle_core::safetensors::save(&inputs, &input).unwrap();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_diffusion"))
        .args(["forward", "--unet"])
        .arg(fixture().join("unet"))
        .arg("--input")
        .arg(&input)
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let e = err(&got["noise_pred"], &t["unet.noise_pred"]);
    assert!(e < 1e-4, "noise_pred err {e}");
}
