//! The UNet on the engine: its blocks carry the skips and the time embedding, so block-wise
//! backward (with and without activation checkpointing) gives whole-graph gradients, and
//! DP 2, ZeRO-2, ZeRO-3 with disk offload and checkpointing, and PP 2 train it with one
//! rank's losses, gradient norms and parameters (every name) over three steps. The diffusers
//! folder layout round-trips through the engine's checkpoint.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use colossal_core::dist::{run_local, Communicator};
use colossal_core::exec::{Acts, Executor, GradAccumulator, LossFn};
use colossal_core::models::ModelFamily;
use colossal_core::parallel::pipeline_run::MicroBatch;
use colossal_core::params::Params;
use colossal_core::train::{Engine, Origin, TrainConfig};
use common::{fixture, max_abs, tensors};
use diffusion::unet::{UNet, UNetCtx};

const MICRO: usize = 4;
const STEPS: usize = 3;

fn load() -> (UNet, Params) {
    UNet::load(&fixture().join("unet"), DType::F32, &Device::Cpu).unwrap()
}

/// Micro-batch `mb` of step `step`: one noisy latent from the fixture's training pair, its
/// timestep and text row, and its ε target; the loss is its share of the global batch's MSE.
fn batch(t: &HashMap<String, Tensor>, step: usize, mb: usize) -> MicroBatch<'static, UNetCtx> {
    let k = (step * MICRO + mb) % 2;
    let shift = (step * MICRO + mb) as f64 * 0.05;
    let x = t["train.noisy"]
        .narrow(0, k, 1)
        .unwrap()
        .affine(1.0, shift)
        .unwrap();
    let target = t["train.noise"].narrow(0, k, 1).unwrap();
    let ctx = UNetCtx {
        text: t["encoder_hidden_states"].narrow(0, k, 1).unwrap(),
        t: vec![[100.0, 700.0][k] + step as f64],
    };
    let n = (MICRO * target.elem_count()) as f64;
    let loss_fn: Box<LossFn<'static>> =
        Box::new(move |out: &Acts| Ok(((out.get("pred")? - &target)?.sqr()?.sum_all()? / n)?));
    MicroBatch {
        inputs: Acts::one("x", x),
        ctx,
        loss_fn,
    }
}

#[test]
fn blockwise_gradients_equal_whole_graph_backward() {
    let (unet, p) = load();
    let t = tensors();
    let mb = batch(&t, 0, 0);
    let whole = {
        let pred = unet
            .forward(&p, mb.inputs.get("x").unwrap(), &mb.ctx.t, &mb.ctx.text)
            .unwrap();
        (mb.loss_fn)(&Acts::one("pred", pred))
            .unwrap()
            .backward()
            .unwrap()
    };
    for checkpointing in [false, true] {
        let exec = Executor {
            activation_checkpointing: checkpointing,
        };
        let mut acc = GradAccumulator::default();
        exec.forward_backward(&unet, &p, &mb.inputs, &mb.ctx, &*mb.loss_fn, &mut acc)
            .unwrap();
        for (name, var) in p.iter() {
            let want = whole.get(var.as_tensor()).unwrap();
            let got = acc
                .grads
                .get(name)
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            let d: f32 = max_abs(&(got - want).unwrap());
            let m: f32 = max_abs(want);
            // Biases just before a GroupNorm have no true gradient (the norm removes a
            // per-channel shift): theirs is rounding noise, compared absolutely.
            assert!(
                d <= 1e-5 * m + 1e-8,
                "{name} (checkpointing {checkpointing}): off by {d} of {m}"
            );
        }
    }
}

fn config(out: &Path, train: &str, parallel: &str) -> TrainConfig {
    let text = format!(
        "[train]\nout_dir = \"{}\"\nbatch_size = {MICRO}\nmicro_batch_size = 1\nmax_steps = {STEPS}\n\
         lr = 1e-3\nschedule = \"constant\"\nweight_decay = 0.01\ngrad_clip = 1.0\neps = 1e-6\n{train}\n[parallel]\n{parallel}\n",
        out.display()
    );
    toml::from_str(&text).unwrap()
}

type Run = (Vec<f32>, Vec<f64>, Params);

fn run(n: usize, train: &str, parallel: &str) -> Run {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), train, &format!("nproc = {n}\n{parallel}"));
    let t = tensors();
    let mut runs = run_local(n, Duration::from_secs(300), |comm| {
        let comm = (n > 1).then(|| Box::new(comm) as Box<dyn Communicator>);
        let (model, params) = load();
        let mut e = Engine::new_rank(
            cfg.clone(),
            Origin::Whole { model, params },
            Device::Cpu,
            comm,
        )?;
        let mut out: Run = (Vec::new(), Vec::new(), Params::new());
        for step in 0..STEPS {
            let mine: Vec<usize> = (e.rank()..MICRO).step_by(e.ranks()).collect();
            let (loss, norm, _) = e.step(mine.len(), |i| Ok(batch(&t, step, mine[i])))?;
            out.0.push(loss);
            out.1.push(norm);
        }
        out.2 = e.full_params()?;
        Ok(out)
    })
    .unwrap();
    runs.swap_remove(0)
}

fn assert_same(what: &str, got: &Run, want: &Run) {
    for s in 0..STEPS {
        let (l, lw, g, gw) = (got.0[s], want.0[s], got.1[s], want.1[s]);
        println!("{what} step {s}: loss {l:.7} vs {lw:.7}, grad norm {g:.7} vs {gw:.7}");
        assert!(
            (l - lw).abs() <= 1e-6 * lw.abs().max(1.0),
            "{what}: loss at step {s}"
        );
        assert!((g - gw).abs() <= 1e-5 * gw, "{what}: grad norm at step {s}");
    }
    let (a, b) = (got.2.names(), want.2.names());
    assert_eq!(a.len(), b.len(), "{what}: parameter count");
    for name in b {
        let d: f32 = max_abs(&(got.2.get(name).unwrap() - want.2.get(name).unwrap()).unwrap());
        assert!(d <= 1e-5, "{what}: {name} differs by {d}");
    }
}

#[test]
fn the_unet_trains_alike_in_every_parallel_layout() {
    let want = run(1, "", "");
    let ckpt = "activation_checkpointing = true";
    for (what, n, train, parallel) in [
        ("dp2", 2, "", "dp = 2"),
        ("dp2 zero2", 2, "", "zero_stage = 2"),
        (
            "dp2 zero3 disk offload + ckpt",
            2,
            ckpt,
            "zero_stage = 3\noffload = \"disk\"",
        ),
        ("pp2 1f1b", 2, "", "pp = 2\npp_schedule = \"1f1b\""),
    ] {
        assert_same(what, &run(n, train, parallel), &want);
    }
}

#[test]
fn a_trained_unet_saves_as_a_diffusers_folder_that_loads_back() {
    let (unet, p) = load();
    let tmp = tempfile::tempdir().unwrap();
    unet.save(tmp.path(), &p, usize::MAX).unwrap();
    assert!(tmp
        .path()
        .join("diffusion_pytorch_model.safetensors")
        .exists());
    let (again, q) = UNet::load(tmp.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(again.param_shapes(), unet.param_shapes());
    for (name, v) in p.iter() {
        let d: f32 = max_abs(&(v.as_tensor() - q.get(name).unwrap()).unwrap());
        assert_eq!(d, 0.0, "{name}");
    }
    // Sharded, as diffusers writes large models.
    let sharded = tmp.path().join("sharded");
    unet.save(&sharded, &p, 1 << 20).unwrap();
    assert!(sharded
        .join("diffusion_pytorch_model.safetensors.index.json")
        .exists());
    let (_, r) = UNet::load(&sharded, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(r.names().len(), p.names().len());
}
