//! `colossal-data pretrain`: documents → ids (BOS + text + EOS) → fixed-length packed
//! sequences with document starts → Parquet shards + manifest, split train/validation by a
//! hash of each document's text (deterministic and independent of file order).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use colossal_core::checkpoint::atomic;
use colossal_core::data::{Manifest, PackedSequence, ShardWriter, SplitInfo, MANIFEST};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::sources::{collect_files, for_each_document, DocSplit};
use crate::tokenizer::LoadedTokenizer;

#[derive(Clone, Debug)]
pub struct PretrainArgs {
    pub inputs: Vec<PathBuf>,
    pub tokenizer: PathBuf,
    pub out: PathBuf,
    pub seq_len: usize,
    pub field: String,
    pub doc_split: DocSplit,
    pub val_fraction: f64,
    pub rows_per_shard: usize,
    pub bos: bool,
    pub eos: bool,
}

/// Packs a token stream into sequences of exactly `seq_len`, remembering where documents start.
struct Packer {
    seq_len: usize,
    ids: Vec<u32>,
    starts: Vec<u32>,
    writer: ShardWriter,
}

impl Packer {
    fn push_document(&mut self, tokens: &[u32]) -> Result<()> {
        self.writer.info.documents += 1;
        self.starts.push(self.ids.len() as u32);
        let mut rest = tokens;
        while !rest.is_empty() {
            let take = (self.seq_len - self.ids.len()).min(rest.len());
            self.ids.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.ids.len() == self.seq_len {
                let seq = PackedSequence {
                    input_ids: std::mem::take(&mut self.ids),
                    doc_starts: std::mem::take(&mut self.starts),
                };
                self.writer.push(seq)?;
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<SplitInfo> {
        let dropped = self.ids.len() as u64;
        let mut info = self.writer.finish()?;
        info.dropped_tokens = dropped;
        Ok(info)
    }
}

fn is_validation(text: &str, fraction: f64) -> bool {
    if fraction <= 0.0 {
        return false;
    }
    let h = Sha256::digest(text.as_bytes());
    let x = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
    (x as f64 / u64::MAX as f64) < fraction
}

pub fn run(args: &PretrainArgs) -> Result<Manifest> {
    if args.seq_len < 2 {
        bail!("--seq-len must be at least 2");
    }
    if !(0.0..1.0).contains(&args.val_fraction) {
        bail!("--val-fraction must be in [0, 1)");
    }
    let files = collect_files(&args.inputs)?;
    if files.is_empty() {
        bail!("no input files under {:?}", args.inputs);
    }
    let tok = LoadedTokenizer::load(&args.tokenizer)?;
    let bos_id = if args.bos { tok.token_id("<s>") } else { None };
    let eos_id = if args.eos { tok.token_id("</s>") } else { None };
    let total_bytes: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let bar = ProgressBar::new(total_bytes);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {bytes}/{total_bytes} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("template"),
    );
    let mut manifest = None;
    atomic::write_dir(&args.out, |dir| -> Result<()> {
        let meta = vec![
            ("colossal.tokenizer_sha256".to_string(), tok.sha256.clone()),
            ("colossal.seq_len".to_string(), args.seq_len.to_string()),
        ];
        let mk = |split: &str| {
            let mut m = meta.clone();
            m.push(("colossal.split".into(), split.into()));
            Packer {
                seq_len: args.seq_len,
                ids: vec![],
                starts: vec![],
                writer: ShardWriter::new(dir, split, args.rows_per_shard, m),
            }
        };
        let (mut train, mut val) = (mk("train"), mk("validation"));
        let mut pending: Vec<String> = Vec::new();
        let flush =
            |pending: &mut Vec<String>, train: &mut Packer, val: &mut Packer| -> Result<()> {
                let encoded = tok.encode_batch(pending)?;
                for (text, ids) in pending.drain(..).zip(encoded) {
                    let mut doc = Vec::with_capacity(ids.len() + 2);
                    doc.extend(bos_id);
                    doc.extend(ids);
                    doc.extend(eos_id);
                    let packer = if is_validation(&text, args.val_fraction) {
                        &mut *val
                    } else {
                        &mut *train
                    };
                    packer.push_document(&doc)?;
                }
                Ok(())
            };
        for file in &files {
            bar.set_message(
                file.file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default(),
            );
            let read = for_each_document(file, &args.field, args.doc_split, &mut |doc| {
                pending.push(doc);
                if pending.len() >= 256 {
                    flush(&mut pending, &mut train, &mut val)?;
                }
                Ok(())
            })?;
            flush(&mut pending, &mut train, &mut val)?;
            bar.inc(read);
        }
        bar.finish();
        let m = Manifest {
            format: Manifest::FORMAT.into(),
            tokenizer: tok.path.display().to_string(),
            tokenizer_sha256: tok.sha256.clone(),
            vocab_size: tok.vocab_size(),
            seq_len: args.seq_len,
            bos_id,
            eos_id,
            validation_fraction: args.val_fraction,
            train: train.finish()?,
            validation: val.finish()?,
        };
        let json = serde_json::to_string_pretty(&m)?;
        atomic::write_file(&dir.join(MANIFEST), json.as_bytes()).context("writing manifest")?;
        manifest = Some(m);
        Ok(())
    })?;
    Ok(manifest.expect("written"))
}

/// Where `colossal-data` puts its output by default.
pub fn describe(m: &Manifest, out: &Path) -> String {
    format!(
        "{}: seq_len {} | train {} seqs ({} docs, {} tokens, {} dropped) in {} shards | validation {} seqs ({} docs) | tokenizer sha256 {}",
        out.display(),
        m.seq_len,
        m.train.sequences,
        m.train.documents,
        m.train.tokens,
        m.train.dropped_tokens,
        m.train.files.len(),
        m.validation.sequences,
        m.validation.documents,
        &m.tokenizer_sha256[..12]
    )
}
