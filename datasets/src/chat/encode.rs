//! Conversation → token ids and labels. The text is the chat template's; the loss covers the
//! assistant turns: for assistant turn i, its tokens are those the conversation up to and
//! including turn i has beyond the prompt rendering of the turns before it (with the
//! generation prompt), the way ColossalChat and TRL find assistant spans without template tags.

use anyhow::Result;

use super::template::ChatTemplate;
use super::{Message, Problem};
use crate::tokenizer::LoadedTokenizer;

pub const IGNORE: i64 = -100;

pub struct ChatEncoder {
    pub tok: LoadedTokenizer,
    pub template: ChatTemplate,
    /// Special-token strings (longest first) and their ids: rendered text contains them
    /// literally (`<s>`, `</s>`) and they must become single ids, not pieces of text.
    specials: Vec<(String, u32)>,
}

/// An encoded row: ids, labels (`IGNORE` outside the loss) and whether it was cut.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub truncated: bool,
}

impl ChatEncoder {
    pub fn new(tok: LoadedTokenizer, template: ChatTemplate) -> Self {
        let mut specials: Vec<(String, u32)> = [
            template.bos_token.as_str(),
            template.eos_token.as_str(),
            "<unk>",
        ]
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| tok.token_id(s).map(|id| (s.to_string(), id)))
        .collect();
        specials.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        specials.dedup();
        Self {
            tok,
            template,
            specials,
        }
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.tok.token_id(&self.template.eos_token)
    }

    /// Ids of rendered text: special-token strings become their ids, the text between them is
    /// tokenized without adding BOS/EOS (as `apply_chat_template(tokenize=True)`).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let next = self
                .specials
                .iter()
                .filter_map(|(s, id)| rest.find(s.as_str()).map(|at| (at, s.len(), *id)))
                .min_by_key(|&(at, len, _)| (at, std::cmp::Reverse(len)));
            match next {
                Some((at, len, id)) => {
                    if at > 0 {
                        ids.extend(self.tok.encode(&rest[..at])?);
                    }
                    ids.push(id);
                    rest = &rest[at + len..];
                }
                None => {
                    ids.extend(self.tok.encode(rest)?);
                    rest = "";
                }
            }
        }
        Ok(ids)
    }

    fn render(&self, m: &[Message], gen: bool) -> Result<String, Problem> {
        self.template.render(m, gen).map_err(Problem::Template)
    }

    fn ids(&self, text: &str) -> Result<Vec<u32>, Problem> {
        self.encode_text(text)
            .map_err(|e| Problem::Template(format!("tokenizing the rendered text: {e}")))
    }

    /// Ids of `messages`, with labels on every assistant turn.
    pub fn conversation(&self, messages: &[Message], max_len: usize) -> Result<Encoded, Problem> {
        if messages.is_empty() {
            return Err(Problem::EmptyConversation);
        }
        let full = self.render(messages, false)?;
        let ids = self.ids(&full)?;
        let mut labels = vec![IGNORE; ids.len()];
        for (i, _) in messages
            .iter()
            .enumerate()
            .filter(|(_, m)| m.role == "assistant")
        {
            if i == 0 {
                return Err(Problem::Malformed(
                    "conversation starts with an assistant turn".into(),
                ));
            }
            let before = self.render(&messages[..i], true)?;
            let upto = self.render(&messages[..=i], false)?;
            if !upto.starts_with(&before) || !full.starts_with(&upto) {
                return Err(Problem::Template(format!(
                    "the rendering of turns 0..{i} is not a prefix of the whole conversation; the template cannot mark assistant turns"
                )));
            }
            let (start, end) = (self.ids(&before)?.len(), self.ids(&upto)?.len());
            for t in start..end.min(ids.len()) {
                labels[t] = ids[t] as i64;
            }
        }
        let truncated = ids.len() > max_len;
        let (ids, labels) = if truncated {
            (ids[..max_len].to_vec(), labels[..max_len].to_vec())
        } else {
            (ids, labels)
        };
        if labels.iter().all(|&l| l == IGNORE) {
            return Err(Problem::NoLossTokens);
        }
        Ok(Encoded {
            ids,
            labels,
            truncated,
        })
    }

    /// The prompt with the generation prompt appended (what a rollout continues).
    pub fn prompt(&self, prompt: &[Message], max_len: usize) -> Result<Vec<u32>, Problem> {
        if prompt.is_empty() {
            return Err(Problem::EmptyConversation);
        }
        let ids = self.ids(&self.render(prompt, true)?)?;
        if ids.len() >= max_len {
            return Err(Problem::PromptTooLong);
        }
        Ok(ids)
    }

    /// `prompt` followed by `response`, labels on the response. A prompt that leaves fewer
    /// than `max_len / 4` (at most 16) tokens for the response loses its oldest exchanges
    /// (a user turn and the reply to it; a leading system message stays); the response is then
    /// cut to fit. Only a last turn that alone is too long is a `PromptTooLong`.
    pub fn continuation(
        &self,
        prompt: &[Message],
        response: &[Message],
        max_len: usize,
    ) -> Result<Encoded, Problem> {
        let room = (max_len / 4).clamp(1, 16);
        let system = prompt.first().is_some_and(|m| m.role == "system") as usize;
        let mut kept: Vec<Message> = prompt.to_vec();
        let mut cut_prompt = false;
        let p = loop {
            match self.prompt(&kept, max_len.saturating_sub(room)) {
                Err(Problem::PromptTooLong) if kept.len() > system + 2 => {
                    kept.drain(system..system + 2);
                    cut_prompt = true;
                }
                other => break other?,
            }
        };
        let prompt = kept.as_slice();
        let all: Vec<Message> = prompt.iter().chain(response).cloned().collect();
        let text = self.render(&all, false)?;
        let ids = self.ids(&text)?;
        if ids.len() <= p.len() || ids[..p.len()] != p[..] {
            return Err(Problem::Template(
                "the prompt's tokens are not a prefix of prompt + response".into(),
            ));
        }
        let truncated = cut_prompt || ids.len() > max_len;
        let ids = ids[..ids.len().min(max_len)].to_vec();
        let labels = ids
            .iter()
            .enumerate()
            .map(|(t, &x)| if t < p.len() { IGNORE } else { x as i64 })
            .collect();
        Ok(Encoded {
            ids,
            labels,
            truncated,
        })
    }
}
