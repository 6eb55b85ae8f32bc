//! The UNet on the engine: its blocks carry the skips and the time embedding, so block-wise
//! backward (with and without activation checkpointing) gives whole-graph gradients, and
//! DP 2, ZeRO-2, ZeRO-3 with disk offload and checkpointing, and PP 2 train it with one
//! rank's losses, gradient norms and parameters (every name) over three steps — also with the
//! text encoder training in front of the UNet (its blocks first, its hidden states a stream).
//! The diffusers folder layout round-trips through the engine's checkpoint.

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
use diffusion::clip::{ClipTextModel, ClipTokenizer};
use diffusion::unet::{Text, UNet, UNetCtx, TEXT_PREFIX};

const MICRO: usize = 4;
const STEPS: usize = 3;

fn load() -> (UNet, Params) {
    UNet::load(&fixture().join("unet"), DType::F32, &Device::Cpu).unwrap()
}

/// The UNet with sd_tiny's text encoder training in front of it: one parameter set.
fn load_joint() -> (UNet, Params) {
    let (unet, mut p) = load();
    let dir = fixture().join("text_encoder");
    let (clip, cp) = ClipTextModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
    for (name, v) in cp.iter() {
        p.insert(format!("{TEXT_PREFIX}{name}"), v.clone());
    }
    (unet.with_text_encoder(clip), p)
}

/// Token ids (1, 77) of one of two captions.
fn caption_ids(k: usize) -> Tensor {
    let tok = ClipTokenizer::from_dir(&fixture().join("tokenizer")).unwrap();
    let ids = tok.encode(["a photo of sks dog", "a drawing of a red cat"][k]);
    Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap()
}

/// Micro-batch `mb` of step `step`: one noisy latent from the fixture's training pair, its
/// timestep and text row, and its ε target; the loss is its share of the global batch's MSE.
fn batch(t: &HashMap<String, Tensor>, step: usize, mb: usize) -> MicroBatch<'static, UNetCtx> {
    batch_with(t, step, mb, false)
}

/// [`batch`]; `ids`: the caption's token ids instead of the fixture's hidden states (for a
/// UNet training its text encoder).
fn batch_with(
    t: &HashMap<String, Tensor>,
    step: usize,
    mb: usize,
    ids: bool,
) -> MicroBatch<'static, UNetCtx> {
    let k = (step * MICRO + mb) % 2;
    let shift = (step * MICRO + mb) as f64 * 0.05;
    let x = t["train.noisy"]
        .narrow(0, k, 1)
        .unwrap()
        .affine(1.0, shift)
        .unwrap();
    let target = t["train.noise"].narrow(0, k, 1).unwrap();
    let text = match ids {
        true => Text::Ids(caption_ids(k)),
        false => Text::Hidden(t["encoder_hidden_states"].narrow(0, k, 1).unwrap()),
    };
    let ctx = UNetCtx {
        text,
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
    let Text::Hidden(text) = &mb.ctx.text else {
        unreachable!()
    };
    let whole = {
        let pred = unet
            .forward(&p, mb.inputs.get("x").unwrap(), &mb.ctx.t, text)
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
    run_with(n, train, parallel, false)
}

/// [`run`]; `joint`: the text encoder trains too.
fn run_with(n: usize, train: &str, parallel: &str, joint: bool) -> Run {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), train, &format!("nproc = {n}\n{parallel}"));
    let t = tensors();
    let mut runs = run_local(n, Duration::from_secs(300), |comm| {
        let comm = (n > 1).then(|| Box::new(comm) as Box<dyn Communicator>);
        let (model, params) = if joint { load_joint() } else { load() };
        let mut e = Engine::new_rank(
            cfg.clone(),
            Origin::Whole { model, params },
            Device::Cpu,
            comm,
        )?;
        let mut out: Run = (Vec::new(), Vec::new(), Params::new());
        for step in 0..STEPS {
            let mine: Vec<usize> = (e.rank()..MICRO).step_by(e.ranks()).collect();
            let (loss, norm, _) =
                e.step(mine.len(), |i| Ok(batch_with(&t, step, mine[i], joint)))?;
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

/// The text encoder in front of the UNet: block-wise gradients (its blocks add the `text`
/// stream every cross-attention reads) equal whole-graph backward through CLIP and the UNet,
/// every CLIP parameter's is non-zero, and DP 2 with ZeRO-2, and ZeRO-3 with CPU offload and
/// checkpointing, train it as one rank does.
#[test]
fn the_text_encoder_trains_with_the_unet_on_the_engine() {
    let (unet, p) = load_joint();
    let clip = unet.text_encoder.clone().unwrap();
    let t = tensors();
    let mb = batch_with(&t, 0, 0, true);
    let whole = {
        let Text::Ids(ids) = &mb.ctx.text else {
            unreachable!()
        };
        let (text, _) = clip.forward(&p, ids).unwrap();
        let x = mb.inputs.get("x").unwrap();
        let pred = unet.forward(&p, x, &mb.ctx.t, &text).unwrap();
        (mb.loss_fn)(&Acts::one("pred", pred))
            .unwrap()
            .backward()
            .unwrap()
    };
    let exec = Executor {
        activation_checkpointing: true,
    };
    let mut acc = GradAccumulator::default();
    exec.forward_backward(&unet, &p, &mb.inputs, &mb.ctx, &*mb.loss_fn, &mut acc)
        .unwrap();
    let (mut text_params, mut worst) = (0, 0f32);
    for (name, var) in p.iter() {
        let want = whole.get(var.as_tensor()).unwrap();
        let got = acc
            .grads
            .get(name)
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let (d, m) = (max_abs(&(got - want).unwrap()), max_abs(want));
        assert!(d <= 1e-5 * m + 1e-8, "{name}: off by {d} of {m}");
        if name.starts_with(TEXT_PREFIX) {
            text_params += 1;
            assert!(m > 0.0, "{name}: zero gradient");
            // A key bias shifts every score of a query alike, which softmax ignores: its
            // true gradient is 0 and its computed one rounding noise.
            if !name.ends_with("k_proj.bias") {
                worst = worst.max(d / m);
                assert!(m > 1e-6, "{name}: gradient {m}");
            }
        }
    }
    println!("{text_params} text-encoder parameters: block-wise vs whole graph, worst relative {worst:e}");
    assert_eq!(text_params, clip.cfg.param_shapes().len());

    let want = run_with(1, "", "", true);
    for (what, n, train, parallel) in [
        ("joint dp2 zero2", 2, "", "zero_stage = 2"),
        (
            "joint dp2 zero3 cpu offload + ckpt",
            2,
            "activation_checkpointing = true",
            "zero_stage = 3\noffload = \"cpu\"",
        ),
    ] {
        assert_same(what, &run_with(n, train, parallel, true), &want);
    }
    assert!(want.2.names().iter().any(|n| n.starts_with(TEXT_PREFIX)));
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
