//! The OpenAI request bodies this server takes, checked field by field, and its error body.
//!
//! Fields OpenAI defines but this server does not implement (`n` > 1, `logprobs`, tools,
//! penalties other than `repetition_penalty`, …) are refused by name, never ignored.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

/// An error as OpenAI returns it: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param.to_string()),
            code: None,
        }
    }

    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code: Some(code),
        }
    }

    pub fn body(&self) -> Value {
        let kind = match self.status.as_u16() {
            404 => "not_found_error",
            429 => "rate_limit_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        };
        json!({"error": {"message": self.message, "type": kind, "param": self.param,
                         "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// `content` of a message: a string, or a list of `{"type": "text", "text": …}` parts.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Content,
    #[serde(default)]
    pub name: Option<String>,
}

/// A string or a list of strings (`stop`, `prompt`).
#[derive(Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

#[derive(Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// A request to either endpoint: `/v1/chat/completions` takes `messages`, `/v1/completions`
/// takes `prompt` (text, one text in a list, or token ids).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Body {
    pub model: String,
    #[serde(default)]
    pub messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    pub prompt: Option<Value>,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub max_completion_tokens: Option<usize>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Not OpenAI's; vLLM's extension.
    #[serde(default)]
    pub top_k: Option<usize>,
    /// Not OpenAI's; HF's and vLLM's.
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<OneOrMany<String>>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// vLLM's extension: keep going past EOS (benchmarks with a fixed length).
    #[serde(default)]
    pub ignore_eos: bool,
    #[serde(default)]
    pub n: Option<usize>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    #[serde(default)]
    pub logprobs: Option<Value>,
    #[serde(default)]
    pub top_logprobs: Option<Value>,
    #[serde(default)]
    pub logit_bias: Option<Value>,
    #[serde(default)]
    pub tools: Option<Value>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub response_format: Option<Value>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub best_of: Option<usize>,
    #[serde(default)]
    pub suffix: Option<String>,
}

impl Body {
    /// Refuses every field this server does not implement, naming it.
    pub fn refuse_unsupported(&self) -> Result<(), ApiError> {
        let not = |param: &str| {
            Err(ApiError::bad(
                param,
                format!("`{param}` is not supported by this server"),
            ))
        };
        if self.n.is_some_and(|n| n != 1) {
            return not("n");
        }
        if self.best_of.is_some_and(|n| n != 1) {
            return not("best_of");
        }
        if self.frequency_penalty.is_some_and(|p| p != 0.0) {
            return not("frequency_penalty");
        }
        if self.presence_penalty.is_some_and(|p| p != 0.0) {
            return not("presence_penalty");
        }
        let set = |v: &Option<Value>| {
            v.as_ref()
                .is_some_and(|v| !v.is_null() && v != &json!(false))
        };
        for (param, v) in [
            ("logprobs", &self.logprobs),
            ("top_logprobs", &self.top_logprobs),
            ("logit_bias", &self.logit_bias),
            ("tools", &self.tools),
            ("tool_choice", &self.tool_choice),
        ] {
            if set(v) {
                return not(param);
            }
        }
        if self
            .response_format
            .as_ref()
            .is_some_and(|f| f["type"] != json!("text"))
        {
            return not("response_format");
        }
        if self.echo == Some(true) {
            return not("echo");
        }
        if self.suffix.is_some() {
            return not("suffix");
        }
        Ok(())
    }

    pub fn stops(&self) -> Result<Vec<String>, ApiError> {
        let v = match &self.stop {
            None => Vec::new(),
            Some(OneOrMany::One(s)) => vec![s.clone()],
            Some(OneOrMany::Many(v)) => v.clone(),
        };
        if v.len() > 4 || v.iter().any(String::is_empty) {
            return Err(ApiError::bad("stop", "`stop`: up to 4 non-empty strings"));
        }
        Ok(v)
    }
}

impl ChatMessage {
    pub fn text(&self) -> Result<String, ApiError> {
        match &self.content {
            Content::Text(s) => Ok(s.clone()),
            Content::Parts(parts) => parts
                .iter()
                .map(|p| match (p["type"].as_str(), p["text"].as_str()) {
                    (Some("text"), Some(t)) => Ok(t),
                    _ => Err(ApiError::bad(
                        "messages",
                        "only text content parts ({\"type\": \"text\", \"text\": …}) are supported",
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|v| v.concat()),
        }
    }
}

/// A body as `T`, or a 400 naming what is wrong with it.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let (code, message) = match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                ("invalid_json", format!("the body is not valid JSON: {e}"))
            }
            _ => ("invalid_request", format!("invalid request: {e}")),
        };
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message,
            param: None,
            code: Some(code),
        }
    })
}
