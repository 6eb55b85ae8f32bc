//! Checkpoints as transformers 5 writes them (`shared/fixtures/llama_tf5`: RoPE under
//! `rope_parameters`, Llama-3 scaling, sequence 48 > original 32), and config.json entries we
//! do not implement.
mod common;

use candle_core::{DType, Device, Tensor};
use colossal_core::checkpoint::llama::load_llama;
use colossal_core::exec::{Executor, GradAccumulator};
use colossal_core::models::llama::Kernels;
use colossal_core::models::llama::{
    generate, AttnInputs, GenerateOptions, LlamaConfig, RopeType, Sampling,
};
use colossal_core::train::lm_loss;
use common::*;
use serde_json::Value;

fn reference() -> Value {
    let text = std::fs::read_to_string(fixture("llama_tf5/reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids_of(v: &Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn rope_parameters_llama3_logits_loss_grad_and_greedy_ids_match() {
    let r = reference();
    let refs = load_tensors(&fixture("llama_tf5/reference.safetensors"));
    let (model, params) =
        load_llama(&fixture("llama_tf5/model"), DType::F32, &Device::Cpu).unwrap();
    let rope = model.cfg.rope().unwrap();
    assert_eq!(rope.theta, 500000.0);
    assert!(
        matches!(rope.rope_type, RopeType::Llama3 { factor, original_max_position_embeddings: 32, .. } if factor == 8.0)
    );

    let ids = ids_2d(&r["input_ids"]);
    let mask = mask_of(&r["attention_mask"]);
    let (b, t) = (ids.len(), ids[0].len());
    let flat: Vec<u32> = ids.concat().iter().map(|&x| x as u32).collect();
    let ids = Tensor::from_vec(flat, (b, t), &Device::Cpu).unwrap();
    let inp = AttnInputs::causal(&model.cfg, &model.rope, b, t, Some(&mask), &Device::Cpu).unwrap();
    let logits = model.forward(&params, &ids, &inp).unwrap();
    let e = assert_close(
        "logits",
        &masked(&logits, &mask),
        &masked(&refs["logits"], &mask),
        1e-4,
    );
    println!("llama_tf5 logits: relative error {e:e}");

    let labels = ids_2d(&r["labels"]);
    let targets: Vec<i64> = labels.iter().flat_map(|row| row[1..].to_vec()).collect();
    let n = targets.iter().filter(|&&x| x != -100).count() as f64;
    let want = r["loss"].as_f64().unwrap() as f32;
    let loss = lm_loss(Kernels::Fused, &logits, &targets, n)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    println!("llama_tf5 loss {loss} (transformers {want})");
    assert!((loss - want).abs() <= 1e-5, "loss {loss} vs {want}");

    let mut sink = GradAccumulator::default();
    let loss_fn = move |l: &Tensor| lm_loss(Kernels::Fused, l, &targets, n);
    Executor {
        activation_checkpointing: false,
    }
    .lm_forward_backward(&model, &params, &ids, &inp, &loss_fn, &mut sink)
    .unwrap();
    let name = "model.layers.0.self_attn.q_proj.weight";
    let want = &refs[&format!("grad.{name}")];
    let d = max_diff(sink.grads.get(name).unwrap(), want) / max_abs(want);
    println!("llama_tf5 grad {name}: relative error {d:e}");
    assert!(d <= 1e-4, "{d:e}");

    let opts = GenerateOptions {
        max_new_tokens: 10,
        sampling: Sampling::Greedy,
        stop_ids: vec![],
        pad_id: 0,
    };
    let prompt = ids_of(&r["prompt_ids"]);
    let (out, _) = generate(&model, &params, &[prompt], &opts, &Device::Cpu).unwrap();
    assert_eq!(out[0], ids_of(&r["greedy_ids"]));
}

#[test]
fn a_mixtral_config_we_cannot_run_is_an_error_naming_what_is_wrong() {
    // Mixtral loads (tests/mixtral.rs); without experts, or with impossible routing, it is an
    // error naming the field.
    let text = std::fs::read_to_string(fixture("mixtral_tiny/model/config.json")).unwrap();
    let mixtral: Value = serde_json::from_str(&text).unwrap();
    let check = |edit: &dyn Fn(&mut Value), want: &str| {
        let mut c = mixtral.clone();
        edit(&mut c);
        let e = serde_json::from_value::<LlamaConfig>(c)
            .unwrap()
            .validate()
            .err()
            .unwrap_or_else(|| panic!("{want}: accepted"))
            .to_string();
        assert!(e.contains(want), "{e}");
    };
    check(
        &|c| {
            c.as_object_mut().unwrap().remove("num_local_experts");
        },
        "mixtral",
    );
    check(
        &|c| c["num_experts_per_tok"] = 5.into(),
        "num_experts_per_tok",
    );
    check(
        &|c| c["router_jitter_noise"] = 0.1.into(),
        "router_jitter_noise",
    );
}

#[test]
fn config_keys_that_change_the_math_are_errors() {
    let base = serde_json::json!({
        "vocab_size": 16, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2
    });
    let with = |k: &str, v: Value| {
        let mut c = base.clone();
        c[k] = v;
        serde_json::from_value::<LlamaConfig>(c).unwrap().validate()
    };
    with("sliding_window", Value::Null).unwrap();
    with("attention_dropout", 0.0.into()).unwrap();
    with("pretraining_tp", 1.into()).unwrap();
    for (k, v, needle) in [
        ("sliding_window", Value::from(4096), "sliding_window"),
        ("attention_dropout", 0.1.into(), "attention_dropout"),
        (
            "architectures",
            serde_json::json!(["Qwen2ForCausalLM"]),
            "Qwen2ForCausalLM",
        ),
        ("model_type", "gemma".into(), "model_type `gemma`"),
        (
            "final_logit_softcapping",
            30.0.into(),
            "final_logit_softcapping",
        ),
        (
            "rope_parameters",
            serde_json::json!({"rope_type": "longrope"}),
            "longrope",
        ),
    ] {
        let e = with(k, v).unwrap_err().to_string();
        assert!(e.contains(needle), "{k}: {e}");
    }
    // A key nobody knows is kept (saving round-trips it) and reported, not an error.
    let mut c = base.clone();
    c["my_note"] = "x".into();
    let cfg: LlamaConfig = serde_json::from_value(c).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.unread_keys(), vec!["my_note"]);
}
