//! The reward model against transformers' `LlamaForSequenceClassification`
//! (`../shared/fixtures/llama_reward_tiny`): pooled scores and the pairwise loss.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use chat_rlhf::loss::preference::pairwise_reward_loss;
use chat_rlhf::reward::{last_token_index, rewards, right_padded};
use colossal_core::checkpoint::llama::load_llama;
use colossal_core::models::llama::AttnInputs;
use serde_json::Value;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/llama_reward_tiny")
}

fn rel(a: f32, b: f32) -> f32 {
    (a - b).abs() / b.abs().max(1e-6)
}

#[test]
fn scores_and_pairwise_loss_match_transformers() {
    let dir = fixture();
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let (model, params) = load_llama(&dir.join("model"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.cfg.score_labels(), Some(1));
    assert_eq!(model.head_weight_name(), "score.weight");
    let rows: Vec<Vec<u32>> = serde_json::from_value(reference["input_ids"].clone()).unwrap();
    let pad = reference["pad_token_id"].as_u64().unwrap() as u32;
    let index = last_token_index(&rows, pad);
    let want_index: Vec<usize> = reference["pooled_index"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(index, want_index);
    let (ids, mask) = right_padded(&rows, pad, &Device::Cpu).unwrap();
    let (b, t) = ids.dims2().unwrap();
    let inp = AttnInputs::causal(&model.cfg, &model.rope, b, t, Some(&mask), &Device::Cpu).unwrap();
    let per_position = model.forward(&params, &ids, &inp).unwrap();
    assert_eq!(per_position.dims(), &[4, 12, 1]);
    let scores = rewards(&per_position, &index)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let want: Vec<f32> = reference["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    println!("scores {scores:?}\nwant   {want:?}");
    assert_eq!(scores.len(), want.len(), "one score per row");
    for (s, w) in scores.iter().zip(&want) {
        assert!(rel(*s, *w) <= 1e-4, "score {s} vs {w}");
    }
    let s = Tensor::new(scores.as_slice(), &Device::Cpu).unwrap();
    let chosen = s
        .index_select(&Tensor::new(&[0u32, 2], &Device::Cpu).unwrap(), 0)
        .unwrap();
    let rejected = s
        .index_select(&Tensor::new(&[1u32, 3], &Device::Cpu).unwrap(), 0)
        .unwrap();
    let loss = pairwise_reward_loss(&chosen, &rejected)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let want_loss = reference["pairwise_log_sigmoid_loss"]["value"]
        .as_f64()
        .unwrap() as f32;
    println!("pairwise loss {loss} (transformers {want_loss})");
    assert!(rel(loss, want_loss) <= 1e-4, "loss {loss} vs {want_loss}");
}
