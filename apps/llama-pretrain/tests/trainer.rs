//! Trainer: bit-exact resume, and one clear error per kind of bad input.

mod common;

use candle_core::Device;
use colossal_core::config::parse_config;
use colossal_core::train::{TrainConfig, Trainer};
use colossal_session::RunExt;
use common::{config, config_text, flat, prepare, rel_norm};

#[test]
fn resume_is_bit_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let straight = tmp.path().join("straight");
    let mut t = Trainer::new(config(&data, &straight, &[]), None, Device::Cpu).unwrap();
    let s = t.run(None).unwrap();
    let final_a = s.final_dir.unwrap();
    assert!(final_a.ends_with("step-0000006"));

    let split = tmp.path().join("split");
    let mut t = Trainer::new(config(&data, &split, &[]), None, Device::Cpu).unwrap();
    let half = t.run(Some(3)).unwrap().final_dir.unwrap();
    drop(t);
    let mut t = Trainer::new(config(&data, &split, &[]), Some(&half), Device::Cpu).unwrap();
    assert_eq!(t.state.step, 3);
    let final_b = t.run(None).unwrap().final_dir.unwrap();

    let a = std::fs::read(final_a.join("model.safetensors")).unwrap();
    let b = std::fs::read(final_b.join("model.safetensors")).unwrap();
    assert_eq!(
        a, b,
        "6 straight steps and 3 + resume 3 must give identical weights"
    );
    let a = std::fs::read(final_a.join("optimizer.safetensors")).unwrap();
    let b = std::fs::read(final_b.join("optimizer.safetensors")).unwrap();
    assert_eq!(a, b);
    // Metrics of the resumed run continue the first run's lines, without duplicates.
    let lines = std::fs::read_to_string(split.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = lines
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
    // Only the newest `keep_last` checkpoints stay; the PNG is drawn.
    let kept: Vec<_> = std::fs::read_dir(straight.join("checkpoints"))
        .unwrap()
        .collect();
    assert_eq!(kept.len(), 2);
    assert!(straight.join("loss.png").exists());
}

#[test]
fn loss_falls_with_gradient_accumulation_matching_big_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let mut a = Trainer::new(
        config(&data, &tmp.path().join("a"), &["train.micro_batch_size=4"]),
        None,
        Device::Cpu,
    )
    .unwrap();
    let mut b = Trainer::new(
        config(&data, &tmp.path().join("b"), &["train.micro_batch_size=1"]),
        None,
        Device::Cpu,
    )
    .unwrap();
    let mut first = None;
    let mut last = 0.0;
    for _ in 0..6 {
        let (la, _, _) = a.train_step().unwrap();
        let (lb, _, _) = b.train_step().unwrap();
        assert!(
            (la - lb).abs() <= 1e-5 * la.abs(),
            "accumulated loss {lb} vs one batch {la}"
        );
        first.get_or_insert(la);
        last = la;
    }
    // Relative to each weight's norm, as every equivalence test compares: an absolute bound
    // depends on the CPU's matmul kernels (Adam turns summation-order noise in gradients
    // near eps into steps of lr; 1.1e-5 on an AVX2-only EPYC).
    let mut worst = 0f32;
    for ((name, x), (_, y)) in flat(&a.params).iter().zip(&flat(&b.params)) {
        let d = rel_norm(y, x);
        assert!(d <= 1e-5, "{name}: relative difference {d:e}");
        worst = worst.max(d);
    }
    println!("accumulation vs one batch: worst relative parameter difference {worst:.1e}");
    assert!(last < first.unwrap(), "loss {first:?} -> {last}");
}

fn err_of(r: colossal_core::Result<Trainer>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn config_key_errors_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let (d, o) = (tmp.path().join("d"), tmp.path().join("o"));
    let text = config_text(&d, &o, 32000);
    let e = parse_config::<TrainConfig>(&text, "run.toml", &["train.lrr=1".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("run.toml") && e.contains("lrr"), "{e}");
    let e = parse_config::<TrainConfig>(&text.replace("lr = 1e-2\n", ""), "run.toml", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("train") && e.contains("`lr`"), "{e}");
}

#[test]
fn bad_inputs_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let out = tmp.path().join("o");

    // Missing data path.
    let missing = tmp.path().join("no-such-data");
    let e = err_of(Trainer::new(config(&missing, &out, &[]), None, Device::Cpu));
    assert!(
        e.contains(&missing.display().to_string()) && e.contains("not found"),
        "{e}"
    );

    // No data path at all (the section is optional for apps that bring their own batches).
    let mut unset = config(&data, &out, &[]);
    unset.data.path = Default::default();
    let e = err_of(Trainer::new(unset, None, Device::Cpu));
    assert!(e.contains("data.path is not set"), "{e}");

    // Tokenizer vocab larger than the model's.
    let cfg: TrainConfig = parse_config(&config_text(&data, &out, 1000), "t.toml", &[]).unwrap();
    let e = err_of(Trainer::new(cfg, None, Device::Cpu));
    assert!(
        e.contains("32000") && e.contains("1000") && e.contains("vocab"),
        "{e}"
    );

    // Checkpoint tensor with the wrong shape: a saved model whose config claims a wider FFN.
    let mut t = Trainer::new(config(&data, &out, &[]), None, Device::Cpu).unwrap();
    let ckpt = t.run(Some(1)).unwrap().final_dir.unwrap();
    let cfg_path = ckpt.join("config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .unwrap()
        .replace("\"intermediate_size\": 32", "\"intermediate_size\": 40");
    std::fs::write(&cfg_path, text).unwrap();
    let cfg = config(&data, &out, &[]);
    let mut cfg2 = cfg.clone();
    cfg2.model.config = None;
    cfg2.model.hf_dir = Some(ckpt.clone());
    let e = err_of(Trainer::new(cfg2, None, Device::Cpu));
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight")
            && e.contains("[32, 16]")
            && e.contains("[40, 16]"),
        "{e}"
    );
    assert!(e.contains("model.safetensors"), "{e}");

    // Corrupt Parquet shard.
    let shard = data.join("train-00000.parquet");
    std::fs::write(&shard, b"PAR1 this is not parquet").unwrap();
    let e = err_of(Trainer::new(cfg, None, Device::Cpu));
    assert!(
        e.contains("train-00000.parquet") && e.contains("corrupt Parquet"),
        "{e}"
    );
}

#[test]
fn evaluation_loss_is_the_training_loss_on_the_same_data() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    // Point the validation split at the training shards: with the same seed both draw the same
    // order, so the evaluated mean loss must equal the training loss of that batch.
    let manifest_path = data.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    m["validation"] = m["train"].clone();
    std::fs::write(&manifest_path, m.to_string()).unwrap();
    let mut t = Trainer::new(
        config(
            &data,
            &tmp.path().join("o"),
            &["train.eval_batches=1", "train.micro_batch_size=4"],
        ),
        None,
        Device::Cpu,
    )
    .unwrap();
    let v = t.evaluate().unwrap().unwrap();
    let (l, _, _) = t.train_step().unwrap();
    assert!((v - l as f64).abs() < 1e-5 * v, "eval {v} vs train {l}");
}

/// `train.device = "cuda"` on a build or machine without CUDA ends the run at once with a
/// reason, before any data is read; a mode misspelt is an error naming the field and values.
#[test]
fn unavailable_device_and_unknown_modes_fail_fast_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let cfg = tmp.path().join("run.toml");
    std::fs::write(&cfg, config_text(&data, &tmp.path().join("o"), 32000)).unwrap();
    let run = |set: &str| {
        let started = std::time::Instant::now();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_llama-pretrain"))
            .args(["train", "--config"])
            .arg(&cfg)
            .args(["--set", set])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{set}: expected a failure");
        (err, started.elapsed())
    };
    let (err, took) = run("train.device=\"cuda\"");
    println!("train.device=cuda: {took:?}: {}", err.trim());
    assert!(took < std::time::Duration::from_secs(10), "took {took:?}");
    assert!(err.contains("train.device = \"cuda\""), "{err}");
    // This test binary is built without CUDA (the cuda feature is only type-checked in CI).
    assert!(
        err.contains("without CUDA") && err.contains("--features cuda"),
        "{err}"
    );
    let (err, _) = run("train.device=\"gpu\"");
    assert!(
        err.contains("train.device") && err.contains("cuda:N"),
        "{err}"
    );
    let (err, _) = run("parallel.precision=\"fp8\"");
    assert!(
        err.contains("parallel.precision") && err.contains("bf16"),
        "{err}"
    );
}

#[test]
fn fused_and_reference_kernels_train_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let run = |kernels: &str| {
        let out = tmp.path().join(kernels);
        let set = format!("train.kernels=\"{kernels}\"");
        let mut t = Trainer::new(config(&data, &out, &[&set]), None, Device::Cpu).unwrap();
        assert_eq!(t.model.kernels.to_string(), kernels);
        (0..4)
            .map(|_| t.train_step().map(|(l, n, _)| (l, n)).unwrap())
            .collect::<Vec<_>>()
    };
    let (fused, reference) = (run("fused"), run("reference"));
    for (s, ((lf, nf), (lr, nr))) in fused.iter().zip(&reference).enumerate() {
        println!("step {s}: loss {lf} vs {lr}, grad norm {nf} vs {nr}");
        assert!((lf - lr).abs() <= 1e-5 * lr.abs(), "loss at step {s}");
        assert!((nf - nr).abs() <= 1e-4 * nr, "grad norm at step {s}");
    }
    let text = config_text(&data, &tmp.path().join("bad"), 32000);
    let set = vec!["train.kernels=\"fast\"".to_string()];
    let e = parse_config::<TrainConfig>(&text, "t.toml", &set)
        .unwrap_err()
        .to_string();
    assert!(e.contains("kernels") && e.contains("fused"), "{e}");
}
