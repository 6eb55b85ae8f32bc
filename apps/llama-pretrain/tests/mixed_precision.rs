//! bf16 / fp16 compute with fp32 masters tracks fp32; fp16 overflow skips the step and the
//! loss scale follows its hysteresis.

mod common;

use std::time::Duration;

use candle_core::Device;
use colossal_core::dist::{run_local, Communicator};
use colossal_core::train::Trainer;
use common::{config, prepare};

fn losses(
    data: &std::path::Path,
    out: &std::path::Path,
    precision: &str,
    ranks: usize,
) -> Vec<f32> {
    let p = format!("parallel.precision=\"{precision}\"");
    let cfg = config(
        data,
        out,
        &[
            "train.batch_size=8",
            "train.micro_batch_size=2",
            "parallel.zero_stage=1",
            &p,
        ],
    );
    let mut all = run_local(ranks, Duration::from_secs(60), |comm| {
        let comm: Box<dyn Communicator> = Box::new(comm);
        let mut t = Trainer::new_rank(cfg.clone(), None, Device::Cpu, (ranks > 1).then_some(comm))?;
        (0..5)
            .map(|_| Ok(t.train_step()?.0))
            .collect::<colossal_core::Result<Vec<f32>>>()
    })
    .unwrap();
    all.swap_remove(0)
}

#[test]
fn low_precision_tracks_fp32() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let reference = losses(&data, &tmp.path().join("fp32"), "fp32", 1);
    for (precision, ranks, tol) in [("bf16", 1, 1e-3f32), ("fp16", 1, 1e-3), ("bf16", 2, 1e-3)] {
        let got = losses(
            &data,
            &tmp.path().join(format!("{precision}{ranks}")),
            precision,
            ranks,
        );
        assert_eq!(got.len(), reference.len(), "{precision}: steps");
        let worst = got
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs() / b)
            .fold(0f32, f32::max);
        println!(
            "{precision} x{ranks}: losses {got:?} vs fp32 {reference:?}: worst relative {worst:e}"
        );
        assert!(worst <= tol, "{precision}: {worst:e} > {tol:e}");
        // And it really computed in low precision: an fp32 run would agree to ~1e-7.
        assert!(
            worst >= 2e-6,
            "{precision}: losses equal fp32's to {worst:e}: was {precision} used at all?"
        );
        assert!(got.last() < got.first(), "{precision}: loss must fall");
    }
}

#[test]
fn fp16_overflow_skips_the_step_and_halves_the_scale() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let cfg = config(
        &data,
        &tmp.path().join("o"),
        &["parallel.precision=\"fp16\""],
    );
    let mut t = Trainer::new(cfg, None, Device::Cpu).unwrap();
    // Overflows injected in the 2nd and 3rd steps.
    t.inject_overflow_at = vec![1, 2];
    let snapshot = |t: &Trainer| -> Vec<f32> {
        t.params
            .get("model.norm.weight")
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    t.train_step().unwrap();
    assert!(!t.last_step_skipped);
    let before = snapshot(&t);
    t.train_step().unwrap();
    assert!(t.last_step_skipped);
    assert_eq!(
        snapshot(&t),
        before,
        "a skipped step leaves the weights alone"
    );
    assert_eq!(
        t.state.loss_scaler.as_ref().unwrap().scale,
        65536.0,
        "hysteresis absorbs the first overflow"
    );
    t.train_step().unwrap();
    assert!(t.last_step_skipped);
    assert_eq!(
        t.state.loss_scaler.as_ref().unwrap().scale,
        32768.0,
        "the second overflow halves the scale"
    );
    assert_eq!(snapshot(&t), before);
    let (loss, norm, _) = t.train_step().unwrap();
    assert!(!t.last_step_skipped && loss.is_finite() && norm.is_finite());
    assert_ne!(snapshot(&t), before, "training continues");
    assert_eq!(t.state.skipped_steps, 2);
    assert_eq!(t.state.optimizer_step, 2);
}
