//! The chat trainers under tensor, pipeline and sequence parallelism: each layout gives one
//! rank's losses and pre-clip gradient norms at every step and, after the last, the same
//! parameters (every name, equal lengths) in its final checkpoint.

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

/// Every weight of the checkpoint in `dir`, by name.
fn weights(dir: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    let (_, p) = colossal_core::checkpoint::llama::load_llama(
        dir,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut out: Vec<(String, Vec<f32>)> = p
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                v.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// ‖a − b‖ / ‖b‖.
fn rel_norm(a: &[f32], b: &[f32]) -> f64 {
    let n = |v: &mut dyn Iterator<Item = f32>| v.map(|x| x as f64 * x as f64).sum::<f64>().sqrt();
    n(&mut a.iter().zip(b).map(|(x, y)| x - y)) / n(&mut b.iter().copied()).max(1e-30)
}

/// One rank's run of `steps` steps against each layout's: losses, gradient norms and the final
/// parameters agree.
fn same_steps(
    method: &str,
    cfg: &ChatConfig,
    layouts: &[&str],
    steps: usize,
    out: &std::path::Path,
) {
    let mut cfg = cfg.clone();
    cfg.train.max_steps = cfg.train.max_steps.max(steps);
    let cfg = &cfg;
    let mut one = cfg.clone();
    one.train.out_dir = out.join("one");
    let base = train(method, &one, None, Some(steps)).unwrap();
    let (l1, g1) = (base.series("loss"), base.series("grad_norm"));
    let p1 = weights(base.final_dir.as_ref().expect("a final checkpoint"));
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
        let p = weights(s.final_dir.as_ref().expect("a final checkpoint"));
        assert_eq!(
            p.iter().map(|(n, v)| (n, v.len())).collect::<Vec<_>>(),
            p1.iter().map(|(n, v)| (n, v.len())).collect::<Vec<_>>(),
            "{method} {layout}: parameter names and lengths"
        );
        let worst = p
            .iter()
            .zip(&p1)
            .map(|((_, a), (_, b))| rel_norm(a, b))
            .fold(0f64, f64::max);
        println!(
            "{method} {layout}: {} parameters, worst relative difference {worst:.1e}",
            p.len()
        );
        assert!(
            worst < 1e-4,
            "{method} {layout}: parameters differ by {worst:e}"
        );
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
        3,
        &dir.path().join("s"),
    );
    let pref = hh_pairs(&dir.path().join("pref"), 30, 96);
    let rm = config(&model, &pref, &dir.path().join("rm-run"), "");
    same_steps(
        "rm",
        &rm,
        &["tp2", "tp2-megatron", "pp2", "ulysses2"],
        3,
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
            3,
            &dir.path().join(format!("d{i}")),
        );
    }
}

#[test]
fn ppo_and_grpo_under_tensor_pipeline_and_sequence_parallelism() {
    let dir = tempfile::tempdir().unwrap();
    let rl = rl_setup(dir.path(), 12, "");
    let ppo_layouts = ["tp2", "pp2", "ring2"];
    // One step: rollouts sample from the updated policy, and a last-bit difference after an
    // update may pick another token (the parameters after the step are compared).
    same_steps("ppo", &rl.ppo, &ppo_layouts, 1, &dir.path().join("p"));
    let grpo_layouts = ["tp2", "pp2", "ulysses2"];
    same_steps("grpo", &rl.grpo, &grpo_layouts, 1, &dir.path().join("g"));
}
