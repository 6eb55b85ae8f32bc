//! A mixture of experts through the trainer: the load-balancing loss counts per micro-batch, so
//! data parallelism equals one rank, and expert parallelism (`parallel.ep`: experts split over
//! data-parallel ranks, tokens exchanged by all-to-all) gives one rank's losses, pre-clip gradient
//! norms and parameters (every expert, gathered by name) at ep 2 and 4, dp2×ep2, ep2×pp2, with ZeRO
//! 1–3 (non-expert state sharded over data-parallel ranks, experts' over the ranks holding the same
//! experts; under ZeRO-3 the weights too) and with tensor parallelism over attention, and with
//! sequence parallelism (ulysses, ring: the routing sums meet over the sequence group); the
//! checkpoint's Adam moments are one rank's too. The bytes each rank's expert group sends are the
//! rows it moved times the hidden size, as the formula says.

use std::path::Path;
use std::time::Duration;

use super::common::{assert_same_run, flat, prepare, rel_norm, Flat, Run};
use super::compare::layout_config;
use candle_core::Device;
use colossal_core::dist::{run_local, Communicator};
use colossal_core::train::Trainer;

const STEPS: usize = 4;
const HIDDEN: u64 = 16;

/// 2 layers of 4 experts (top 2), heavy aux and z-loss coefficients so the terms matter; 8
/// micro-batches of 1.
const MODEL: [&str; 10] = [
    "model.config.num_local_experts=4",
    "model.config.num_experts_per_tok=2",
    "model.config.router_aux_loss_coef=0.1",
    "model.config.router_z_loss_coef=0.01",
    "train.batch_size=8",
    "train.micro_batch_size=1",
    "train.lr=1e-3",
    "train.min_lr=1e-4",
    "train.eval_every=1000",
    "train.save_every=1000",
];

/// Per rank: the expert group's bytes, the formula's figure for the rows it moved, and the
/// bytes of Adam moments and of parameters the rank holds.
#[derive(Clone, Copy)]
struct RankFigures {
    bytes: u64,
    formula: u64,
    moments: u64,
    params: u64,
}

/// Losses, grad norms and whole parameters (world rank 0), the checkpoint's Adam moments, and
/// each rank's figures.
fn run(data: &Path, out: &Path, nproc: usize, extra: &[&str]) -> (Run, Flat, Vec<RankFigures>) {
    let cfg = layout_config(data, out, &MODEL, nproc, extra);
    // ZeRO-3 gathers a block's weights again for its backward and recomputes its forward.
    let recomputed = cfg.parallel.zero_stage == 3;
    let results = run_local(nproc, Duration::from_secs(120), |comm| {
        let comm: Box<dyn Communicator> = Box::new(comm);
        let mut t = Trainer::new_rank(cfg.clone(), None, Device::Cpu, (nproc > 1).then_some(comm))?;
        let mut run = Run::default();
        for _ in 0..STEPS {
            run.step(t.train_step()?);
        }
        let (bytes, formula) = t.expert_traffic().map_or((0, 0), |x| {
            (x.bytes_sent, x.formula_bytes(HIDDEN, 4, recomputed))
        });
        let metrics = t.last_step_metrics();
        let held = |k: &str| metrics[k].as_u64().unwrap();
        let figures = RankFigures {
            bytes,
            formula,
            moments: held("mem_optim_bytes"),
            params: held("mem_params_bytes"),
        };
        run.params = flat(&t.full_params()?);
        let mut moments = Flat::new();
        // The checkpoint holds every expert, as one rank's does.
        if let Some(dir) = t.save_checkpoint()? {
            let opt = dir.join(colossal_core::train::OPTIMIZER);
            let file = candle_core::safetensors::load(&opt, &Device::Cpu)?;
            for (name, m) in file {
                moments.push((name, m.flatten_all()?.to_vec1::<f32>()?));
            }
            moments.sort_by(|a, b| a.0.cmp(&b.0));
            let f32 = candle_core::DType::F32;
            let (_, whole) = colossal_core::checkpoint::llama::load_llama(&dir, f32, &Device::Cpu)?;
            let (mut saved, mut held) = (flat(&whole), run.params.clone());
            saved.sort_by(|a, b| a.0.cmp(&b.0));
            held.sort_by(|a, b| a.0.cmp(&b.0));
            assert!(
                saved == held,
                "the checkpoint differs from the gathered weights"
            );
        }
        Ok((run, moments, figures))
    })
    .unwrap();
    let figures = results.iter().map(|(_, _, f)| *f).collect();
    let (run, moments, _) = results.into_iter().next().unwrap();
    (run, moments, figures)
}

/// Losses, grad norms and whole parameters of 2 steps on `nproc` ranks resumed from `from`,
/// and then the validation loss over 3 batches (not a multiple of the ranks).
fn resumed(data: &Path, out: &Path, nproc: usize, extra: &[&str], from: &Path) -> (Run, f64) {
    let extra = [extra, &["train.eval_batches=3"]].concat();
    let cfg = layout_config(data, out, &MODEL, nproc, &extra);
    let mut runs = run_local(nproc, Duration::from_secs(120), |comm| {
        let comm: Box<dyn Communicator> = Box::new(comm);
        let comm = (nproc > 1).then_some(comm);
        let mut t = Trainer::new_rank(cfg.clone(), Some(from), Device::Cpu, comm)?;
        let mut run = Run::default();
        for _ in 0..2 {
            run.step(t.train_step()?);
        }
        let val = t.evaluate()?.expect("a validation split");
        run.params = flat(&t.full_params()?);
        Ok((run, val))
    })
    .unwrap();
    runs.swap_remove(0)
}

/// Every moment of `want` in `got` by name, within `tol` relative to its norm.
fn assert_same_moments(what: &str, got: &Flat, want: &Flat, tol: f32) {
    let names = |f: &Flat| f.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(got), names(want), "{what}: moment names");
    let worst = got
        .iter()
        .zip(want)
        .map(|((n, a), (_, b))| (rel_norm(a, b), n))
        .fold((0f32, ""), |w, (d, n)| if d > w.0 { (d, n) } else { w });
    println!(
        "{what}: {} moments, worst relative difference {:.1e} ({})",
        want.len(),
        worst.0,
        worst.1
    );
    assert!(
        worst.0 <= tol,
        "{what}: moment {} differs by {:e}",
        worst.1,
        worst.0
    );
}

/// `got` is `want`'s run with its checkpoint moments, and every rank's expert group sent the
/// bytes the formula says.
fn assert_layout(what: &str, got: &(Run, Flat, Vec<RankFigures>), want: &(Run, Flat)) {
    assert_same_run(what, &got.0, &want.0, 1e-5);
    assert_same_moments(what, &got.1, &want.1, 1e-4);
    for (rank, f) in got.2.iter().enumerate() {
        let (bytes, formula) = (f.bytes, f.formula);
        println!("{what} rank {rank}: expert all-to-all {bytes} bytes over {STEPS} steps (formula {formula})");
        assert_eq!(bytes, formula, "{what} rank {rank}: bytes vs formula");
    }
}

#[test]
fn expert_parallel_layouts_match_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let (reference, ref_moments, _) = run(&data, &tmp.path().join("ref"), 1, &[]);
    assert!(
        reference
            .params
            .iter()
            .any(|(n, _)| n.contains("experts.3.w2")),
        "a Mixtral model"
    );
    let (ep, zero1, zero2, zero3) = (
        "parallel.ep=2",
        "parallel.zero_stage=1",
        "parallel.zero_stage=2",
        "parallel.zero_stage=3",
    );
    // Elements of the non-expert or expert weights, each weight split in `over` equal
    // zero-padded chunks (ZeRO-3) or all of them as one flat buffer (ZeRO 1–2).
    let count = |experts: bool, over: u64, per_weight: bool| -> u64 {
        let of = |(n, v): &(String, Vec<f32>)| {
            let n = (n.contains(".experts.") == experts) as u64 * v.len() as u64;
            if per_weight {
                n.div_ceil(over)
            } else {
                n
            }
        };
        let sum: u64 = reference.params.iter().map(of).sum();
        if per_weight {
            sum
        } else {
            sum.div_ceil(over)
        }
    };
    let layouts: [(&str, usize, &[&str]); 10] = [
        ("dp2", 2, &[]),
        ("ep2", 2, &[ep]),
        ("ep4", 4, &["parallel.ep=4"]),
        ("dp2×ep2", 4, &[ep]),
        ("ep2×pp2", 4, &[ep, "parallel.pp=2"]),
        // Experts alone on their rank: only the non-expert state is sharded.
        ("ep2 zero-2", 2, &[ep, zero2]),
        // Each expert on two ranks: its state sharded over them.
        ("dp2×ep2 zero-2", 4, &[ep, zero2]),
        ("ep2×pp2 zero-1", 4, &[ep, "parallel.pp=2", zero1]),
        // Weights sharded too: each expert's over the ranks holding it.
        ("ep2 zero-3", 2, &[ep, zero3]),
        ("dp2×ep2 zero-3", 4, &[ep, zero3]),
    ];
    for (what, nproc, extra) in layouts {
        let out = tmp.path().join(what);
        let got = run(&data, &out, nproc, extra);
        assert_layout(what, &got, &(reference.clone(), ref_moments.clone()));
        let figures = got.2;
        // Moments per rank (one stage holds the whole model): 8 bytes an element, the
        // rank's experts (1/ep of them) and every other weight, each sharded under ZeRO
        // over the ranks holding it.
        if !what.contains("pp") {
            let ep = extra.iter().find_map(|s| s.strip_prefix("parallel.ep="));
            let ep: u64 = ep.map_or(1, |e| e.parse().unwrap());
            let zero = extra.iter().any(|s| s.starts_with("parallel.zero_stage"));
            let sharded_weights = extra.contains(&zero3);
            let (over_dense, over_experts) = match zero {
                true => (nproc as u64, nproc as u64 / ep),
                false => (1, 1),
            };
            // Every expert has the same shapes: a rank's 1/ep of them hold 1/ep of the chunks.
            let elements = count(false, over_dense, sharded_weights)
                + match sharded_weights {
                    true => count(true, over_experts, true) / ep,
                    false => (count(true, 1, false) / ep).div_ceil(over_experts),
                };
            let whole = count(false, 1, false) + count(true, 1, false);
            println!(
                "{what}: Adam moments {} bytes a rank, parameters {} (formula {}, {}; one rank {}, {})",
                figures[0].moments,
                figures[0].params,
                8 * elements,
                4 * elements,
                8 * whole,
                4 * whole
            );
            for f in &figures {
                assert_eq!(f.moments, 8 * elements, "{what}: moment bytes a rank");
                if sharded_weights {
                    assert_eq!(f.params, 4 * elements, "{what}: parameter bytes a rank");
                }
            }
        }
    }
    // Sequence parallelism: each rank routes its part of every sequence, and the sums behind
    // the load-balancing and z losses meet over the sequence group.
    let (ulysses, ring) = ("parallel.sp_mode=\"ulysses\"", "parallel.sp_mode=\"ring\"");
    // Experts split over the ranks holding the same weights, sequence ranks too.
    let sp: [(&str, usize, &[&str]); 6] = [
        ("ulysses sp2", 2, &["parallel.sp=2", ulysses]),
        ("ring sp2", 2, &["parallel.sp=2", ring]),
        ("dp2×ring sp2 zero-2", 4, &["parallel.sp=2", ring, zero2]),
        ("ulysses sp2 ep2", 2, &["parallel.sp=2", ulysses, ep]),
        ("dp2×ring sp2 ep2", 4, &["parallel.sp=2", ring, ep]),
        (
            "dp2×ulysses sp2 ep4 zero-3",
            4,
            &["parallel.sp=2", ulysses, "parallel.ep=4", zero3],
        ),
    ];
    for (what, nproc, extra) in sp {
        let got = run(&data, &tmp.path().join(what), nproc, extra);
        assert_layout(what, &got, &(reference.clone(), ref_moments.clone()));
    }
    // A whole checkpoint resumes under ZeRO-3 with experts split (each rank reads it and keeps
    // its chunks of its experts' weights and moments) as on one rank. Evaluation gathers
    // weights and exchanges tokens, so a rank without a batch of its own runs an uncounted one.
    let ckpt = tmp.path().join("ref/checkpoints/step-0000004");
    let (one, one_val) = resumed(&data, &tmp.path().join("resumed"), 1, &[], &ckpt);
    for (what, nproc, extra) in [
        ("resumed at dp2 zero-3", 2, &[zero3][..]),
        ("resumed at ep2 zero-3", 2, &[ep, zero3][..]),
        ("resumed at dp2×ep2 zero-3", 4, &[ep, zero3][..]),
    ] {
        let (got, val) = resumed(&data, &tmp.path().join(what), nproc, extra, &ckpt);
        assert_same_run(what, &got, &one, 1e-5);
        println!("{what}: validation loss {val} (one rank {one_val})");
        assert!(
            (val - one_val).abs() <= 1e-5 * one_val,
            "{what}: validation loss"
        );
    }
    // Tensor parallelism splits attention (two key/value heads, one a rank); the router and
    // experts stay whole on each tensor rank, and ranks at one tensor position form the
    // expert-parallel groups.
    let kv = "model.config.num_key_value_heads=2";
    let (reference, ref_moments, _) = run(&data, &tmp.path().join("ref-kv2"), 1, &[kv]);
    let want = (reference, ref_moments);
    for (what, nproc, extra) in [
        ("tp2", 2, &[kv, "parallel.tp=2"][..]),
        ("tp2×ep2", 4, &[kv, ep, "parallel.tp=2"][..]),
        ("tp2×ep2 zero-1", 4, &[kv, ep, "parallel.tp=2", zero1][..]),
        ("tp2×ep2 zero-3", 4, &[kv, ep, "parallel.tp=2", zero3][..]),
    ] {
        assert_layout(
            what,
            &run(&data, &tmp.path().join(what), nproc, extra),
            &want,
        );
    }
    // 32 experts, top-1, 16 tokens a micro-batch: some expert gets no token on a rank, its
    // gradient is zero there (not absent), and every layout still sums the same gradients.
    let sparse = &[
        "model.config.num_local_experts=32",
        "model.config.num_experts_per_tok=1",
    ][..];
    let (reference, _, _) = run(&data, &tmp.path().join("ref-sparse"), 1, sparse);
    for (what, nproc, extra) in [
        ("unused experts, dp2", 2, &[][..]),
        ("unused experts, dp2 zero-2", 2, &[zero2][..]),
        ("unused experts, ep2", 2, &[ep][..]),
        ("unused experts, dp2×ep2 zero-3", 4, &[ep, zero3][..]),
    ] {
        let extra = [sparse, extra].concat();
        let (got, _, _) = run(&data, &tmp.path().join(what), nproc, &extra);
        assert_same_run(what, &got, &reference, 1e-5);
    }
    // Not implemented, refused by name: expert capacity (which ranks a micro-batch's tokens)
    // over a split sequence.
    let sets = ["parallel.sp=2", ulysses, "model.config.capacity_factor=1.0"];
    let cfg = layout_config(&data, &tmp.path().join("cap-sp"), &MODEL, 2, &sets);
    let err = super::common::assembly_error(&cfg, 2);
    println!("capacity with sp2: {err}");
    assert!(err.contains("parallel.sp = 2 with capacity_factor = 1 is not implemented"));
    // Expert capacity drops the same slots wherever the experts live.
    let cap = "model.config.capacity_factor=1.0";
    let (reference, _, _) = run(&data, &tmp.path().join("ref-cap"), 1, &[cap]);
    for (what, nproc, extra) in [
        ("capacity 1.0, ep2", 2, &[cap, "parallel.ep=2"]),
        ("capacity 1.0, ep4", 4, &[cap, "parallel.ep=4"]),
    ] {
        let (got, _, _) = run(&data, &tmp.path().join(what), nproc, extra);
        assert_same_run(what, &got, &reference, 1e-5);
    }
}
