//! Every scheduler against trajectories diffusers ran (`tests/data/scheduler_trajectories.json`,
//! made by `scripts/fixtures/diffusion_schedulers.py`): timesteps, σs, the initial noise scale,
//! the scaled model input and the sample after each step, for DDPM, DDIM (η > 0), Euler, Euler
//! ancestral and DPM-Solver++ 2M over spacings, prediction types and final σ choices.

mod common;

use candle_core::{Device, Tensor};
use common::rel_err;
use diffusion::scheduler::{Scheduler, SchedulerConfig};
use serde_json::Value;

fn cases() -> Vec<Value> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/scheduler_trajectories.json"
    );
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    doc["cases"].as_array().unwrap().clone()
}

fn tensor(v: &Value, shape: &[usize]) -> Tensor {
    let data: Vec<f32> = serde_json::from_value(v.clone()).unwrap();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

#[test]
fn every_scheduler_follows_diffusers_step_by_step() {
    let cases = cases();
    assert_eq!(cases.len(), 11);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let cfg = SchedulerConfig::from_json(&case["config"].to_string())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut s = Scheduler::new(cfg).unwrap();
        s.eta = case["eta"].as_f64().unwrap() as f32;
        let n = case["num_inference_steps"].as_u64().unwrap() as usize;
        s.set_timesteps(n).unwrap();
        let want_t: Vec<f64> = serde_json::from_value(case["timesteps"].clone()).unwrap();
        assert_eq!(s.timesteps(), want_t.as_slice(), "{name}: timesteps");
        if let Some(sig) = case["sigmas"].as_array().filter(|a| !a.is_empty()) {
            // torch's vectorised sqrt is not always correctly rounded: within an ulp.
            let want: Vec<f32> = sig.iter().map(|x| x.as_f64().unwrap() as f32).collect();
            assert_eq!(s.sigmas().len(), want.len(), "{name}: sigmas");
            for (a, b) in s.sigmas().iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 2.5e-7 * b.abs(),
                    "{name}: sigma {a} vs {b}"
                );
            }
        }
        let want_sigma = case["init_noise_sigma"].as_f64().unwrap();
        assert!(
            (s.init_noise_sigma() - want_sigma).abs() <= 1e-6 * want_sigma,
            "{name}: init_noise_sigma {} vs {want_sigma}",
            s.init_noise_sigma()
        );
        let shape: Vec<usize> = serde_json::from_value(case["shape"].clone()).unwrap();
        let mut x = tensor(&case["initial_sample"], &shape);
        for (i, row) in case["steps"].as_array().unwrap().iter().enumerate() {
            let input = s.scale_model_input(&x, i).unwrap();
            let e = rel_err(&input, &tensor(&row["model_input"], &shape));
            assert!(e < 2e-6, "{name} step {i}: model input rel err {e}");
            let noise = tensor(&row["noise"], &shape);
            let noise = s.needs_noise(i).then_some(&noise);
            let out = tensor(&row["model_output"], &shape);
            x = s.step(i, &out, &x, noise).unwrap();
            let want = tensor(&row["prev_sample"], &shape);
            let e = rel_err(&x, &want);
            assert!(e < 1e-5, "{name} step {i}: sample rel err {e}");
            // Continue from diffusers' sample, so one step's rounding does not compound.
            x = want;
        }
    }
}
