//! The continued-pretraining options: `train.freeze = "non_embedding"` trains only the
//! embedding (and LM head); NEFTune perturbs training but not evaluation, and resumes exactly.

use super::common::{config, prepare};
use candle_core::Device;
use colossal_core::train::Trainer;

fn weights(t: &Trainer) -> Vec<(String, Vec<f32>)> {
    t.full_params()
        .unwrap()
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                v.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
            )
        })
        .collect()
}

#[test]
fn freezing_non_embedding_weights_trains_only_the_embedding() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let cfg = config(
        &data,
        &tmp.path().join("o"),
        &["train.freeze=\"non_embedding\""],
    );
    let mut t = Trainer::new(cfg, None, Device::Cpu).unwrap();
    let before = weights(&t);
    for _ in 0..2 {
        t.train_step().unwrap();
    }
    let after = weights(&t);
    assert_eq!(after.len(), before.len(), "same parameters");
    for ((name, a), (other, b)) in after.iter().zip(&before) {
        assert_eq!(
            (name, a.len()),
            (other, b.len()),
            "same parameter, same length"
        );
        let changed = a != b;
        assert_eq!(changed, name == "model.embed_tokens.weight", "{name}");
    }
    let bad = config(
        &data,
        &tmp.path().join("p"),
        &["train.freeze=\"non_embedding\"", "parallel.zero_stage=1"],
    );
    let err = Trainer::new(bad, None, Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("train.freeze") && err.contains("parallel.zero_stage = 1"),
        "{err}"
    );
}

#[test]
fn neftune_noises_training_only_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let run = |out: &str, alpha: &str, steps: usize, resume: Option<&std::path::Path>| {
        let a = format!("train.neftune_alpha={alpha}");
        let cfg = config(&data, &tmp.path().join(out), &[&a]);
        let mut t = Trainer::new(cfg, resume, Device::Cpu).unwrap();
        let val = t.evaluate().unwrap().unwrap();
        let losses: Vec<f32> = (0..steps).map(|_| t.train_step().unwrap().0).collect();
        t.save_checkpoint().unwrap();
        (val, losses)
    };
    let (clean_val, clean) = run("clean", "0", 4, None);
    let (noisy_val, noisy) = run("noisy", "5", 4, None);
    assert_eq!(clean_val, noisy_val, "evaluation sees clean embeddings");
    assert_ne!(clean[0], noisy[0], "training sees noisy ones");
    let (_, first) = run("split", "5", 2, None);
    let ckpt = tmp.path().join("split/checkpoints/step-0000002");
    let (_, rest) = run("resumed", "5", 2, Some(&ckpt));
    assert_eq!(
        [first, rest].concat(),
        noisy,
        "the same noise after a resume"
    );
}
