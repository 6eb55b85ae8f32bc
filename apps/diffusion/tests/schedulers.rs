//! Schedulers against `shared/fixtures/sd_tiny` (made by diffusers 0.35): the noise schedule,
//! the forward process, DDIM's timesteps and a whole 10-step DDIM trajectory given the UNet
//! outputs diffusers saw.

mod common;

use common::{close, fixture, reference, rel_err, tensors};
use diffusion::scheduler::{Scheduler, SchedulerKind};

#[test]
fn the_noise_schedule_is_diffusers_bit_for_bit() {
    let s = Scheduler::from_dir(&fixture().join("scheduler")).unwrap();
    assert_eq!(s.kind(), SchedulerKind::Ddpm);
    let t = tensors();
    let betas: Vec<f32> = t["ddpm.betas"].to_vec1().unwrap();
    let ac: Vec<f32> = t["ddpm.alphas_cumprod"].to_vec1().unwrap();
    let differ = |a: &[f32], b: &[f32]| a.iter().zip(b).filter(|(x, y)| x != y).count();
    assert_eq!(differ(&s.schedule.betas, &betas), 0, "betas");
    assert_eq!(differ(&s.schedule.alphas_cumprod, &ac), 0, "alphas_cumprod");
}

#[test]
fn add_noise_matches_diffusers_at_per_sample_timesteps() {
    let s = Scheduler::from_dir(&fixture().join("scheduler")).unwrap();
    let t = tensors();
    let noisy = s
        .add_noise(&t["ddpm.x0"], &t["ddpm.noise"], &[0, 10, 500, 999])
        .unwrap();
    let e = rel_err(&noisy, &t["ddpm.noisy"]);
    close("ddpm.noisy", e, 1e-6);
    let noisy = s
        .add_noise(&t["train.x0"], &t["train.noise"], &[100, 700])
        .unwrap();
    let e = rel_err(&noisy, &t["train.noisy"]);
    close("train.noisy", e, 1e-6);
    // Epsilon prediction: the training target is the noise itself.
    let target = s
        .target(&t["train.x0"], &t["train.noise"], &[100, 700])
        .unwrap();
    assert_eq!(rel_err(&target, &t["train.noise"]), 0.0);
}

#[test]
fn a_ten_step_ddim_trajectory_follows_diffusers() {
    let mut s = Scheduler::from_dir(&fixture().join("scheduler_ddim")).unwrap();
    s.set_timesteps(10).unwrap();
    let want: Vec<f64> = serde_json::from_value(reference()["ddim"]["timesteps"].clone()).unwrap();
    assert_eq!(s.timesteps(), want.as_slice());
    let t = tensors();
    let (outs, steps) = (&t["ddim.noise_pred_per_step"], &t["ddim.latents_per_step"]);
    let mut x = t["ddim.initial_latents"].clone();
    for (i, &ts) in s.timesteps().to_vec().iter().enumerate() {
        let out = outs.get(i).unwrap().unsqueeze(0).unwrap();
        x = s.step(i, &out, &x, None).unwrap();
        let e = rel_err(&x, &steps.get(i).unwrap().unsqueeze(0).unwrap());
        close(&format!("step {i} (t = {ts})"), e, 1e-5);
    }
    let e = rel_err(&x, &t["ddim.final_latents"]);
    close("final latents", e, 1e-5);
}

#[test]
fn settings_we_do_not_implement_are_errors_naming_them() {
    let dir = std::env::temp_dir().join(format!("sched-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let base = std::fs::read_to_string(fixture().join("scheduler/scheduler_config.json")).unwrap();
    let check = |edit: &dyn Fn(&mut serde_json::Value), want: &str| {
        let mut v: serde_json::Value = serde_json::from_str(&base).unwrap();
        edit(&mut v);
        std::fs::write(dir.join("scheduler_config.json"), v.to_string()).unwrap();
        let e = Scheduler::from_dir(&dir).unwrap_err().to_string();
        assert!(
            e.contains("scheduler_config.json") && e.contains(want),
            "{e}"
        );
    };
    check(&|v| v["thresholding"] = true.into(), "thresholding");
    check(
        &|v| v["use_karras_sigmas"] = false.into(),
        "`use_karras_sigmas` is not a Ddpm setting",
    );
    check(
        &|v| v["_class_name"] = "LMSDiscreteScheduler".into(),
        "LMSDiscreteScheduler",
    );
    check(&|v| v["timestep_spacing"] = "karras".into(), "karras");
    std::fs::remove_dir_all(&dir).unwrap();
}
