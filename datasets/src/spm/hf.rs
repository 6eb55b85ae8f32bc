//! The Hugging Face files for a LLaMA SentencePiece BPE model, as transformers writes them
//! (`LlamaTokenizer.save_pretrained` and the `LlamaConverter` fast conversion): a
//! `tokenizer.json` for `tokenizers`, `tokenizer_config.json` and `special_tokens_map.json`.
//!
//! The fast tokenizer's merges are every split of a piece into two pieces, ordered by the
//! merged piece's score, then by the lengths of the two halves (both descending; ties keep
//! vocabulary order). Note that this tie rule is not sentencepiece's (see `bpe.rs`), so the
//! fast tokenizer can split differently where scores tie; [`super::SpmBpe`] is exact.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::proto::{ModelProto, PieceType};

/// `tokenizer.json` (LlamaConverter, legacy, `add_prefix_space`, BOS added).
pub fn tokenizer_json(model: &ModelProto) -> Value {
    let vocab: HashMap<&str, usize> = model
        .pieces
        .iter()
        .enumerate()
        .map(|(i, p)| (p.piece.as_str(), i))
        .collect();
    // (left, right, score of the merged piece), per piece in vocabulary order.
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for p in &model.pieces {
        let text = p.piece.as_str();
        let mut local: Vec<(&str, &str, f32)> = text
            .char_indices()
            .skip(1)
            .map(|(i, _)| (&text[..i], &text[i..]))
            .filter(|(l, r)| vocab.contains_key(l) && vocab.contains_key(r))
            .map(|(l, r)| (l, r, p.score))
            .collect();
        local.sort_by_key(|(l, r, _)| (vocab[l], vocab[r]));
        merges.extend(local);
    }
    let key = |m: &(&str, &str, f32)| (m.2, m.0.chars().count(), m.1.chars().count());
    merges.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        kb.0.total_cmp(&ka.0)
            .then(kb.1.cmp(&ka.1))
            .then(kb.2.cmp(&ka.2))
    });
    let special = |i: usize, p: &str| {
        json!({"id": i, "content": p, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    let added: Vec<Value> = model
        .pieces
        .iter()
        .enumerate()
        .filter(|(_, p)| matches!(p.kind, PieceType::Unknown | PieceType::Control))
        .map(|(i, p)| special(i, &p.piece))
        .collect();
    let unk = model
        .pieces
        .iter()
        .find(|p| p.kind == PieceType::Unknown)
        .map_or("<unk>", |p| p.piece.as_str());
    let bos_id = vocab.get("<s>").copied().unwrap_or(1);
    let vocab_json: serde_json::Map<String, Value> = model
        .pieces
        .iter()
        .enumerate()
        .map(|(i, p)| (p.piece.clone(), json!(i)))
        .collect();
    let merges_json: Vec<Value> = merges.iter().map(|(l, r, _)| json!([l, r])).collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u{2581}"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}
        ]},
        "pre_tokenizer": null,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}
            ],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [bos_id], "tokens": ["<s>"]}}
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        ]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": model.byte_fallback,
            "ignore_merges": false, "vocab": vocab_json, "merges": merges_json
        }
    })
}

fn token_entry(content: &str, special: bool) -> String {
    let special = if special {
        ",\n      \"special\": true"
    } else {
        ""
    };
    format!(
        "{{\n      \"content\": \"{content}\",\n      \"lstrip\": false,\n      \"normalized\": false,\n      \"rstrip\": false,\n      \"single_word\": false{special}\n    }}"
    )
}

/// `tokenizer_config.json` as `LlamaTokenizer(vocab_file=…).save_pretrained` writes it
/// (transformers 4.57; `model_max_length` is its "no limit" value, int(1e30)).
pub fn tokenizer_config() -> String {
    let decoder: Vec<String> = [(0, "<unk>"), (1, "<s>"), (2, "</s>")]
        .iter()
        .map(|(i, t)| {
            format!(
                "    \"{i}\": {}",
                token_entry(t, true).replace("\n", "\n  ")
            )
        })
        .collect();
    format!(
        r#"{{
  "add_bos_token": true,
  "add_eos_token": false,
  "add_prefix_space": true,
  "added_tokens_decoder": {{
{}
  }},
  "bos_token": "<s>",
  "clean_up_tokenization_spaces": false,
  "eos_token": "</s>",
  "extra_special_tokens": {{}},
  "legacy": true,
  "model_max_length": 1000000000000000019884624838656,
  "pad_token": null,
  "sp_model_kwargs": {{}},
  "spaces_between_special_tokens": false,
  "tokenizer_class": "LlamaTokenizer",
  "unk_token": "<unk>",
  "use_default_system_prompt": false
}}
"#,
        decoder.join(",\n")
    )
}

/// `special_tokens_map.json`.
pub fn special_tokens_map() -> String {
    let entry = |t: &str| {
        token_entry(t, false)
            .replace("\n    ", "\n  ")
            .replace("\n      ", "\n    ")
    };
    format!(
        "{{\n  \"bos_token\": {},\n  \"eos_token\": {},\n  \"unk_token\": {}\n}}\n",
        entry("<s>"),
        entry("</s>"),
        entry("<unk>")
    )
}
