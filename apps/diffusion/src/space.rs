//! Where the UNet works: a VAE's latent space (Stable Diffusion), or the pixels themselves
//! (a pixel-space model, e.g. small images trained from scratch without a trained VAE). A
//! pipeline folder records pixel space as diffusers records a missing component:
//! `"vae": [null, null]` in `model_index.json`, and no `vae/` folder.

use candle_core::Tensor;
use colossal_core::params::Params;

use crate::vae::Vae;
use crate::Result;

pub enum Space {
    Latent { vae: Box<Vae>, params: Params },
    Pixels,
}

impl Space {
    /// How many pixels one latent covers (2 per VAE level after the first; 1 in pixel space).
    pub fn scale(&self) -> usize {
        match self {
            Space::Latent { vae, .. } => 1 << (vae.cfg.block_out_channels.len() - 1),
            Space::Pixels => 1,
        }
    }

    /// Images (B, 3, H, W) in [−1, 1] → the posterior's mean and standard deviation, without
    /// gradient history (pixels: the images, exactly).
    pub fn encode(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok(match self {
            Space::Latent { vae, params } => {
                let post = vae.encode(params, images)?;
                (post.mean.detach(), post.std.detach())
            }
            Space::Pixels => (images.detach(), images.zeros_like()?),
        })
    }

    /// A posterior sample → what the UNet sees (× the VAE's scaling factor).
    pub fn to_model(&self, z: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Space::Latent { vae, .. } => vae.to_model_latents(z)?,
            Space::Pixels => z.clone(),
        })
    }

    /// The UNet's space → images in [−1, 1], without gradient history.
    pub fn decode(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Space::Latent { vae, params } => {
                vae.decode(params, &vae.from_model_latents(x)?)?.detach()
            }
            Space::Pixels => x.detach(),
        })
    }

    pub fn is_pixels(&self) -> bool {
        matches!(self, Space::Pixels)
    }
}
