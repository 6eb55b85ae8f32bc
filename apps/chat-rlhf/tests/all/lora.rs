//! LoRA in the chat trainers: SFT and DPO train adapters on a frozen policy (loss falls, the
//! optimizer holds the adapters only), DPO's, PPO's and GRPO's reference is the policy's own
//! frozen base (DPO's first loss is log 2, PPO's and GRPO's first KL is 0, then PPO's grows),
//! two ranks under ZeRO-2 give one rank's first step, and under ZeRO-3 (the base sharded, the
//! reference gathering it block by block) DPO's first three steps and PPO's first.

use crate::common::*;
use chat_rlhf::run::train;

/// Every projection and the (untied) LM head.
const LORA: &str = "[lora]\nr = 8\nalpha = 16\ntarget_modules = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"gate_proj\", \"up_proj\", \"down_proj\", \"lm_head\"]\n";

/// Adam's state bytes for the parameters in `dir`'s optimizer file.
fn adam_bytes(dir: &std::path::Path) -> u64 {
    std::fs::metadata(dir.join("optimizer.safetensors"))
        .unwrap()
        .len()
}

#[test]
fn sft_and_dpo_train_lora_adapters_on_a_frozen_policy() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir.path().join("base"), 1);
    let sft_data = dolly_sft(&dir.path().join("sft"), 60, 96);
    let mut sft = config(&model, &sft_data, &dir.path().join("sft-run"), LORA);
    sft.train.max_steps = 8;
    sft.train.lr = 3e-2;
    let s = train("sft", &sft, None, None).unwrap();
    let l = s.series("loss");
    let lora_dir = s.final_dir.unwrap();
    // The frozen base on the same batches (adapters left at B = 0): the control.
    let mut still = sft.clone();
    still.train.lr = 0.0;
    still.train.out_dir = dir.path().join("sft-lr0");
    let base = train("sft", &still, None, None).unwrap().series("loss");
    // The same steps training every weight, for the optimizer-state comparison.
    let mut full = sft.clone();
    full.lora = None;
    full.train.lr = 1e-2;
    full.train.out_dir = dir.path().join("sft-full");
    let f = train("sft", &full, None, None).unwrap();
    let (a, b) = (adam_bytes(&lora_dir), adam_bytes(&f.final_dir.unwrap()));
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (trained, frozen) = (mean(&l[4..]), mean(&base[4..]));
    println!(
        "LoRA SFT losses {l:?}; last 4 steps {trained:.4} vs {frozen:.4} for the frozen base; optimizer state {a} bytes vs {b} for full fine-tuning"
    );
    assert_eq!(
        l[0], base[0],
        "B starts at zero: the first step is the base's"
    );
    assert!(
        trained < frozen - 0.1,
        "LoRA SFT loss falls: {l:?} vs {base:?}"
    );
    assert!(a * 5 < b, "optimizer state {a} vs {b}");
    assert!(lora_dir.join("adapter/adapter_model.safetensors").exists());

    let pref = hh_pairs(&dir.path().join("pref"), 40, 128);
    let extra = format!("{LORA}[dpo]\nloss = \"dpo\"\nbeta = 0.1\nlabel_smoothing = 0.0\n");
    let mut dpo = config(&model, &pref, &dir.path().join("dpo-run"), &extra);
    let mut three_steps = dpo.clone();
    three_steps.train.max_steps = 3;
    let first = train("dpo", &three_steps, None, None).unwrap();
    let one = first.series("loss");
    let two = train(
        "dpo",
        &zero2(&dpo, &dir.path().join("dpo-z2")),
        None,
        Some(1),
    )
    .unwrap()
    .series("loss");
    // B starts at zero: the policy is its base, the reference, so the loss is −log σ(0).
    assert!(
        (one[0] - 2f64.ln()).abs() < 1e-6,
        "DPO at the reference: {}",
        one[0]
    );
    assert!(
        rel(one[0], two[0]) < 1e-6,
        "one rank {one:?} vs ZeRO-2 {two:?}"
    );
    let z3 = zero3(&three_steps, &dir.path().join("dpo-z3"));
    let three = train("dpo", &z3, None, None).unwrap();
    // Evaluation too: a rank with fewer validation pairs runs uncounted ones in step.
    for (key, n) in [
        ("loss", 3),
        ("grad_norm", 3),
        ("reward_margin", 3),
        ("val_loss", 1),
    ] {
        let (a, b) = (first.series(key), three.series(key));
        println!("LoRA DPO {key}: one rank {a:?}, ZeRO-3 {b:?}");
        assert_eq!((a.len(), b.len()), (n, n), "{key}");
        for (x, y) in a.iter().zip(&b) {
            assert!(rel(*y, *x) < 1e-5, "{key}: one rank {a:?} vs ZeRO-3 {b:?}");
        }
    }
    dpo.train.max_steps = 8;
    dpo.train.lr = 1e-2;
    dpo.train.out_dir = dir.path().join("dpo-long");
    let d = train("dpo", &dpo, None, None).unwrap();
    let l = d.series("loss");
    let acc = d.series("reward_accuracy");
    println!("LoRA DPO losses {l:?}; reward accuracy {acc:?}");
    // Below log 2, the loss at the reference, from the first update on.
    assert!(
        mean(&l[4..]) < 2f64.ln() - 0.02,
        "LoRA DPO loss falls: {l:?}"
    );
}

#[test]
fn a_reward_model_with_lora_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir.path().join("base"), 2);
    let pref = hh_pairs(&dir.path().join("pref"), 8, 64);
    let cfg = config(&model, &pref, &dir.path().join("rm"), LORA);
    let err = train("rm", &cfg, None, Some(1)).err().unwrap().to_string();
    assert!(err.contains("[lora] with rm"), "{err}");
}

#[test]
fn ppo_and_grpo_with_lora_use_the_frozen_base_as_reference() {
    let dir = tempfile::tempdir().unwrap();
    let rl = rl_setup(dir.path(), 4, "");
    let lora = |c: &chat_rlhf::config::ChatConfig| {
        let section: toml::Table = toml::from_str(LORA).unwrap();
        let mut c = c.clone();
        c.lora = Some(section["lora"].clone().try_into().unwrap());
        c
    };
    let mut ppo = lora(&rl.ppo);
    // Two PPO iterations: each makes ppo_epochs = 2 optimizer steps.
    ppo.train.max_steps = 4;
    let one = train("ppo", &ppo, None, None).unwrap();
    let two = train(
        "ppo",
        &zero2(&ppo, &dir.path().join("ppo-z2")),
        None,
        Some(1),
    )
    .unwrap();
    let three = train(
        "ppo",
        &zero3(&ppo, &dir.path().join("ppo-z3")),
        None,
        Some(1),
    )
    .unwrap();
    let (kl, loss) = (one.series("kl"), one.series("loss"));
    println!(
        "PPO with LoRA: kl {kl:?}, loss {loss:?}, ZeRO-2 first loss {:?}",
        two.series("loss")
    );
    // Rollouts of the initial policy (B = 0) against its own base: no divergence at all.
    assert_eq!(kl[0], 0.0, "the reference is the base without adapters");
    assert!(
        kl[1] > 0.0,
        "after an update the adapters move the policy: {kl:?}"
    );
    assert!(
        rel(loss[0], two.series("loss")[0]) < 1e-5,
        "one rank vs ZeRO-2"
    );
    println!(
        "PPO with LoRA under ZeRO-3: kl {:?}, loss {:?}",
        three.series("kl"),
        three.series("loss")
    );
    assert_eq!(
        three.series("kl")[0],
        0.0,
        "ZeRO-3: the base is the reference"
    );
    assert!(
        rel(three.series("loss")[0], loss[0]) < 1e-5,
        "one rank vs ZeRO-3"
    );
    let mut grpo = lora(&rl.grpo);
    grpo.train.out_dir = dir.path().join("grpo-lora");
    let g = train("grpo", &grpo, None, Some(1)).unwrap();
    println!(
        "GRPO with LoRA: kl {:?}, loss {:?}",
        g.series("kl"),
        g.series("loss")
    );
    assert_eq!(g.series("kl")[0], 0.0);
}

/// QLoRA in the chat trainers: with the policy's base resting in nf4, DPO's reference (the
/// same quantised base, shared) starts at log 2 and its loss falls, and PPO's rollouts,
/// generated block by block from the codes, start at zero KL from that reference.
#[test]
fn dpo_and_ppo_train_lora_on_an_nf4_base() {
    let dir = tempfile::tempdir().unwrap();
    let qlora = format!("{LORA}quantize = \"nf4\"\n");
    let model = tiny_model(&dir.path().join("base"), 3);
    let pref = hh_pairs(&dir.path().join("pref"), 40, 128);
    let extra = format!("{qlora}[dpo]\nloss = \"dpo\"\nbeta = 0.1\nlabel_smoothing = 0.0\n");
    let mut dpo = config(&model, &pref, &dir.path().join("dpo-nf4"), &extra);
    dpo.train.max_steps = 8;
    dpo.train.lr = 1e-2;
    let l = train("dpo", &dpo, None, None).unwrap().series("loss");
    println!("QLoRA (nf4) DPO losses {l:?}");
    assert!(
        (l[0] - 2f64.ln()).abs() < 1e-6,
        "DPO at the reference: {l:?}"
    );
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(
        mean(&l[4..]) < 2f64.ln() - 0.02,
        "QLoRA DPO loss falls: {l:?}"
    );

    let rl = rl_setup(&dir.path().join("rl"), 4, "");
    let section: toml::Table = toml::from_str(&qlora).unwrap();
    let mut ppo = rl.ppo.clone();
    ppo.lora = Some(section["lora"].clone().try_into().unwrap());
    ppo.train.max_steps = 4;
    let kl = train("ppo", &ppo, None, None).unwrap().series("kl");
    println!("QLoRA (nf4) PPO kl {kl:?}");
    assert_eq!(
        kl[0], 0.0,
        "the reference is the quantised base without adapters"
    );
    assert!(kl[1] > 0.0, "the adapters move the policy: {kl:?}");
}
