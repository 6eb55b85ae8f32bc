//! Learning new BPE pieces from a corpus (`expand-vocab --train-add`), the way sentencepiece's
//! BPE trainer grows a vocabulary: text split at whitespace into words (each with the ▁ prefix,
//! as the encoder sees them), words counted, then the most frequent adjacent pair of symbols
//! merged, again and again. Characters come first (most frequent first), then merges in
//! order; each piece's score is minus its rank, as in a trained model.

use std::collections::HashMap;

use super::proto::{ModelProto, Piece};

/// The first `vocab_size` pieces a BPE model trained on `text` would have (characters and
/// merges), by rank. Pieces longer than `max_len` characters are not formed.
pub fn train_pieces(text: &str, vocab_size: usize, max_len: usize) -> Vec<String> {
    let mut words: HashMap<String, u64> = HashMap::new();
    for line in text.lines() {
        for w in line.split_whitespace() {
            *words.entry(format!("\u{2581}{w}")).or_default() += 1;
        }
    }
    // Each distinct word as a sequence of symbols, with its count; sorted for determinism.
    let mut words: Vec<(Vec<String>, u64)> = words
        .into_iter()
        .map(|(w, c)| (w.chars().map(String::from).collect(), c))
        .collect();
    words.sort();
    let mut chars: HashMap<String, u64> = HashMap::new();
    for (w, c) in &words {
        for s in w {
            *chars.entry(s.clone()).or_default() += c;
        }
    }
    let mut chars: Vec<(String, u64)> = chars.into_iter().collect();
    chars.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut pieces: Vec<String> = chars.into_iter().map(|(c, _)| c).collect();
    pieces.truncate(vocab_size);
    while pieces.len() < vocab_size {
        let mut pairs: HashMap<(&str, &str), u64> = HashMap::new();
        for (w, c) in &words {
            for p in w.windows(2) {
                if p[0].chars().count() + p[1].chars().count() <= max_len {
                    *pairs.entry((p[0].as_str(), p[1].as_str())).or_default() += c;
                }
            }
        }
        // Most frequent pair; ties to the lexicographically smallest, for determinism.
        let Some(((l, r), _)) = pairs
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0)))
        else {
            break;
        };
        let (l, r) = (l.to_string(), r.to_string());
        let merged = format!("{l}{r}");
        for (w, _) in words.iter_mut() {
            let mut i = 0;
            while i + 1 < w.len() {
                if w[i] == l && w[i + 1] == r {
                    w[i] = merged.clone();
                    w.remove(i + 1);
                }
                i += 1;
            }
        }
        pieces.push(merged);
    }
    pieces
}

/// A BPE model holding `pieces` (scores −rank), to hand to [`super::expand`].
pub fn as_model(template: &ModelProto, pieces: &[String]) -> ModelProto {
    let mut m = template.clone();
    m.pieces = pieces
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut piece = Piece::added(p);
            piece.score = -(i as f32);
            piece
        })
        .collect();
    m
}
