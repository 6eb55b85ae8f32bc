//! `colossal serve` and `colossal bench-serve`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use colossal_core::infer::{EngineConfig, StreamingConfig};
use colossal_serve::bench::{self, BenchOptions};
use colossal_serve::{Limits, ServeOptions};

#[derive(Args)]
pub struct ServeArgs {
    /// HF model directory.
    #[arg(long)]
    model: PathBuf,
    /// Tokenizer directory or tokenizer.json/tokenizer.model (default: the model directory).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// A .jinja chat template or a tokenizer_config.json with `chat_template`.
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// The model name clients send (default: the model directory's name).
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Tensor-parallel ranks (threads).
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Token slots per KV-cache block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Memory for the KV cache (all ranks together).
    #[arg(long, default_value_t = 512)]
    kv_cache_mb: usize,
    /// Most sequences decoded together.
    #[arg(long, default_value_t = 64)]
    max_num_seqs: usize,
    /// Most tokens one engine step feeds the model (prompts are chunked to fit).
    #[arg(long, default_value_t = 512)]
    max_batched_tokens: usize,
    /// StreamingLLM: attention-sink tokens kept at the start (with --streaming-window).
    #[arg(long)]
    streaming_sinks: Option<usize>,
    /// StreamingLLM: most recent tokens kept.
    #[arg(long)]
    streaming_window: Option<usize>,
    /// Largest `max_tokens` a request may ask.
    #[arg(long, default_value_t = 2048)]
    max_tokens: usize,
    /// Requests in flight at once (more get 429).
    #[arg(long, default_value_t = 256)]
    max_concurrent: usize,
    /// Largest request body.
    #[arg(long, default_value_t = 1024)]
    max_body_kb: usize,
}

pub fn serve(a: ServeArgs, device: &candle_core::Device) -> Result<()> {
    let streaming = match (a.streaming_sinks, a.streaming_window) {
        (None, None) => None,
        (Some(sinks), Some(window)) => Some(StreamingConfig { sinks, window }),
        _ => bail!("--streaming-sinks and --streaming-window go together"),
    };
    if a.tp == 0 {
        bail!("--tp must be ≥ 1");
    }
    let opts = ServeOptions {
        model: a.model,
        tokenizer: a.tokenizer,
        chat_template: a.chat_template,
        name: a.name,
        engine: EngineConfig {
            block_size: a.block_size,
            num_blocks: 0,
            max_num_seqs: a.max_num_seqs,
            max_batched_tokens: a.max_batched_tokens,
            streaming,
        },
        kv_cache_mb: a.kv_cache_mb,
        tp: a.tp,
        limits: Limits {
            max_body_bytes: a.max_body_kb << 10,
            max_tokens: a.max_tokens,
            max_concurrent: a.max_concurrent,
            // With StreamingLLM a conversation may pass the model's context.
            context: usize::MAX,
        },
    };
    let state = colossal_serve::start(&opts, device)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let addr = format!("{}:{}", a.host, a.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("--host/--port: cannot listen on {addr}"))?;
        eprintln!(
            "serving `{}` on http://{} (chat page at /, OpenAI API at /v1)",
            state.model_name,
            listener.local_addr()?
        );
        colossal_serve::server::serve(state, listener, colossal_serve::server::signal()).await?;
        anyhow::Ok(())
    })?;
    eprintln!("stopped");
    Ok(())
}

#[derive(Args)]
pub struct BenchServeArgs {
    /// The server: host:port or http://host:port.
    #[arg(long, default_value = "127.0.0.1:8000")]
    url: String,
    /// Concurrent clients, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    clients: Vec<usize>,
    /// Requests each client sends in turn.
    #[arg(long, default_value_t = 4)]
    requests_per_client: usize,
    /// Tokens per completion (EOS ignored).
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// One prompt per line (default: a built-in set of 16).
    #[arg(long)]
    prompts: Option<PathBuf>,
    #[arg(long, default_value = "runs/bench-serve.json")]
    out: PathBuf,
}

pub fn bench_serve(a: BenchServeArgs) -> Result<()> {
    let addr = a
        .url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let prompts = match &a.prompts {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("--prompts {}", p.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect(),
        None => bench::default_prompts(),
    };
    let rt = tokio::runtime::Runtime::new()?;
    let report = rt.block_on(async {
        let models = colossal_serve::client::request(&addr, "GET", "/v1/models", None)
            .await
            .with_context(|| format!("--url {}: no server", a.url))?
            .json()?;
        let model = models["data"][0]["id"]
            .as_str()
            .context("/v1/models lists no model")?
            .to_string();
        bench::run(BenchOptions {
            addr: addr.clone(),
            model,
            clients: a.clients.clone(),
            requests_per_client: a.requests_per_client,
            max_tokens: a.max_tokens,
            prompts,
        })
        .await
    })?;
    if let Some(dir) = a.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = a.out.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&report)?)?;
    std::fs::rename(&tmp, &a.out)?;
    println!("{}", serde_json::to_string(&report)?);
    eprintln!("wrote {}", a.out.display());
    Ok(())
}
