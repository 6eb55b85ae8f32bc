//! SentencePiece models: reading and writing `tokenizer.model`, BPE encoding identical to the
//! sentencepiece library, and Colossal-LLaMA's vocabulary expansion.
pub mod bpe;
pub mod hf;
pub mod proto;
pub mod train;

pub use bpe::SpmBpe;
pub use proto::{ModelProto, Piece, PieceType};

/// Colossal-LLaMA's `init_tokenizer.py` merge: the pieces of `add`, de-duplicated (first
/// occurrence kept) and stably sorted by length in characters, each appended to `base` as a
/// normal piece with score 0 unless `base` has it. Returns the merged model and the added
/// pieces in id order.
pub fn expand(base: &ModelProto, add: &ModelProto) -> (ModelProto, Vec<String>) {
    let mut seen = std::collections::HashSet::new();
    let mut new: Vec<&str> = add
        .pieces
        .iter()
        .map(|p| p.piece.as_str())
        .filter(|p| seen.insert(*p))
        .collect();
    new.sort_by_key(|p| p.chars().count());
    let mut have: std::collections::HashSet<&str> =
        base.pieces.iter().map(|p| p.piece.as_str()).collect();
    let mut merged = base.clone();
    let mut added = Vec::new();
    for p in new {
        if have.insert(p) {
            merged.pieces.push(Piece::added(p));
            added.push(p.to_string());
        }
    }
    (merged, added)
}

/// Where the added pieces come from.
pub enum Addition<'a> {
    /// Another SentencePiece model's pieces.
    Model(&'a std::path::Path),
    /// BPE pieces learned from a text corpus: (file, vocabulary size of the learned model).
    Corpus(&'a std::path::Path, usize),
}

/// [`expand`] of the base model file by `add`, writing the merged model and its HF files to
/// `out` (created if needed, each file atomically). Returns the number of pieces added.
pub fn write_expanded(
    base: &std::path::Path,
    add: Addition<'_>,
    out: &std::path::Path,
) -> anyhow::Result<usize> {
    use anyhow::Context;
    use colossal_core::checkpoint::atomic::write_file;
    let base = ModelProto::load(base)?;
    let add = match add {
        Addition::Model(path) => ModelProto::load(path)?,
        Addition::Corpus(path, size) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("{}: cannot read the corpus", path.display()))?;
            train::as_model(&base, &train::train_pieces(&text, size, 16))
        }
    };
    let (merged, added) = expand(&base, &add);
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    write_file(&out.join("tokenizer.model"), &merged.to_bytes())?;
    let json = serde_json::to_string(&hf::tokenizer_json(&merged))?;
    write_file(&out.join("tokenizer.json"), json.as_bytes())?;
    write_file(
        &out.join("tokenizer_config.json"),
        hf::tokenizer_config().as_bytes(),
    )?;
    write_file(
        &out.join("special_tokens_map.json"),
        hf::special_tokens_map().as_bytes(),
    )?;
    Ok(added.len())
}
