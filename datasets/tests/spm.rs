//! SentencePiece against the fixtures written by the sentencepiece library: Colossal-LLaMA's
//! vocabulary expansion gives the reference model's pieces in order (and its bytes), and our
//! BPE gives sentencepiece's ids on the 50 sample lines and the edge cases, for the original
//! LLaMA-2 model and for the merged one.

use std::path::PathBuf;

use colossal_data::spm::{expand, ModelProto, SpmBpe};

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared")
}

fn fixture() -> serde_json::Value {
    let path = shared().join("fixtures/tokenizer_expansion/token_ids.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn expansion_reproduces_the_reference_model() {
    let base =
        ModelProto::load(&shared().join("data/tokenizers/llama2_32k/tokenizer.model")).unwrap();
    let add =
        ModelProto::load(&shared().join("data/tokenizers/chinese_llama_alpaca/chinese_sp.model"))
            .unwrap();
    let (merged, added) = expand(&base, &add);
    assert_eq!(added.len(), 17_953);
    let reference_path = shared().join("fixtures/tokenizer_expansion/merged/tokenizer.model");
    let reference = ModelProto::load(&reference_path).unwrap();
    assert_eq!(merged.pieces.len(), reference.pieces.len());
    for (i, (a, b)) in merged.pieces.iter().zip(&reference.pieces).enumerate() {
        assert_eq!(
            (&a.piece, a.score, a.kind),
            (&b.piece, b.score, b.kind),
            "piece {i}"
        );
    }
    let listed: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(shared().join("fixtures/tokenizer_expansion/added_pieces.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(listed["first_new_id"], 32000);
    let listed: Vec<&str> = listed["pieces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(added, listed);
    assert_eq!(
        merged.to_bytes(),
        std::fs::read(&reference_path).unwrap(),
        "byte-identical model file"
    );
    // Reading and writing the original is the identity too.
    let raw = std::fs::read(shared().join("data/tokenizers/llama2_32k/tokenizer.model")).unwrap();
    assert_eq!(base.to_bytes(), raw);
}

#[test]
fn bpe_matches_sentencepiece_on_every_sample_line() {
    let f = fixture();
    let orig = SpmBpe::new(
        &ModelProto::load(&shared().join("data/tokenizers/llama2_32k/tokenizer.model")).unwrap(),
    )
    .unwrap();
    let merged = SpmBpe::new(
        &ModelProto::load(&shared().join("fixtures/tokenizer_expansion/merged/tokenizer.model"))
            .unwrap(),
    )
    .unwrap();
    let mut checked = 0;
    for (set, rows) in [("lines", &f["lines"]), ("edge_cases", &f["edge_cases"])] {
        for (i, row) in rows.as_array().unwrap().iter().enumerate() {
            let text = row["text"].as_str().unwrap();
            assert_eq!(
                orig.encode(text),
                ids(&row["orig_sp_ids"]),
                "{set} {i} (LLaMA-2): {text:?}"
            );
            assert_eq!(
                merged.encode(text),
                ids(&row["merged_sp_ids"]),
                "{set} {i} (merged): {text:?}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 68);
}

fn json_file(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn expand_vocab_and_tokenize_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let exe = env!("CARGO_BIN_EXE_colossal-data");
    let res = std::process::Command::new(exe)
        .arg("expand-vocab")
        .arg("--base")
        .arg(shared().join("data/tokenizers/llama2_32k/tokenizer.model"))
        .arg("--add")
        .arg(shared().join("data/tokenizers/chinese_llama_alpaca/chinese_sp.model"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(stdout.contains("added 17953 pieces"), "{stdout}");
    let reference = shared().join("fixtures/tokenizer_expansion/merged");
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        assert!(
            json_file(&out.join(file)) == json_file(&reference.join(file)),
            "{file} differs from transformers' output"
        );
    }
    assert_eq!(
        std::fs::read(out.join("tokenizer.model")).unwrap(),
        std::fs::read(reference.join("tokenizer.model")).unwrap()
    );

    // `tokenize` prints sentencepiece's ids for each line, from the directory just written.
    let f = fixture();
    let lines: Vec<&serde_json::Value> = f["lines"].as_array().unwrap().iter().collect();
    let input = tmp.path().join("lines.txt");
    let text: Vec<&str> = lines.iter().map(|l| l["text"].as_str().unwrap()).collect();
    std::fs::write(&input, text.join("\n")).unwrap();
    let res = std::process::Command::new(exe)
        .arg("tokenize")
        .arg("--tokenizer")
        .arg(&out)
        .arg("--input")
        .arg(&input)
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let printed: Vec<Vec<u32>> = String::from_utf8_lossy(&res.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(printed.len(), 50);
    for (i, (got, row)) in printed.iter().zip(&lines).enumerate() {
        assert_eq!(got, &ids(&row["merged_sp_ids"]), "line {i}");
    }
    // The HF fast tokenizer we wrote reproduces transformers' fast ids (which differ from
    // sentencepiece on 16 lines: ties between score-0 pieces).
    let fast = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    for (i, row) in lines.iter().enumerate() {
        let enc = fast.encode(row["text"].as_str().unwrap(), false).unwrap();
        assert_eq!(
            enc.get_ids(),
            ids(&row["merged_hf_fast_ids"]).as_slice(),
            "fast line {i}"
        );
    }
    // Decoding sentencepiece ids gives the line back.
    let tok = colossal_data::tokenizer::LoadedTokenizer::load(&out).unwrap();
    for row in &lines {
        let text = row["text"].as_str().unwrap();
        assert_eq!(tok.decode(&tok.encode(text).unwrap()).unwrap(), text);
    }
}

#[test]
fn pieces_learned_from_a_corpus_extend_the_vocabulary() {
    let text: String = std::fs::read_to_string(
        shared().join("data/pretrain_text/zh_hongloumeng_dream_of_the_red_chamber.txt"),
    )
    .unwrap()
    .lines()
    .take(300)
    .map(|l| format!("{l}\n"))
    .collect();
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("zh.txt");
    std::fs::write(&corpus, &text).unwrap();
    let out = tmp.path().join("tok");
    let base = shared().join("data/tokenizers/llama2_32k/tokenizer.model");
    let res = std::process::Command::new(env!("CARGO_BIN_EXE_colossal-data"))
        .arg("expand-vocab")
        .arg("--base")
        .arg(&base)
        .arg("--train-add")
        .arg(&corpus)
        .args(["--vocab-size", "1500"])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let merged = ModelProto::load(&out.join("tokenizer.model")).unwrap();
    let added = merged.pieces.len() - 32000;
    assert!(added > 100, "{added} pieces added");
    // Every added piece occurs in the corpus (▁ standing for the word start), and the corpus
    // now takes fewer tokens.
    for p in &merged.pieces[32000..] {
        let bare = p.piece.trim_start_matches('\u{2581}');
        assert!(bare.is_empty() || text.contains(bare), "{}", p.piece);
    }
    let (old, new) = (
        SpmBpe::new(&ModelProto::load(&base).unwrap()).unwrap(),
        SpmBpe::new(&merged).unwrap(),
    );
    let count = |m: &SpmBpe| text.lines().map(|l| m.encode(l).len()).sum::<usize>();
    let (before, after) = (count(&old), count(&new));
    println!("{added} learned pieces: {before} → {after} tokens");
    assert!(after * 10 < before * 8, "{before} → {after}");
}
