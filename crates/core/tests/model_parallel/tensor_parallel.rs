//! Tensor parallelism (and Megatron sequence parallelism) against one rank: same losses, same
//! updated parameters, over several AdamW steps of the block-wise executor.

use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use colossal_core::checkpoint::llama::{load_llama, save_llama};
use colossal_core::dist::{run_local, Communicator, Group};
use colossal_core::exec::{Executor, GradAccumulator};
use colossal_core::models::llama::{init_params, AttnInputs, Llama, LlamaConfig};
use colossal_core::nn::cross_entropy_sum;
use colossal_core::parallel::tensor;

use super::shared::{adamw, rel};
use colossal_core::params::Params;

const T: Duration = Duration::from_secs(60);
const STEPS: usize = 5;

fn config(tie: bool, bias: bool) -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 4, "tie_word_embeddings": tie,
        "attention_bias": bias, "mlp_bias": bias, "initializer_range": 0.2, "pad_token_id": 0
    }))
    .unwrap()
}

/// Batch `step`: (ids (B, T), next-token targets flattened over the first T-1 positions).
fn batch(step: usize, vocab: u32) -> (Vec<u32>, Vec<i64>) {
    let (b, t) = (2usize, 8usize);
    let ids: Vec<u32> = (0..b * t)
        .map(|i| ((i * 7 + step * 13 + i * i) as u32) % vocab)
        .collect();
    let mut targets = Vec::new();
    for r in 0..b {
        for i in 1..t {
            targets.push(ids[r * t + i] as i64);
        }
    }
    (ids, targets)
}

/// Logits (B, T, V') → rows of the first T-1 positions (N, V').
fn shifted(logits: &Tensor) -> candle_core::Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))
}

/// Trains `STEPS` steps; the loss is the mean token cross-entropy, vocabulary-parallel when
/// `group` is given. Returns the losses and the final (gathered, whole) parameters.
fn train(model: &Llama, mut params: Params, group: Option<&Group>) -> (Vec<f32>, Params) {
    let plan = model.tp_plan();
    let exec = Executor::default();
    let mut opt = adamw();
    let mut losses = Vec::new();
    for step in 0..STEPS {
        let (ids, targets) = batch(step % 2, model.cfg.vocab_size as u32);
        let n = targets.len() as f64;
        let ids = Tensor::from_vec(ids, (2, 8), &Device::Cpu).unwrap();
        let inp = AttnInputs::causal(&model.cfg, &model.rope, 2, 8, None, &Device::Cpu).unwrap();
        let loss_fn = |logits: &Tensor| -> colossal_core::Result<Tensor> {
            let rows = shifted(logits)?;
            let (sum, _) = match group {
                Some(g) => {
                    let start = tensor::vocab_start(&model.cfg, g.rank(), g.size());
                    tensor::vocab_parallel_cross_entropy(&rows, &targets, -100, start, g)?
                }
                None => cross_entropy_sum(&rows, &targets, -100)?,
            };
            Ok((sum / n)?)
        };
        let mut acc = GradAccumulator::default();
        let out = exec
            .lm_forward_backward(model, &params, &ids, &inp, loss_fn, &mut acc)
            .unwrap();
        losses.push(out.loss);
        opt.step(&params, &acc.grads, 1e-3).unwrap();
    }
    if let Some(g) = group {
        let mut full = Params::new();
        for (name, var) in params.iter() {
            let t = g
                .with(|c| tensor::gather(name, var.as_tensor(), &plan, c))
                .unwrap();
            full.insert(name, candle_core::Var::from_tensor(&t).unwrap());
        }
        params = full;
    }
    (losses, params)
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let s = b.abs().unwrap().max_all().unwrap();
    d.to_scalar::<f32>().unwrap() / s.to_scalar::<f32>().unwrap().max(1e-12)
}

fn check_tp(cfg: LlamaConfig, tp: usize, sequence_parallel: bool) {
    let model = Llama::new(cfg).unwrap();
    // Two initialisations: the optimizer updates its parameters' variables in place.
    let (ref_losses, ref_params) =
        train(&model, init_params(&model, 5, &Device::Cpu).unwrap(), None);
    let full = init_params(&model, 5, &Device::Cpu).unwrap();
    assert!(ref_losses[STEPS - 1] < ref_losses[0], "{ref_losses:?}");
    let results = run_local(tp, T, |comm| {
        let rank = comm.rank();
        let group = Group::new(Box::new(comm));
        let local = tensor::shard_params(&full, &model.tp_plan(), rank, tp)?;
        let tp_model = tensor::parallelize(&model, group.clone(), sequence_parallel)?;
        Ok(train(&tp_model, local, Some(&group)))
    })
    .unwrap();
    for (rank, (losses, params)) in results.iter().enumerate() {
        for (a, b) in losses.iter().zip(&ref_losses) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs(),
                "rank {rank}: {losses:?} vs {ref_losses:?}"
            );
        }
        for (name, var) in ref_params.iter() {
            // The key bias shifts every score of a query equally, so softmax cancels it: its
            // exact gradient is zero, and Adam turns the rounding noise into ±lr steps.
            if name.ends_with("k_proj.bias") {
                continue;
            }
            let rel = rel(params.get(name).unwrap(), var.as_tensor());
            assert!(
                rel < 1e-5,
                "tp {tp} sp {sequence_parallel} rank {rank} {name}: {rel:e}"
            );
        }
    }
    println!(
        "tp {tp} sequence_parallel {sequence_parallel}: losses {:?}",
        results[0].0
    );
}

#[test]
fn tp2_and_tp4_match_one_rank() {
    check_tp(config(false, false), 2, false);
    check_tp(config(false, false), 4, false);
}

#[test]
fn tp_with_biases_and_tied_embeddings_matches_one_rank() {
    check_tp(config(true, true), 2, false);
}

#[test]
fn megatron_sequence_parallel_matches_one_rank() {
    check_tp(config(false, false), 2, true);
    check_tp(config(false, true), 2, true);
    check_tp(config(true, false), 4, true);
}

#[test]
fn heads_that_do_not_split_are_an_error_naming_the_field() {
    let mut cfg = config(false, false);
    cfg.num_key_value_heads = Some(2);
    let err = tensor::validate(&cfg, 4).unwrap_err().to_string();
    assert!(
        err.contains("num_key_value_heads = 2") && err.contains("parallel.tp = 4"),
        "{err}"
    );
    assert!(tensor::validate(&cfg, 2).is_ok());
}

#[test]
fn sharded_loading_reads_each_rank_slice_of_an_hf_checkpoint() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/llama_tiny/model");
    let (model, full) = load_llama(&dir, DType::F32, &Device::Cpu).unwrap();
    let plan = model.tp_plan();
    for rank in 0..2 {
        let sharded = tensor::load_sharded(&dir, &model, &plan, rank, 2, &Device::Cpu).unwrap();
        let want = tensor::shard_params(&full, &plan, rank, 2).unwrap();
        for (name, var) in want.iter() {
            let got = sharded.get(name).unwrap();
            assert_eq!(got.dims(), var.as_tensor().dims(), "{name}");
            assert_eq!(max_rel(got, var.as_tensor()), 0.0, "{name}");
        }
        let q = sharded
            .get("model.layers.0.self_attn.q_proj.weight")
            .unwrap();
        assert_eq!(q.dims(), &[32, 64]);
        let o = sharded
            .get("model.layers.0.self_attn.o_proj.weight")
            .unwrap();
        assert_eq!(o.dims(), &[64, 32]);
    }
    // And a checkpoint we wrote ourselves round-trips through the sliced reader.
    let tmp = tempfile::tempdir().unwrap();
    save_llama(tmp.path(), &model, &full, 1 << 14).unwrap();
    let sharded = tensor::load_sharded(tmp.path(), &model, &plan, 1, 2, &Device::Cpu).unwrap();
    let want = tensor::shard_params(&full, &plan, 1, 2).unwrap();
    for (name, var) in want.iter() {
        assert_eq!(
            max_rel(sharded.get(name).unwrap(), var.as_tensor()),
            0.0,
            "{name}"
        );
    }
}

/// LLaMA's plan covers exactly its parameters for every head and bias layout; a rule that
/// matches nothing, or a parameter left out, is an error naming it when the model is built.
#[test]
fn the_llama_plan_checks_against_every_layout_and_errors_name_the_entry() {
    for (bias, tie, score) in [
        (false, true, false),
        (true, false, false),
        (true, true, true),
    ] {
        let mut cfg: LlamaConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": tie,
            "attention_bias": bias, "mlp_bias": bias
        }))
        .unwrap();
        if score {
            cfg = cfg.with_score_head(1);
        }
        let model = Llama::new(cfg).unwrap();
        model.tp_plan().check(&model.param_shapes(), 2).unwrap();
        let mut plan = model.tp_plan();
        plan.rules.push((
            "model.layers.*.mlp.gate.weight".into(),
            colossal_core::parallel::plan::TpStyle::Colwise,
        ));
        let e = plan
            .check(&model.param_shapes(), 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`model.layers.*.mlp.gate.weight`"), "{e}");
        let mut plan = model.tp_plan();
        plan.rules
            .retain(|(p, _)| !p.contains("post_attention_layernorm"));
        let e = plan
            .check(&model.param_shapes(), 2)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`model.layers.0.post_attention_layernorm.weight` is not covered"),
            "{e}"
        );
    }
}
