//! LoRA files as diffusers' DreamBooth-LoRA training saves them
//! (`tests/data/lora`, made by scripts/fixtures/diffusion_lora.py on sd_tiny): merged into our
//! UNet they give the noise prediction diffusers gives with `load_lora_weights`; α / r comes
//! from the file's adapter metadata; bad files are errors naming what is wrong; and
//! `diffusion sample --lora` samples with one.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::{close, err, fixture};
use diffusion::lora::{merge, LoraWeights};
use diffusion::unet::UNet;

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/lora")
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(data().join("reference.safetensors"), &Device::Cpu).unwrap()
}

#[test]
fn a_diffusers_dreambooth_lora_merges_to_diffusers_noise_prediction() {
    let lora = LoraWeights::read(&data()).unwrap();
    assert_eq!((lora.unet.len(), lora.text_encoder.len()), (32, 0));
    // r = 4, lora_alpha = 8 in the adapter metadata.
    assert!(
        lora.unet.iter().all(|a| a.scale == 2.0),
        "α / r from the metadata"
    );
    let (unet, p) = UNet::load(&fixture().join("unet"), DType::F32, &Device::Cpu).unwrap();
    let r = reference();
    let t: Vec<f64> = r["t"]
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|&x| x as f64)
        .collect();
    let base = unet.forward(&p, &r["x"], &t, &r["ehs"]).unwrap();
    close("without the LoRA", err(&base, &r["unet_out_base"]), 1e-4);
    assert_eq!(merge(&lora.unet, &p, 1.0, "the UNet").unwrap(), 32);
    let adapted = unet.forward(&p, &r["x"], &t, &r["ehs"]).unwrap();
    let moved = err(&r["unet_out"], &r["unet_out_base"]);
    assert!(moved > 1e-2, "the LoRA changes the prediction ({moved})");
    close("with the LoRA merged", err(&adapted, &r["unet_out"]), 1e-4);
}

fn write(dir: &std::path::Path, tensors: &[(&str, Vec<usize>)]) -> PathBuf {
    let path = dir.join("lora.safetensors");
    let data: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, shape)| {
            (
                k.to_string(),
                Tensor::ones(shape.as_slice(), DType::F32, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    let map: HashMap<String, Tensor> = data.into_iter().collect();
    candle_core::safetensors::save(&map, &path).unwrap();
    path
}

#[test]
fn bad_lora_files_are_errors_naming_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let kohya = write(
        dir.path(),
        &[(
            "lora_unet_down_blocks_0_attn1_to_q.lora_down.weight",
            vec![4, 8],
        )],
    );
    let e = LoraWeights::read(&kohya).unwrap_err().to_string();
    assert!(
        e.contains("lora_unet_down_blocks_0_attn1_to_q") && e.contains("unet."),
        "{e}"
    );
    let half = write(
        dir.path(),
        &[("unet.mid.to_q.lora.down.weight", vec![4, 8])],
    );
    let e = LoraWeights::read(&half).unwrap_err().to_string();
    assert!(
        e.contains("unet.mid.to_q") && e.contains("up weight"),
        "{e}"
    );
    let missing = write(
        dir.path(),
        &[
            ("unet.no_such.to_q.lora.down.weight", vec![4, 32]),
            ("unet.no_such.to_q.lora.up.weight", vec![32, 4]),
            ("unet.no_such.to_q.alpha", vec![]),
        ],
    );
    let lora = LoraWeights::read(&missing).unwrap();
    assert_eq!(lora.unet[0].scale, 0.25, "alpha 1 over rank 4");
    let (_, p) = UNet::load(&fixture().join("unet"), DType::F32, &Device::Cpu).unwrap();
    let e = merge(&lora.unet, &p, 1.0, "the UNet")
        .unwrap_err()
        .to_string();
    assert!(e.contains("no_such.to_q.weight"), "{e}");
}

#[test]
fn sample_with_a_lora_merges_it_and_writes_the_grid() {
    let dir = tempfile::tempdir().unwrap();
    let run = |lora: bool| {
        let out = dir.path().join(if lora { "lora.png" } else { "base.png" });
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_diffusion"));
        cmd.args(["sample", "--model"]).arg(fixture());
        cmd.args([
            "--prompt",
            "a photo of sks dog",
            "--steps",
            "2",
            "--scheduler",
            "ddim",
        ]);
        cmd.arg("--out").arg(&out);
        if lora {
            cmd.arg("--lora").arg(data()).args(["--lora-scale", "1.0"]);
        }
        let res = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&res.stdout).to_string();
        assert!(
            res.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&res.stderr)
        );
        (stdout, image::open(&out).unwrap().to_rgb8())
    };
    let (said, with) = run(true);
    assert!(
        said.contains("32 UNet and 0 text-encoder weights merged"),
        "{said}"
    );
    let (_, without) = run(false);
    assert_eq!(with.dimensions(), without.dimensions());
    assert_ne!(
        with.as_raw(),
        without.as_raw(),
        "the LoRA changes the image"
    );
}
