//! Parity with `shared/fixtures/llama_tiny` (transformers 4.57, float32).
mod common;

use candle_core::{DType, Device, Tensor};
use colossal_core::checkpoint::llama::{load_llama, save_llama};
use colossal_core::exec::{Executor, GradAccumulator};
use colossal_core::models::llama::Kernels;
use colossal_core::models::llama::{generate, AttnInputs, GenerateOptions, Llama, Sampling};
use colossal_core::optim::{clip_grad_norm, AdamW, AdamWConfig};
use colossal_core::params::Params;
use colossal_core::train::lm_loss;
use common::*;
use serde_json::Value;

struct Fixture {
    reference: Value,
    tensors: std::collections::HashMap<String, Tensor>,
}

fn fixture_data() -> Fixture {
    let dir = fixture("llama_tiny");
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let tensors = load_tensors(&dir.join("reference.safetensors"));
    Fixture { reference, tensors }
}

fn check_forward(model_dir: &str) {
    for kernels in [Kernels::Fused, Kernels::Reference] {
        check_forward_with(model_dir, kernels);
    }
}

fn check_forward_with(model_dir: &str, kernels: Kernels) {
    let f = fixture_data();
    let (model, params) = load_llama(&fixture(model_dir), DType::F32, &Device::Cpu).unwrap();
    let model = model.with_kernels(kernels);
    let (ids, inp, targets, mask) = lm_batch(&model, &f.reference);
    let logits = model.forward(&params, &ids, &inp).unwrap();
    let e = assert_close(
        "logits",
        &masked(&logits, &mask),
        &masked(&f.tensors["logits"], &mask),
        1e-4,
    );
    println!("{model_dir} ({kernels}): logits rel err {e:e}");
    let loss = lm_loss(kernels, &logits, &targets, 26.0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let want = f.reference["loss"].as_f64().unwrap() as f32;
    println!("{model_dir} ({kernels}): loss {loss} (reference {want})");
    assert!((loss - want).abs() <= 1e-5, "loss {loss} vs {want}");
}

#[test]
fn logits_and_loss_match_single_file() {
    check_forward("llama_tiny/model");
}

#[test]
fn logits_and_loss_match_sharded() {
    check_forward("llama_tiny/model_sharded");
    let (_, a) = load_llama(&fixture("llama_tiny/model"), DType::F32, &Device::Cpu).unwrap();
    let (_, b) = load_llama(
        &fixture("llama_tiny/model_sharded"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    for (name, v) in a.iter() {
        assert_eq!(max_diff(v.as_tensor(), b.get(name).unwrap()), 0.0, "{name}");
    }
}

#[test]
fn hidden_states_rope_and_layer_outputs_match() {
    let f = fixture_data();
    let (model, params) =
        load_llama(&fixture("llama_tiny/model"), DType::F32, &Device::Cpu).unwrap();
    let (ids, inp, _, mask) = lm_batch(&model, &f.reference);
    let inv = Tensor::new(model.rope.inv_freq(1).as_slice(), &Device::Cpu).unwrap();
    assert_close("rope.inv_freq", &inv, &f.tensors["rope.inv_freq"], 1e-6);
    assert_close(
        "rope.cos",
        &inp.cos.get(0).unwrap(),
        &f.tensors["rope.cos"],
        1e-5,
    );
    assert_close(
        "rope.sin",
        &inp.sin.get(0).unwrap(),
        &f.tensors["rope.sin"],
        1e-5,
    );
    let mut x = model.embed(&params, &ids).unwrap();
    assert_close("hidden_states.0", &x, &f.tensors["hidden_states.0"], 1e-5);
    for l in 0..2 {
        x = model.layer(l, &params, &x, &inp, None).unwrap();
        let r = &f.tensors[&format!("layer_output.{l}")];
        assert_close(
            &format!("layer_output.{l}"),
            &masked(&x, &mask),
            &masked(r, &mask),
            1e-4,
        );
    }
    let h1 = &f.tensors["hidden_states.1"];
    let h = model
        .layer(0, &params, &model.embed(&params, &ids).unwrap(), &inp, None)
        .unwrap();
    assert_close(
        "hidden_states.1",
        &masked(&h, &mask),
        &masked(h1, &mask),
        1e-4,
    );
    let normed = model.final_norm(&params, &x).unwrap();
    assert_close(
        "hidden_states.2",
        &masked(&normed, &mask),
        &masked(&f.tensors["hidden_states.2"], &mask),
        1e-4,
    );
}

fn grads_blockwise(
    model: &Llama,
    params: &Params,
    f: &Fixture,
    checkpointing: bool,
) -> GradAccumulator {
    let (ids, inp, targets, _) = lm_batch(model, &f.reference);
    let mut sink = GradAccumulator::default();
    let kernels = model.kernels;
    let loss_fn = move |l: &Tensor| lm_loss(kernels, l, &targets, 26.0);
    Executor {
        activation_checkpointing: checkpointing,
    }
    .lm_forward_backward(model, params, &ids, &inp, &loss_fn, &mut sink)
    .unwrap();
    sink
}

#[test]
fn gradients_grad_norm_and_adamw_step_match() {
    for kernels in [Kernels::Fused, Kernels::Reference] {
        gradients_grad_norm_and_adamw_step_match_with(kernels);
    }
}

#[test]
fn fused_and_reference_kernels_are_different_code_with_the_same_gradients() {
    let f = fixture_data();
    let (model, params) =
        load_llama(&fixture("llama_tiny/model"), DType::F32, &Device::Cpu).unwrap();
    let fused = grads_blockwise(&model.with_kernels(Kernels::Fused), &params, &f, false);
    let reference = grads_blockwise(&model.with_kernels(Kernels::Reference), &params, &f, false);
    let mut bitwise_equal = 0;
    for name in params.names() {
        let (a, b) = (
            fused.grads.get(name).unwrap(),
            reference.grads.get(name).unwrap(),
        );
        let d = max_diff(a, b) / max_abs(b);
        assert!(d <= 1e-5, "{name}: fused vs reference {d:e}");
        bitwise_equal += usize::from(max_diff(a, b) == 0.0);
    }
    println!(
        "{bitwise_equal} of {} gradients bitwise equal",
        params.len()
    );
    assert!(
        bitwise_equal < params.len(),
        "the fused kernels did not run"
    );
}

fn gradients_grad_norm_and_adamw_step_match_with(kernels: Kernels) {
    let f = fixture_data();
    let (model, params) =
        load_llama(&fixture("llama_tiny/model"), DType::F32, &Device::Cpu).unwrap();
    let model = model.with_kernels(kernels);
    let mut sink = grads_blockwise(&model, &params, &f, false);
    for name in f.reference["grad_params"].as_array().unwrap() {
        let name = name.as_str().unwrap();
        let r = &f.tensors[&format!("grad.{name}")];
        let g = sink.grads.get(name).unwrap();
        let d = max_diff(g, r) / max_abs(r);
        println!("{kernels}: grad {name}: rel err {d:e}");
        assert!(d <= 1e-4, "{kernels}: grad {name}: {d:e}");
    }
    let norm = clip_grad_norm(&mut sink.grads, 1.0).unwrap();
    let want = f.reference["grad_norm_total_preclip"].as_f64().unwrap();
    println!("grad norm {norm} (reference {want})");
    assert!(((norm - want) / want).abs() <= 1e-5);
    let mut opt = AdamW::new(AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        no_decay: vec![],
    });
    opt.step(&params, &sink.grads, 1e-3).unwrap();
    for name in f.reference["grad_params"].as_array().unwrap() {
        let name = name.as_str().unwrap();
        let d = max_diff(
            params.get(name).unwrap(),
            &f.tensors[&format!("after_step.{name}")],
        );
        println!("after_step {name}: abs err {d:e}");
        assert!(d <= 2e-5, "after_step {name}: {d:e}");
    }
}

#[test]
fn every_parameter_gets_a_nonzero_gradient() {
    let f = fixture_data();
    let (model, params) =
        load_llama(&fixture("llama_tiny/model"), DType::F32, &Device::Cpu).unwrap();
    let sink = grads_blockwise(&model, &params, &f, true);
    for name in params.names() {
        let g = sink
            .grads
            .get(name)
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        assert!(max_abs(g) > 0.0, "{name}: zero gradient");
    }
    // padding_idx semantics: the pad row of the embedding never receives gradient.
    let row0 = sink.grads.get(Llama::EMBED).unwrap().get(0).unwrap();
    assert_eq!(max_abs(&row0), 0.0);
}

#[test]
fn greedy_generation_matches() {
    let f = fixture_data();
    let (model, params) =
        load_llama(&fixture("llama_tiny/model"), DType::F32, &Device::Cpu).unwrap();
    let g = &f.reference["generation"];
    let prompt: Vec<u32> = g["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let want: Vec<u32> = g["new_token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let opts = GenerateOptions {
        max_new_tokens: 10,
        sampling: Sampling::Greedy,
        stop_ids: vec![],
        pad_id: 0,
    };
    let (ids, steps) = generate(
        &model,
        &params,
        std::slice::from_ref(&prompt),
        &opts,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(ids[0], want);
    let steps = Tensor::from_vec(steps.concat(), (10, 512), &Device::Cpu).unwrap();
    assert_close(
        "gen.step_logits",
        &steps,
        &f.tensors["gen.step_logits"],
        1e-4,
    );
    // Batched with left padding gives the same ids as unbatched.
    let short = prompt[2..].to_vec();
    let (alone, _) = generate(
        &model,
        &params,
        std::slice::from_ref(&short),
        &opts,
        &Device::Cpu,
    )
    .unwrap();
    let (both, _) = generate(&model, &params, &[prompt, short], &opts, &Device::Cpu).unwrap();
    assert_eq!(both[0], want);
    assert_eq!(both[1], alone[0]);
}

#[test]
fn saved_model_reloads_identically_with_hf_names_and_shapes() {
    let (model, params) =
        load_llama(&fixture("llama_tiny/model"), DType::F32, &Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for (sub, shard) in [("single", usize::MAX), ("sharded", 200 * 1024)] {
        let dir = tmp.path().join(sub);
        save_llama(&dir, &model, &params, shard).unwrap();
        let (m2, p2) = load_llama(&dir, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(m2.cfg.vocab_size, model.cfg.vocab_size);
        for (name, v) in params.iter() {
            assert_eq!(
                max_diff(v.as_tensor(), p2.get(name).unwrap()),
                0.0,
                "{name}"
            );
        }
        // Same tensor names and shapes as the transformers-written file.
        let ours = colossal_core::checkpoint::hf::read_tensors(
            &colossal_core::checkpoint::hf::weight_files(&dir).unwrap(),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let theirs = load_tensors(&fixture("llama_tiny/model/model.safetensors"));
        assert_eq!(ours.len(), theirs.len());
        for (k, t) in &theirs {
            assert_eq!(ours[k].0.dims(), t.dims(), "{k}");
        }
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["model_type"], "llama");
        assert_eq!(cfg["num_key_value_heads"], 2);
        assert_eq!(cfg["dtype"], "float32");
    }
    assert!(tmp
        .path()
        .join("sharded/model.safetensors.index.json")
        .exists());
    // The single file is byte-identical to the one transformers wrote (same names, order, metadata).
    let ours = std::fs::read(tmp.path().join("single/model.safetensors")).unwrap();
    let theirs = std::fs::read(fixture("llama_tiny/model/model.safetensors")).unwrap();
    assert_eq!(ours.len(), theirs.len(), "size of model.safetensors");
}

#[test]
fn reward_model_checkpoint_loads_as_base_model() {
    let dir = fixture("llama_reward_tiny");
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let tensors = load_tensors(&dir.join("reference.safetensors"));
    let (model, params) = load_llama(&dir.join("model"), DType::F32, &Device::Cpu).unwrap();
    let ids = ids_2d(&reference["input_ids"]);
    let mask = mask_of(&reference["attention_mask"]);
    let (b, t) = (ids.len(), ids[0].len());
    let flat: Vec<u32> = ids.concat().iter().map(|&x| x as u32).collect();
    let ids = Tensor::from_vec(flat, (b, t), &Device::Cpu).unwrap();
    let inp = AttnInputs::causal(&model.cfg, &model.rope, b, t, Some(&mask), &Device::Cpu).unwrap();
    let mut x = model.embed(&params, &ids).unwrap();
    for l in 0..model.cfg.num_hidden_layers {
        x = model.layer(l, &params, &x, &inp, None).unwrap();
    }
    let h = model.final_norm(&params, &x).unwrap();
    assert_close(
        "last_hidden_state",
        &masked(&h, &mask),
        &masked(&tensors["last_hidden_state"], &mask),
        1e-4,
    );
}
