//! The VAE against `shared/fixtures/sd_tiny` (diffusers 0.35): posterior mean, std and
//! log-variance of an emoji image, a posterior sample, and a decode; every parameter trains.

mod common;

use candle_core::{DType, Device};
use common::{close, err, fixture, tensors};
use diffusion::vae::Vae;

#[test]
fn encode_and_decode_match_diffusers() {
    let (vae, p) = Vae::load(&fixture().join("vae"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        vae.param_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum::<usize>(),
        658_375
    );
    let t = tensors();
    let post = vae.encode(&p, &t["vae.image"]).unwrap();
    for (name, got) in [
        ("mean", &post.mean),
        ("std", &post.std),
        ("logvar", &post.logvar),
    ] {
        let e = err(got, &t[&format!("vae.latent_{name}")]);
        close(&format!("latent {name}"), e, 1e-4);
    }
    let z = post.sample(&t["vae.posterior_noise"]).unwrap();
    let e = err(&z, &t["vae.latent_sample"]);
    close("latent sample", e, 1e-4);
    let img = vae.decode(&p, &t["vae.decode_latents"]).unwrap();
    let e = err(&img, &t["vae.decoded"]);
    close("decoded", e, 1e-4);
    let back = vae
        .from_model_latents(&vae.to_model_latents(&z).unwrap())
        .unwrap();
    assert!(err(&back, &z) < 1e-6);
}

#[test]
fn every_vae_parameter_gets_a_gradient() {
    let (vae, p) = Vae::load(&fixture().join("vae"), DType::F32, &Device::Cpu).unwrap();
    let t = tensors();
    let post = vae.encode(&p, &t["vae.image"]).unwrap();
    let z = post.sample(&t["vae.posterior_noise"]).unwrap();
    let img = vae.decode(&p, &z).unwrap();
    let loss = img.sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in p.iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let s: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(s > 0.0, "{name}: zero gradient");
    }
}
