//! Mixtral (`MixtralForCausalLM`, the Hub layout) against transformers: logits, every layer's
//! router logits, the load-balancing loss, the loss with its auxiliary term, the listed
//! gradients, and greedy generation with the KV cache (`../shared/fixtures/mixtral_tiny`).

mod common;

use candle_core::{DType, Device, Tensor};
use colossal_core::checkpoint::llama::load_llama;
use colossal_core::models::llama::moe::load_balancing_loss;
use colossal_core::models::llama::Kernels;
use colossal_core::train::lm_loss;
use common::{
    assert_close, fixture, greedy_ids, ids_1d, lm_batch, load_tensors, masked, max_abs, max_diff,
};

/// The fixture's directory and `reference.json`.
fn mixtral_fixture() -> (std::path::PathBuf, serde_json::Value) {
    let dir = fixture("mixtral_tiny");
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    (dir, serde_json::from_str(&text).unwrap())
}

#[test]
fn mixtral_matches_transformers() {
    let (dir, reference) = mixtral_fixture();
    let tensors = load_tensors(&dir.join("reference.safetensors"));
    for kernels in [Kernels::Fused, Kernels::Reference] {
        let (model, params) = load_llama(&dir.join("model"), DType::F32, &Device::Cpu).unwrap();
        let model = model.with_kernels(kernels);
        assert_eq!(model.cfg.num_local_experts, Some(4));
        let (ids, inp, targets, mask) = lm_batch(&model, &reference);
        let (logits, routers) = model.forward_with_router(&params, &ids, &inp).unwrap();
        let e = assert_close(
            "logits",
            &masked(&logits, &mask),
            &masked(&tensors["logits"], &mask),
            1e-4,
        );
        println!("mixtral ({kernels}): logits rel err {e:e}");
        for (l, r) in routers.iter().enumerate() {
            let e = assert_close(
                &format!("router_logits.{l}"),
                r,
                &tensors[&format!("router_logits.{l}")],
                1e-4,
            );
            println!("mixtral ({kernels}): router_logits.{l} rel err {e:e}");
        }
        let m = Tensor::from_vec(mask.concat(), (mask.len(), mask[0].len()), &Device::Cpu).unwrap();
        let aux = load_balancing_loss(&model, &routers, Some(&m)).unwrap();
        let n = targets.iter().filter(|&&t| t != -100).count() as f64;
        let ce = lm_loss(kernels, &logits, &targets, n).unwrap();
        let coef = model.cfg.router_aux_loss_coef.unwrap();
        let loss = (&ce + (&aux * coef).unwrap()).unwrap();
        let (aux_v, loss_v) = (
            aux.to_scalar::<f32>().unwrap(),
            loss.to_scalar::<f32>().unwrap(),
        );
        let (want_aux, want_loss) = (
            reference["aux_loss"].as_f64().unwrap() as f32,
            reference["loss"].as_f64().unwrap() as f32,
        );
        println!("mixtral ({kernels}): aux_loss {aux_v} (transformers {want_aux}), loss {loss_v} (transformers {want_loss})");
        assert!(
            (aux_v - want_aux).abs() <= 1e-5,
            "aux {aux_v} vs {want_aux}"
        );
        assert!(
            (loss_v - want_loss).abs() <= 1e-5,
            "loss {loss_v} vs {want_loss}"
        );
        let grads = loss.backward().unwrap();
        let mut listed = 0;
        for (name, want) in tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("grad.").map(|n| (n, v)))
        {
            let var = params
                .get(name)
                .unwrap_or_else(|_| panic!("no parameter {name}"));
            let g = grads
                .get(var)
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            let e = assert_close(&format!("grad.{name}"), g, want, 1e-4);
            listed += 1;
            if name.ends_with("gate.weight") || name.contains("embed") {
                println!("mixtral ({kernels}): grad.{name} rel err {e:e}");
            }
        }
        assert!(listed >= 10, "{listed} gradients listed");
        // Greedy generation with the KV cache.
        let prompt = ids_1d(&reference["prompt_ids"]);
        let want = ids_1d(&reference["greedy_ids"]);
        let got = greedy_ids(&model, &params, &prompt, want.len());
        assert_eq!(got, want, "greedy ids");
    }
}

/// Training goes through the block-wise executor, where no layer's graph outlives its block:
/// the routing sums carried between blocks give transformers' loss (cross-entropy + 0.02 ×
/// load balancing) and the listed gradients, with and without activation checkpointing; the
/// engine adds the term itself (one micro-batch: weight 1), so a trainer's loss is HF's.
#[test]
fn mixtral_trains_block_wise_with_the_load_balancing_loss() {
    use colossal_core::exec::{llama_inputs, Executor, GradAccumulator};
    use colossal_core::models::ModelFamily;
    use colossal_core::parallel::pipeline_run::MicroBatch;
    use colossal_core::train::{Engine, Origin};

    let (dir, reference) = mixtral_fixture();
    let tensors = load_tensors(&dir.join("reference.safetensors"));
    let want_loss = reference["loss"].as_f64().unwrap() as f32;
    let (model, params) = load_llama(&dir.join("model"), DType::F32, &Device::Cpu).unwrap();
    let (ids, inp, targets, _) = lm_batch(&model, &reference);
    let n = targets.iter().filter(|&&t| t != -100).count() as f64;
    let kernels = model.kernels;
    for checkpointing in [false, true] {
        let ex = Executor {
            activation_checkpointing: checkpointing,
        };
        let loss_fn = |out: &colossal_core::exec::Acts| {
            let ce = lm_loss(kernels, out.output()?, &targets, n)?;
            let aux = model
                .aux_loss(out)?
                .expect("a mixture of experts has an aux loss");
            Ok((ce + aux)?)
        };
        let mut acc = GradAccumulator::default();
        let out = ex
            .forward_backward(
                &model,
                &params,
                &llama_inputs(&ids),
                &inp,
                &loss_fn,
                &mut acc,
            )
            .unwrap();
        println!(
            "block-wise (checkpointing {checkpointing}): loss {} (transformers {want_loss})",
            out.loss
        );
        assert!((out.loss - want_loss).abs() <= 1e-5);
        let mut listed = 0;
        for (name, want) in tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("grad.").map(|n| (n, v)))
        {
            let g = acc
                .grads
                .get(name)
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            let e = assert_close(&format!("grad.{name}"), g, want, 1e-4);
            if name.ends_with("gate.weight") {
                println!("block-wise: grad.{name} rel err {e:e}");
            }
            listed += 1;
        }
        assert!(listed >= 10);
        // The router gets its gradient through both the kept weights and the aux term: every
        // trainable parameter gets a non-zero one.
        for (name, _) in params.iter() {
            let g = acc
                .grads
                .get(name)
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            assert!(max_abs(g) > 0.0, "{name}: zero gradient");
        }
    }
    // The engine: one micro-batch of the global batch, so the term counts with weight 1.
    let tmp = tempfile::tempdir().unwrap();
    let cfg: colossal_core::train::TrainConfig = toml::from_str(&format!(
        "[train]\nout_dir = \"{}\"\nbatch_size = 1\nmicro_batch_size = 1\nmax_steps = 1\nlr = 1e-3\n",
        tmp.path().display()
    ))
    .unwrap();
    let origin = Origin::Whole {
        model: model.clone(),
        params: params.clone(),
    };
    let mut engine = Engine::new_rank(cfg, origin, Device::Cpu, None).unwrap();
    let (loss, norm, _) = engine
        .step(1, |_| {
            let targets = targets.clone();
            Ok(MicroBatch {
                inputs: llama_inputs(&ids),
                ctx: inp.clone(),
                loss_fn: colossal_core::exec::on_output(move |logits: &Tensor| {
                    lm_loss(kernels, logits, &targets, n)
                }),
            })
        })
        .unwrap();
    println!("engine step: loss {loss} (transformers {want_loss}), grad norm {norm:.6}");
    assert!((loss - want_loss).abs() <= 1e-5, "engine loss {loss}");
}

/// The router z-loss (ST-MoE: coefficient × mean over tokens and layers of logsumexp(router
/// logits)², padding excluded) joins the model's loss term, and expert capacity drops exactly
/// the slots past ⌈factor · N · k / E⌉ per expert, first choices first: counted in the model's
/// counters; a factor of E / k drops nothing and changes nothing.
#[test]
fn router_z_loss_and_expert_capacity() {
    use colossal_core::exec::{llama_inputs, Executor};
    use colossal_core::models::llama::Llama;
    use colossal_core::models::ModelFamily;

    let (dir, reference) = mixtral_fixture();
    let (base, params) = load_llama(&dir.join("model"), DType::F32, &Device::Cpu).unwrap();
    let (ids, inp, _, mask) = lm_batch(&base, &reference);
    let with = |f: &dyn Fn(&mut colossal_core::models::llama::LlamaConfig)| {
        let mut cfg = base.cfg.clone();
        f(&mut cfg);
        Llama::new(cfg).unwrap()
    };
    let aux_of = |m: &Llama| {
        let out = Executor::default()
            .forward(m, &params, &llama_inputs(&ids), &inp)
            .unwrap();
        let aux = m.aux_loss(&out).unwrap().unwrap();
        (out, aux.to_scalar::<f32>().unwrap() as f64)
    };
    // z-loss by hand from the router logits, in f64.
    let (_, routers) = base.forward_with_router(&params, &ids, &inp).unwrap();
    let valid: Vec<f64> = mask.concat().iter().map(|&v| v as f64).collect();
    let (mut z, mut count) = (0f64, 0f64);
    for r in &routers {
        for (row, w) in r.to_vec2::<f32>().unwrap().iter().zip(&valid) {
            let m = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
            let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            z += w * lse * lse;
            count += w;
        }
    }
    let z = z / count;
    let (_, aux) = aux_of(&base);
    let zed = with(&|c| c.router_z_loss_coef = Some(0.01));
    let (_, aux_z) = aux_of(&zed);
    println!("z-loss: mean lse² {z:.6}, loss term {aux:.6} → {aux_z:.6} with coefficient 0.01");
    assert!(
        (aux_z - aux - 0.01 * z).abs() < 1e-5,
        "{aux_z} vs {aux} + 0.01·{z}"
    );

    // Capacity: E / k = 2 → every expert may take all N tokens.
    let (plain, _) = aux_of(&base);
    let roomy = with(&|c| c.capacity_factor = Some(2.0));
    let (out, _) = aux_of(&roomy);
    assert_eq!(
        max_diff(out.output().unwrap(), plain.output().unwrap()),
        0.0
    );
    assert_eq!(roomy.counters()[1], ("moe_dropped_slots", 0));
    // Factor 1: capacity ⌈32 · 2 / 4⌉ = 16 per expert; the drops counted by hand from each
    // layer's router logits (layer 1's after layer 0's drops).
    let tight = with(&|c| c.capacity_factor = Some(1.0));
    let (out, _) = aux_of(&tight);
    let counters = tight.counters();
    let (_, tight_routers) = tight.forward_with_router(&params, &ids, &inp).unwrap();
    let mut by_hand = Vec::new();
    for r in &tight_routers {
        let top2: Vec<[usize; 2]> = r
            .to_vec2::<f32>()
            .unwrap()
            .iter()
            .map(|r| {
                let mut o: Vec<usize> = (0..4).collect();
                o.sort_by(|&a, &b| r[b].total_cmp(&r[a]).then(a.cmp(&b)));
                [o[0], o[1]]
            })
            .collect();
        let (mut taken, mut dropped) = ([0usize; 4], 0u64);
        for j in 0..2 {
            for t in &top2 {
                match taken[t[j]] < 16 {
                    true => taken[t[j]] += 1,
                    false => dropped += 1,
                }
            }
        }
        by_hand.push(dropped);
    }
    println!("capacity factor 1.0: drops by hand per layer {by_hand:?} of 64 slots each; model counters {counters:?}");
    assert!(by_hand[0] > 0, "the fixture's routing overflows an expert");
    assert_eq!(counters[0], ("moe_routed_slots", 128));
    assert_eq!(
        counters[1],
        ("moe_dropped_slots", by_hand.iter().sum::<u64>())
    );
    assert!(max_diff(out.output().unwrap(), plain.output().unwrap()) > 1e-3);
    // Which slots stay: 4 tokens, 2 experts, top 2, factor 0.5 → 2 per expert. Expert 0 takes
    // the first choices of tokens 0 and 1 (token 2's is dropped), expert 1 token 3's first
    // choice, then token 0's second; every other second choice finds its expert full.
    let small = with(&|c| {
        c.num_local_experts = Some(2);
        c.capacity_factor = Some(0.5);
    });
    let kept = small.within_capacity(&[0, 1, 0, 1, 0, 1, 1, 0], 4);
    assert_eq!(kept, [0, 1, 2, 6]);
}
