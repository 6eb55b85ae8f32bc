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
use colossal_core::exec::{Executor, GradAccumulator};
use colossal_core::models::{init_all, ModelFamily};
use colossal_core::parallel::pipeline_run::MicroBatch;
use colossal_core::params::Params;
use colossal_core::train::{Engine, Origin, TrainConfig};
use fold::example::{Example, Recipe};
use fold::model::{FoldConfig, FoldCtx, FoldModel};
use rand::SeedableRng;

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/proteins/openfold_test")
}

fn chain_example() -> Example {
    Example::load(
        &shared().join("mmcif/1psm.cif.gz"),
        "A",
        &shared().join("msas/1psm_A/bfd_uniclust_hits.a3m"),
    )
    .unwrap()
}

/// One training example: features masked with `seed` and AlphaFold's weighted loss (backbone
/// FAPE, distogram, masked MSA, pLDDT), its share of a batch of `batch`.
fn example(model: &FoldModel, seed: u64, batch: usize) -> MicroBatch<'static, FoldCtx> {
    let recipe = Recipe {
        max_msa_seqs: 8,
        ..Default::default()
    };
    chain_example()
        .micro_batch(model, &recipe, seed, batch, &Device::Cpu)
        .unwrap()
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
    let mut mb = example(&model, 0, 1);
    // One recycling pass first: the recycling embedder then sees non-zero inputs.
    model.recycle_into(&p, &mut mb.ctx, 1).unwrap();
    let out = model.forward(&p, &mb.ctx).unwrap();
    let whole = (mb.loss_fn)(&out).unwrap().backward().unwrap();
    let mut acc = GradAccumulator::default();
    let exec = Executor {
        activation_checkpointing: true,
    };
    exec.forward_backward(&model, &p, &mb.inputs, &mb.ctx, &*mb.loss_fn, &mut acc)
        .unwrap();
    let (mut worst, mut at) = (0f32, String::new());
    for (name, var) in p.iter() {
        let want = whole
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no whole-graph gradient"));
        let got = acc
            .grads
            .get(name)
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let (d, m) = (max_abs(&(got - want).unwrap()), max_abs(want));
        assert!(d <= 1e-4 * m + 1e-7, "{name}: off by {d} of {m}");
        // Biases that shift every attention logit of a query alike (IPA's pair bias and key
        // bias, the row attention's pair-bias LayerNorm bias) have a true gradient of 0 (softmax
        // ignores the shift): theirs is rounding noise.
        let invariant = [
            "ipa.linear_b.bias",
            "ipa.linear_kv.bias",
            "msa_att_row.layer_norm_z.bias",
        ]
        .iter()
        .any(|s| name.ends_with(s));
        if !invariant {
            assert!(m > 1e-6, "{name}: gradient {m}");
            if d / m > worst {
                (worst, at) = (d / m, name.to_string());
            }
        }
    }
    let n = p.len();
    println!("{n} parameters, every gradient non-zero; block-wise vs whole graph worst relative {worst:e} ({at})");
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

/// The same losses and pre-clip gradient norms at every step, and every parameter at the end.
fn assert_same_run(what: &str, got: &Run, want: &Run) {
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
    let n = want.2.names().len();
    println!("{what}: {n} parameters, worst difference {worst:e}");
}

fn run(n: usize, train: &str, parallel: &str, steps: usize) -> Run {
    run_on(&chain_example(), n, train, parallel, steps, 1)
}

/// `steps` engine steps on `ex` over `n` ranks; with dynamic axial parallelism over `dap` ranks
/// each rank's loss is its 1/dap share.
fn run_on(ex: &Example, n: usize, train: &str, parallel: &str, steps: usize, dap: usize) -> Run {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), train, &format!("nproc = {n}\n{parallel}"));
    let recipe = Recipe {
        max_msa_seqs: 8,
        ..Default::default()
    };
    let mut runs = run_local(n, Duration::from_secs(600), |comm| {
        let comm = (n > 1).then(|| Box::new(comm) as Box<dyn Communicator>);
        let (model, params) = model_and_params();
        let origin = Origin::Whole {
            model: model.clone(),
            params,
        };
        let mut e = Engine::new_rank(cfg.clone(), origin, Device::Cpu, comm)?;
        let mut out: Run = (Vec::new(), Vec::new(), Params::new());
        for step in 0..steps {
            let mine: Vec<usize> = (e.rank()..MICRO).step_by(e.ranks()).collect();
            let (loss, norm, _) = e.step(mine.len(), |i| {
                let seed = (step * MICRO + mine[i]) as u64;
                let mb = ex.micro_batch(&model, &recipe, seed, MICRO * dap, &Device::Cpu);
                mb.map_err(|e| colossal_core::Error::Config(e.to_string()))
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
        assert_same_run(what, &got, &want);
    }
}

#[test]
fn the_losses_fall_as_it_fits_one_chain() {
    let (l, _, _) = run(1, "", "", 30);
    println!("loss: first {:.4}, last {:.4}", l[0], l[l.len() - 1]);
    let tail: f32 = l[25..].iter().sum::<f32>() / 5.0;
    assert!(tail < 0.85 * l[0], "{l:?}");
}

/// OpenFold's own `EvoformerBlock` (tests/data/evoformer_block.safetensors, made by
/// scripts/check/openfold_evoformer.py): its weights load under our names and shapes exactly
/// (no name missing or extra), and our block gives its output streams on masked inputs.
/// The weights an OpenFold fixture holds under every name and shape of `specs`.
fn openfold_params(
    t: &std::collections::HashMap<String, Tensor>,
    specs: &fold::model::specs::Specs,
) -> Params {
    let mut p = Params::new();
    for s in &specs.0 {
        let w = t
            .get(&s.name)
            .unwrap_or_else(|| panic!("OpenFold has no `{}`", s.name));
        assert_eq!(w.dims(), s.shape.as_slice(), "{}", s.name);
        p.insert(s.name.clone(), candle_core::Var::from_tensor(w).unwrap());
    }
    p
}

#[test]
fn an_evoformer_block_equals_openfolds() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/evoformer_block.safetensors");
    let t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let cfg = FoldConfig::tiny();
    let mut specs = fold::model::specs::Specs::default();
    fold::model::evoformer::block_specs(&mut specs, "evoformer.blocks.0", &cfg.evoformer_stack);
    let p = openfold_params(&t, &specs);
    let theirs = t.keys().filter(|k| k.starts_with("evoformer.")).count();
    assert_eq!(
        theirs,
        specs.0.len(),
        "OpenFold's block has parameters we lack"
    );
    let c = fold::model::primitives::Ctx {
        p: &p,
        k: Default::default(),
        chunk: None,
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
        None,
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
/// scripts/check/openfold_structure.py): its weights under our names, and our per-layer backbone
/// frames, final torsion angles and N, Cα, C, O positions equal its.
#[test]
fn structure_module_equals_openfolds() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/structure_module.safetensors");
    let t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let cfg = FoldConfig::tiny().structure_module;
    let mut specs = fold::model::specs::Specs::default();
    fold::model::structure::structure_specs(&mut specs, &cfg);
    let p = openfold_params(&t, &specs);
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
        chunk: None,
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
    // The torsion-angle ResNet, and N, Cα, C, O placed from the final frames and ψ.
    let rel = |a: &Tensor, b: &Tensor| max_abs(&(a - b).unwrap()) / max_abs(b);
    let ea = rel(&out.angles, &t["output.angles"]);
    let eu = rel(&out.unnormalized_angles, &t["output.unnormalized_angles"]);
    let eb = rel(&out.backbone, &t["output.backbone"]);
    println!("torsion angles relative {ea:e} (unnormalised {eu:e}); N, Cα, C, O relative {eb:e}");
    assert!(ea < 1e-5 && eu < 1e-5 && eb < 1e-5, "{ea:e} {eu:e} {eb:e}");
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
        1.0,
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

/// Chunked computation (attention over a few rows at a time, transitions and the outer product
/// mean in row chunks) gives what the whole computation gives.
#[test]
fn chunked_equals_unchunked() {
    let (model, p) = model_and_params();
    let mb = example(&model, 3, 1);
    let whole = model.forward(&p, &mb.ctx).unwrap();
    for chunk in [1, 3, 7] {
        let chunked = FoldModel {
            chunk_size: Some(chunk),
            ..model.clone()
        };
        let out = chunked.forward(&p, &mb.ctx).unwrap();
        let mut worst = 0f32;
        for name in [
            "distogram",
            "masked_msa",
            "frames_trans",
            "backbone",
            "plddt",
        ] {
            let (a, b) = (out.get(name).unwrap(), whole.get(name).unwrap());
            worst = worst.max(max_abs(&(a - b).unwrap()) / max_abs(b));
        }
        println!("chunk {chunk}: worst relative difference {worst:e}");
        assert!(worst < 1e-5, "chunk {chunk}: {worst:e}");
    }
}

/// Dynamic axial parallelism: the MSA and pair streams split over 2 and 4 ranks (and 2 × 2
/// with data parallelism) train as one rank does — losses, gradient norms, every parameter.
/// The chain is cropped to 36 residues so 4 ranks split it evenly; each rank's loss is its
/// 1/N share (every rank computes the heads alike).
#[test]
fn dynamic_axial_parallelism_equals_one_rank() {
    let ex = chain_example().crop(1, 36).unwrap();
    let run = |nproc: usize, dap: usize| -> Run {
        let parallel = match dap {
            1 => String::new(),
            n => format!("sp = {n}\nsp_mode = \"dap\""),
        };
        run_on(&ex, nproc, "", &parallel, STEPS, dap)
    };
    let want = run(1, 1);
    for (what, nproc, dap) in [("dap 2", 2, 2), ("dap 4", 4, 4), ("dp 2 × dap 2", 4, 2)] {
        let got = run(nproc, dap);
        assert_same_run(what, &got, &want);
    }
}
