//! The binary: `chat` streams a reply per piped line, `eval` scores answers with a reward
//! model against a baseline, and bad configs name the key.

use std::io::Write;
use std::process::{Command, Stdio};

use colossal_data::chat::raw::{Kind, RawFormat};

use crate::common::*;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_chat-rlhf"))
}

#[test]
fn chat_answers_each_piped_line() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir.path().join("m"), 4);
    let mut child = bin()
        .args(["chat", "--model"])
        .arg(&model)
        .arg("--tokenizer")
        .arg(tokenizer_dir())
        .arg("--chat-template")
        .arg(template_path())
        .args(["--temperature", "0", "--max-new-tokens", "5"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hello there\nAnd again\n/quit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(out.status.success());
    assert_eq!(text.matches("assistant> ").count(), 2, "{text}");
}

#[test]
fn eval_scores_against_a_baseline_and_grades_gsm8k() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir.path().join("m"), 5);
    let base = tiny_model(&dir.path().join("b"), 6);
    let rm = chat_rlhf::rm::with_score_head(&model, &dir.path().join("rm"), 1).unwrap();
    let prompts = prepared(
        Kind::Prompt,
        RawFormat::Gsm8k,
        "data/sft/gsm8k_test.jsonl",
        6,
        200,
        &dir.path().join("p"),
    );
    let out = dir.path().join("eval.json");
    let status = bin()
        .args(["eval", "--model"])
        .arg(&model)
        .arg("--baseline")
        .arg(&base)
        .arg("--reward-model")
        .arg(&rm)
        .arg("--prompts")
        .arg(&prompts)
        .args(["--split", "train", "--max-new-tokens", "4", "--out"])
        .arg(&out)
        .arg("--tokenizer")
        .arg(tokenizer_dir())
        .status()
        .unwrap();
    assert!(status.success());
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    println!("{r:#}");
    let n = r["prompts"].as_u64().unwrap();
    assert!(n > 0);
    assert_eq!(r["gsm8k_questions"].as_u64(), Some(n));
    let win = r["win_rate"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&win));
    let answers = std::fs::read_to_string(out.with_extension("answers.jsonl")).unwrap();
    assert_eq!(answers.lines().count() as u64, n);
}

#[test]
fn a_bad_config_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[model]\n[data]\npath = \"x\"\n[train]\nout_dir = \"o\"\nbatch_size = 4\nmicro_batch_size = 1\nmax_steps = 1\nlr = 1e-3\n[dpo]\nloss = \"dpo\"\nbeta = 0.1\ngama = 1\n").unwrap();
    let out = bin().args(["dpo", "--config"]).arg(&cfg).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("gama") && err.contains("dpo"), "{err}");
}

#[test]
fn grpo_with_the_gsm8k_reward_runs() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir.path().join("m"), 8);
    let gsm = prepared(
        Kind::Prompt,
        RawFormat::Gsm8k,
        "data/sft/gsm8k_train.jsonl.gz",
        8,
        200,
        &dir.path().join("g"),
    );
    let extra = "[grpo]\ngroup_size = 2\nreward = \"gsm8k\"\n[generation]\nmax_new_tokens = 4\n"
        .to_string();
    let mut cfg = config(&model, &gsm, &dir.path().join("run"), &extra);
    cfg.data.tokenizer = Some(tokenizer_dir());
    let s = chat_rlhf::run::train("grpo", &cfg, None, Some(1)).unwrap();
    let r = s.series("reward_mean")[0];
    assert!((0.0..=1.0).contains(&r), "{r}");
    let mut no_tok = cfg.clone();
    no_tok.data.tokenizer = None;
    let err = chat_rlhf::run::train("grpo", &no_tok, None, Some(1)).unwrap_err();
    assert!(format!("{err:#}").contains("[data] tokenizer"), "{err:#}");
}

/// `mpirun -n 2 chat-rlhf dpo --set parallel.backend="mpi"` = two local ranks, with ZeRO-2
/// and with tensor parallelism.
#[cfg(feature = "mpi")]
#[test]
fn mpirun_two_processes_match_two_local_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir.path().join("m"), 9);
    let data = hh_pairs(&dir.path().join("pref"), 20, 96);
    let cfg = dir.path().join("dpo.toml");
    let text = config_text(
        &model,
        &data,
        &dir.path().join("unused"),
        "[dpo]\nloss = \"dpo\"\nbeta = 0.1\n[parallel]\nzero_stage = 2\n",
    );
    std::fs::write(&cfg, text).unwrap();
    let losses = |mpi: bool, split: &str| -> Vec<f64> {
        let out = dir.path().join(format!(
            "{}{}",
            if mpi { "mpi" } else { "local" },
            split.replace(['.', '=', ' '], "_")
        ));
        let bin = env!("CARGO_BIN_EXE_chat-rlhf");
        let mut cmd = if mpi {
            let mut c = Command::new("mpirun");
            c.args(["--allow-run-as-root", "--oversubscribe", "-n", "2", bin]);
            c
        } else {
            Command::new(bin)
        };
        let backend = if mpi {
            "parallel.backend=\"mpi\""
        } else {
            "parallel.nproc=2"
        };
        let res = cmd
            .args(["dpo", "--config"])
            .arg(&cfg)
            .args(["--set", backend, "--set"])
            .arg(format!("train.out_dir=\"{}\"", out.display()))
            .args(split.split_whitespace().flat_map(|s| ["--set", s]))
            .output()
            .expect("mpirun on PATH (the mpi feature needs Open MPI)");
        assert!(
            res.status.success(),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    for split in ["", "parallel.tp=2 parallel.zero_stage=0"] {
        let (local, mpi) = (losses(false, split), losses(true, split));
        println!("[{split}] local {local:?}\nmpi   {mpi:?}");
        assert_eq!(local.len(), 2);
        assert_eq!(local, mpi, "{split}");
    }
}
