//! Mixtral (`MixtralForCausalLM`, the Hub layout) against transformers: logits, every layer's
//! router logits, the load-balancing loss, the loss with its auxiliary term, the listed
//! gradients, and greedy generation with the KV cache (`../shared/fixtures/mixtral_tiny`).

mod common;

use candle_core::{DType, Device, Tensor};
use colossal_core::checkpoint::llama::load_llama;
use colossal_core::models::llama::moe::load_balancing_loss;
use colossal_core::models::llama::Kernels;
use colossal_core::train::lm_loss;
use common::{assert_close, fixture, greedy_ids, ids_1d, lm_batch, load_tensors, masked};

#[test]
fn mixtral_matches_transformers() {
    let dir = fixture("mixtral_tiny");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
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

    let dir = fixture("mixtral_tiny");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
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
            let m = g
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(m > 0.0, "{name}: zero gradient");
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
