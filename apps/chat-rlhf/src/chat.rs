//! `chat-rlhf chat`: a terminal chat with a model, its template and streamed tokens.
//! Reads one user turn per line (stdin may be piped); `/reset` starts over, `/quit` ends.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device};
use clap::Args;
use colossal_core::checkpoint::llama::load_llama;
use colossal_core::models::llama::{generate_stream, GenerateOptions};
use colossal_data::chat::encode::ChatEncoder;
use colossal_data::chat::template::ChatTemplate;
use colossal_data::chat::Message;
use colossal_data::tokenizer::LoadedTokenizer;

use crate::config::GenerationSection;
use crate::rollout::sampling;

#[derive(Args, Clone)]
pub struct ChatArgs {
    /// HF model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Tokenizer directory (default: the model directory).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Template file or tokenizer_config.json (default: the tokenizer's tokenizer_config.json).
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Tokenizer and template from the flags (shared with `eval`).
pub fn encoder(
    model: &std::path::Path,
    tokenizer: Option<&std::path::Path>,
    template: Option<&std::path::Path>,
) -> Result<ChatEncoder> {
    let tok_dir = tokenizer.unwrap_or(model);
    let tok = LoadedTokenizer::load(tok_dir)?;
    let tmpl = match template {
        Some(t) => t.to_path_buf(),
        None => tok_dir.join("tokenizer_config.json"),
    };
    let template =
        ChatTemplate::load(&tmpl).map_err(|e| anyhow::anyhow!("--chat-template: {e:#}"))?;
    Ok(ChatEncoder::new(tok, template))
}

pub fn run(a: &ChatArgs) -> Result<()> {
    let (model, params) = load_llama(&a.model, DType::F32, &Device::Cpu)?;
    let enc = encoder(&a.model, a.tokenizer.as_deref(), a.chat_template.as_deref())?;
    let gen = GenerationSection {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: None,
        top_p: a.top_p,
    };
    let mut history: Vec<Message> = a
        .system
        .iter()
        .map(|s| Message::new("system", s.clone()))
        .collect();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    let mut turn = 0u64;
    write!(out, "user> ")?;
    out.flush()?;
    for line in stdin.lock().lines() {
        let line = line?;
        match line.trim() {
            "/quit" => break,
            "/reset" => {
                history.retain(|m| m.role == "system");
                write!(out, "(conversation cleared)\nuser> ")?;
                out.flush()?;
                continue;
            }
            "" => continue,
            _ => {}
        }
        history.push(Message::new("user", line.trim()));
        let prompt = enc
            .template
            .render(&history, true)
            .map_err(|e| anyhow::anyhow!("chat template: {e}"))?;
        let ids = enc.encode_text(&prompt)?;
        let room = model.cfg.max_position_embeddings.saturating_sub(ids.len());
        if room == 0 {
            writeln!(
                out,
                "(the conversation is longer than the model's {} positions; /reset)",
                model.cfg.max_position_embeddings
            )?;
            history.pop();
            continue;
        }
        let opts = GenerateOptions {
            max_new_tokens: a.max_new_tokens.min(room),
            sampling: sampling(&gen, a.seed ^ turn),
            stop_ids: model.cfg.eos_ids(),
            pad_id: 0,
        };
        write!(out, "assistant> ")?;
        out.flush()?;
        let eos = model.cfg.eos_ids();
        let mut so_far: Vec<u32> = Vec::new();
        let mut shown = 0usize;
        let reply = generate_stream(&model, &params, &ids, &opts, &Device::Cpu, &mut |id| {
            if eos.contains(&id) {
                return Ok(());
            }
            so_far.push(id);
            // Decode the whole reply each time: pieces may be parts of one character.
            let text = enc.tok.decode(&so_far).unwrap_or_default();
            if text.len() > shown && text.is_char_boundary(shown) {
                print!("{}", &text[shown..]);
                let _ = std::io::stdout().flush();
                shown = text.len();
            }
            Ok(())
        })?;
        let text_ids: Vec<u32> = reply.into_iter().filter(|id| !eos.contains(id)).collect();
        let text = enc.tok.decode(&text_ids)?;
        history.push(Message::new("assistant", text.trim()));
        write!(out, "\nuser> ")?;
        out.flush()?;
        turn += 1;
    }
    writeln!(out)?;
    Ok(())
}
