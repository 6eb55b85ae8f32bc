//! The UNet against `shared/fixtures/sd_tiny` (diffusers 0.35): parameter names and shapes
//! from the config, the timestep features and embedding, the noise prediction, and one
//! training step's loss, gradient norm and gradients, with a gradient for every parameter.

mod common;

use candle_core::{DType, Device};
use common::{close, err, fixture, max_abs, reference, tensors};
use diffusion::unet::{timestep_features, UNet};

fn timesteps(v: &serde_json::Value) -> Vec<f64> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn the_noise_prediction_matches_diffusers() {
    let (unet, p) = UNet::load(&fixture().join("unet"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        unet.param_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum::<usize>(),
        reference()["components"]["unet"]["params"]
            .as_u64()
            .unwrap() as usize
    );
    let (r, t) = (reference(), tensors());
    let ts = timesteps(&r["unet"]["timesteps"]);
    let f = timestep_features(&ts, 32, true, 0.0, &Device::Cpu).unwrap();
    let e = err(&f, &t["unet.time_proj"]);
    close("time_proj", e, 1e-5);
    let emb = unet
        .time_embedding(&p, &ts, &Device::Cpu, DType::F32)
        .unwrap();
    let e = err(&emb, &t["unet.time_embedding"]);
    close("time_embedding", e, 1e-4);
    let out = unet
        .forward(&p, &t["unet.latents"], &ts, &t["encoder_hidden_states"])
        .unwrap();
    let e = err(&out, &t["unet.noise_pred"]);
    close("noise_pred", e, 1e-4);
}

#[test]
fn a_training_step_matches_diffusers_loss_and_gradients() {
    let (unet, p) = UNet::load(&fixture().join("unet"), DType::F32, &Device::Cpu).unwrap();
    let (r, t) = (reference(), tensors());
    let ts = timesteps(&r["train"]["timesteps"]);
    let pred = unet
        .forward(&p, &t["train.noisy"], &ts, &t["encoder_hidden_states"])
        .unwrap();
    let e = err(&pred, &t["train.noise_pred"]);
    close("noise_pred", e, 1e-4);
    let loss = (&pred - &t["train.noise"])
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let got: f32 = loss.to_scalar().unwrap();
    let want = r["train"]["loss"].as_f64().unwrap() as f32;
    println!("loss {got} vs diffusers {want}");
    assert!((got - want).abs() < 1e-5, "loss {got} vs {want}");
    let grads = loss.backward().unwrap();
    let (mut sq, mut checked) = (0f64, 0);
    for (name, var) in p.iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let s: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(s > 0.0, "{name}: zero gradient");
        sq += s as f64;
        if let Some(want) = t.get(&format!("train.grad.{name}")) {
            let d: f32 = max_abs(&(g - want).unwrap());
            let m: f32 = max_abs(want);
            assert!(
                d < 1e-4 * m,
                "{name}: gradient off by {d} (largest element {m})"
            );
            println!("gradient {name}: off by {:.2e} of its largest {m:.3e}", d);
            checked += 1;
        }
    }
    assert_eq!(checked, 4, "the fixture's four gradients");
    let norm = sq.sqrt();
    let want = r["train"]["unet_grad_norm_f64"].as_f64().unwrap();
    println!("grad norm {norm} vs diffusers {want}");
    assert!(
        ((norm - want) / want).abs() < 1e-5,
        "grad norm {norm} vs {want}"
    );
}
