//! LoRA against `shared/fixtures/lora_tiny` (PEFT 0.21 on transformers, float32): the adapter
//! loaded from PEFT's layout gives PEFT's logits, loss and LoRA gradients, nothing else gets a
//! gradient, a saved adapter reads back the same, and the merged model equals PEFT's
//! `merge_and_unload()`.
mod common;

use candle_core::{DType, Device, Tensor};
use colossal_core::checkpoint::llama::{load_llama, save_llama};
use colossal_core::exec::{Executor, GradAccumulator};
use colossal_core::lora;
use colossal_core::models::llama::Llama;
use colossal_core::params::Params;
use colossal_core::train::lm_loss;
use common::*;
use serde_json::Value;

struct Fixture {
    reference: Value,
    tensors: std::collections::HashMap<String, Tensor>,
}

fn fixture_data() -> Fixture {
    let dir = fixture("lora_tiny");
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    Fixture {
        reference: serde_json::from_str(&text).unwrap(),
        tensors: load_tensors(&dir.join("reference.safetensors")),
    }
}

/// The base model with the fixture's adapter loaded.
fn adapted() -> (Llama, Params, lora::LoraConfig, Vec<lora::Site>) {
    let (model, mut params) =
        load_llama(&fixture("llama_tiny/model"), DType::F32, &Device::Cpu).unwrap();
    let (cfg, sites) = lora::load_adapter(
        &fixture("lora_tiny/adapter"),
        &model.linear_layers(),
        &mut params,
    )
    .unwrap();
    (model.with_lora(&cfg, sites.clone()), params, cfg, sites)
}

#[test]
fn peft_adapter_gives_peft_logits_loss_and_lora_gradients_only() {
    let f = fixture_data();
    let (model, params, cfg, sites) = adapted();
    assert_eq!(cfg.r, 4);
    assert_eq!(cfg.scaling(), f.reference["scaling"].as_f64().unwrap());
    assert_eq!(sites.len(), 7 * model.cfg.num_hidden_layers);
    // Only the adapters are trainable: the base is frozen.
    let trainable: Vec<&String> = params.names().iter().collect();
    assert_eq!(trainable.len(), 2 * sites.len());
    assert!(trainable.iter().all(|n| n.contains(".lora_")));
    assert!(params.is_frozen("model.layers.0.self_attn.q_proj.weight"));

    let (ids, inp, targets, mask) = lm_batch(&model, &f.reference);
    let logits = model.forward(&params, &ids, &inp).unwrap();
    let e = assert_close(
        "logits",
        &masked(&logits, &mask),
        &masked(&f.tensors["logits"], &mask),
        1e-4,
    );
    let n = targets.iter().filter(|&&t| t != -100).count() as f64;
    let loss = lm_loss(model.kernels, &logits, &targets, n)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let want = f.reference["loss"].as_f64().unwrap() as f32;
    println!("logits rel err {e:e}; loss {loss} (PEFT {want})");
    assert!((loss - want).abs() <= 1e-4, "loss {loss} vs {want}");

    let mut sink = GradAccumulator::default();
    let kernels = model.kernels;
    let loss_fn = move |l: &Tensor| lm_loss(kernels, l, &targets, n);
    Executor::default()
        .lm_forward_backward(&model, &params, &ids, &inp, &loss_fn, &mut sink)
        .unwrap();
    let got: Vec<&String> = sink.grads.names().collect();
    assert_eq!(got.len(), 2 * sites.len(), "gradients: {got:?}");
    let mut worst = 0f32;
    for name in params.names() {
        let g = sink
            .grads
            .get(name)
            .expect("every adapter tensor gets a gradient");
        let want = &f.tensors[&format!("grad.base_model.model.{name}")];
        worst = worst.max(assert_close(name, g, want, 1e-4));
    }
    println!(
        "{} LoRA gradients, worst rel err {worst:e}; no base weight got one",
        got.len()
    );
}

/// QLoRA on the fixture: with the base's Linear weights resting in nf4 or int8 codes, the
/// whole forward, the block-wise forward and backward, and generation each equal, bit for bit,
/// the same on a dense copy of the dequantised base; the codes cost PEFT's logits a small,
/// printed error.
#[test]
fn quantised_base_computes_what_its_dequantised_copy_does() {
    use colossal_core::quant::QuantKind;
    let f = fixture_data();
    let (model, params, _, _) = adapted();
    let base = lora::frozen_linears(&model.linear_layers(), &params);
    assert_eq!(base.len(), 7 * model.cfg.num_hidden_layers);
    let (ids, inp, targets, mask) = lm_batch(&model, &f.reference);
    let n = targets.iter().filter(|&&t| t != -100).count() as f64;
    let kernels = model.kernels;
    let loss_fn = move |l: &Tensor| lm_loss(kernels, l, &targets, n);
    let prompt = ids_1d(&f.reference["prompt_ids"]);
    for kind in [QuantKind::Nf4, QuantKind::Int8] {
        let mut q = params.clone();
        q.quantise(&base, kind, 64).unwrap();
        let err = q.get(&base[0]).unwrap_err().to_string();
        assert!(
            err.contains(&base[0]) && err.contains(&kind.to_string()),
            "{err}"
        );
        let dense = q.dense().unwrap();
        assert!(!dense.has_quantised());
        let logits = model.forward(&q, &ids, &inp).unwrap();
        let want = model.forward(&dense, &ids, &inp).unwrap();
        assert_eq!(max_diff(&logits, &want), 0.0, "{kind}: forward");
        let mut grads = Vec::new();
        for p in [&q, &dense] {
            let mut sink = GradAccumulator::default();
            let loss = Executor::default()
                .lm_forward_backward(&model, p, &ids, &inp, &loss_fn, &mut sink)
                .unwrap()
                .loss;
            grads.push((loss, sink.grads));
        }
        assert_eq!(grads[0].0, grads[1].0, "{kind}: loss");
        for name in params.names() {
            let (a, b) = (grads[0].1.get(name).unwrap(), grads[1].1.get(name).unwrap());
            assert_eq!(max_diff(a, b), 0.0, "{kind}: gradient of {name}");
        }
        let ids_q = greedy_ids(&model, &q, &prompt, 8);
        assert_eq!(ids_q, greedy_ids(&model, &dense, &prompt, 8), "{kind}");
        // A sanity bound only: the codes do move the logits.
        let e = assert_close(
            "quantised logits",
            &masked(&logits, &mask),
            &masked(&f.tensors["logits"], &mask),
            0.5,
        );
        assert!(e > 0.0, "{kind}: the base did not change");
        let bytes: usize = q.quantised().map(|(_, w)| w.bytes()).sum();
        let f32_bytes: usize = base
            .iter()
            .map(|n| 4 * params.get(n).unwrap().elem_count())
            .sum();
        println!(
            "{kind}: forward, loss {}, {} LoRA gradients and greedy {:?} equal the dequantised base's; logits rel err vs PEFT (unquantised) {e:e}; base Linear weights {bytes} bytes vs {f32_bytes} in f32",
            grads[0].0,
            params.names().len(),
            ids_q
        );
    }
}

#[test]
fn saved_adapter_reads_back_and_merges_into_peft_merged_model() {
    let f = fixture_data();
    let (model, params, cfg, sites) = adapted();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("adapter");
    lora::save_adapter(&out, &cfg, &sites, &params, Some("llama_tiny")).unwrap();
    let (base, mut again) =
        load_llama(&fixture("llama_tiny/model"), DType::F32, &Device::Cpu).unwrap();
    let (cfg2, sites2) = lora::load_adapter(&out, &base.linear_layers(), &mut again).unwrap();
    assert_eq!((cfg2, &sites2), (cfg.clone(), &sites));
    for name in params.names() {
        let d = max_diff(params.get(name).unwrap(), again.get(name).unwrap());
        assert_eq!(d, 0.0, "{name} differs after a save and load");
    }

    // Merged: W + (α/r)·B·A, saved as a plain LLaMA directory, equals PEFT's merged model.
    let merged = lora::merge(&params, &cfg, &sites).unwrap();
    assert_eq!(merged.len(), base.param_shapes().len());
    let merged_dir = dir.path().join("merged");
    save_llama(&merged_dir, &base, &merged, usize::MAX).unwrap();
    let (plain, merged) = load_llama(&merged_dir, DType::F32, &Device::Cpu).unwrap();
    let (ids, inp, _, mask) = lm_batch(&plain, &f.reference);
    let logits = plain.forward(&merged, &ids, &inp).unwrap();
    let e = assert_close(
        "merged logits",
        &masked(&logits, &mask),
        &masked(&f.tensors["merged_logits"], &mask),
        1e-4,
    );
    // And the adapted model itself computes what its merge computes.
    let adapted_logits = model.forward(&params, &ids, &inp).unwrap();
    let e2 = assert_close("adapted vs merged", &adapted_logits, &logits, 1e-5);
    let prompt = ids_1d(&f.reference["prompt_ids"]);
    let want = ids_1d(&f.reference["merged_greedy_ids"]);
    let ids = greedy_ids(&plain, &merged, &prompt, want.len());
    println!(
        "merged logits rel err {e:e}; adapted vs merged {e2:e}; greedy {:?}",
        ids
    );
    assert_eq!(ids, want);
}

#[test]
fn unsupported_peft_options_are_errors_naming_them() {
    let (model, mut params) =
        load_llama(&fixture("llama_tiny/model"), DType::F32, &Device::Cpu).unwrap();
    let src = fixture("lora_tiny/adapter");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join(lora::ADAPTER_CONFIG)).unwrap())
            .unwrap();
    for (key, value, says) in [
        ("use_dora", Value::Bool(true), "`use_dora`"),
        (
            "target_modules",
            Value::String("q_.*".into()),
            "regular expression",
        ),
        (
            "target_modules",
            serde_json::json!(["nothing_here"]),
            "matches no Linear",
        ),
        ("bias", Value::String("all".into()), "`bias`"),
        (
            "rank_pattern",
            serde_json::json!({"q_proj": 8}),
            "`rank_pattern`",
        ),
        ("r", serde_json::json!(8), "has shape"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config.clone();
        c[key] = value;
        std::fs::write(dir.path().join(lora::ADAPTER_CONFIG), c.to_string()).unwrap();
        std::fs::copy(
            src.join(lora::ADAPTER_WEIGHTS),
            dir.path().join(lora::ADAPTER_WEIGHTS),
        )
        .unwrap();
        let err = lora::load_adapter(dir.path(), &model.linear_layers(), &mut params)
            .err()
            .unwrap_or_else(|| panic!("{key} was accepted"))
            .to_string();
        println!("{key}: {err}");
        assert!(err.contains(says), "{key}: {err}");
    }
}
