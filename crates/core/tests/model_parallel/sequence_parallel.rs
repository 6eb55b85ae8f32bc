//! Ulysses and ring attention against one rank: each of `sp` ranks holds a part of every
//! sequence (load-balanced causal split), and training gives one rank's losses and updated
//! parameters (f32, 1e-5 relative, 5 AdamW steps). Ring attention on a sequence 4× longer than
//! the per-rank attention budget gives full attention's logits.

use std::time::Duration;

use candle_core::{Device, Tensor};
use colossal_core::dist::{run_local, Group, ReduceOp};
use colossal_core::exec::{Executor, GradAccumulator};
use colossal_core::models::llama::{init_params, AttnInputs, Llama, LlamaConfig};
use colossal_core::nn::cross_entropy_sum;
use colossal_core::parallel::sequence::{self, SpMode};
use colossal_core::params::Params;

use super::shared::{adamw, copy_where, rel};

const T: Duration = Duration::from_secs(60);
const STEPS: usize = 5;
const SEQ: usize = 16;
const IGNORE: i64 = -100;

fn config(kv_heads: usize) -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": kv_heads, "tie_word_embeddings": true,
        "initializer_range": 0.2
    }))
    .unwrap()
}

/// Batch `step` of 2 rows: ids (2, len) and per-position next-token targets (IGNORE last).
fn batch(step: usize, len: usize) -> (Tensor, Vec<Vec<i64>>) {
    let ids: Vec<u32> = (0..2 * len)
        .map(|i| ((i * 7 + step * 13 + i * i) % 96) as u32)
        .collect();
    let targets = (0..2)
        .map(|r| {
            (0..len)
                .map(|i| {
                    if i + 1 < len {
                        ids[r * len + i + 1] as i64
                    } else {
                        IGNORE
                    }
                })
                .collect()
        })
        .collect();
    (
        Tensor::from_vec(ids, (2, len), &Device::Cpu).unwrap(),
        targets,
    )
}

/// `STEPS` AdamW steps. With `sp = Some(group)`, this rank sees only its positions; the
/// per-rank loss sums and gradients are summed over the group.
fn train(model: &Llama, params: Params, sp: Option<&Group>) -> (Vec<f32>, Params) {
    let mut opt = adamw();
    let mut losses = Vec::new();
    for step in 0..STEPS {
        let (ids, targets) = batch(step % 2, SEQ);
        let inp = AttnInputs::causal(&model.cfg, &model.rope, 2, SEQ, None, &Device::Cpu).unwrap();
        let n = (2 * (SEQ - 1)) as f64;
        let (ids, inp, targets): (Tensor, AttnInputs, Vec<i64>) = match sp {
            None => (ids, inp, targets.concat()),
            Some(g) => {
                let pos = sequence::local_positions(SEQ, g.size(), g.rank()).unwrap();
                let mine = targets
                    .iter()
                    .flat_map(|row| pos.iter().map(|&p| row[p]))
                    .collect();
                (
                    sequence::shard_tokens(&ids, g.size(), g.rank()).unwrap(),
                    sequence::shard_inputs(&inp, g.size(), g.rank()).unwrap(),
                    mine,
                )
            }
        };
        let loss_fn = |logits: &Tensor| -> colossal_core::Result<Tensor> {
            let (b, t, v) = logits.dims3()?;
            let (sum, _) = cross_entropy_sum(&logits.reshape((b * t, v))?, &targets, IGNORE)?;
            Ok((sum / n)?)
        };
        let mut acc = GradAccumulator::default();
        let out = Executor::default()
            .lm_forward_backward(model, &params, &ids, &inp, loss_fn, &mut acc)
            .unwrap();
        let mut loss = out.loss;
        if let Some(g) = sp {
            let sum = |t: &Tensor| g.with(|c| c.all_reduce(t, ReduceOp::Sum)).unwrap();
            loss = sum(&Tensor::new(&[loss], &Device::Cpu).unwrap())
                .to_vec1::<f32>()
                .unwrap()[0];
            // Same order on every rank: the all-reduces must pair up.
            let mut names: Vec<String> = acc.grads.names().cloned().collect();
            names.sort();
            for name in names {
                let total = sum(acc.grads.get(&name).unwrap());
                acc.grads.set(&name, total);
            }
        }
        losses.push(loss);
        opt.step(&params, &acc.grads, 1e-3).unwrap();
    }
    (losses, params)
}

fn check(mode: SpMode, sp: usize, kv_heads: usize) {
    let model = Llama::new(config(kv_heads)).unwrap();
    let init = init_params(&model, 9, &Device::Cpu).unwrap();
    let (ref_losses, ref_params) = train(&model, copy_where(&init, |_| true), None);
    assert!(ref_losses[STEPS - 1] < ref_losses[0], "{ref_losses:?}");
    let results = run_local(sp, T, |comm| {
        let group = Group::new(Box::new(comm));
        let (sp_model, _) = sequence::parallelize(&model, group.clone(), mode)?;
        Ok(train(&sp_model, copy_where(&init, |_| true), Some(&group)))
    })
    .unwrap();
    for (rank, (losses, params)) in results.iter().enumerate() {
        for (a, b) in losses.iter().zip(&ref_losses) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs(),
                "{mode:?} sp {sp} rank {rank}: {losses:?} vs {ref_losses:?}"
            );
        }
        for (name, var) in ref_params.iter() {
            let d = rel(params.get(name).unwrap(), var.as_tensor());
            assert!(
                d < 1e-5,
                "{mode:?} sp {sp} kv {kv_heads} rank {rank} {name}: {d:e}"
            );
        }
    }
    println!(
        "{mode:?} sp {sp} kv heads {kv_heads}: losses {:?} (one rank {ref_losses:?})",
        results[0].0
    );
}

#[test]
fn ulysses_matches_one_rank() {
    check(SpMode::Ulysses, 2, 4);
    // 2 KV heads over 4 ranks: they travel repeated to the query heads.
    check(SpMode::Ulysses, 4, 2);
}

#[test]
fn ring_attention_matches_one_rank() {
    check(SpMode::Ring, 2, 4);
    check(SpMode::Ring, 4, 2);
}

#[test]
fn ring_attention_on_a_sequence_four_times_the_attention_budget() {
    // Budget: one rank may form at most 16 × 16 attention scores at once (per row and head).
    let budget_tokens = 16;
    let len = 4 * budget_tokens;
    let model = Llama::new(config(4)).unwrap();
    let params = init_params(&model, 3, &Device::Cpu).unwrap();
    let (ids, _) = batch(0, len);
    let inp = AttnInputs::causal(&model.cfg, &model.rope, 2, len, None, &Device::Cpu).unwrap();
    let full = model.forward(&params, &ids, &inp).unwrap();
    let sp = 4;
    let peaks = run_local(sp, T, |comm| {
        let group = Group::new(Box::new(comm));
        let rank = group.rank();
        let (m, regions) = sequence::parallelize(&model, group, SpMode::Ring)?;
        let local = sequence::shard_inputs(&inp, sp, rank)?;
        let logits = m.forward(&params, &sequence::shard_tokens(&ids, sp, rank)?, &local)?;
        let want = sequence::shard_tokens(&full, sp, rank)?;
        let d = rel(&logits, &want);
        assert!(
            d < 1e-5,
            "rank {rank}: ring logits differ from full attention by {d:e}"
        );
        Ok(regions
            .peak_block
            .load(std::sync::atomic::Ordering::Relaxed))
    })
    .unwrap();
    for peak in &peaks {
        assert!(*peak <= budget_tokens * budget_tokens, "peak block {peak}");
    }
    println!(
        "sequence {len} (budget {budget_tokens}): full attention forms {} scores per head, ring at most {} per rank",
        len * len,
        peaks.iter().max().unwrap()
    );
}

/// A mixture of experts over a split, right-padded sequence: each rank routes its part, its
/// padding tokens (from the whole batch's mask) count for nothing, and the ranks' shares of
/// the load-balancing and z losses sum to one rank's.
#[test]
fn moe_routing_losses_over_a_split_padded_sequence_match_one_rank() {
    use colossal_core::exec::{llama_inputs, FullParams};
    use colossal_core::models::ModelFamily;
    let mut cfg = config(4);
    cfg.num_local_experts = Some(4);
    cfg.num_experts_per_tok = Some(2);
    cfg.router_aux_loss_coef = Some(0.5);
    cfg.router_z_loss_coef = Some(0.1);
    let model = Llama::new(cfg).unwrap();
    let params = init_params(&model, 5, &Device::Cpu).unwrap();
    let (ids, _) = batch(0, SEQ);
    // The second row ends in 6 padding tokens.
    let mask: Vec<Vec<u8>> = vec![vec![1; SEQ], (0..SEQ).map(|i| (i < 10) as u8).collect()];
    let inp = AttnInputs::causal(&model.cfg, &model.rope, 2, SEQ, Some(&mask), &Device::Cpu);
    let inp = inp.unwrap();
    let aux = |m: &Llama, ids: &Tensor, inp: &AttnInputs| -> colossal_core::Result<f32> {
        let out = Executor::default().forward_with(
            m,
            &mut FullParams(&params),
            &llama_inputs(ids),
            inp,
        )?;
        Ok(m.aux_loss(&out)?.expect("a MoE model").to_scalar::<f32>()?)
    };
    let whole = aux(&model, &ids, &inp).unwrap();
    // Without the mask the padding would count.
    let unmasked = AttnInputs::causal(&model.cfg, &model.rope, 2, SEQ, None, &Device::Cpu);
    let unmasked = aux(&model, &ids, &unmasked.unwrap()).unwrap();
    assert!(
        (whole - unmasked).abs() > 1e-4 * whole,
        "{whole} vs {unmasked}"
    );
    for mode in [SpMode::Ulysses, SpMode::Ring] {
        let shares = run_local(2, T, |comm| {
            let group = Group::new(Box::new(comm));
            let (sp_model, _) = sequence::parallelize(&model, group.clone(), mode)?;
            let (r, n) = (group.rank(), group.size());
            let ids = sequence::shard_tokens(&ids, n, r)?;
            aux(&sp_model, &ids, &sequence::shard_inputs(&inp, n, r)?)
        })
        .unwrap();
        let sum: f32 = shares.iter().sum();
        println!("{mode:?} sp 2: routing losses {shares:?}, sum {sum} (one rank {whole}; without the mask {unmasked})");
        assert!(
            (sum - whole).abs() <= 1e-5 * whole,
            "{mode:?}: {sum} vs {whole}"
        );
    }
}
