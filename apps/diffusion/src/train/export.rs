//! What a run leaves for diffusers: a complete pipeline folder (`model_index.json`, the
//! pretrained tokenizer, text encoder, VAE and scheduler, and the trained `unet/`), written
//! beside the engine's resumable checkpoints; and the EMA weights inside a checkpoint.

use std::path::Path;

use candle_core::DType;
use colossal_core::models::ModelFamily;
use colossal_core::params::Params;

use crate::unet::UNet;
use crate::{Error, Result};

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| Error::file(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| Error::file(from, e))? {
        let entry = entry.map_err(|e| Error::file(from, e))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if src.is_dir() {
            copy_dir(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).map_err(|e| Error::file(&src, e))?;
        }
    }
    Ok(())
}

/// Writes `out` as a diffusers pipeline folder: `pretrained`'s components with `unet`
/// (`weights`) in place of its UNet — and of its text encoder when that trained too — and no
/// VAE for a pixel-space model (`"vae": [null, null]`). With LoRA adapters the models keep their
/// base weights and the adapters go to `pytorch_lora_weights.safetensors` (what
/// `load_lora_weights(folder)` reads).
/// Built beside `out` and renamed into place.
pub fn pipeline_folder(
    pretrained: &Path,
    unet: &UNet,
    weights: &Params,
    pixel_space: bool,
    out: &Path,
) -> Result<()> {
    let tmp = out.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::file(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::file(&tmp, e))?;
    let index = pretrained.join("model_index.json");
    let text = std::fs::read_to_string(&index).map_err(|e| Error::file(&index, e))?;
    let mut v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::file(&index, e))?;
    if pixel_space {
        v["vae"] = serde_json::json!([null, null]);
    }
    let text = serde_json::to_string_pretty(&v).map_err(|e| Error::file(&index, e))?;
    let dst = tmp.join("model_index.json");
    std::fs::write(&dst, text).map_err(|e| Error::file(&dst, e))?;
    let vae = (!pixel_space).then_some("vae");
    let text = unet.text_encoder.is_none().then_some("text_encoder");
    for part in ["tokenizer", "scheduler"]
        .into_iter()
        .chain(vae)
        .chain(text)
    {
        copy_dir(&pretrained.join(part), &tmp.join(part))?;
    }
    if let Some(clip) = &unet.text_encoder {
        let config = pretrained.join("text_encoder/config.json");
        clip.save(&tmp.join("text_encoder"), weights, &config)?;
    }
    unet.denoiser().save(&tmp.join("unet"), weights, 10 << 30)?;
    if let Some(lora) = &unet.lora {
        crate::lora::save_lora(&tmp.join(crate::lora::LORA_FILE), lora, weights)?;
    }
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| Error::file(out, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| Error::file(out, e))?;
    tracing::info!(dir = %out.display(), "diffusers pipeline folder written");
    Ok(())
}

/// The EMA weights of a checkpoint: `ckpt/ema/` as a UNet folder.
pub fn save_ema(ckpt: &Path, unet: &UNet, ema: &Params) -> Result<()> {
    Ok(unet.denoiser().save(&ckpt.join("ema"), ema, 10 << 30)?)
}

/// The EMA weights saved with checkpoint `ckpt`, if any.
pub fn load_ema(ckpt: &Path) -> Result<Option<Params>> {
    let dir = ckpt.join("ema");
    if !dir.exists() {
        return Ok(None);
    }
    let (_, p) = UNet::load(&dir, DType::F32, &candle_core::Device::Cpu)?;
    Ok(Some(p))
}
