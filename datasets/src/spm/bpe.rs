//! sentencepiece's BPE encoding, reproduced exactly: the text is normalised (dummy prefix,
//! spaces as ▁), split into characters (user-defined pieces whole), then the adjacent pair
//! whose concatenation is the highest-scoring piece is merged — ties go to the leftmost pair —
//! until no pair is a piece. Symbols that are not pieces fall back to their UTF-8 bytes
//! (`<0xNN>`) when the model has byte fallback, else to `<unk>`.
//!
//! This tie rule is where HF's fast tokenizer departs from sentencepiece for models with many
//! equal scores (pieces appended with score 0): it ranks merges by score, then by length.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use anyhow::{bail, Result};

use super::proto::{ModelProto, PieceType};

pub struct SpmBpe {
    /// Pieces that take part in merges (normal, user-defined, unused), by text.
    mergeable: HashMap<String, (u32, f32)>,
    /// Every piece by text (byte and control pieces too).
    ids: HashMap<String, u32>,
    user_defined: Vec<String>,
    pieces_by_id: Vec<(String, PieceType)>,
    unk: u32,
    byte_fallback: bool,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
}

/// A candidate merge; the heap pops the highest score, then the leftmost.
struct Pair {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl PartialEq for Pair {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Pair {}
impl PartialOrd for Pair {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pair {
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

impl SpmBpe {
    pub fn new(model: &ModelProto) -> Result<Self> {
        if !model.bpe {
            bail!("only BPE sentencepiece models are supported (trainer_spec.model_type != BPE)");
        }
        if !matches!(model.normalizer_name.as_str(), "identity" | "") {
            bail!(
                "normalizer `{}` is not supported (only identity, as LLaMA's)",
                model.normalizer_name
            );
        }
        let mut mergeable = HashMap::new();
        let mut ids = HashMap::new();
        let mut user_defined = Vec::new();
        let mut unk = 0;
        for (i, p) in model.pieces.iter().enumerate() {
            let id = i as u32;
            ids.entry(p.piece.clone()).or_insert(id);
            match p.kind {
                PieceType::Normal | PieceType::UserDefined | PieceType::Unused => {
                    mergeable.entry(p.piece.clone()).or_insert((id, p.score));
                }
                PieceType::Unknown => unk = id,
                _ => {}
            }
            if p.kind == PieceType::UserDefined {
                user_defined.push(p.piece.clone());
            }
        }
        // Longest first, so prefix matching takes the longest user-defined piece.
        user_defined.sort_by_key(|p| std::cmp::Reverse(p.len()));
        Ok(Self {
            mergeable,
            ids,
            user_defined,
            pieces_by_id: model
                .pieces
                .iter()
                .map(|p| (p.piece.clone(), p.kind))
                .collect(),
            unk,
            byte_fallback: model.byte_fallback,
            add_dummy_prefix: model.add_dummy_prefix,
            remove_extra_whitespaces: model.remove_extra_whitespaces,
            escape_whitespaces: model.escape_whitespaces,
        })
    }

    fn normalize(&self, text: &str) -> String {
        let text = if self.remove_extra_whitespaces {
            text.split(' ')
                .filter(|w| !w.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        } else {
            text.to_string()
        };
        if text.is_empty() {
            return text;
        }
        let text = if self.add_dummy_prefix {
            format!(" {text}")
        } else {
            text
        };
        if self.escape_whitespaces {
            text.replace(' ', "\u{2581}")
        } else {
            text
        }
    }

    /// Pieces of `text` (after BPE, before byte fallback).
    pub fn pieces(&self, text: &str) -> Vec<String> {
        let norm = self.normalize(text);
        // Initial symbols: user-defined pieces whole, otherwise one character each.
        let mut symbols: Vec<String> = Vec::new();
        let mut rest = norm.as_str();
        while let Some(c) = rest.chars().next() {
            let len = self
                .user_defined
                .iter()
                .find(|u| rest.starts_with(u.as_str()))
                .map_or(c.len_utf8(), |u| u.len());
            symbols.push(rest[..len].to_string());
            rest = &rest[len..];
        }
        let n = symbols.len();
        let (mut prev, mut next): (Vec<isize>, Vec<isize>) = (
            (0..n).map(|i| i as isize - 1).collect(),
            (0..n)
                .map(|i| if i + 1 < n { i as isize + 1 } else { -1 })
                .collect(),
        );
        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<Pair>, symbols: &[String], l: isize, r: isize| {
            if l < 0 || r < 0 {
                return;
            }
            let (l, r) = (l as usize, r as usize);
            let merged = format!("{}{}", symbols[l], symbols[r]);
            if let Some(&(_, score)) = self.mergeable.get(&merged) {
                heap.push(Pair {
                    score,
                    left: l,
                    right: r,
                    len: merged.len(),
                });
            }
        };
        for i in 1..n {
            push(&mut heap, &symbols, i as isize - 1, i as isize);
        }
        while let Some(top) = heap.pop() {
            let (l, r) = (top.left, top.right);
            // Stale: one side was merged away or grew since this pair was queued.
            if symbols[l].is_empty()
                || symbols[r].is_empty()
                || symbols[l].len() + symbols[r].len() != top.len
            {
                continue;
            }
            let right = std::mem::take(&mut symbols[r]);
            symbols[l].push_str(&right);
            next[l] = next[r];
            if next[r] >= 0 {
                prev[next[r] as usize] = l as isize;
            }
            push(&mut heap, &symbols, prev[l], l as isize);
            push(&mut heap, &symbols, l as isize, next[l]);
        }
        symbols.into_iter().filter(|s| !s.is_empty()).collect()
    }

    /// Ids of `text` (no BOS/EOS), as `sentencepiece.encode(text)`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        for piece in self.pieces(text) {
            match self.mergeable.get(&piece) {
                Some(&(id, _)) => out.push(id),
                None if self.byte_fallback => {
                    for b in piece.bytes() {
                        let byte = format!("<0x{b:02X}>");
                        out.push(self.ids.get(&byte).copied().unwrap_or(self.unk));
                    }
                }
                None => out.push(self.unk),
            }
        }
        out
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces_by_id.len()
    }

    pub fn piece_id(&self, piece: &str) -> Option<u32> {
        self.ids.get(piece).copied()
    }

    /// Text of `ids`: byte pieces become bytes, ▁ a space, the dummy prefix is dropped and
    /// control pieces (BOS/EOS) are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let Some((piece, kind)) = self.pieces_by_id.get(id as usize) else {
                continue;
            };
            match kind {
                PieceType::Control => {}
                PieceType::Byte => {
                    let hex = piece.trim_start_matches("<0x").trim_end_matches('>');
                    bytes.extend(u8::from_str_radix(hex, 16).ok());
                }
                _ => bytes.extend_from_slice(piece.as_bytes()),
            }
        }
        let text = String::from_utf8_lossy(&bytes).replace('\u{2581}', " ");
        match text.strip_prefix(' ') {
            Some(rest) if self.add_dummy_prefix => rest.to_string(),
            _ => text,
        }
    }
}
