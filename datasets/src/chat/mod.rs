//! Chat data: conversations in the TRL and ColossalChat schemas (and converters from the raw
//! public formats), rendered with HF Jinja chat templates, tokenized with the loss on
//! assistant turns only, and written as Parquet with a per-file report of every row not kept.

pub mod encode;
pub mod prep;
pub mod raw;
pub mod schema;
pub mod template;

use serde::{Deserialize, Serialize};

/// One chat message, as `apply_chat_template` takes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.to_string(),
            content: content.into(),
        }
    }
}

/// A conversation to fine-tune on (loss on the assistant turns).
#[derive(Clone, Debug, PartialEq)]
pub struct SftRow {
    pub messages: Vec<Message>,
}

/// A shared prompt and two continuations, the first preferred.
#[derive(Clone, Debug, PartialEq)]
pub struct PreferenceRow {
    pub prompt: Vec<Message>,
    pub chosen: Vec<Message>,
    pub rejected: Vec<Message>,
}

/// A prompt for rollouts, with the reference answer when the reward is verifiable (GSM8K).
#[derive(Clone, Debug, PartialEq)]
pub struct PromptRow {
    pub prompt: Vec<Message>,
    pub answer: Option<String>,
}

/// Why a row was not kept (or was cut), reported with its file and line.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Problem {
    /// The row is not valid JSON or lacks a field.
    Malformed(String),
    EmptyConversation,
    /// The chat template raised or failed to render.
    Template(String),
    /// The prompt alone is longer than the maximum length.
    PromptTooLong,
    /// Nothing to learn from is left after truncation.
    NoLossTokens,
}

impl Problem {
    pub fn kind(&self) -> &'static str {
        match self {
            Problem::Malformed(_) => "malformed",
            Problem::EmptyConversation => "empty_conversation",
            Problem::Template(_) => "template_error",
            Problem::PromptTooLong => "prompt_too_long",
            Problem::NoLossTokens => "no_loss_tokens",
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Malformed(m) => write!(f, "malformed row: {m}"),
            Problem::EmptyConversation => write!(f, "empty conversation"),
            Problem::Template(m) => write!(f, "chat template did not render: {m}"),
            Problem::PromptTooLong => write!(f, "prompt longer than max length"),
            Problem::NoLossTokens => write!(f, "no assistant tokens left after truncation"),
        }
    }
}
