//! `llama-pretrain bench`: one training step (block-wise forward + backward + AdamW) of a fixed
//! tiny LLaMA, timed over several steps; prints and writes JSON with tokens/s and GFLOP/s.
//! `scripts/bench/torch_llama.py` runs the identical model and step in PyTorch.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};
use colossal_core::exec::{llama_inputs, on_output, Executor, GradAccumulator};
use colossal_core::models::llama::{init_params, AttnInputs, Kernels, Llama, LlamaConfig};
use colossal_core::optim::{AdamW, AdamWConfig};
use colossal_core::train::lm_loss;
use rand::{Rng, SeedableRng};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[arg(long, default_value_t = 256)]
    pub dim: usize,
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    #[arg(long, default_value_t = 688)]
    pub ffn: usize,
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 2048)]
    pub vocab: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    #[arg(long)]
    pub activation_checkpointing: bool,
    /// `fused` (the kernels crate) or `reference` (compositions of candle ops).
    #[arg(long, default_value = "fused", value_parser = parse_kernels)]
    pub kernels: Kernels,
    #[arg(long, default_value = "bench.json")]
    pub out: PathBuf,
}

fn parse_kernels(s: &str) -> std::result::Result<Kernels, String> {
    match s {
        "fused" => Ok(Kernels::Fused),
        "reference" => Ok(Kernels::Reference),
        other => Err(format!("`{other}`: expected fused or reference")),
    }
}

pub fn run(a: &BenchArgs) -> Result<()> {
    let cfg: LlamaConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": a.vocab, "hidden_size": a.dim, "intermediate_size": a.ffn,
        "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
        "num_key_value_heads": a.heads, "max_position_embeddings": a.seq,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": false,
    }))?;
    let model = Llama::new(cfg)?.with_kernels(a.kernels);
    let device = Device::Cpu;
    let params = init_params(&model, 0, &device)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let ids: Vec<u32> = (0..a.batch * a.seq)
        .map(|_| rng.random_range(0..a.vocab as u32))
        .collect();
    let targets: Vec<i64> = (0..a.batch)
        .flat_map(|b| {
            ids[b * a.seq + 1..(b + 1) * a.seq]
                .iter()
                .map(|&x| x as i64)
                .collect::<Vec<_>>()
        })
        .collect();
    let ids = Tensor::from_vec(ids, (a.batch, a.seq), &device)?;
    let ctx = AttnInputs::causal(&model.cfg, &model.rope, a.batch, a.seq, None, &device)?;
    let exec = Executor {
        activation_checkpointing: a.activation_checkpointing,
    };
    let mut opt = AdamW::new(AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        no_decay: vec![],
    });
    let norm = targets.len() as f64;
    let mut times = Vec::new();
    let mut last_loss = 0.0;
    let mut faults_at_start = None;
    for i in 0..a.warmup + a.steps {
        if i == a.warmup {
            faults_at_start = colossal_core::runtime::minor_faults();
        }
        let t0 = Instant::now();
        let mut sink = GradAccumulator::default();
        let tg = targets.clone();
        let kernels = a.kernels;
        let loss_fn = on_output(move |l: &Tensor| lm_loss(kernels, l, &tg, norm));
        let inputs = llama_inputs(&ids);
        let out = exec.forward_backward(&model, &params, &inputs, &ctx, &*loss_fn, &mut sink)?;
        opt.step(&params, &sink.grads, 1e-3)?;
        last_loss = out.loss;
        if i >= a.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    // Fresh pages touched per timed step: ~0 when the step's buffers are reused.
    let faults_per_step = faults_at_start
        .zip(colossal_core::runtime::minor_faults())
        .map(|(a0, a1)| (a1 - a0) as f64 / a.steps as f64);
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let tokens = (a.batch * a.seq) as f64;
    let n_params = model.cfg.num_params();
    let n_matmul = n_params - a.vocab * a.dim; // the input embedding is a lookup, not a matmul
    let attn = 12.0 * (a.layers * a.dim * a.seq) as f64; // QK^T and AV, forward + backward, per token
    let flops = tokens * (6.0 * n_matmul as f64 + attn);
    let report = serde_json::json!({
        "implementation": "colossal-rs (candle 0.11, CPU, f32)",
        "config": {"dim": a.dim, "layers": a.layers, "heads": a.heads, "ffn": a.ffn, "seq": a.seq,
                    "batch": a.batch, "vocab": a.vocab, "activation_checkpointing": a.activation_checkpointing,
                    "kernels": a.kernels.to_string()},
        "params": n_params,
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "steps_timed": a.steps,
        "step_s_median": median,
        "step_s_mean": mean,
        "tokens_per_s": tokens / median,
        "gflops_per_s": flops / median / 1e9,
        "flops_per_step": flops,
        "flops_formula": "tokens * (6 * N_matmul + 12 * layers * dim * seq); N_matmul = params - vocab*dim (input embedding excluded)",
        "final_loss": last_loss,
        "peak_rss_bytes": colossal_core::runtime::peak_rss_bytes().unwrap_or(0),
        "minor_page_faults_per_timed_step": faults_per_step,
    });
    let text = serde_json::to_string_pretty(&report)?;
    std::fs::write(&a.out, &text)?;
    println!("{text}");
    Ok(())
}
