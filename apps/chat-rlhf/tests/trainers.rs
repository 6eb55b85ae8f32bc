//! Every trainer on a tiny model and slices of the shared data: it learns (its key metric
//! moves the right way), and two ranks under ZeRO-2 give one rank's first-step loss.

mod common;

use chat_rlhf::config::ChatConfig;
use chat_rlhf::run::train;
use colossal_data::chat::raw::{Kind, RawFormat};
use common::*;

/// Runs `method` at one rank and at two ranks with ZeRO-2; the first-step losses agree.
fn same_first_step(method: &str, cfg: &ChatConfig, out: &std::path::Path) -> Vec<f64> {
    let one = train(method, cfg, None, Some(1)).unwrap();
    let two = train(method, &zero2(cfg, &out.join("zero2")), None, Some(1)).unwrap();
    let (a, b) = (one.series("loss")[0], two.series("loss")[0]);
    println!("{method}: first-step loss one rank {a:.7}, nproc=2 ZeRO-2 {b:.7}");
    assert!(rel(a, b) < 1e-5, "{method}: {a} vs {b}");
    one.series("loss")
}

#[test]
fn sft_learns_and_matches_across_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir.path().join("base"), 1);
    let data = prepared(
        Kind::Sft,
        RawFormat::Dolly,
        "data/sft/dolly15k_open_qa_3742.jsonl",
        60,
        96,
        &dir.path().join("sft"),
    );
    let cfg = config(&model, &data, &dir.path().join("run"), "");
    same_first_step("sft", &cfg, dir.path());
    let mut long = cfg.clone();
    long.train.max_steps = 8;
    long.train.lr = 1e-2;
    long.train.out_dir = dir.path().join("long");
    let s = train("sft", &long, None, None).unwrap();
    let l = s.series("loss");
    println!("sft losses {l:?}, val {:?}", s.series("val_loss"));
    assert!(l.last().unwrap() < &(l[0] - 0.5), "SFT loss falls: {l:?}");
    assert!(dir.path().join("long/loss.png").exists());
    assert!(s.final_dir.unwrap().join("model.safetensors").exists());
}

#[test]
fn reward_model_and_preference_losses_match_across_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir.path().join("base"), 2);
    let data = prepared(
        Kind::Preference,
        RawFormat::HhRlhf,
        "data/preference/hh-rlhf_harmless-base_test.jsonl.gz",
        40,
        128,
        &dir.path().join("pref"),
    );
    let rm = config(&model, &data, &dir.path().join("rm"), "");
    same_first_step("rm", &rm, dir.path());
    let cfg = |loss: &str| {
        config(
            &model,
            &data,
            &dir.path().join(format!("run-{}", loss.len())),
            &format!("[dpo]\n{loss}"),
        )
    };
    for loss in [
        "loss = \"dpo\"\nbeta = 0.1\nlabel_smoothing = 0.0",
        "loss = \"ipo\"\nbeta = 0.5",
        "loss = \"simpo\"\nbeta = 2.0\ngamma = 0.5",
        "loss = \"orpo\"\nlambda = 0.1",
        "loss = \"kto\"\nbeta = 0.1",
    ] {
        let c = cfg(loss);
        let l = same_first_step("dpo", &c, &dir.path().join(loss.len().to_string()));
        // The reference is the starting model: DPO's first loss is −log σ(0) = log 2.
        if loss.contains("\"dpo\"") {
            assert!(
                (l[0] - 2f64.ln()).abs() < 1e-5,
                "DPO at the reference: {}",
                l[0]
            );
        }
    }
}
