//! Converters from the raw public formats in `../shared/data` to TRL-schema rows.

use clap::ValueEnum;
use serde_json::{json, Value};

use super::{Message, Problem};

/// What a data set is prepared for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    Sft,
    Preference,
    Prompt,
}

/// The layout of each input line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RawFormat {
    /// TRL or ColossalChat schema, recognised per row.
    Auto,
    /// Anthropic hh-rlhf: `{"chosen", "rejected"}` "\n\nHuman: …\n\nAssistant: …" dialogues.
    HhRlhf,
    /// OpenAssistant message trees (`prompt` with nested ranked `replies`).
    Oasst,
    /// `{"text": "### Human: … ### Assistant: …"}` (Dolly open_qa as reformatted).
    Dolly,
    /// `{"prompt": "<Alpaca template>", "answer": "…###eos_token###"}`.
    DollyAlpaca,
    /// self-instruct seed tasks: `{instruction, instances: [{input, output}]}`.
    SelfInstruct,
    /// GSM8K `{question, answer}` (answer ends with "#### <number>").
    Gsm8k,
    /// One JSON string per line (OpenAssistant prompt lottery).
    PromptLines,
}

fn malformed(m: impl Into<String>) -> Problem {
    Problem::Malformed(m.into())
}

fn text<'a>(v: &'a Value, k: &str) -> Result<&'a str, Problem> {
    v.get(k)
        .and_then(Value::as_str)
        .ok_or_else(|| malformed(format!("missing `{k}`")))
}

fn unsupported(format: RawFormat, kind: Kind) -> Problem {
    malformed(format!("format {format:?} has no {kind:?} rows"))
}

/// The rows (TRL schema) that one input line gives.
pub fn to_trl(format: RawFormat, kind: Kind, v: &Value) -> Result<Vec<Value>, Problem> {
    match format {
        RawFormat::Auto => Ok(vec![v.clone()]),
        RawFormat::HhRlhf => hh_rlhf(kind, v),
        RawFormat::Oasst => oasst(kind, v),
        RawFormat::Dolly => {
            let t = text(v, "text")?;
            let (q, a) = t
                .split_once(" ### Assistant: ")
                .ok_or_else(|| malformed("no \" ### Assistant: \" in `text`"))?;
            let q = q.trim_start_matches("### Human:").trim();
            single_turn(kind, q, a.trim(), None)
        }
        RawFormat::DollyAlpaca => {
            let p = text(v, "prompt")?;
            let a = text(v, "answer")?
                .trim_end_matches("###eos_token###")
                .trim();
            let body = p
                .split_once("### Instruction:\n")
                .map(|(_, b)| b)
                .ok_or_else(|| malformed("no \"### Instruction:\" in `prompt`"))?;
            let body = body.trim_end().trim_end_matches("### Response:").trim_end();
            let q = match body.split_once("\n\n### Input:\n") {
                Some((ins, input)) => format!("{}\n\n{}", ins.trim(), input.trim()),
                None => body.trim().to_string(),
            };
            single_turn(kind, &q, a, None)
        }
        RawFormat::SelfInstruct => {
            let ins = text(v, "instruction")?;
            let instances = v
                .get("instances")
                .and_then(Value::as_array)
                .ok_or_else(|| malformed("missing `instances`"))?;
            let mut rows = Vec::new();
            for inst in instances {
                let input = inst.get("input").and_then(Value::as_str).unwrap_or("");
                let q = if input.trim().is_empty() {
                    ins.to_string()
                } else {
                    format!("{ins}\n\n{input}")
                };
                rows.extend(single_turn(kind, &q, text(inst, "output")?, None)?);
            }
            Ok(rows)
        }
        RawFormat::Gsm8k => {
            let q = text(v, "question")?;
            let a = text(v, "answer")?;
            let number =
                gsm8k_answer(a).ok_or_else(|| malformed("answer has no \"#### <number>\""))?;
            single_turn(kind, q, a, Some(number))
        }
        RawFormat::PromptLines => match (kind, v) {
            (Kind::Prompt, Value::String(s)) => Ok(vec![json!({ "prompt": s })]),
            (Kind::Prompt, _) => Err(malformed("line is not a JSON string")),
            (k, _) => Err(unsupported(format, k)),
        },
    }
}

fn single_turn(
    kind: Kind,
    q: &str,
    a: &str,
    answer: Option<String>,
) -> Result<Vec<Value>, Problem> {
    Ok(vec![match kind {
        Kind::Sft => json!({"messages": [Message::new("user", q), Message::new("assistant", a)]}),
        Kind::Prompt => json!({"prompt": [Message::new("user", q)], "answer": answer}),
        Kind::Preference => return Err(malformed("single answers have no preference pairs")),
    }])
}

/// GSM8K's final answer: the number after "####", without thousands separators.
pub fn gsm8k_answer(solution: &str) -> Option<String> {
    let tail = solution.rsplit_once("####")?.1.trim();
    let n: String = tail.chars().filter(|c| *c != ',').collect();
    (!n.is_empty()).then_some(n)
}

/// "\n\nHuman: …\n\nAssistant: …" → messages.
pub fn hh_dialogue(s: &str) -> Result<Vec<Message>, Problem> {
    const MARKS: [(&str, &str); 2] = [("\n\nHuman: ", "user"), ("\n\nAssistant: ", "assistant")];
    let mut cuts: Vec<(usize, usize, &str)> = Vec::new();
    for (mark, role) in MARKS {
        cuts.extend(s.match_indices(mark).map(|(i, m)| (i, i + m.len(), role)));
    }
    // A turn may end with a bare "\n\nAssistant:" (the prompt of a PPO rollout).
    if let Some(i) = s.strip_suffix("\n\nAssistant:").map(str::len) {
        cuts.push((i, s.len(), "assistant"));
    }
    cuts.sort();
    if cuts.first().map(|c| c.0) != Some(0) {
        return Err(malformed("dialogue does not start with \"\\n\\nHuman: \""));
    }
    let mut out = Vec::new();
    for (i, &(_, start, role)) in cuts.iter().enumerate() {
        let end = cuts.get(i + 1).map_or(s.len(), |c| c.0);
        out.push(Message::new(role, s[start..end].trim()));
    }
    Ok(out)
}

fn hh_rlhf(kind: Kind, v: &Value) -> Result<Vec<Value>, Problem> {
    let chosen = hh_dialogue(text(v, "chosen")?)?;
    let split = |m: &[Message]| -> Result<(Vec<Message>, Message), Problem> {
        match m.split_last() {
            Some((last, rest)) if last.role == "assistant" && !rest.is_empty() => {
                Ok((rest.to_vec(), last.clone()))
            }
            _ => Err(malformed("dialogue does not end with an Assistant turn")),
        }
    };
    Ok(vec![match kind {
        Kind::Sft => json!({ "messages": chosen }),
        Kind::Prompt => json!({ "prompt": split(&chosen)?.0 }),
        Kind::Preference => {
            let (prompt, c) = split(&chosen)?;
            let (prompt_r, r) = split(&hh_dialogue(text(v, "rejected")?)?)?;
            if prompt != prompt_r {
                return Err(malformed(
                    "chosen and rejected differ before their last turn",
                ));
            }
            json!({"prompt": prompt, "chosen": [c], "rejected": [r]})
        }
    }])
}

fn oasst_message(node: &Value) -> Result<Message, Problem> {
    let role = match text(node, "role")? {
        "prompter" => "user",
        "assistant" => "assistant",
        other => return Err(malformed(format!("unknown OpenAssistant role `{other}`"))),
    };
    Ok(Message::new(role, text(node, "text")?))
}

fn replies(node: &Value) -> Vec<&Value> {
    let mut r: Vec<&Value> = node
        .get("replies")
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    // Best rank first; unranked replies keep their order after the ranked ones.
    r.sort_by_key(|n| n.get("rank").and_then(Value::as_u64).unwrap_or(u64::MAX));
    r
}

/// Every ranked pair of sibling assistant replies, with the path that leads to them.
fn oasst_pairs(node: &Value, path: &mut Vec<Message>, out: &mut Vec<Value>) -> Result<(), Problem> {
    path.push(oasst_message(node)?);
    let kids = replies(node);
    let ranked: Vec<&Value> = kids
        .iter()
        .copied()
        .filter(|k| k.get("rank").and_then(Value::as_u64).is_some() && k["role"] == "assistant")
        .collect();
    for (i, better) in ranked.iter().enumerate() {
        for worse in &ranked[i + 1..] {
            if better["rank"] == worse["rank"] {
                continue;
            }
            out.push(json!({
                "prompt": path.clone(),
                "chosen": [oasst_message(better)?],
                "rejected": [oasst_message(worse)?],
            }));
        }
    }
    for k in kids {
        oasst_pairs(k, path, out)?;
    }
    path.pop();
    Ok(())
}

fn oasst(kind: Kind, v: &Value) -> Result<Vec<Value>, Problem> {
    let root = v
        .get("prompt")
        .ok_or_else(|| malformed("missing `prompt` (the tree root)"))?;
    match kind {
        Kind::Prompt => Ok(vec![json!({ "prompt": [oasst_message(root)?] })]),
        Kind::Sft => {
            // The best-ranked path from the root, ending on an assistant turn.
            let mut messages = vec![oasst_message(root)?];
            let mut node = root;
            while let Some(next) = replies(node).first().copied() {
                messages.push(oasst_message(next)?);
                node = next;
            }
            while messages.last().is_some_and(|m| m.role != "assistant") {
                messages.pop();
            }
            Ok(vec![json!({ "messages": messages })])
        }
        Kind::Preference => {
            let mut out = Vec::new();
            oasst_pairs(root, &mut Vec::new(), &mut out)?;
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hh_dialogues_split_into_turns() {
        let v = json!({
            "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: fine",
            "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: go away",
        });
        let rows = to_trl(RawFormat::HhRlhf, Kind::Preference, &v).unwrap();
        assert_eq!(rows[0]["prompt"].as_array().unwrap().len(), 3);
        assert_eq!(rows[0]["chosen"][0]["content"], "fine");
        assert_eq!(rows[0]["rejected"][0]["content"], "go away");
        let p = to_trl(RawFormat::HhRlhf, Kind::Prompt, &v).unwrap();
        assert_eq!(p[0]["prompt"][2]["content"], "how?");
    }

    #[test]
    fn gsm8k_answers_are_numbers() {
        assert_eq!(
            gsm8k_answer("so 3+4=7\n#### 1,234").as_deref(),
            Some("1234")
        );
        assert_eq!(gsm8k_answer("no marker"), None);
    }
}
