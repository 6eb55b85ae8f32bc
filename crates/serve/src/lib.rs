//! `colossal serve`: an OpenAI-compatible server over the paged, continuously batched engine
//! of `colossal_core::infer`, with a chat page; `colossal bench-serve`: a load generator.
//!
//! The HTTP stack (axum on tokio) lives here, not in the core library. One thread owns the
//! engine ([`worker`]); handlers tokenize, check limits and hand it jobs; the worker sends each
//! request's text back through a channel as it is generated.

pub mod api;
pub mod bench;
pub mod client;
mod reply;
pub mod server;
pub mod worker;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use colossal_core::checkpoint::llama::load_llama;
use colossal_core::infer::{Engine, EngineConfig};
use colossal_core::models::llama::{Llama, LlamaConfig};
use colossal_data::chat::encode::ChatEncoder;
use colossal_data::chat::template::ChatTemplate;
use colossal_data::tokenizer::LoadedTokenizer;
use tokio::sync::{mpsc, Semaphore};

pub use server::{Limits, Shared};

/// The chat page: one HTML file, no build step.
pub const PAGE: &str = include_str!("page.html");

/// What `colossal serve` is asked to serve.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub model: PathBuf,
    /// Tokenizer directory or file (default: the model directory).
    pub tokenizer: Option<PathBuf>,
    /// A `.jinja` template or a `tokenizer_config.json` (default: the tokenizer directory's
    /// `tokenizer_config.json`, if it has a template).
    pub chat_template: Option<PathBuf>,
    /// The name clients use in `model` (default: the model directory's name).
    pub name: Option<String>,
    /// `num_blocks = 0`: as many blocks as `kv_cache_mb` holds.
    pub engine: EngineConfig,
    pub kv_cache_mb: usize,
    /// Tensor-parallel ranks (threads), each holding a slice of the weights and of the cache.
    pub tp: usize,
    pub limits: Limits,
}

/// Loads the model and tokenizer, starts the engine thread; the state handlers share.
pub fn start(opts: &ServeOptions, device: &Device) -> Result<Arc<Shared>> {
    // Under tensor parallelism each rank reads only its slices (below).
    let (model, params) = if opts.tp > 1 {
        let cfg = LlamaConfig::from_file(&opts.model.join("config.json"))
            .with_context(|| format!("--model {}", opts.model.display()))?;
        (Llama::new(cfg)?, None)
    } else {
        let (m, p) = load_llama(&opts.model, DType::F32, device)
            .with_context(|| format!("--model {}", opts.model.display()))?;
        (m, Some(p))
    };
    let tok_path = opts.tokenizer.clone().unwrap_or_else(|| opts.model.clone());
    let tok = Arc::new(
        LoadedTokenizer::load(&tok_path)
            .with_context(|| format!("--tokenizer {}", tok_path.display()))?,
    );
    let tok_dir = if tok_path.is_dir() {
        tok_path.clone()
    } else {
        tok_path
            .parent()
            .map_or(PathBuf::from("."), Path::to_path_buf)
    };
    let chat = match &opts.chat_template {
        Some(t) => Some(
            ChatTemplate::load(t).with_context(|| format!("--chat-template {}", t.display()))?,
        ),
        None => {
            let cfg = tok_dir.join("tokenizer_config.json");
            let has = std::fs::read_to_string(&cfg).is_ok_and(|t| t.contains("\"chat_template\""));
            match has {
                true => Some(ChatTemplate::load(&cfg)?),
                false => {
                    tracing::warn!("no chat template (--chat-template): /v1/chat/completions will refuse requests");
                    None
                }
            }
        }
    };
    let chat =
        chat.map(|t| ChatEncoder::new(LoadedTokenizer::load(&tok_path).expect("loaded above"), t));
    let mut limits = opts.limits.clone();
    let cfg = &model.cfg;
    if opts.engine.streaming.is_none() {
        limits.context = limits.context.min(cfg.max_position_embeddings);
    }
    if limits.max_concurrent == 0 || limits.max_tokens == 0 {
        bail!("--max-concurrent and --max-tokens must be ≥ 1");
    }
    let name = opts.name.clone().unwrap_or_else(|| {
        opts.model
            .file_name()
            .map_or("model".into(), |n| n.to_string_lossy().into_owned())
    });
    let (bos_id, eos_ids, cfg_vocab) = (cfg.bos_token_id, cfg.eos_ids(), cfg.vocab_size);
    let mut engine_cfg = opts.engine.clone();
    if engine_cfg.num_blocks == 0 {
        let c = &model.cfg;
        let per_block =
            2 * c.num_hidden_layers * engine_cfg.block_size * c.num_kv_heads() * c.head_dim() * 4;
        engine_cfg.num_blocks =
            (opts.kv_cache_mb << 20) / per_block.max(1) / opts.tp.max(1) * opts.tp.max(1);
        tracing::info!(
            "KV cache: {} blocks of {} tokens ({} MiB)",
            engine_cfg.num_blocks,
            engine_cfg.block_size,
            opts.kv_cache_mb
        );
    }
    let (jobs, rx) = mpsc::unbounded_channel();
    let load = Arc::new(worker::Load::default());
    let shared_load = load.clone();
    let worker_tok = tok.clone();
    if opts.tp <= 1 {
        let engine = Engine::new(model, params.expect("loaded"), engine_cfg, device)?;
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || worker::run(engine, Vec::new(), worker_tok, rx, load))?;
    } else {
        tensor_parallel(opts, model, engine_cfg, device, worker_tok, rx, load)?;
    }
    Ok(Arc::new(Shared {
        model_name: name,
        tok,
        chat,
        bos_id,
        eos_ids,
        vocab_size: cfg_vocab,
        slots: Arc::new(Semaphore::new(limits.max_concurrent)),
        limits,
        jobs,
        load: shared_load,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    }))
}

/// `tp` threads, each an engine over its slice of the weights; rank 0 takes the jobs and
/// repeats every change to the others ([`worker::Mirror`]).
fn tensor_parallel(
    opts: &ServeOptions,
    model: Llama,
    cfg: EngineConfig,
    device: &Device,
    tok: Arc<LoadedTokenizer>,
    jobs: mpsc::UnboundedReceiver<worker::Job>,
    load: Arc<worker::Load>,
) -> Result<()> {
    use colossal_core::dist::{run_local, Communicator, Group};
    use colossal_core::parallel::tensor;
    let tp = opts.tp;
    let plan = tensor::checked_plan(&model, tp).with_context(|| format!("--tp {tp}"))?;
    let (dir, device) = (opts.model.clone(), device.clone());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let (senders, receivers): (Vec<_>, Vec<_>) = (1..tp)
        .map(|_| std::sync::mpsc::channel::<worker::Mirror>())
        .unzip();
    // Each follower thread takes its own receiver once.
    let receivers: Vec<_> = receivers
        .into_iter()
        .map(|rx| std::sync::Mutex::new(Some(rx)))
        .collect();
    let rank0 = std::sync::Mutex::new(Some((senders, tok, jobs, load)));
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            let r = run_local(tp, std::time::Duration::from_secs(600), |comm| {
                let rank = comm.rank();
                let local = tensor::load_sharded(&dir, &model, &plan, rank, tp, &device)?;
                let engine = colossal_core::infer::tensor_parallel(
                    &model,
                    local,
                    Group::new(Box::new(comm)),
                    cfg.clone(),
                    &device,
                )?;
                let _ = ready_tx.send(Ok(()));
                if rank == 0 {
                    let (senders, tok, jobs, load) =
                        rank0.lock().expect("rank 0").take().expect("once");
                    worker::run(engine, senders, tok, jobs, load);
                } else {
                    let rx = receivers[rank - 1]
                        .lock()
                        .expect("rank")
                        .take()
                        .expect("once");
                    worker::follow(engine, rx);
                }
                Ok(())
            });
            if let Err(e) = r {
                let _ = ready_tx.send(Err(e.to_string()));
            }
        })?;
    for _ in 0..tp {
        ready_rx
            .recv()
            .context("tensor-parallel ranks")?
            .map_err(|e| anyhow::anyhow!("--tp {tp}: {e}"))?;
    }
    Ok(())
}
