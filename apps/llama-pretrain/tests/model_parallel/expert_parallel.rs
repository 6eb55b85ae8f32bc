//! A mixture of experts through the trainer: the load-balancing loss counts per micro-batch,
//! so data parallelism equals one rank, and expert parallelism (`parallel.ep`: experts split
//! over data-parallel ranks, tokens exchanged by all-to-all) gives one rank's losses, pre-clip
//! gradient norms and parameters (every expert, gathered by name) at ep 2 and 4, dp2×ep2 and
//! ep2×pp2; the bytes each rank's expert group sends are the rows it moved times the hidden
//! size, as the formula says.

use std::path::Path;
use std::time::Duration;

use super::common::{assert_same_run, flat, prepare, Run};
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

/// Losses, grad norms and whole parameters (world rank 0), and per rank the expert group's
/// bytes and the formula's figure for the rows it moved.
fn run(data: &Path, out: &Path, nproc: usize, extra: &[&str]) -> (Run, Vec<(u64, u64)>) {
    let cfg = layout_config(data, out, &MODEL, nproc, extra);
    let results = run_local(nproc, Duration::from_secs(120), |comm| {
        let comm: Box<dyn Communicator> = Box::new(comm);
        let mut t = Trainer::new_rank(cfg.clone(), None, Device::Cpu, (nproc > 1).then_some(comm))?;
        let mut run = Run::default();
        for _ in 0..STEPS {
            run.step(t.train_step()?);
        }
        let traffic = t
            .expert_traffic()
            .map_or((0, 0), |x| (x.bytes_sent, x.formula_bytes(HIDDEN, 4)));
        run.params = flat(&t.full_params()?);
        // The checkpoint holds every expert, as one rank's does.
        if let Some(dir) = t.save_checkpoint()? {
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
        Ok((run, traffic))
    })
    .unwrap();
    let traffic = results.iter().map(|(_, t)| *t).collect();
    (results.into_iter().next().unwrap().0, traffic)
}

#[test]
fn expert_parallel_layouts_match_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let (reference, _) = run(&data, &tmp.path().join("ref"), 1, &[]);
    assert!(
        reference
            .params
            .iter()
            .any(|(n, _)| n.contains("experts.3.w2")),
        "a Mixtral model"
    );
    let layouts: [(&str, usize, &[&str]); 5] = [
        ("dp2", 2, &[]),
        ("ep2", 2, &["parallel.ep=2"]),
        ("ep4", 4, &["parallel.ep=4"]),
        ("dp2×ep2", 4, &["parallel.ep=2"]),
        ("ep2×pp2", 4, &["parallel.ep=2", "parallel.pp=2"]),
    ];
    for (what, nproc, extra) in layouts {
        let out = tmp.path().join(what);
        let (got, traffic) = run(&data, &out, nproc, extra);
        assert_same_run(what, &got, &reference, 1e-5);
        for (rank, (bytes, formula)) in traffic.iter().enumerate() {
            println!("{what} rank {rank}: expert all-to-all {bytes} bytes over {STEPS} steps (formula {formula})");
            assert_eq!(bytes, formula, "{what} rank {rank}: bytes vs formula");
        }
    }
    // Expert capacity drops the same slots wherever the experts live.
    let cap = "model.config.capacity_factor=1.0";
    let (reference, _) = run(&data, &tmp.path().join("ref-cap"), 1, &[cap]);
    for (what, nproc, extra) in [
        ("capacity 1.0, ep2", 2, &[cap, "parallel.ep=2"]),
        ("capacity 1.0, ep4", 4, &[cap, "parallel.ep=4"]),
    ] {
        let (got, _) = run(&data, &tmp.path().join(what), nproc, extra);
        assert_same_run(what, &got, &reference, 1e-5);
    }
}
