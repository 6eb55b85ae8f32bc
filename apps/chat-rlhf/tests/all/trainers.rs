//! Every trainer on a tiny model and slices of the shared data: it learns (its key metric
//! moves the right way), and two ranks under ZeRO-2 give one rank's first-step loss.

use crate::common::*;
use chat_rlhf::config::ChatConfig;
use chat_rlhf::run::train;

/// Runs `method` at one rank and at two ranks with ZeRO-2; the first-step losses agree.
fn same_first_step(method: &str, cfg: &ChatConfig, out: &std::path::Path) -> Vec<f64> {
    let one = train(method, cfg, None, Some(1)).unwrap();
    let two = train(method, &zero2(cfg, &out.join("zero2")), None, Some(1)).unwrap();
    let (a, b) = (one.series("loss")[0], two.series("loss")[0]);
    let (ga, gb) = (one.series("grad_norm")[0], two.series("grad_norm")[0]);
    println!("{method}: first-step loss one rank {a:.7}, nproc=2 ZeRO-2 {b:.7}; grad norm {ga:.6} / {gb:.6}");
    assert!(
        rel(a, b) < 1e-5 || (a - b).abs() < 1e-7,
        "{method}: {a} vs {b}"
    );
    assert!(rel(ga, gb) < 1e-4, "{method} grad norm: {ga} vs {gb}");
    one.series("loss")
}

#[test]
fn sft_learns_and_matches_across_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir.path().join("base"), 1);
    let data = dolly_sft(&dir.path().join("sft"), 60, 96);
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
    let data = hh_pairs(&dir.path().join("pref"), 40, 128);
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

#[test]
fn ppo_and_grpo_match_across_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let sft = dolly_sft(&dir.path().join("sft"), 20, 64);
    let ptx = format!("ptx_coef = 0.5\nptx_data = \"{}\"", sft.display());
    let rl = rl_setup(dir.path(), 3, &ptx);
    let resident = same_first_step("ppo", &rl.ppo, &dir.path().join("p"));
    // Reference and reward model streamed from disk block by block: the same step.
    let mut offloaded = rl.ppo.clone();
    offloaded.ppo.as_mut().unwrap().offload_frozen = true;
    offloaded.train.out_dir = dir.path().join("ppo-offload");
    let o = train("ppo", &offloaded, None, Some(1))
        .unwrap()
        .series("loss");
    assert!(
        rel(o[0], resident[0]) < 1e-6,
        "offloaded {o:?} vs resident {resident:?}"
    );
    same_first_step("grpo", &rl.grpo, &dir.path().join("g"));
}

#[test]
fn a_resumed_run_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir.path().join("base"), 7);
    let data = hh_pairs(&dir.path().join("pref"), 30, 96);
    let mut cfg = config(
        &model,
        &data,
        &dir.path().join("straight"),
        "[dpo]\nloss = \"dpo\"\nbeta = 0.1",
    );
    cfg.train.max_steps = 4;
    cfg.train.save_every = 2;
    let straight = train("dpo", &cfg, None, None).unwrap().series("loss");
    let mut first = cfg.clone();
    first.train.out_dir = dir.path().join("halves");
    train("dpo", &first, None, Some(2)).unwrap();
    let ckpt = colossal_core::train::list_checkpoints(&first.train.out_dir)
        .pop()
        .unwrap();
    let rest = train("dpo", &first, Some(&ckpt), None)
        .unwrap()
        .series("loss");
    println!(
        "straight {straight:?}\nresumed from {} {rest:?}",
        ckpt.display()
    );
    assert_eq!((rest.len(), straight.len()), (2, 4));
    for (a, b) in straight[2..].iter().zip(&rest) {
        assert!(rel(*a, *b) < 1e-6, "{straight:?} vs {rest:?}");
    }
}
