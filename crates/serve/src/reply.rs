//! Responses in OpenAI's shapes: a whole completion, or server-sent events as the worker
//! sends text.

use axum::http::StatusCode;
use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::api::ApiError;
use crate::server::Kind;
use crate::worker::Event;

pub(crate) struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub kind: Kind,
}

impl Meta {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        match self.kind {
            Kind::Chat => {
                json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            }
            Kind::Text => {
                json!({"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model, "choices": [{"index": 0, "text": delta["content"].as_str().unwrap_or(""),
                "logprobs": null, "finish_reason": finish}]})
            }
        }
    }
}

fn usage(p: usize, c: usize) -> Value {
    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
}

pub(crate) fn stream(
    meta: Meta,
    mut rx: mpsc::UnboundedReceiver<Event>,
    with_usage: bool,
    permit: OwnedSemaphorePermit,
) -> Response {
    let (tx, out) = mpsc::unbounded_channel::<Result<Sse, std::convert::Infallible>>();
    // Ends when the request is done or the client has gone (the body, and `out`, dropped):
    // then `rx` drops and the engine aborts the request.
    tokio::spawn(async move {
        let _held = permit;
        let send = |v: Value| tx.send(Ok(Sse::default().data(v.to_string()))).is_ok();
        if meta.kind == Kind::Chat
            && !send(meta.chunk(json!({"role": "assistant", "content": ""}), None))
        {
            return;
        }
        while let Some(ev) = rx.recv().await {
            let alive = match ev {
                Event::Text(t) => send(meta.chunk(json!({"content": t}), None)),
                Event::Done {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    let mut ok = send(meta.chunk(json!({}), Some(finish)));
                    if with_usage {
                        let mut u = meta.chunk(json!({}), None);
                        u["choices"] = json!([]);
                        u["usage"] = usage(prompt_tokens, completion_tokens);
                        ok &= send(u);
                    }
                    ok
                }
                Event::Error(e) => {
                    send(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "engine_error", e).body())
                }
            };
            if !alive {
                return;
            }
        }
        let _ = tx.send(Ok(Sse::default().data("[DONE]")));
    });
    axum::response::Sse::new(UnboundedReceiverStream::new(out))
        .keep_alive(KeepAlive::default())
        .into_response()
}

pub(crate) async fn whole(
    meta: Meta,
    mut rx: mpsc::UnboundedReceiver<Event>,
    permit: OwnedSemaphorePermit,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Error(e) => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "engine_error",
                    e,
                ))
            }
            Event::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            } => {
                drop(permit);
                let choice = match meta.kind {
                    Kind::Chat => {
                        json!({"index": 0, "message": {"role": "assistant", "content": text},
                                         "logprobs": null, "finish_reason": finish})
                    }
                    Kind::Text => {
                        json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
                    }
                };
                let object = if meta.kind == Kind::Chat {
                    "chat.completion"
                } else {
                    "text_completion"
                };
                return Ok(Json(
                    json!({"id": meta.id, "object": object, "created": meta.created,
                    "model": meta.model, "choices": [choice],
                    "usage": usage(prompt_tokens, completion_tokens)}),
                )
                .into_response());
            }
        }
    }
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting_down",
        "the engine stopped",
    ))
}
