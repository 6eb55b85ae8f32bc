//! The HTTP side: OpenAI's `/v1/chat/completions`, `/v1/completions`, `/v1/models`, plus
//! `/health` and the chat page at `/`, on axum.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use colossal_core::infer::SamplingParams;
use colossal_data::chat::encode::ChatEncoder;
use colossal_data::chat::Message;
use colossal_data::tokenizer::LoadedTokenizer;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};

use crate::api::{parse, ApiError, Body};
use crate::reply::{stream, whole, Meta};
use crate::worker::Job;

/// Limits every request is checked against.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens: usize,
    /// Requests in flight at once; more get 429.
    pub max_concurrent: usize,
    /// Prompt + completion tokens a request may reach (the model's context, unless
    /// StreamingLLM lets a conversation go past it).
    pub context: usize,
}

pub struct Shared {
    pub model_name: String,
    pub tok: Arc<LoadedTokenizer>,
    /// Tokenizer and chat template (chat completions need one).
    pub chat: Option<ChatEncoder>,
    pub bos_id: Option<u32>,
    pub vocab_size: usize,
    pub eos_ids: Vec<u32>,
    pub limits: Limits,
    pub jobs: mpsc::UnboundedSender<Job>,
    pub slots: Arc<Semaphore>,
    pub load: Arc<crate::worker::Load>,
    pub created: u64,
}

pub fn router(state: Arc<Shared>) -> Router {
    let limit = state.limits.max_body_bytes;
    Router::new()
        .route("/", get(|| async { Html(crate::PAGE) }))
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Serves until SIGINT or SIGTERM (or `shutdown` resolves); running requests finish first.
pub async fn serve(
    state: Arc<Shared>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    tracing::info!("serving {} on http://{addr}", state.model_name);
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Resolves at SIGINT or SIGTERM.
pub async fn signal() {
    let int = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! { _ = int => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = int.await;
    tracing::info!("shutting down: running requests finish, new connections are refused");
}

async fn health(State(s): State<Arc<Shared>>) -> Json<Value> {
    let mut v = s.load.json();
    v["status"] = json!("ok");
    Json(v)
}

async fn models(State(s): State<Arc<Shared>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [
        {"id": s.model_name, "object": "model", "created": s.created, "owned_by": "colossal-rs"}
    ]}))
}

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Kind {
    Chat,
    Text,
}

async fn chat(State(s): State<Arc<Shared>>, body: Result<Bytes, BytesRejection>) -> Response {
    respond(s, body, Kind::Chat)
        .await
        .unwrap_or_else(|e| e.into_response())
}

async fn completions(
    State(s): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(s, body, Kind::Text)
        .await
        .unwrap_or_else(|e| e.into_response())
}

async fn respond(
    s: Arc<Shared>,
    body: Result<Bytes, BytesRejection>,
    kind: Kind,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                format!("the body is larger than {} bytes", s.limits.max_body_bytes),
            )
        } else {
            ApiError::new(e.status(), "bad_body", e.body_text())
        }
    })?;
    let req: Body = parse(&body)?;
    if req.model != s.model_name {
        return Err(ApiError {
            param: Some("model".into()),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!(
                    "the model `{}` does not exist; this server has `{}`",
                    req.model, s.model_name
                ),
            )
        });
    }
    req.refuse_unsupported()?;
    let prompt = match kind {
        Kind::Chat => chat_prompt(&s, &req)?,
        Kind::Text => text_prompt(&s, &req)?,
    };
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= s.vocab_size) {
        let param = if kind == Kind::Chat {
            "messages"
        } else {
            "prompt"
        };
        return Err(ApiError::bad(
            param,
            format!(
                "token id {bad} is outside the model's vocabulary of {}",
                s.vocab_size
            ),
        ));
    }
    let params = sampling(&s, &req, prompt.len())?;
    let stop = req.stops()?;
    let permit = s.slots.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            format!(
                "{} requests are running; try again later",
                s.limits.max_concurrent
            ),
        )
    })?;
    let (tx, rx) = mpsc::unbounded_channel();
    let job = Job {
        prompt,
        params,
        stop,
        hidden_stop_ids: if req.ignore_eos {
            Vec::new()
        } else {
            s.eos_ids.clone()
        },
        events: tx,
    };
    s.jobs.send(job).map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        )
    })?;
    let meta = Meta {
        id: format!(
            "{}-{}",
            if kind == Kind::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            next_id()
        ),
        created: now(),
        model: s.model_name.clone(),
        kind,
    };
    if req.stream {
        let usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
        Ok(stream(meta, rx, usage, permit))
    } else {
        whole(meta, rx, permit).await
    }
}

fn chat_prompt(s: &Shared, req: &Body) -> Result<Vec<u32>, ApiError> {
    if req.prompt.is_some() {
        return Err(ApiError::bad(
            "prompt",
            "chat completions take `messages`, not `prompt`",
        ));
    }
    let Some(messages) = &req.messages else {
        return Err(ApiError::bad("messages", "`messages` is required"));
    };
    if messages.is_empty() {
        return Err(ApiError::bad("messages", "`messages` must not be empty"));
    }
    let enc = s.chat.as_ref().ok_or_else(|| {
        ApiError::bad(
            "messages",
            "this server has no chat template (start it with --chat-template)",
        )
    })?;
    let mut msgs = Vec::with_capacity(messages.len());
    for m in messages {
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "developer"
        ) {
            return Err(ApiError::bad(
                "messages",
                format!("unknown role `{}`", m.role),
            ));
        }
        let role = if m.role == "developer" {
            "system"
        } else {
            m.role.as_str()
        };
        let _ = &m.name;
        msgs.push(Message::new(role, m.text()?));
    }
    let text = enc
        .template
        .render(&msgs, true)
        .map_err(|e| ApiError::bad("messages", format!("chat template: {e}")))?;
    enc.encode_text(&text)
        .map_err(|e| ApiError::bad("messages", format!("tokenizer: {e}")))
}

fn text_prompt(s: &Shared, req: &Body) -> Result<Vec<u32>, ApiError> {
    if req.messages.is_some() {
        return Err(ApiError::bad(
            "messages",
            "completions take `prompt`, not `messages`",
        ));
    }
    let bad = || {
        ApiError::bad(
            "prompt",
            "`prompt` must be a string, a list of one string, or a list of token ids",
        )
    };
    let text = match &req.prompt {
        None => return Err(ApiError::bad("prompt", "`prompt` is required")),
        Some(Value::String(t)) => t.clone(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap().to_string()
        }
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_u64) => {
            return Ok(a.iter().map(|v| v.as_u64().unwrap() as u32).collect());
        }
        Some(Value::Array(a)) if a.len() > 1 && a.iter().all(Value::is_string) => {
            return Err(ApiError::bad(
                "prompt",
                "batched prompts are not supported; send one request per prompt",
            ));
        }
        _ => return Err(bad()),
    };
    // As HF's tokenizer(text): BOS first when the model has one.
    let mut ids: Vec<u32> = s.bos_id.into_iter().collect();
    ids.extend(
        s.tok
            .encode(&text)
            .map_err(|e| ApiError::bad("prompt", format!("tokenizer: {e}")))?,
    );
    Ok(ids)
}

fn sampling(s: &Shared, req: &Body, prompt_len: usize) -> Result<SamplingParams, ApiError> {
    let max_tokens = req
        .max_completion_tokens
        .or(req.max_tokens)
        .unwrap_or(match req.messages {
            Some(_) => s
                .limits
                .max_tokens
                .min(s.limits.context.saturating_sub(prompt_len))
                .max(1),
            None => 16,
        });
    if max_tokens == 0 || max_tokens > s.limits.max_tokens {
        return Err(ApiError::bad(
            "max_tokens",
            format!("`max_tokens` must be between 1 and {}", s.limits.max_tokens),
        ));
    }
    if prompt_len + max_tokens > s.limits.context {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::bad(
                if req.messages.is_some() { "messages" } else { "prompt" },
                format!(
                    "this model's context is {} tokens; the prompt has {prompt_len} and `max_tokens` asks {max_tokens}",
                    s.limits.context
                ),
            )
        });
    }
    let params = SamplingParams {
        temperature: req.temperature.unwrap_or(1.0),
        top_k: req.top_k,
        top_p: req.top_p,
        repetition_penalty: req.repetition_penalty.unwrap_or(1.0),
        seed: req.seed.unwrap_or_else(next_id),
        max_tokens,
        stop_ids: Vec::new(),
    };
    if let Some((field, why)) = params.invalid_field() {
        return Err(ApiError::bad(field, format!("{field}: {why}")));
    }
    if params.temperature > 2.0 {
        return Err(ApiError::bad(
            "temperature",
            "`temperature` must be between 0 and 2",
        ));
    }
    Ok(params)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn next_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    now().wrapping_mul(1_000_003) ^ N.fetch_add(1, Ordering::Relaxed)
}
