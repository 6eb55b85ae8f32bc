//! `colossal`: run any supported HF model directory.
//!
//! * `colossal forward --model DIR --input IDS.json --out LOGITS.safetensors`
//! * `colossal generate --model DIR --prompt-ids 1,261,340 --max-new-tokens 10`
//! * `colossal convert --from DIR --to DIR --format hf|distributed` (checkpoints)
//! * `colossal merge-lora --base DIR --adapter DIR --out DIR` (a PEFT LoRA folded into the base)
//! * `colossal serve --model DIR` (an OpenAI-compatible server and chat page)
//! * `colossal bench-serve --url HOST:PORT --clients 1,8,32` (load on a running server)

mod serve;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use clap::{Parser, Subcommand};
use colossal_core::checkpoint::{hf, llama::load_llama};
use colossal_core::exec::{llama_inputs, Executor};
use colossal_core::lora;
use colossal_core::models::llama::{generate, AttnInputs, GenerateOptions, Sampling};
use colossal_core::train::DeviceSpec;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "colossal", about = "colossal-rs model tools")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Where forward and generate run: cpu, cuda or cuda:N (a build with the cuda feature).
    #[arg(long, global = true, default_value = "cpu")]
    device: DeviceSpec,
}

#[derive(Subcommand)]
enum Cmd {
    /// Logits for a batch of ids: input JSON {"input_ids": [[..]], "attention_mask": [[..]]}.
    Forward {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Continue a prompt; prints {"ids": [...]} with the new ids only.
    Generate {
        #[arg(long)]
        model: PathBuf,
        /// Comma-separated prompt ids.
        #[arg(long, value_delimiter = ',')]
        prompt_ids: Vec<u32>,
        #[arg(long, default_value_t = 20)]
        max_new_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long)]
        top_p: Option<f64>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stop at EOS (from config.json).
        #[arg(long, default_value_t = false)]
        stop_at_eos: bool,
    },
    /// Converts a checkpoint: a distributed one (dist/index.json) to a whole HF directory
    /// (with optimizer moments and trainer state), or a whole/HF one to distributed.
    Convert {
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        to: PathBuf,
        /// Output format: hf or distributed.
        #[arg(long)]
        format: String,
        /// Shard HF weight files above this size (MB).
        #[arg(long, default_value_t = 2000)]
        max_shard_mb: usize,
    },
    /// OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models, /health)
    /// with a chat page at /: paged KV cache, continuous batching, optional StreamingLLM.
    Serve(serve::ServeArgs),
    /// Concurrent streaming clients against a running server: requests/s, tokens/s, time to
    /// first token and per-token latency percentiles, as JSON.
    BenchServe(serve::BenchServeArgs),
    /// Folds a LoRA adapter in PEFT's layout into its base model (PEFT's `merge_and_unload`):
    /// a plain model directory in the base's dtype.
    MergeLora {
        #[arg(long)]
        base: PathBuf,
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Shard HF weight files above this size (MB).
        #[arg(long, default_value_t = 2000)]
        max_shard_mb: usize,
    },
}

#[derive(serde::Deserialize)]
struct ForwardInput {
    input_ids: Vec<Vec<u32>>,
    #[serde(default)]
    attention_mask: Option<Vec<Vec<u8>>>,
}

fn main() -> Result<()> {
    colossal_core::runtime::tune_allocator();
    colossal_core::runtime::tune_threads();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let device = cli.device.device_for(0, "--device")?;
    match cli.cmd {
        Cmd::Serve(a) => serve::serve(a, &device)?,
        Cmd::BenchServe(a) => serve::bench_serve(a)?,
        Cmd::MergeLora {
            base,
            adapter,
            out,
            max_shard_mb,
        } => merge_lora(&base, &adapter, &out, max_shard_mb << 20)?,
        Cmd::Convert {
            from,
            to,
            format,
            max_shard_mb,
        } => {
            use colossal_core::checkpoint::distributed::is_distributed;
            use colossal_core::models::llama::Llama;
            use colossal_core::train::{distributed_to_whole, whole_to_distributed};
            match (format.as_str(), is_distributed(&from)) {
                ("hf", true) => distributed_to_whole::<Llama>(&from, &to, max_shard_mb << 20)?,
                ("distributed", false) => whole_to_distributed::<Llama>(&from, &to)?,
                ("hf", false) => bail!("--from {} is already an HF directory", from.display()),
                ("distributed", true) => bail!("--from {} is already distributed", from.display()),
                (other, _) => bail!("--format `{other}`: expected hf or distributed"),
            }
            eprintln!("{} → {} ({format})", from.display(), to.display());
        }
        Cmd::Forward { model, input, out } => {
            let (llama, params) = load_llama(&model, DType::F32, &device)?;
            let text = std::fs::read_to_string(&input)
                .with_context(|| format!("reading {}", input.display()))?;
            let inp: ForwardInput = serde_json::from_str(&text).with_context(|| {
                format!(
                    "{}: expected {{\"input_ids\": [[..]], \"attention_mask\": [[..]]}}",
                    input.display()
                )
            })?;
            let b = inp.input_ids.len();
            let t = inp.input_ids.first().map_or(0, Vec::len);
            if b == 0 || t == 0 || inp.input_ids.iter().any(|r| r.len() != t) {
                bail!(
                    "{}: field `input_ids` must be a non-empty rectangular array",
                    input.display()
                );
            }
            if let Some(m) = &inp.attention_mask {
                if m.len() != b || m.iter().any(|r| r.len() != t) {
                    bail!(
                        "{}: field `attention_mask` must have the shape of `input_ids` ({b}x{t})",
                        input.display()
                    );
                }
            }
            if let Some(bad) = inp
                .input_ids
                .iter()
                .flatten()
                .find(|&&id| id as usize >= llama.cfg.vocab_size)
            {
                bail!(
                    "{}: id {bad} is outside the model's vocab_size {}",
                    input.display(),
                    llama.cfg.vocab_size
                );
            }
            let ids = Tensor::from_vec(inp.input_ids.concat(), (b, t), &device)?;
            let ctx = AttnInputs::causal(
                &llama.cfg,
                &llama.rope,
                b,
                t,
                inp.attention_mask.as_deref(),
                &device,
            )?;
            let outputs =
                Executor::default().forward(&llama, &params, &llama_inputs(&ids), &ctx)?;
            let logits = outputs.output()?.clone();
            hf::save_file(&out, &[("logits".to_string(), logits)])?;
            eprintln!(
                "wrote logits ({b}, {t}, {}) to {}",
                llama.cfg.vocab_size,
                out.display()
            );
        }
        Cmd::Generate {
            model,
            prompt_ids,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            stop_at_eos,
        } => {
            let (llama, params) = load_llama(&model, DType::F32, &device)?;
            if prompt_ids.is_empty() {
                bail!("--prompt-ids: at least one id is needed");
            }
            if let Some(bad) = prompt_ids
                .iter()
                .find(|&&id| id as usize >= llama.cfg.vocab_size)
            {
                bail!(
                    "--prompt-ids: id {bad} is outside the model's vocab_size {}",
                    llama.cfg.vocab_size
                );
            }
            let sampling = if temperature > 0.0 {
                Sampling::Sample {
                    temperature,
                    top_k,
                    top_p,
                    seed,
                }
            } else {
                Sampling::Greedy
            };
            let opts = GenerateOptions {
                max_new_tokens,
                sampling,
                stop_ids: if stop_at_eos {
                    llama.cfg.eos_ids()
                } else {
                    vec![]
                },
                pad_id: llama.cfg.pad_token_id.unwrap_or(0),
            };
            let (ids, _) = generate(&llama, &params, &[prompt_ids], &opts, &device)?;
            println!("{}", serde_json::json!({ "ids": ids[0] }));
        }
    }
    Ok(())
}

/// Base + adapter → one plain model directory, written atomically.
fn merge_lora(base: &Path, adapter: &Path, out: &Path, max_shard_bytes: usize) -> Result<()> {
    use colossal_core::models::family::ModelFamily;
    let (llama, mut params) = load_llama(base, DType::F32, &candle_core::Device::Cpu)
        .with_context(|| format!("--base {}", base.display()))?;
    let dtype = match llama.cfg.dtype.as_deref() {
        None | Some("float32") => DType::F32,
        Some("bfloat16") => DType::BF16,
        Some("float16") => DType::F16,
        Some(other) => bail!(
            "--base {}: dtype `{other}` is not supported",
            base.display()
        ),
    };
    let (cfg, sites) = lora::load_adapter(adapter, &llama.linear_layers(), &mut params)
        .with_context(|| format!("--adapter {}", adapter.display()))?;
    let merged = lora::merge(&params, &cfg, &sites)?.cast(dtype)?;
    colossal_core::checkpoint::atomic::write_dir(out, |tmp| -> Result<()> {
        llama.save(tmp, &merged, max_shard_bytes)?;
        Ok(())
    })?;
    println!(
        "{}",
        serde_json::json!({"merged_modules": sites.len(), "r": cfg.r, "scaling": cfg.scaling(),
                           "out": out.display().to_string()})
    );
    Ok(())
}
