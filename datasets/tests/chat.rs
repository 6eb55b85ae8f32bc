//! Chat data preparation: templates render what transformers' `apply_chat_template` renders,
//! labels cover exactly the assistant turns, and bad rows are reported by file:line.

use std::path::{Path, PathBuf};

use colossal_data::chat::encode::{ChatEncoder, IGNORE};
use colossal_data::chat::prep::{self, read_records, PrepArgs};
use colossal_data::chat::raw::{Kind, RawFormat};
use colossal_data::chat::template::ChatTemplate;
use colossal_data::chat::Message;
use colossal_data::tokenizer::LoadedTokenizer;
use serde_json::Value;

fn here(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn shared(p: &str) -> PathBuf {
    here("../../shared").join(p)
}

fn template(name: &str) -> ChatTemplate {
    ChatTemplate::load(&here(&format!("templates/{name}"))).unwrap()
}

fn msgs(v: &Value) -> Vec<Message> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Every (template, conversation, add_generation_prompt) case that
/// `tests/chat_templates/make_expected.py` rendered with transformers 4.57.6.
#[test]
fn templates_render_what_transformers_renders() {
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(here("tests/chat_templates/expected.json")).unwrap(),
    )
    .unwrap();
    let mut n = 0;
    for case in expected["cases"].as_array().unwrap() {
        let t = template(case["template"].as_str().unwrap());
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let got = t.render(&msgs(&case["messages"]), gen);
        let what = format!(
            "{} / {} / gen={gen}",
            case["template"], case["conversation"]
        );
        match (case["expected"].as_str(), case["error"].as_str()) {
            (Some(want), _) => assert_eq!(got.as_deref(), Ok(want), "{what}"),
            (None, Some(err)) => assert_eq!(got, Err(err.to_string()), "{what}"),
            _ => unreachable!(),
        }
        n += 1;
    }
    assert_eq!(n, 30);
}

/// The same, spelled out for two cases (LLaMA-2 chat and ChatML, from transformers' output).
#[test]
fn llama2_and_chatml_strings() {
    let m = vec![
        Message::new("system", "You are a helpful assistant."),
        Message::new("user", "  Hi there!  "),
        Message::new("assistant", "Hello! How can I help?\n"),
        Message::new("user", "Name a prime number."),
        Message::new("assistant", "7"),
    ];
    assert_eq!(
        template("llama2.jinja").render(&m, false).unwrap(),
        "<s>[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\n  Hi there! [/INST] Hello! How can I help? </s><s>[INST] Name a prime number. [/INST] 7 </s>"
    );
    let one = [Message::new("user", "What is the capital of France?")];
    assert_eq!(
        template("chatml.jinja").render(&one, true).unwrap(),
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
}

fn encoder(t: &str) -> ChatEncoder {
    let tok = LoadedTokenizer::load(&shared("data/tokenizers/llama2_32k")).unwrap();
    ChatEncoder::new(tok, template(t))
}

#[test]
fn labels_cover_the_assistant_turns_only() {
    let enc = encoder("llama2.jinja");
    let m = vec![
        Message::new("user", "Hi"),
        Message::new("assistant", "Hello there"),
        Message::new("user", "Bye"),
        Message::new("assistant", "See you"),
    ];
    let e = enc.conversation(&m, 512).unwrap();
    assert_eq!(e.ids[0], 1, "<s> is the BOS id, not text");
    let learned: Vec<u32> = e
        .ids
        .iter()
        .zip(&e.labels)
        .filter(|(_, &l)| l != IGNORE)
        .map(|(&i, _)| i)
        .collect();
    let text = enc.tok.decode(&learned).unwrap();
    assert!(
        text.contains("Hello there") && text.contains("See you"),
        "{text}"
    );
    assert!(!text.contains("Hi") && !text.contains("Bye"), "{text}");
    assert_eq!(
        learned.iter().filter(|&&i| i == 2).count(),
        2,
        "both EOS learned"
    );
    // Truncation keeps the first tokens; a prompt that leaves no answer is reported.
    let short = enc.conversation(&m, 8).unwrap_err();
    assert_eq!(short.kind(), "no_loss_tokens");
}

#[test]
fn prep_reports_every_bad_row_by_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("pairs.jsonl");
    let long = "word ".repeat(200);
    std::fs::write(
        &input,
        [
            r#"{"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}"#,
            r#"{"prompt": "Say bye", "rejected": "No."}"#,
            r#"{"context": [], "chosen": [{"from": "assistant", "content": "a"}], "rejected": [{"from": "assistant", "content": "b"}]}"#,
            &format!(r#"{{"prompt": "{long}", "chosen": "a", "rejected": "b"}}"#),
            r#"{"prompt": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "chosen": "x", "rejected": "y"}"#,
            "not json",
        ]
        .join("\n"),
    )
    .unwrap();
    let args = PrepArgs {
        kind: Kind::Preference,
        inputs: vec![input.clone()],
        format: RawFormat::Auto,
        max_len: 64,
        val_fraction: 0.0,
        out: dir.path().join("out"),
    };
    let summary = prep::run(&args, &encoder("llama2.jinja")).unwrap();
    let r = &summary["report"]["files"][input.display().to_string()];
    println!("{}", serde_json::to_string_pretty(r).unwrap());
    assert_eq!(r["lines"], 6);
    assert_eq!(r["written"], 1);
    let p = &r["problems"];
    assert_eq!(p["malformed"], 2, "missing chosen, not JSON");
    assert_eq!(p["empty_conversation"], 1);
    assert_eq!(p["prompt_too_long"], 1);
    assert_eq!(p["template_error"], 1, "roles do not alternate");
    let dropped: Vec<&str> = r["dropped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert!(
        dropped[0].ends_with("pairs.jsonl:2: malformed row: missing `chosen`"),
        "{dropped:?}"
    );
    assert!(
        dropped
            .iter()
            .any(|d| d
                .contains(":5: chat template did not render: Conversation roles must alternate"))
    );
    let rows = read_records(&dir.path().join("out/train.parquet")).unwrap();
    assert_eq!(rows.len(), 1);
    assert!(rows[0].source.ends_with("pairs.jsonl:1"));
    let chosen = rows[0].labels("chosen_labels");
    assert!(chosen.iter().any(|&l| l != IGNORE) && chosen[0] == IGNORE);
}

#[test]
fn raw_formats_convert() {
    let dir = tempfile::tempdir().unwrap();
    let enc = encoder("llama2.jinja");
    let cases = [
        (
            Kind::Preference,
            RawFormat::HhRlhf,
            "data/preference/hh-rlhf_harmless-base_test.jsonl.gz",
        ),
        (
            Kind::Preference,
            RawFormat::Oasst,
            "data/preference/oasst_en_100_tree.jsonl",
        ),
        (
            Kind::Sft,
            RawFormat::Oasst,
            "data/preference/oasst_en_100_tree.jsonl",
        ),
        (
            Kind::Sft,
            RawFormat::Dolly,
            "data/sft/dolly15k_open_qa_3742.jsonl",
        ),
        (
            Kind::Sft,
            RawFormat::DollyAlpaca,
            "data/sft/dolly15k_sample_151_alpaca_format.jsonl",
        ),
        (
            Kind::Sft,
            RawFormat::SelfInstruct,
            "data/sft/self_instruct_seed_tasks.jsonl",
        ),
        (Kind::Prompt, RawFormat::Gsm8k, "data/sft/gsm8k_test.jsonl"),
        (
            Kind::Prompt,
            RawFormat::PromptLines,
            "data/sft/oasst_prompt_lottery_en_250.jsonl",
        ),
    ];
    for (i, (kind, format, file)) in cases.into_iter().enumerate() {
        let out = dir.path().join(i.to_string());
        let args = PrepArgs {
            kind,
            inputs: vec![shared(file)],
            format,
            max_len: 1024,
            val_fraction: 0.05,
            out: out.clone(),
        };
        let s = prep::run(&args, &enc).unwrap();
        let r = &s["report"]["files"][shared(file).display().to_string()];
        println!(
            "{file} {format:?} {kind:?}: {r:#}",
            r = serde_json::json!({"lines": r["lines"], "rows": r["rows"], "written": r["written"], "truncated": r["truncated"], "problems": r["problems"]})
        );
        let written = r["written"].as_u64().unwrap();
        assert!(written > 0, "{file}");
        assert_eq!(
            s["manifest"]["train_rows"].as_u64().unwrap()
                + s["manifest"]["validation_rows"].as_u64().unwrap(),
            written
        );
        if format == RawFormat::Oasst && kind == Kind::Preference {
            assert_eq!(r["rows"], 754, "the ranked sibling pairs SOURCES.md counts");
        }
        if format == RawFormat::Gsm8k {
            let rows = read_records(&out.join("train.parquet")).unwrap();
            assert!(rows.iter().all(|r| r.texts["answer"]
                .as_deref()
                .is_some_and(|a| a.parse::<f64>().is_ok())));
        }
    }
}
