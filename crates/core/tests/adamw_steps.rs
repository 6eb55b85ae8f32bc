//! AdamW against `shared/fixtures/adamw_steps`: six steps of `torch.optim.AdamW(betas=(0.9,
//! 0.95), eps=1e-8, weight_decay=0.1)` after `clip_grad_norm_(…, 1.0)`, lr changing per step.
//! One step cannot tell β1 from β2 (bias correction makes it lr·g/(|g|+eps)); six can.
mod common;

use candle_core::{Tensor, Var};
use colossal_core::optim::{clip_grad_norm, AdamW, AdamWConfig};
use colossal_core::params::{Grads, Params};
use common::*;
use serde_json::Value;

const NAMES: [&str; 3] = ["a", "b", "c"];

fn run(cfg: AdamWConfig) -> Vec<f32> {
    let dir = fixture("adamw_steps");
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let t = load_tensors(&dir.join("reference.safetensors"));
    let mut params = Params::new();
    for n in NAMES {
        params.insert(
            n,
            Var::from_tensor(&t[&format!("init.{n}")].copy().unwrap()).unwrap(),
        );
    }
    let clip = r["clip_max_norm"].as_f64().unwrap();
    let mut opt = AdamW::new(cfg);
    let mut worst_per_step = Vec::new();
    for step in 0..r["steps"].as_u64().unwrap() as usize {
        let mut grads = Grads::new();
        for n in NAMES {
            grads.set(n, t[&format!("step{step}.grad.{n}")].clone());
        }
        let norm = clip_grad_norm(&mut grads, clip).unwrap();
        let want_norm = r["grad_norm_preclip_per_step"][step].as_f64().unwrap();
        assert!(
            ((norm - want_norm) / want_norm).abs() < 1e-6,
            "step {step}: pre-clip norm {norm} vs {want_norm}"
        );
        let lr = r["lr_per_step"][step].as_f64().unwrap();
        opt.step(&params, &grads, lr).unwrap();
        let mut worst = 0f32;
        for n in NAMES {
            let want: &Tensor = &t[&format!("step{step}.param.{n}")];
            worst = worst.max(max_diff(params.get(n).unwrap(), want));
        }
        worst_per_step.push(worst);
    }
    worst_per_step
}

fn torch_config() -> AdamWConfig {
    AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        no_decay: vec![],
    }
}

#[test]
fn six_steps_match_torch_at_every_step() {
    let worst = run(torch_config());
    println!("adamw_steps: worst |ours − torch| per step {worst:?}");
    for (step, w) in worst.iter().enumerate() {
        assert!(*w <= 1e-6, "step {step}: {w:e}");
    }
}

#[test]
fn the_fixture_tells_the_betas_apart() {
    // With β1 and β2 swapped the first step is the same, later ones are not.
    let swapped = run(AdamWConfig {
        beta1: 0.95,
        beta2: 0.9,
        ..torch_config()
    });
    println!("betas swapped: worst per step {swapped:?}");
    assert!(swapped[0] <= 1e-6);
    assert!(swapped.iter().skip(1).any(|w| *w > 1e-4));
}
