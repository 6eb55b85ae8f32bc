//! Boundary-aware packing: with it, a token's logits depend only on its own document (positions
//! restart, attention stays inside the document) — replacing the other documents of the packed
//! row changes nothing; plain packing lets documents see each other. Also under ring and
//! Ulysses sequence parallelism, whose masks come from the same table.

use std::time::Duration;

use candle_core::{Device, Tensor};
use colossal_core::data::PackedSequence;
use colossal_core::dist::{run_local, Group};
use colossal_core::models::llama::{init_params, Llama, LlamaConfig};
use colossal_core::parallel::sequence::{self, SpMode};
use colossal_core::train::causal_lm_batch;

fn model() -> (Llama, colossal_core::params::Params) {
    let cfg: LlamaConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "initializer_range": 0.3
    }))
    .unwrap();
    let m = Llama::new(cfg).unwrap();
    let p = init_params(&m, 11, &Device::Cpu).unwrap();
    (m, p)
}

/// Documents [a (5 tokens) | b (6) | c (5)] packed into 16 tokens; `other` varies a and c.
fn packed(other: u32) -> PackedSequence {
    let a: Vec<u32> = (0..5).map(|i| (i * 3 + other * 7) % 64).collect();
    let b: Vec<u32> = vec![10, 20, 30, 40, 50, 60];
    let c: Vec<u32> = (0..5).map(|i| (i * 5 + other * 11 + 1) % 64).collect();
    PackedSequence {
        input_ids: [a, b, c].concat(),
        doc_starts: vec![0, 5, 11],
    }
}

/// Logits of the middle document's tokens (positions 5..11).
fn middle_logits(m: &Llama, p: &colossal_core::params::Params, other: u32, aware: bool) -> Tensor {
    let batch = causal_lm_batch(m, &[packed(other)], aware, &Device::Cpu).unwrap();
    let logits = m.forward(p, &batch.ids, &batch.inputs).unwrap();
    logits.narrow(1, 5, 6).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn other_documents_do_not_change_a_documents_logits() {
    let (m, p) = model();
    let (x, y) = (
        middle_logits(&m, &p, 1, true),
        middle_logits(&m, &p, 2, true),
    );
    assert_eq!(
        max_diff(&x, &y),
        0.0,
        "boundary-aware: independent of the other documents"
    );
    // The same document alone in its own row gives the same logits.
    let alone = PackedSequence {
        input_ids: vec![10, 20, 30, 40, 50, 60],
        doc_starts: vec![0],
    };
    let batch = causal_lm_batch(&m, &[alone], true, &Device::Cpu).unwrap();
    let own = m.forward(&p, &batch.ids, &batch.inputs).unwrap();
    assert!(max_diff(&x, &own) < 1e-5);
    let (x, y) = (
        middle_logits(&m, &p, 1, false),
        middle_logits(&m, &p, 2, false),
    );
    let d = max_diff(&x, &y);
    assert!(
        d > 1e-3,
        "plain packing: earlier documents leak into the middle one ({d})"
    );
}

#[test]
fn sequence_parallel_attention_keeps_documents_apart() {
    let (m, p) = model();
    for mode in [SpMode::Ring, SpMode::Ulysses] {
        let per_other: Vec<Vec<Tensor>> = [1u32, 2]
            .iter()
            .map(|&other| {
                let batch = causal_lm_batch(&m, &[packed(other)], true, &Device::Cpu).unwrap();
                run_local(2, Duration::from_secs(30), |comm| {
                    let g = Group::new(Box::new(comm));
                    let rank = g.rank();
                    let (sp_model, _) = sequence::parallelize(&m, g, mode)?;
                    let ids = sequence::shard_tokens(&batch.ids, 2, rank)?;
                    let inp = sequence::shard_inputs(&batch.inputs, 2, rank)?;
                    sp_model.forward(&p, &ids, &inp)
                })
                .unwrap()
            })
            .collect();
        // Positions of the middle document on each rank (chunks r and 3 − r of 4).
        for (rank, (x, y)) in per_other[0].iter().zip(&per_other[1]).enumerate() {
            let pos = sequence::local_positions(16, 2, rank).unwrap();
            for (k, &t) in pos.iter().enumerate() {
                if (5..11).contains(&t) {
                    let a = x.narrow(1, k, 1).unwrap();
                    let b = y.narrow(1, k, 1).unwrap();
                    assert!(max_diff(&a, &b) < 1e-5, "{mode:?} rank {rank} position {t}");
                }
            }
        }
    }
}
