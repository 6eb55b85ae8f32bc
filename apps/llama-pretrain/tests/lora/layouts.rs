//! LoRA in every parallel layout, and dropout: each equals one rank.

use std::path::Path;

use candle_core::Device;
use colossal_core::train::Trainer;

use super::common::{assert_same_run, prepare, Flat, Run};
use super::{lora_config, run};

#[test]
fn lora_trains_adapters_only_and_data_parallel_zero_match_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let (reference, base_after) = run(&data, &tmp.path().join("ref"), 1, 8, &[]);
    // The base the adapters start from: the same seed's fresh model, untrained.
    let fresh = Trainer::new(
        lora_config(&data, &tmp.path().join("fresh"), &[]),
        None,
        Device::Cpu,
    )
    .unwrap();
    let base_before: Flat = fresh
        .params
        .frozen()
        .map(|(n, t)| (n.to_string(), t.flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    assert_eq!(base_after, base_before, "a frozen base weight changed");
    let names: Vec<&str> = reference.params.iter().map(|(n, _)| n.as_str()).collect();
    // 2 layers × 7 projections × (A, B); the tied head is no Linear of its own.
    assert_eq!(names.len(), 28, "{names:?}");
    assert!(names.iter().all(|n| n.contains(".lora_")), "{names:?}");
    let trainable: usize = reference.params.iter().map(|(_, v)| v.len()).sum();
    let base: usize = base_before.iter().map(|(_, v)| v.len()).sum();
    println!(
        "trainable {trainable} of {} parameters; Adam state {} bytes vs {} for full fine-tuning; losses {:?}",
        trainable + base,
        8 * trainable,
        8 * (trainable + base),
        reference.losses
    );
    for (zero, ranks, micro) in [(0, 2, 4), (0, 2, 2), (1, 2, 4), (2, 2, 2), (3, 2, 2)] {
        let stage = format!("parallel.zero_stage={zero}");
        let out = tmp.path().join(format!("z{zero}-dp{ranks}-{micro}"));
        let (got, base) = run(&data, &out, ranks, micro, &[&stage]);
        let what = format!("lora zero={zero} dp={ranks} micro={micro}");
        assert_same_run(&what, &got, &reference, 1e-5);
        assert_eq!(base, base_before, "{what}: a frozen base weight changed");
        println!("{what}: equals one rank");
    }
    // Pipeline stages: each holds its layers' frozen base and adapters (the tied, frozen
    // embedding on the first and last); the whole base comes back unchanged.
    let layouts = [
        ("lora pp2", 2, &["parallel.pp=2"][..]),
        (
            "lora dp2×pp2 zero-1",
            4,
            &["parallel.pp=2", "parallel.zero_stage=1"][..],
        ),
    ];
    let want = (&reference, &base_before);
    assert_layouts_match(&data, tmp.path(), &[], want, &layouts);
}

/// Each layout (name, ranks, its sets), run with the `common` sets and micro-batches of 1,
/// equals `want`'s run, and its frozen base comes back whole and equal to `want`'s.
fn assert_layouts_match(
    data: &Path,
    dir: &Path,
    common: &[&str],
    want: (&Run, &Flat),
    layouts: &[(&str, usize, &[&str])],
) {
    let mut base_before = want.1.clone();
    base_before.sort_by(|a, b| a.0.cmp(&b.0));
    for &(what, ranks, extra) in layouts {
        let nproc = format!("parallel.nproc={ranks}");
        let mut sets = common.to_vec();
        sets.push(&nproc);
        sets.extend_from_slice(extra);
        let (got, mut base) = run(data, &dir.join(what), ranks, 1, &sets);
        assert_same_run(what, &got, want.0, 1e-5);
        base.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(base, base_before, "{what}: the frozen base, gathered whole");
        println!("{what}: equals one rank");
    }
}

/// Each adapter pair split the way its base weight is: a column-split base keeps A whole and
/// splits B's rows, a row-split one splits A's columns and keeps B whole.
#[test]
fn lora_under_tensor_and_sequence_parallelism_matches_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    // Two key/value heads, so that they split over two ranks; a learning rate at which the
    // adapters move far from B = 0 within the steps.
    let (kv, lr) = ("model.config.num_key_value_heads=2", "train.lr=1e-2");
    let (reference, base_before) = run(&data, &tmp.path().join("ref"), 1, 1, &[kv, lr]);
    let sp = "parallel.sp_mode=\"megatron\"";
    let layouts = [
        ("lora tp2", 2, &["parallel.tp=2"][..]),
        ("lora tp2 megatron-sp", 2, &["parallel.tp=2", sp][..]),
        // Sequence parallelism: whole weights, each rank a part of every sequence.
        (
            "lora sp2 ulysses",
            2,
            &["parallel.sp=2", "parallel.sp_mode=\"ulysses\""][..],
        ),
        (
            "lora sp2 ring",
            2,
            &["parallel.sp=2", "parallel.sp_mode=\"ring\""][..],
        ),
        (
            "lora dp2×tp2 zero-2",
            4,
            &["parallel.tp=2", "parallel.zero_stage=2"][..],
        ),
    ];
    let want = (&reference, &base_before);
    assert_layouts_match(&data, tmp.path(), &[kv, lr], want, &layouts);
}

/// LoRA on a mixture of experts (every projection, each expert's and the router's too) with
/// the experts split over ranks: each rank holds its experts' frozen weights and adapters, and
/// ep2, dp2×ep2 with ZeRO-2 and ep2 with ZeRO-3 train as one rank does, the base untouched and
/// gathered whole with the adapters for checkpoints.
#[test]
fn lora_on_split_experts_matches_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let moe = [
        "model.config.num_local_experts=4",
        "model.config.num_experts_per_tok=2",
        "model.config.router_aux_loss_coef=0.1",
        "train.lr=1e-2",
    ];
    let (reference, base) = run(&data, &tmp.path().join("ref"), 1, 1, &moe);
    let adapters: Vec<&str> = reference.params.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        adapters.iter().any(|n| n.contains("experts.3.w2.lora_B")),
        "adapters on the experts: {adapters:?}"
    );
    let ep = "parallel.ep=2";
    for (what, ranks, extra) in [
        ("lora ep2", 2, &[ep][..]),
        ("lora dp2×ep2 zero-2", 4, &[ep, "parallel.zero_stage=2"][..]),
        ("lora ep2 zero-3", 2, &[ep, "parallel.zero_stage=3"][..]),
    ] {
        let n = format!("parallel.nproc={ranks}");
        let sets = [&moe[..], &[n.as_str()], extra].concat();
        let (got, got_base) = run(&data, &tmp.path().join(what), ranks, 1, &sets);
        assert_same_run(what, &got, &reference, 1e-5);
        assert!(got_base == base, "{what}: the base");
        println!(
            "{what}: equals one rank, {} adapters, base whole and untouched",
            got.params.len()
        );
    }
}

/// PEFT's `lora_dropout`: the adapters read dropout(x) in training. Masks key off the step, each
/// row's tokens and an element's place in the whole row, so data-parallel, ZeRO, pipeline,
/// recomputing, tensor-parallel (with Megatron-SP) and sequence-parallel layouts train exactly
/// as one rank does, an adapter on the output head's included, and dropout changes what the
/// adapters learn.
#[test]
fn lora_dropout_draws_the_same_masks_in_every_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let (drop, lr) = ("lora.dropout=0.1", "train.lr=1e-2");
    let (reference, _) = run(&data, &tmp.path().join("ref"), 1, 8, &[drop, lr]);
    let (plain, _) = run(&data, &tmp.path().join("plain"), 1, 8, &[lr]);
    // B starts at zero, so the first loss is the base's either way; B's gradient is not.
    let d = (reference.norms[0] - plain.norms[0]).abs() / plain.norms[0];
    println!(
        "dropout 0.1: grad norms {:?}, losses {:?}; without: {:?}, {:?}",
        reference.norms, reference.losses, plain.norms, plain.losses
    );
    assert!(
        d > 1e-3,
        "dropout changed the first gradient norm by only {d:e}"
    );
    let (z2, pp2, n2) = ("parallel.zero_stage=2", "parallel.pp=2", "parallel.nproc=2");
    let recompute = "train.activation_checkpointing=true";
    for (what, ranks, micro, extra) in [
        ("dropout dp2", 2, 4, &[][..]),
        ("dropout dp2 zero-2, micro-batches of 2", 2, 2, &[z2][..]),
        ("dropout pp2", 2, 1, &[pp2, n2][..]),
        (
            "dropout with activation checkpointing",
            1,
            8,
            &[recompute][..],
        ),
    ] {
        let mut sets = vec![drop, lr];
        sets.extend_from_slice(extra);
        let (got, _) = run(&data, &tmp.path().join(what), ranks, micro, &sets);
        assert_same_run(what, &got, &reference, 1e-5);
        println!("{what}: equals one rank");
    }
    // A row-split projection reads a slice of its input's features, a sequence-parallel rank
    // some positions of every row: two key/value heads, one a tensor rank.
    let kv = "model.config.num_key_value_heads=2";
    let (reference, _) = run(&data, &tmp.path().join("ref-kv2"), 1, 8, &[drop, lr, kv]);
    for (what, extra) in [
        ("dropout tp2", &["parallel.tp=2"][..]),
        (
            "dropout tp2 megatron-sp",
            &["parallel.tp=2", "parallel.sp_mode=\"megatron\""][..],
        ),
        (
            "dropout sp2 ulysses",
            &["parallel.sp=2", "parallel.sp_mode=\"ulysses\""][..],
        ),
        (
            "dropout sp2 ring",
            &["parallel.sp=2", "parallel.sp_mode=\"ring\""][..],
        ),
    ] {
        let sets = [&[drop, lr, kv, n2][..], extra].concat();
        let (got, _) = run(&data, &tmp.path().join(what), 2, 8, &sets);
        assert_same_run(what, &got, &reference, 1e-5);
        println!("{what}: equals one rank");
    }
    // An adapter on the (untied) output head alone reads dropped inputs too.
    let head = [
        drop,
        lr,
        kv,
        "model.config.tie_word_embeddings=false",
        "lora.target_modules=[\"lm_head\"]",
    ];
    let (reference, _) = run(&data, &tmp.path().join("ref-head"), 1, 8, &head);
    assert!(reference
        .params
        .iter()
        .any(|(n, _)| n == "lm_head.lora_B.weight"));
    let (undropped, _) = run(&data, &tmp.path().join("head-0"), 1, 8, &head[1..]);
    let d = (reference.norms[0] - undropped.norms[0]).abs() / undropped.norms[0];
    assert!(
        d > 1e-3,
        "dropout on the head changed the first norm by {d:e}"
    );
    for (what, extra) in [
        ("head dropout dp2", &[][..]),
        ("head dropout tp2", &["parallel.tp=2"][..]),
        (
            "head dropout sp2 ring",
            &["parallel.sp=2", "parallel.sp_mode=\"ring\""][..],
        ),
    ] {
        let sets = [&head[..], &[n2], extra].concat();
        let micro = if extra.is_empty() { 4 } else { 8 };
        let (got, _) = run(&data, &tmp.path().join(what), 2, micro, &sets);
        assert_same_run(what, &got, &reference, 1e-5);
        println!("{what}: equals one rank");
    }
}

#[test]
fn lora_loss_falls_below_the_frozen_base() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    // The same 48 batches with the adapters trained (lr 5e-2) and left at zero (lr 0).
    let losses = |lr: &str| -> Vec<f32> {
        let (lr, min) = (format!("train.lr={lr}"), format!("train.min_lr={lr}"));
        let sets = ["train.max_steps=48", &lr, &min, "train.save_every=0"];
        let cfg = lora_config(&data, &tmp.path().join(&lr), &sets);
        let mut t = Trainer::new(cfg, None, Device::Cpu).unwrap();
        (0..48).map(|_| t.train_step().unwrap().0).collect()
    };
    let (trained, frozen) = (losses("5e-2"), losses("0"));
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    let (a, b) = (mean(&trained[40..]), mean(&frozen[40..]));
    println!(
        "LoRA loss over the last 8 of 48 steps: {a:.4} trained vs {b:.4} frozen base (first step {:.4} both)",
        trained[0]
    );
    assert_eq!(
        trained[0], frozen[0],
        "B starts at zero: the first step is the base's"
    );
    assert!(a < b - 0.02, "trained {trained:?}\nfrozen {frozen:?}");
}
