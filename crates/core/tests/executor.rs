//! The block-wise executor gives the gradients of one whole-graph `backward()`,
//! with and without activation checkpointing, for untied and tied embeddings.
mod common;

use candle_core::{DType, Device, Tensor};
use colossal_core::checkpoint::llama::load_llama;
use colossal_core::exec::{Executor, GradAccumulator, Hooks};
use colossal_core::models::llama::Kernels;
use colossal_core::models::llama::{init_params, AttnInputs, Llama, LlamaConfig};
use colossal_core::params::Params;
use colossal_core::train::lm_loss;
use common::*;

fn batch(model: &Llama) -> (Tensor, AttnInputs, Vec<i64>) {
    let (b, t) = (3, 12);
    let ids: Vec<u32> = (0..b * t)
        .map(|i| (1 + (i * 37 + 11) % (model.cfg.vocab_size - 1)) as u32)
        .collect();
    let mask: Vec<Vec<u8>> = (0..b)
        .map(|r| (0..t).map(|c| (c < t - 2 * r) as u8).collect())
        .collect();
    let targets: Vec<i64> = (0..b)
        .flat_map(|r| (1..t).map(move |c| (r, c)))
        .map(|(r, c)| {
            if mask[r][c] == 1 {
                ids[r * t + c] as i64
            } else {
                -100
            }
        })
        .collect();
    let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap();
    let inp = AttnInputs::causal(&model.cfg, &model.rope, b, t, Some(&mask), &Device::Cpu).unwrap();
    (ids, inp, targets)
}

/// Records the order in which blocks hand over gradients.
#[derive(Default)]
struct Recorder {
    inner: GradAccumulator,
    order: Vec<usize>,
}

impl Hooks for Recorder {
    fn after_backward(
        &mut self,
        block: usize,
        grads: Vec<(String, Tensor)>,
    ) -> colossal_core::Result<()> {
        self.order.push(block);
        self.inner.after_backward(block, grads)
    }
}

fn compare(model: &Llama, params: &Params) {
    let (ids, inp, targets) = batch(model);
    let n = targets.iter().filter(|&&t| t != -100).count() as f64;
    let logits = model.forward(params, &ids, &inp).unwrap();
    let whole_loss = lm_loss(Kernels::Fused, &logits, &targets, n).unwrap();
    let whole = whole_loss.backward().unwrap();
    for checkpointing in [false, true] {
        let mut rec = Recorder::default();
        let t2 = targets.clone();
        let loss_fn = move |l: &Tensor| lm_loss(Kernels::Fused, l, &t2, n);
        let out = Executor {
            activation_checkpointing: checkpointing,
        }
        .lm_forward_backward(model, params, &ids, &inp, &loss_fn, &mut rec)
        .unwrap();
        assert_eq!(out.loss, whole_loss.to_scalar::<f32>().unwrap());
        let blocks = model.cfg.num_hidden_layers + 2;
        assert_eq!(
            rec.order,
            (0..blocks).rev().collect::<Vec<_>>(),
            "blocks finish last to first"
        );
        let mut worst = 0f32;
        for (name, var) in params.iter() {
            let want = whole.get(var.as_tensor()).unwrap();
            let got = rec.inner.grads.get(name).unwrap();
            let d = max_diff(got, want) / max_abs(want).max(1e-12);
            worst = worst.max(d);
            assert!(
                d <= 1e-6,
                "{name} (checkpointing {checkpointing}): rel diff {d:e}"
            );
        }
        println!("checkpointing={checkpointing}: worst relative gradient difference {worst:e}");
    }
}

#[test]
fn blockwise_gradients_equal_whole_graph_gradients() {
    let (model, params) =
        load_llama(&fixture("llama_tiny/model"), DType::F32, &Device::Cpu).unwrap();
    compare(&model, &params);
}

#[test]
fn blockwise_gradients_equal_whole_graph_with_tied_embeddings() {
    let cfg: LlamaConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 97, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 1, "tie_word_embeddings": true,
        "attention_bias": true, "initializer_range": 0.2
    }))
    .unwrap();
    let model = Llama::new(cfg).unwrap();
    let params = init_params(&model, 3, &Device::Cpu).unwrap();
    compare(&model, &params);
}
