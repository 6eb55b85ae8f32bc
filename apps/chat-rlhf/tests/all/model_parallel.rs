//! The chat trainers under tensor, pipeline and sequence parallelism: each layout gives one
//! rank's losses and gradient norms (the same global batch, the same update).

use crate::common::*;
use chat_rlhf::config::ChatConfig;
use chat_rlhf::run::train;

/// `cfg` split as `layout` says (dp, tp, pp, ring/ulysses sp, megatron, ZeRO stage) over its
/// own output directory.
fn split(cfg: &ChatConfig, layout: &str, out: &std::path::Path) -> ChatConfig {
    let mut c = cfg.clone();
    let p = &mut c.parallel;
    let (mut dp, mut tp, mut pp, mut sp) = (1, 1, 1, 1);
    for part in layout.split('-') {
        let name = part.trim_end_matches(|c: char| c.is_ascii_digit());
        let n = part[name.len()..].parse::<usize>().unwrap_or(1);
        match name {
            "dp" => dp = n,
            "tp" => tp = n,
            "pp" => pp = n,
            "ring" | "ulysses" => {
                sp = n;
                p.sp_mode = serde_json::from_value(name.into()).unwrap();
            }
            "megatron" => p.sp_mode = colossal_core::train::SpMode::Megatron,
            "zero" => p.zero_stage = n as u8,
            other => panic!("layout part {other}"),
        }
    }
    (p.tp, p.pp, p.sp, p.nproc) = (tp, pp, sp, dp * tp * pp * sp);
    p.dp = Some(dp);
    c.train.out_dir = out.join(layout);
    c
}

/// One rank's run of `steps` steps against each layout's: losses and gradient norms agree.
fn same_steps(
    method: &str,
    cfg: &ChatConfig,
    layouts: &[&str],
    steps: usize,
    out: &std::path::Path,
) {
    let mut one = cfg.clone();
    one.train.out_dir = out.join("one");
    let base = train(method, &one, None, Some(steps)).unwrap();
    let (l1, g1) = (base.series("loss"), base.series("grad_norm"));
    for layout in layouts {
        let s = train(method, &split(cfg, layout, out), None, Some(steps)).unwrap();
        let (l, g) = (s.series("loss"), s.series("grad_norm"));
        println!("{method} {layout}: losses {l:?} vs one rank {l1:?}; grad norms {g:?} vs {g1:?}");
        assert_eq!(l.len(), steps, "{method} {layout}");
        for i in 0..steps {
            assert!(
                rel(l[i], l1[i]) < 2e-5 || (l[i] - l1[i]).abs() < 1e-6,
                "{method} {layout} step {}: loss {} vs {}",
                i + 1,
                l[i],
                l1[i]
            );
            assert!(
                rel(g[i], g1[i]) < 2e-4,
                "{method} {layout} step {}: grad norm {} vs {}",
                i + 1,
                g[i],
                g1[i]
            );
        }
    }
}

#[test]
fn sft_rm_and_dpo_under_tensor_pipeline_and_sequence_parallelism() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir.path().join("base"), 11);
    let sft = dolly_sft(&dir.path().join("sft"), 40, 96);
    let cfg = config(&model, &sft, &dir.path().join("sft-run"), "");
    same_steps(
        "sft",
        &cfg,
        &[
            "tp2",
            "pp2",
            "ring2",
            "tp2-pp2",
            "dp2-tp2-zero2",
            "tp2-pp2-zero1",
        ],
        2,
        &dir.path().join("s"),
    );
    let pref = hh_pairs(&dir.path().join("pref"), 30, 96);
    let rm = config(&model, &pref, &dir.path().join("rm-run"), "");
    same_steps(
        "rm",
        &rm,
        &["tp2", "tp2-megatron", "pp2", "ulysses2"],
        2,
        &dir.path().join("r"),
    );
    for (i, loss) in ["loss = \"dpo\"\nbeta = 0.1", "loss = \"kto\"\nbeta = 0.1"]
        .iter()
        .enumerate()
    {
        let c = config(
            &model,
            &pref,
            &dir.path().join("dpo-run"),
            &format!("[dpo]\n{loss}"),
        );
        same_steps(
            "dpo",
            &c,
            &["tp2", "pp2", "ring2", "dp2-tp2"],
            2,
            &dir.path().join(format!("d{i}")),
        );
    }
}

#[test]
fn ppo_and_grpo_under_tensor_pipeline_and_sequence_parallelism() {
    let dir = tempfile::tempdir().unwrap();
    let rl = rl_setup(dir.path(), 12, "");
    let ppo_layouts = ["tp2", "pp2", "ring2"];
    same_steps("ppo", &rl.ppo, &ppo_layouts, 1, &dir.path().join("p"));
    let grpo_layouts = ["tp2", "pp2", "ulysses2"];
    same_steps("grpo", &rl.grpo, &grpo_layouts, 1, &dir.path().join("g"));
}
