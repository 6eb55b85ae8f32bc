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
