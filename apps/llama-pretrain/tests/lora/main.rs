//! `[lora]` training: only the adapters train (the base stays bit-identical), data parallel, ZeRO
//! 1–3, pipeline, tensor (with Megatron-SP), sequence and expert parallel layouts equal one rank,
//! QLoRA's quantised base trains as its dequantised copy does, a checkpoint holds the adapter in
//! PEFT's layout and resumes bit-exactly, and the layouts not implemented with LoRA are refused by
//! name.

#[path = "../common/mod.rs"]
mod common;
mod layouts;
mod qlora;

use std::path::Path;
use std::time::Duration;

use candle_core::Device;
use colossal_core::config::parse_config;
use colossal_core::dist::{run_local, Communicator};
use colossal_core::train::{TrainConfig, Trainer};
use colossal_session::RunExt;
use common::{config_text, flat, prepare, Flat, Run};

const STEPS: usize = 5;
const LORA: &str = "\n[lora]\nr = 4\nalpha = 8\ntarget_modules = [\"all-linear\"]\n";

fn lora_config(data: &Path, out: &Path, overrides: &[&str]) -> TrainConfig {
    let text = config_text(data, out, 32000) + LORA;
    let ov: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    parse_config(&text, "test.toml", &ov).unwrap()
}

/// `STEPS` steps of a global batch of 8 on `ranks` local ranks: the run (adapters as the
/// parameters) and the frozen base weights at the end.
fn run(data: &Path, out: &Path, ranks: usize, micro: usize, extra: &[&str]) -> (Run, Flat) {
    let mbs = format!("train.micro_batch_size={micro}");
    let mut overrides = vec![
        "train.batch_size=8",
        &mbs,
        "train.lr=1e-3",
        "train.min_lr=1e-4",
    ];
    overrides.extend_from_slice(extra);
    let cfg = lora_config(data, out, &overrides);
    let mut results = run_local(ranks, Duration::from_secs(60), |comm| {
        let comm: Box<dyn Communicator> = Box::new(comm);
        let mut t = Trainer::new_rank(cfg.clone(), None, Device::Cpu, (ranks > 1).then_some(comm))?;
        let mut run = Run::default();
        for _ in 0..STEPS {
            run.step(t.train_step()?);
        }
        let full = t.full_params()?;
        run.params = flat(&full);
        if cfg.parallel.zero_stage == 3 && cfg.parallel.ep == 1 {
            // The base shards with the adapters: a rank holds ⌈n/ranks⌉ of every weight.
            let sizes = full.frozen().map(|(_, t)| t.elem_count());
            let sizes = sizes.chain(full.iter().map(|(_, v)| v.elem_count()));
            let want: usize = sizes.map(|n| 4 * n.div_ceil(ranks)).sum();
            let m = t.last_step_metrics();
            let got = m["mem_params_bytes"].as_u64().unwrap() as usize;
            assert_eq!(got, want, "parameter bytes a ZeRO-3 rank holds");
            // Gradient chunks: the adapters' only.
            let adapters: usize = full
                .iter()
                .map(|(_, v)| 4 * v.elem_count().div_ceil(ranks))
                .sum();
            assert_eq!(m["mem_grads_bytes"].as_u64().unwrap() as usize, adapters);
            assert_eq!(
                t.params.frozen().count(),
                0,
                "a whole base on a ZeRO-3 rank"
            );
            if t.is_main() {
                println!(
                    "lora zero-3: {got} parameter bytes a rank (whole model {})",
                    4 * (full.num_elements()
                        + full.frozen().map(|(_, t)| t.elem_count()).sum::<usize>())
                );
            }
        }
        let base: Flat = full
            .frozen()
            .map(|(n, t)| (n.to_string(), t.flatten_all().unwrap().to_vec1().unwrap()))
            .collect();
        Ok((run, base))
    })
    .unwrap();
    results.swap_remove(0)
}

/// The frozen base (dequantised where it rests quantised), by name.
fn base_of(p: &colossal_core::params::Params) -> Flat {
    let dense = p.dense().unwrap();
    let mut v: Flat = dense
        .frozen()
        .map(|(n, t)| (n.to_string(), t.flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn lora_checkpoint_is_a_peft_adapter_and_resumes_bit_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    // A base resting in nf4 is written dequantised and quantised again on resume.
    let mut finals = Vec::new();
    for (what, sets) in [("dense", &[][..]), ("nf4", &["lora.quantize=\"nf4\""][..])] {
        let cfg = |out: &Path| lora_config(&data, out, sets);
        let straight = tmp.path().join(what).join("straight");
        let mut t = Trainer::new(cfg(&straight), None, Device::Cpu).unwrap();
        let final_a = t.run(None).unwrap().final_dir.unwrap();
        let split = tmp.path().join(what).join("split");
        let mut t = Trainer::new(cfg(&split), None, Device::Cpu).unwrap();
        let half = t.run(Some(3)).unwrap().final_dir.unwrap();
        drop(t);
        let mut t = Trainer::new(cfg(&split), Some(&half), Device::Cpu).unwrap();
        assert_eq!(t.state.step, 3);
        assert_eq!(t.params.quantised().count(), 14 * (what == "nf4") as usize);
        let final_b = t.run(None).unwrap().final_dir.unwrap();
        for file in [
            "adapter/adapter_model.safetensors",
            "optimizer.safetensors",
            "model.safetensors",
        ] {
            let a = std::fs::read(final_a.join(file)).unwrap();
            let b = std::fs::read(final_b.join(file)).unwrap();
            // Not assert_eq: a failure would print both files byte by byte.
            assert!(a == b, "{what} {file}: 6 straight steps vs 3 + resume 3");
        }
        println!("{what}: 6 straight steps and 3 + resume 3 write the same files");
        finals.push(final_a);
    }
    let final_a = &finals[0];
    let nf4 = std::fs::read(finals[1].join("adapter/adapter_model.safetensors")).unwrap();
    let dense = std::fs::read(final_a.join("adapter/adapter_model.safetensors")).unwrap();
    assert_ne!(nf4, dense, "the nf4 base trains other adapters");
    // The checkpoint's adapter is PEFT's layout: it loads onto the checkpoint's base.
    let (model, mut params) = colossal_core::checkpoint::llama::load_llama(
        final_a,
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let (cfg, sites) = colossal_core::lora::load_adapter(
        &final_a.join("adapter"),
        &model.linear_layers(),
        &mut params,
    )
    .unwrap();
    assert_eq!((cfg.r, cfg.alpha, sites.len()), (4, 8.0, 14));
    // The optimizer state holds the adapters only.
    let opt = colossal_core::checkpoint::hf::read_tensors(
        &[final_a.join("optimizer.safetensors")],
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(opt.len(), 2 * 28);
    assert!(opt.keys().all(|k| k.contains(".lora_")));
}

#[test]
fn lora_refuses_layouts_it_does_not_implement() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    for (set, says) in [
        (
            "lora.quant_block_size=7",
            "lora.quant_block_size is set but lora.quantize is not",
        ),
        (
            "lora.target_modules=[\"nothing\"]",
            "matches no Linear layer",
        ),
    ] {
        let cfg = lora_config(&data, &tmp.path().join("x"), &[set]);
        let err = Trainer::new(cfg, None, Device::Cpu)
            .err()
            .expect(set)
            .to_string();
        println!("{set}: {err}");
        assert!(err.contains(says), "{set}: {err}");
    }
    // Dropout masks key off a token's place in its row: not on rows routed to experts.
    let sets = ["lora.dropout=0.1", "model.config.num_local_experts=4"];
    let cfg = lora_config(&data, &tmp.path().join("y"), &sets);
    let err = Trainer::new(cfg, None, Device::Cpu).err().unwrap();
    println!("{sets:?}: {err}");
    assert!(err
        .to_string()
        .contains("lora.dropout = 0.1 on a mixture of experts is not implemented"));
    for (sets, says) in [
        (
            &["lora.quantize=\"int8\"", "parallel.zero_stage=3"][..],
            "lora.quantize = \"int8\" with parallel.zero_stage = 3 is not implemented",
        ),
        (
            &["lora.quantize=\"nf4\"", "lora.quant_block_size=7"][..],
            "lora.quant_block_size: nf4 packs two indices a byte: block size 7 is odd",
        ),
    ] {
        let cfg = lora_config(&data, &tmp.path().join("z"), sets);
        let err = cfg.lora.as_ref().unwrap().validate(&cfg).unwrap_err();
        println!("{sets:?}: {err}");
        assert!(err.to_string().contains(says), "{err}");
    }
}
