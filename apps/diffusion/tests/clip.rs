//! CLIP against `shared/fixtures/sd_tiny` (transformers 4.57): tokenizer ids for 14 prompts,
//! the text encoder's last hidden state and pooled output, and a gradient for every parameter.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{close, err, fixture, reference, tensors};
use diffusion::clip::{ClipTextModel, ClipTokenizer};

fn ids(rows: &serde_json::Value) -> Tensor {
    let rows: Vec<Vec<u32>> = serde_json::from_value(rows.clone()).unwrap();
    let (b, t) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (b, t), &Device::Cpu).unwrap()
}

#[test]
fn the_tokenizer_gives_transformers_ids() {
    let tok = ClipTokenizer::from_dir(&fixture().join("tokenizer")).unwrap();
    let r = reference();
    let prompts = r["tokenizer"]["test_prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 14);
    for p in prompts {
        let text = p["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(p["slow_ids"].clone()).unwrap();
        let mut got = vec![tok.bos];
        got.extend(tok.tokenize(text));
        got.push(tok.eos);
        assert_eq!(got, want, "{text:?}");
    }
    // Padded to 77 with the end token, as the pipeline calls it.
    let want: Vec<Vec<u32>> =
        serde_json::from_value(r["text_encoder"]["input_ids"].clone()).unwrap();
    assert_eq!(tok.encode("grinning face with smiling eyes"), want[0]);
}

#[test]
fn the_text_encoder_matches_transformers() {
    let (model, params) =
        ClipTextModel::load(&fixture().join("text_encoder"), DType::F32, &Device::Cpu).unwrap();
    let (r, t) = (reference(), tensors());
    let (last, pooled) = model
        .forward(&params, &ids(&r["text_encoder"]["input_ids"]))
        .unwrap();
    let e = err(&last, &t["text_encoder.last_hidden_state"]);
    close("last_hidden_state", e, 1e-4);
    let e = err(&pooled, &t["text_encoder.pooler_output"]);
    close("pooler_output", e, 1e-4);
    let (both, _) = model
        .forward(&params, &ids(&r["text_encoder"]["input_ids_batch2"]))
        .unwrap();
    let e = err(&both, &t["encoder_hidden_states"]);
    close("encoder_hidden_states", e, 1e-4);
}

#[test]
fn every_text_encoder_parameter_gets_a_gradient() {
    let (model, params) =
        ClipTextModel::load(&fixture().join("text_encoder"), DType::F32, &Device::Cpu).unwrap();
    let r = reference();
    let (last, pooled) = model
        .forward(&params, &ids(&r["text_encoder"]["input_ids_batch2"]))
        .unwrap();
    let loss = (last.sqr().unwrap().mean_all().unwrap() + pooled.sum_all().unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in params.iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let n: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(n > 0.0, "{name}: zero gradient");
    }
}
