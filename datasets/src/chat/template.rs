//! HF chat templates on minijinja, configured as transformers configures jinja2
//! (`trim_blocks`, `lstrip_blocks`, no trailing newline, Python string methods, `tojson`,
//! `raise_exception`), so a template renders the same text as `apply_chat_template`.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use minijinja::{Environment, ErrorKind};

use super::Message;

pub struct ChatTemplate {
    env: Environment<'static>,
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<(), minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |_fmt: String| -> String {
            // Templates use it for a "today" line; a fixed date keeps data preparation
            // reproducible.
            "26 Jul 2024".to_string()
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| anyhow!("chat template does not parse: {e}"))?;
        Ok(Self {
            env,
            source: source.to_string(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// A template file (`.jinja`), or the `chat_template` of a `tokenizer_config.json` (a
    /// string, or transformers' list of named templates, of which `default` is taken), with
    /// its special tokens.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read chat template", path.display()))?;
        if path.extension().is_some_and(|e| e == "json") {
            let cfg: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not JSON", path.display()))?;
            let tmpl = match &cfg["chat_template"] {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(list) => list
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str())
                    .map(str::to_string)
                    .ok_or_else(|| anyhow!("{}: no `default` chat template", path.display()))?,
                _ => return Err(anyhow!("{}: no `chat_template` field", path.display())),
            };
            let token = |k: &str, d: &str| -> String {
                match &cfg[k] {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Object(o) => o
                        .get("content")
                        .and_then(|c| c.as_str())
                        .unwrap_or(d)
                        .to_string(),
                    _ => d.to_string(),
                }
            };
            return Self::new(
                &tmpl,
                &token("bos_token", "<s>"),
                &token("eos_token", "</s>"),
            )
            .with_context(|| path.display().to_string());
        }
        Self::new(&text, "<s>", "</s>").with_context(|| path.display().to_string())
    }

    /// What `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=…)`
    /// returns; a template's `raise_exception` comes back as the error message.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let tmpl = self.env.get_template("chat").map_err(|e| e.to_string())?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| match e.kind() {
            ErrorKind::InvalidOperation => e.detail().unwrap_or("template error").to_string(),
            _ => e.to_string(),
        })
    }
}
