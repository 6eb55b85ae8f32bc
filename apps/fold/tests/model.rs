//! The model (Evoformer, structure module, heads) on the engine, on a real chain (1psm A: 38
//! residues, its BFD MSA and its NMR structure): block-wise backward (with checkpointing) gives
//! whole-graph gradients and every parameter gets one; data parallelism with ZeRO-2, and ZeRO-3
//! with CPU offload and checkpointing, train it as one rank does (losses, gradient norms, every
//! parameter); the loss falls as it fits the chain. An Evoformer block and the structure module
//! equal OpenFold's own modules on fixtures they made; FAPE and lDDT by hand on three residues.

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{Device, Tensor};
use colossal_core::dist::{run_local, Communicator};
use colossal_core::exec::{Acts, Executor, GradAccumulator, LossFn};
use colossal_core::models::{init_all, ModelFamily};
use colossal_core::parallel::pipeline_run::MicroBatch;
use colossal_core::params::Params;
use colossal_core::train::{Engine, Origin, TrainConfig};
use fold::features::{self, Masking};
use fold::model::{FoldConfig, FoldCtx, FoldModel};
use fold::superpose::Vec3;
use rand::SeedableRng;

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/proteins/openfold_test")
}

fn chain() -> fold::pdb::Chain {
    let chains = fold::mmcif::read(&shared().join("mmcif/1psm.cif.gz")).unwrap();
    chains.into_iter().find(|c| c.id == "A").unwrap()
}

/// The chain's Cβ (Cα for glycine), as the distogram's targets use.
fn pseudo_beta() -> Vec<Vec3> {
    let a = chain();
    let atom = |r: &fold::pdb::Residue| if r.name == "GLY" { "CA" } else { "CB" };
    a.residues
        .iter()
        .map(|r| r.atom(atom(r)).unwrap().xyz)
        .collect()
}

/// The chain's backbone frames.
fn frames() -> (Tensor, Tensor) {
    let a = chain();
    let at = |n: &str| -> Vec<Vec3> { a.residues.iter().map(|r| r.atom(n).unwrap().xyz).collect() };
    fold::loss::true_frames(&at("N"), &at("CA"), &at("C"), &Device::Cpu).unwrap()
}

/// One training example: masked features (a seed per step) and the loss backbone FAPE +
/// 0.3 · distogram + 2 · masked MSA (AlphaFold's weights), its share of a batch of `batch`.
fn example(model: &FoldModel, seed: u64, batch: usize) -> MicroBatch<'static, FoldCtx> {
    let msa = fold::msa::read(&shared().join("msas/1psm_A/bfd_uniclust_hits.a3m")).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let f = features::make(
        &msa,
        8,
        Some(&Masking { fraction: 0.15 }),
        &mut rng,
        &Device::Cpu,
    )
    .unwrap();
    let bins = model.cfg.heads.distogram_bins;
    let targets = fold::loss::distogram_targets(&pseudo_beta(), bins, &Device::Cpu).unwrap();
    let mask = Tensor::ones(f.aatype.len(), candle_core::DType::F32, &Device::Cpu).unwrap();
    let (true_msa, bert) = (f.true_msa.clone(), f.bert_mask.clone());
    let (rots, trans) = frames();
    let loss_fn: Box<LossFn<'static>> = Box::new(move |out: &Acts| {
        let d = fold::loss::distogram_loss(out.get("distogram")?, &targets, &mask)?;
        let m = fold::loss::masked_msa_loss(out.get("masked_msa")?, &true_msa, &bert)?;
        let fape = fold::loss::backbone_fape(
            out.get("frames_rot")?,
            out.get("frames_trans")?,
            &rots,
            &trans,
            &mask,
        )?;
        Ok(((((d * 0.3)? + (m * 2.0)?)? + fape)? / batch as f64)?)
    });
    MicroBatch {
        inputs: Acts::new(),
        ctx: FoldCtx::of(&f),
        loss_fn,
    }
}

/// A fresh model whose every weight is perturbed off AlphaFold's zero initialisations (which
/// start residual branches as the identity and so hold back some gradients at step 0).
fn model_and_params() -> (FoldModel, Params) {
    let model = FoldModel::new(FoldConfig::tiny()).unwrap();
    let p = init_all(&model.param_specs(), 7, &Device::Cpu).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    for (_, v) in p.iter() {
        let t = v.as_tensor();
        let noise: Vec<f32> = (0..t.elem_count())
            .map(|_| rand::Rng::random_range(&mut rng, -0.05f32..0.05))
            .collect();
        let noise = Tensor::from_vec(noise, t.dims(), &Device::Cpu).unwrap();
        v.set(&(t + noise).unwrap()).unwrap();
    }
    (model, p)
}

fn max_abs(x: &Tensor) -> f32 {
    x.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

#[test]
fn blockwise_gradients_equal_whole_graph_and_reach_every_parameter() {
    let (model, p) = model_and_params();
    let mb = example(&model, 0, 1);
    let out = model.forward(&p, &mb.ctx).unwrap();
    let whole = (mb.loss_fn)(&out).unwrap().backward().unwrap();
    let mut acc = GradAccumulator::default();
    let exec = Executor {
        activation_checkpointing: true,
    };
    exec.forward_backward(&model, &p, &mb.inputs, &mb.ctx, &*mb.loss_fn, &mut acc)
        .unwrap();
    let mut worst = 0f32;
    for (name, var) in p.iter() {
        let want = whole
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no whole-graph gradient"));
        let got = acc
            .grads
            .get(name)
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let (d, m) = (max_abs(&(got - want).unwrap()), max_abs(want));
        assert!(m > 0.0, "{name}: zero gradient");
        assert!(d <= 1e-4 * m + 1e-7, "{name}: off by {d} of {m}");
        worst = worst.max(d / m);
    }
    println!("{} parameters, every gradient non-zero; block-wise vs whole graph worst relative {worst:e}", p.len());
}

const STEPS: usize = 3;
const MICRO: usize = 2;

fn config(out: &Path, train: &str, parallel: &str) -> TrainConfig {
    let text = format!(
        "[train]\nout_dir = \"{}\"\nbatch_size = {MICRO}\nmicro_batch_size = 1\nmax_steps = {STEPS}\n\
         lr = 1e-3\nschedule = \"constant\"\ngrad_clip = 1.0\neps = 1e-6\n{train}\n[parallel]\n{parallel}\n",
        out.display()
    );
    toml::from_str(&text).unwrap()
}

type Run = (Vec<f32>, Vec<f64>, Params);

fn run(n: usize, train: &str, parallel: &str, steps: usize) -> Run {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), train, &format!("nproc = {n}\n{parallel}"));
    let mut runs = run_local(n, Duration::from_secs(600), |comm| {
        let comm = (n > 1).then(|| Box::new(comm) as Box<dyn Communicator>);
        let (model, params) = model_and_params();
        let mut e = Engine::new_rank(
            cfg.clone(),
            Origin::Whole {
                model: model.clone(),
                params,
            },
            Device::Cpu,
            comm,
        )?;
        let mut out: Run = (Vec::new(), Vec::new(), Params::new());
        for step in 0..steps {
            let mine: Vec<usize> = (e.rank()..MICRO).step_by(e.ranks()).collect();
            let (loss, norm, _) = e.step(mine.len(), |i| {
                Ok(example(&model, (step * MICRO + mine[i]) as u64, MICRO))
            })?;
            out.0.push(loss);
            out.1.push(norm);
        }
        out.2 = e.full_params()?;
        Ok(out)
    })
    .unwrap();
    runs.swap_remove(0)
}

#[test]
fn the_evoformer_trains_alike_in_every_parallel_layout() {
    let want = run(1, "", "", STEPS);
    for (what, n, train, parallel) in [
        ("dp2 zero2", 2, "", "zero_stage = 2"),
        (
            "dp2 zero3 cpu offload + ckpt",
            2,
            "activation_checkpointing = true",
            "zero_stage = 3\noffload = \"cpu\"",
        ),
    ] {
        let got = run(n, train, parallel, STEPS);
        for s in 0..STEPS {
            let (l, lw, g, gw) = (got.0[s], want.0[s], got.1[s], want.1[s]);
            println!("{what} step {s}: loss {l:.7} vs {lw:.7}, grad norm {g:.7} vs {gw:.7}");
            assert!(
                (l - lw).abs() <= 1e-5 * lw.abs().max(1.0),
                "{what}: loss at step {s}"
            );
            assert!((g - gw).abs() <= 1e-4 * gw, "{what}: grad norm at step {s}");
        }
        assert_eq!(got.2.names().len(), want.2.names().len());
        let mut worst = 0f32;
        for name in want.2.names() {
            let d = max_abs(&(got.2.get(name).unwrap() - want.2.get(name).unwrap()).unwrap());
            worst = worst.max(d);
            assert!(d <= 1e-5, "{what}: {name} differs by {d}");
        }
        println!(
            "{what}: {} parameters, worst difference {worst:e}",
            want.2.names().len()
        );
    }
}

#[test]
fn the_losses_fall_as_it_fits_one_chain() {
    let (l, _, _) = run(1, "", "", 30);
    println!("loss: first {:.4}, last {:.4}", l[0], l[l.len() - 1]);
    let tail: f32 = l[25..].iter().sum::<f32>() / 5.0;
    assert!(tail < 0.8 * l[0], "{l:?}");
}

/// OpenFold's own `EvoformerBlock` (tests/data/evoformer_block.safetensors, made by
/// scripts/check/openfold_evoformer.py): its weights load under our names and shapes exactly
/// (no name missing or extra), and our block gives its output streams on masked inputs.
#[test]
fn an_evoformer_block_equals_openfolds() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/evoformer_block.safetensors");
    let t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let cfg = FoldConfig::tiny();
    let mut specs = fold::model::specs::Specs::default();
    fold::model::evoformer::block_specs(&mut specs, "evoformer.blocks.0", &cfg.evoformer_stack);
    let mut p = Params::new();
    for s in &specs.0 {
        let w = t
            .get(&s.name)
            .unwrap_or_else(|| panic!("OpenFold has no `{}`", s.name));
        assert_eq!(w.dims(), s.shape.as_slice(), "{}", s.name);
        p.insert(s.name.clone(), candle_core::Var::from_tensor(w).unwrap());
    }
    let theirs = t.keys().filter(|k| k.starts_with("evoformer.")).count();
    assert_eq!(
        theirs,
        specs.0.len(),
        "OpenFold's block has parameters we lack"
    );
    let c = fold::model::primitives::Ctx {
        p: &p,
        k: Default::default(),
    };
    let masks = fold::model::evoformer::Masks {
        msa: &t["input.msa_mask"],
        pair: &t["input.pair_mask"],
    };
    let (m, z) = fold::model::evoformer::block(
        &c,
        "evoformer.blocks.0",
        &cfg.evoformer_stack,
        &t["input.m"],
        &t["input.z"],
        &masks,
    )
    .unwrap();
    let rel = |a: &Tensor, b: &Tensor| max_abs(&(a - b).unwrap()) / max_abs(b);
    let (em, ez) = (rel(&m, &t["output.m"]), rel(&z, &t["output.z"]));
    println!(
        "{} parameters by OpenFold's names; m relative error {em:e}, z {ez:e}",
        specs.0.len()
    );
    assert!(em < 1e-5 && ez < 1e-5, "m {em:e}, z {ez:e}");
}

/// OpenFold's own `StructureModule` (tests/data/structure_module.safetensors, made by
/// scripts/check/openfold_structure.py): its weights (all but the torsion-angle ResNet, which
/// the frames do not depend on) under our names, and our per-layer backbone frames equal its.
#[test]
fn structure_module_equals_openfolds() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/structure_module.safetensors");
    let t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let cfg = FoldConfig::tiny().structure_module;
    let mut specs = fold::model::specs::Specs::default();
    fold::model::structure::structure_specs(&mut specs, &cfg);
    let mut p = Params::new();
    for s in &specs.0 {
        let w = t
            .get(&s.name)
            .unwrap_or_else(|| panic!("OpenFold has no `{}`", s.name));
        assert_eq!(w.dims(), s.shape.as_slice(), "{}", s.name);
        p.insert(s.name.clone(), candle_core::Var::from_tensor(w).unwrap());
    }
    assert_eq!(
        t.keys()
            .filter(|k| k.starts_with("structure_module."))
            .count(),
        specs.0.len()
    );
    let aatype: Vec<u32> = t["input.aatype"]
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&a| a as u32)
        .collect();
    let c = fold::model::primitives::Ctx {
        p: &p,
        k: Default::default(),
    };
    let out = fold::model::structure::structure_module(
        &c,
        &cfg,
        &t["input.single"],
        &t["input.pair"],
        &aatype,
        &t["input.mask"],
    )
    .unwrap();
    let frames = &t["output.frames"]; // (L, R, 7): quaternion, translation
    let layers = frames.dim(0).unwrap();
    let (mut er, mut et) = (0f32, 0f32);
    for l in 0..layers {
        let f = frames.get(l).unwrap();
        let rot = fold::model::rigid::quat_to_rot(&f.narrow(1, 0, 4).unwrap()).unwrap();
        er = er.max(max_abs(&(out.rots.get(l).unwrap() - rot).unwrap()));
        let tr = f.narrow(1, 4, 3).unwrap();
        et = et.max(max_abs(&(out.trans.get(l).unwrap() - &tr).unwrap()) / max_abs(&tr));
    }
    println!(
        "structure module, {layers} layers: rotations within {er:e}, translations relative {et:e}"
    );
    assert!(
        er < 1e-5 && et < 1e-5,
        "rotations {er:e}, translations {et:e}"
    );
}

/// FAPE and lDDT on three residues, worked by hand. Frames all identity-rotated at Cα (0,0,0),
/// (3.8,0,0), (7.6,0,0); the prediction moves the third by 1 Å along y (frame and atom). Seen
/// from frames 0 and 1, atom 2 is 1 Å off; from frame 2, atoms 0 and 1 are: four errors of 1 Å
/// and five of 0 among the nine pairs, each √(d² + 10⁻⁴), over 10 Å, averaged with the (3 + ε)²
/// denominator. lDDT-Cα: the prediction moves atom 2 by 3 Å along y; distances 0–1 keep all four
/// tolerances, 1–2 (3.8 → 4.842) two, 0–2 (7.6 → 8.171) three: (2·1 + 2·½ + 2·¾)/6 = 0.75.
#[test]
fn fape_and_lddt_by_hand() {
    let dev = Device::Cpu;
    let eye = Tensor::eye(3, candle_core::DType::F32, &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .repeat((3, 1, 1))
        .unwrap();
    let t_true = Tensor::new(&[[0f32, 0.0, 0.0], [3.8, 0.0, 0.0], [7.6, 0.0, 0.0]], &dev).unwrap();
    let t_pred = Tensor::new(&[[0f32, 0.0, 0.0], [3.8, 0.0, 0.0], [7.6, 1.0, 0.0]], &dev).unwrap();
    let mask = Tensor::ones(3, candle_core::DType::F32, &dev).unwrap();
    let fape = fold::loss::backbone_fape(
        &eye.unsqueeze(0).unwrap(),
        &t_pred.unsqueeze(0).unwrap(),
        &eye,
        &t_true,
        &mask,
    )
    .unwrap()
    .to_scalar::<f32>()
    .unwrap() as f64;
    let by_hand =
        (4.0 * (1.0f64 + 1e-4).sqrt() + 5.0 * 1e-4f64.sqrt()) / 10.0 / (3.0f64 + 1e-4).powi(2);
    println!("FAPE {fape} vs by hand {by_hand}");
    assert!((fape - by_hand).abs() < 1e-6);
    let r = [[0.0, 0.0, 0.0], [3.8, 0.0, 0.0], [7.6, 0.0, 0.0]];
    let p = [[0.0, 0.0, 0.0], [3.8, 0.0, 0.0], [7.6, 3.0, 0.0]];
    let lddt = fold::metrics::lddt(&p, &r, 15.0);
    println!("lDDT-Cα {lddt} vs by hand 0.75");
    assert!((lddt - 0.75).abs() < 1e-9);
}
