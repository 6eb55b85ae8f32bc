//! The CLIP BPE tokenizer from `vocab.json` + `merges.txt`, as transformers' `CLIPTokenizer`
//! without ftfy: text cleaned (control characters dropped, whitespace collapsed, NFC, lower
//! case), split by CLIP's pattern, each piece's UTF-8 bytes mapped to GPT-2's printable byte
//! alphabet, then byte-pair merges by rank with `</w>` closing each word. Encoding adds
//! `<|startoftext|>` … `<|endoftext|>`, truncates to the model length and pads with the pad
//! token, as `tokenizer(text, padding="max_length", truncation=True)`.

use std::collections::HashMap;
use std::path::Path;

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

use crate::{Error, Result};

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    ranks: HashMap<(String, String), usize>,
    byte_char: [char; 256],
    pattern: Regex,
    pub bos: u32,
    pub eos: u32,
    pub pad: u32,
    /// Sequence length with the special tokens (77 for SD's text encoders).
    pub max_len: usize,
}

/// GPT-2's reversible map from bytes to printable characters (printable Latin-1 bytes map to
/// themselves, the rest to U+0100 onwards in byte order).
fn bytes_to_unicode() -> [char; 256] {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut out = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        out[b as usize] = if printable(b) {
            char::from_u32(b).expect("Latin-1")
        } else {
            let c = char::from_u32(next).expect("U+0100..");
            next += 1;
            c
        };
    }
    out
}

impl ClipTokenizer {
    /// Reads `dir/vocab.json`, `dir/merges.txt` and, when present, the special tokens and
    /// length of `dir/tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let vocab_path = dir.join("vocab.json");
        let text = std::fs::read_to_string(&vocab_path).map_err(|e| Error::file(&vocab_path, e))?;
        let vocab: HashMap<String, u32> =
            serde_json::from_str(&text).map_err(|e| Error::file(&vocab_path, e))?;
        let merges_path = dir.join("merges.txt");
        let text =
            std::fs::read_to_string(&merges_path).map_err(|e| Error::file(&merges_path, e))?;
        let mut ranks = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            if line.starts_with("#version") || line.trim().is_empty() {
                continue;
            }
            let (a, b) = line.split_once(' ').ok_or_else(|| {
                Error::file(
                    &merges_path,
                    format!("line {}: expected two symbols", n + 1),
                )
            })?;
            ranks.insert((a.to_string(), b.to_string()), ranks.len());
        }
        let id = |tok: &str| {
            vocab
                .get(tok)
                .copied()
                .ok_or_else(|| Error::file(&vocab_path, format!("no id for `{tok}`")))
        };
        let mut max_len = 77;
        let mut pad_token = EOS.to_string();
        let cfg_path = dir.join("tokenizer_config.json");
        if let Ok(text) = std::fs::read_to_string(&cfg_path) {
            let cfg: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::file(&cfg_path, e))?;
            if let Some(n) = cfg["model_max_length"].as_u64().filter(|&n| n < 1 << 20) {
                max_len = n as usize;
            }
            if let Some(p) = cfg["pad_token"].as_str() {
                pad_token = p.to_string();
            }
        }
        let pattern = Regex::new(
            r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
        )
        .expect("CLIP's pattern compiles");
        Ok(Self {
            bos: id(BOS)?,
            eos: id(EOS)?,
            pad: id(&pad_token)?,
            vocab,
            ranks,
            byte_char: bytes_to_unicode(),
            pattern,
            max_len,
        })
    }

    /// transformers' BasicTokenizer cleaning (strip_accents off, no punctuation split).
    fn clean(text: &str) -> String {
        let kept: String = text
            .chars()
            .filter(|&c| c != '\0' && c != '\u{fffd}')
            .filter(|&c| !c.is_control() || c == '\t' || c == '\n' || c == '\r')
            .collect();
        let nfc: String = kept.nfc().collect();
        nfc.split_whitespace()
            .map(str::to_lowercase)
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Byte-pair merges of one pre-token (already in the byte alphabet), `</w>` on the last.
    fn bpe(&self, word: &str) -> Vec<String> {
        let mut parts: Vec<String> = word.chars().map(String::from).collect();
        if let Some(last) = parts.last_mut() {
            last.push_str("</w>");
        }
        loop {
            let best = parts
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| {
                    self.ranks
                        .get(&(w[0].clone(), w[1].clone()))
                        .map(|&r| (r, i))
                })
                .min();
            let Some((_, i)) = best else { break };
            let (a, b) = (parts[i].clone(), parts[i + 1].clone());
            // Merge every occurrence of the pair, left to right.
            let mut merged = Vec::with_capacity(parts.len());
            let mut j = 0;
            while j < parts.len() {
                if j + 1 < parts.len() && parts[j] == a && parts[j + 1] == b {
                    merged.push(format!("{a}{b}"));
                    j += 2;
                } else {
                    merged.push(parts[j].clone());
                    j += 1;
                }
            }
            parts = merged;
        }
        parts
    }

    /// Token ids of `text` without special tokens.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        let text = Self::clean(text);
        let mut ids = Vec::new();
        for m in self.pattern.find_iter(&text) {
            let piece = m.as_str();
            if let Some(&id) = [BOS, EOS].contains(&piece).then(|| &self.vocab[piece]) {
                ids.push(id);
                continue;
            }
            let mapped: String = piece.bytes().map(|b| self.byte_char[b as usize]).collect();
            for tok in self.bpe(&mapped) {
                ids.push(self.vocab.get(&tok).copied().unwrap_or(self.eos));
            }
        }
        ids
    }

    /// `<|startoftext|>` + ids + `<|endoftext|>`, truncated to `max_len` (the end token kept)
    /// and padded to it.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = vec![self.bos];
        ids.extend(self.tokenize(text).into_iter().take(self.max_len - 2));
        ids.push(self.eos);
        ids.resize(self.max_len, self.pad);
        ids
    }
}
