//! Rows in the two common chat schemas, recognised per row:
//! TRL — `{"messages": [{"role", "content"}]}`, `{"prompt", "chosen", "rejected"}` (strings or
//! message lists), `{"prompt"}`; ColossalChat — `{"messages": [{"from", "content"}]}`,
//! `{"context", "chosen", "rejected"}` (message lists).

use serde_json::Value;

use super::{Message, PreferenceRow, Problem, PromptRow, SftRow};

type RowResult<T> = Result<T, Problem>;

fn malformed(m: impl Into<String>) -> Problem {
    Problem::Malformed(m.into())
}

/// ColossalChat and ShareGPT speakers → the roles chat templates expect.
fn role_of(name: &str) -> RowResult<&'static str> {
    Ok(match name {
        "user" | "human" | "prompter" => "user",
        "assistant" | "gpt" | "bot" => "assistant",
        "system" => "system",
        other => return Err(malformed(format!("unknown role `{other}`"))),
    })
}

/// A message list (`role` or `from`, and `content`), or a bare string as one message of `role`.
pub fn messages(v: &Value, field: &str, bare_role: &str) -> RowResult<Vec<Message>> {
    match v {
        Value::String(s) => Ok(vec![Message::new(bare_role, s.clone())]),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let who = m
                    .get("role")
                    .or_else(|| m.get("from"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| malformed(format!("{field}[{i}] has no `role` or `from`")))?;
                let content = m
                    .get("content")
                    .or_else(|| m.get("value"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| malformed(format!("{field}[{i}] has no `content`")))?;
                Ok(Message::new(role_of(who)?, content))
            })
            .collect(),
        Value::Null => Err(malformed(format!("missing `{field}`"))),
        _ => Err(malformed(format!(
            "`{field}` is neither a string nor a message list"
        ))),
    }
}

fn field<'a>(row: &'a Value, name: &str) -> RowResult<&'a Value> {
    match row.get(name) {
        Some(v) if !v.is_null() => Ok(v),
        _ => Err(malformed(format!("missing `{name}`"))),
    }
}

fn non_empty(m: Vec<Message>) -> RowResult<Vec<Message>> {
    if m.is_empty() || m.iter().all(|m| m.content.trim().is_empty()) {
        Err(Problem::EmptyConversation)
    } else {
        Ok(m)
    }
}

pub fn sft(row: &Value) -> RowResult<SftRow> {
    let m = messages(field(row, "messages")?, "messages", "user")?;
    let m = non_empty(m)?;
    if !m.iter().any(|m| m.role == "assistant") {
        return Err(malformed("conversation has no assistant turn"));
    }
    Ok(SftRow { messages: m })
}

pub fn preference(row: &Value) -> RowResult<PreferenceRow> {
    let prompt = match (row.get("prompt"), row.get("context")) {
        (Some(p), _) if !p.is_null() => messages(p, "prompt", "user")?,
        (_, Some(c)) if !c.is_null() => messages(c, "context", "user")?,
        _ => {
            return Err(malformed(
                "missing `prompt` (TRL) or `context` (ColossalChat)",
            ))
        }
    };
    let chosen = messages(field(row, "chosen")?, "chosen", "assistant")?;
    let rejected = messages(field(row, "rejected")?, "rejected", "assistant")?;
    let prompt = non_empty(prompt)?;
    Ok(PreferenceRow {
        prompt,
        chosen: non_empty(chosen)?,
        rejected: non_empty(rejected)?,
    })
}

pub fn prompt(row: &Value) -> RowResult<PromptRow> {
    let p = match (row.get("prompt"), row.get("messages")) {
        (Some(p), _) if !p.is_null() => messages(p, "prompt", "user")?,
        (_, Some(m)) if !m.is_null() => messages(m, "messages", "user")?,
        _ => return Err(malformed("missing `prompt` or `messages`")),
    };
    let answer = ["answer", "gt_answer", "ground_truth"]
        .iter()
        .find_map(|k| row.get(*k).and_then(Value::as_str))
        .map(str::to_string);
    Ok(PromptRow {
        prompt: non_empty(p)?,
        answer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn both_schemas_give_the_same_rows() {
        let trl = json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]});
        let cc = json!({"messages": [{"from": "human", "content": "hi"}, {"from": "assistant", "content": "yo"}]});
        assert_eq!(sft(&trl).unwrap(), sft(&cc).unwrap());
        let trl = json!({"prompt": "q", "chosen": "a", "rejected": "b"});
        let cc = json!({"context": [{"from": "user", "content": "q"}], "chosen": [{"from": "assistant", "content": "a"}], "rejected": [{"from": "assistant", "content": "b"}]});
        assert_eq!(preference(&trl).unwrap(), preference(&cc).unwrap());
        assert_eq!(
            prompt(&json!({"prompt": "q"})).unwrap().prompt[0].content,
            "q"
        );
    }

    #[test]
    fn bad_rows_say_what_is_wrong() {
        let e = preference(&json!({"prompt": "q", "rejected": "b"})).unwrap_err();
        assert_eq!(e, Problem::Malformed("missing `chosen`".into()));
        assert_eq!(
            sft(&json!({"messages": []})).unwrap_err(),
            Problem::EmptyConversation
        );
        let e = sft(&json!({"messages": [{"role": "wizard", "content": "x"}]})).unwrap_err();
        assert_eq!(e.kind(), "malformed");
    }
}
