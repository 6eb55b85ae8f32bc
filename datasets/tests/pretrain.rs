//! `colossal-data pretrain`: packing, boundaries, split, determinism and input errors.

use std::path::{Path, PathBuf};

use colossal_core::data::{Manifest, PackedDataset};
use colossal_data::pretrain::{run, PretrainArgs};
use colossal_data::sources::DocSplit;
use colossal_data::tokenizer::LoadedTokenizer;

fn tokenizer() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data/tokenizers/llama2_32k/tokenizer.json");
    assert!(p.exists(), "{} missing", p.display());
    p
}

fn args(inputs: Vec<PathBuf>, out: &Path, seq_len: usize) -> PretrainArgs {
    PretrainArgs {
        inputs,
        tokenizer: tokenizer(),
        out: out.to_path_buf(),
        seq_len,
        field: "text".into(),
        doc_split: DocSplit::Paragraph,
        val_fraction: 0.0,
        rows_per_shard: 4,
        bos: true,
        eos: true,
    }
}

const DOCS: [&str; 3] = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "All:\nSpeak, speak.",
];

#[test]
fn packs_documents_with_boundaries_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.txt");
    std::fs::write(&input, DOCS.join("\n\n")).unwrap();
    let out = tmp.path().join("data");
    let m = run(&args(vec![input], &out, 16)).unwrap();
    let tok = LoadedTokenizer::load(&tokenizer()).unwrap();
    let mut stream = Vec::new();
    let mut starts = Vec::new();
    for d in DOCS {
        starts.push(stream.len());
        stream.push(1);
        stream.extend(tok.encode(d).unwrap());
        stream.push(2);
    }
    assert_eq!(m.train.documents, 3);
    assert_eq!(m.train.sequences as usize, stream.len() / 16);
    assert_eq!(m.train.dropped_tokens as usize, stream.len() % 16);
    assert_eq!(m.vocab_size, 32000);
    assert_eq!(m.train.files.len() as u64, m.train.sequences.div_ceil(4));
    let mut ds = PackedDataset::open(&out, "train", 0).unwrap();
    for i in 0..m.train.sequences as usize {
        let s = ds.get(i as u64, false).unwrap();
        assert_eq!(s.input_ids, stream[i * 16..(i + 1) * 16]);
        let want: Vec<u32> = starts
            .iter()
            .filter(|&&p| p >= i * 16 && p < (i + 1) * 16)
            .map(|&p| (p - i * 16) as u32)
            .collect();
        assert_eq!(s.doc_starts, want, "sequence {i}");
    }
    // Shuffled order is a permutation, and the same for the same seed.
    let n = m.train.sequences;
    let mut a: Vec<_> = (0..n).map(|c| ds.get(c, true).unwrap().input_ids).collect();
    let mut ds2 = PackedDataset::open(&out, "train", 0).unwrap();
    let b: Vec<_> = (0..n)
        .map(|c| ds2.get(c, true).unwrap().input_ids)
        .collect();
    assert_eq!(a, b);
    let mut plain: Vec<_> = (0..n)
        .map(|c| ds.get(c, false).unwrap().input_ids)
        .collect();
    a.sort();
    plain.sort();
    assert_eq!(a, plain);
}

#[test]
fn output_is_deterministic_and_split_by_document() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data/pretrain_text/tinyshakespeare.txt");
    let input = tmp.path().join("small.txt");
    let text: String = std::fs::read_to_string(corpus)
        .unwrap()
        .lines()
        .take(600)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&input, text).unwrap();
    let mut a1 = args(vec![input.clone()], &tmp.path().join("a"), 32);
    a1.val_fraction = 0.2;
    a1.rows_per_shard = 1000;
    let m1 = run(&a1).unwrap();
    let mut a2 = a1.clone();
    a2.out = tmp.path().join("b");
    let m2 = run(&a2).unwrap();
    assert_eq!(m1, m2);
    assert!(m1.validation.documents > 0 && m1.train.documents > m1.validation.documents);
    for f in m1.train.files.iter().chain(&m1.validation.files) {
        let x = std::fs::read(tmp.path().join("a").join(f)).unwrap();
        let y = std::fs::read(tmp.path().join("b").join(f)).unwrap();
        assert_eq!(x, y, "{f} differs between runs");
    }
    let manifest = Manifest::read(&tmp.path().join("a")).unwrap();
    assert_eq!(manifest.tokenizer_sha256.len(), 64);
}

#[test]
fn jsonl_named_field_and_malformed_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.jsonl");
    std::fs::write(
        &good,
        "{\"content\": \"Hello world\"}\n\n{\"content\": \"Second doc\"}\n",
    )
    .unwrap();
    let mut a = args(vec![good.clone()], &tmp.path().join("o1"), 4);
    a.field = "content".into();
    let m = run(&a).unwrap();
    assert_eq!(m.train.documents, 2);

    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"ok\"}\n{\"text\": \"broken\"\n").unwrap();
    let e = run(&args(vec![bad.clone()], &tmp.path().join("o2"), 4))
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("{}:2", bad.display())), "{e}");

    let e = run(&args(vec![good], &tmp.path().join("o3"), 4))
        .unwrap_err()
        .to_string();
    assert!(e.contains(":1") && e.contains("`text`"), "{e}");

    let missing = tmp.path().join("nope");
    let e = run(&args(vec![missing.clone()], &tmp.path().join("o4"), 4))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&missing.display().to_string()) && e.contains("not found"),
        "{e}"
    );
}
