//! The whole text-to-image pipeline against `shared/fixtures/sd_tiny`: prompt → tokens → CLIP
//! → 10 DDIM steps of the UNet from the fixture's initial latents → VAE decode, as diffusers'
//! `StableDiffusionPipeline(prompt, num_inference_steps=10, guidance_scale=1, eta=0)`.

mod common;

use candle_core::Device;
use common::{close, err, fixture, tensors};
use diffusion::pipeline::{Pipeline, SampleOptions};

#[test]
fn a_prompt_samples_as_diffusers_ddim_pipeline() {
    let dir = fixture();
    let mut pipe = Pipeline::load(&dir, Some(&dir.join("scheduler_ddim")), &Device::Cpu).unwrap();
    let t = tensors();
    let opts = SampleOptions {
        steps: 10,
        guidance: 1.0,
        height: 16,
        width: 16,
        seed: 0,
    };
    let prompt = vec!["grinning face with smiling eyes".to_string()];
    let (images, latents) = pipe
        .generate(&prompt, &opts, Some(t["ddim.initial_latents"].clone()))
        .unwrap();
    let e = err(&latents, &t["ddim.final_latents"]);
    close("final latents", e, 1e-4);
    let want = t["ddim.decoded_image"]
        .affine(0.5, 0.5)
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap();
    let e = err(&images, &want);
    close("image", e, 1e-4);
}

#[test]
fn guidance_and_stochastic_schedulers_sample_reproducibly() {
    let dir = fixture();
    let mut pipe = Pipeline::load(&dir, None, &Device::Cpu).unwrap();
    let opts = SampleOptions {
        steps: 4,
        guidance: 7.5,
        height: 16,
        width: 16,
        seed: 11,
    };
    let prompts = vec![
        "a cube shaped sks vase".to_string(),
        "copyright sign".to_string(),
    ];
    let (a, _) = pipe.generate(&prompts, &opts, None).unwrap();
    let (b, _) = pipe.generate(&prompts, &opts, None).unwrap();
    assert_eq!(a.dims(), [2, 3, 16, 16]);
    assert_eq!(err(&a, &b), 0.0, "same seed, same images");
    let (c, _) = pipe
        .generate(
            &prompts,
            &SampleOptions {
                seed: 12,
                ..opts.clone()
            },
            None,
        )
        .unwrap();
    assert!(err(&a, &c) > 1e-3, "another seed, other images");
}
