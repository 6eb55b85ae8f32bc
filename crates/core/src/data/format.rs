//! On-disk layout of a prepared dataset directory:
//!
//! ```text
//! manifest.json                 tokenizer hash, seq_len, vocab size, per-split files and counts
//! train-00000.parquet …         columns input_ids: list<int32> (seq_len), doc_starts: list<int32>
//! validation-00000.parquet …
//! ```
//! `doc_starts` holds the offsets inside the sequence where a document begins, so trainers can
//! build per-document position ids and block-diagonal masks. Each shard also carries the key
//! counts as Parquet key-value metadata.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Int32Builder, ListBuilder};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub const MANIFEST: &str = "manifest.json";

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SplitInfo {
    pub files: Vec<String>,
    pub sequences: u64,
    pub documents: u64,
    /// Tokens in the packed sequences.
    pub tokens: u64,
    /// Tail tokens that did not fill a last sequence.
    pub dropped_tokens: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub tokenizer: String,
    pub tokenizer_sha256: String,
    pub vocab_size: usize,
    pub seq_len: usize,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub validation_fraction: f64,
    pub train: SplitInfo,
    pub validation: SplitInfo,
}

impl Manifest {
    pub const FORMAT: &'static str = "colossal-packed-v1";

    pub fn read(dir: &Path) -> Result<Self> {
        if !dir.exists() {
            return Err(Error::file(dir, "data directory not found"));
        }
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let m: Self = serde_json::from_str(&text).map_err(|e| Error::file(&path, e.to_string()))?;
        if m.format != Self::FORMAT {
            return Err(Error::file(
                &path,
                format!("field `format`: `{}` is not {}", m.format, Self::FORMAT),
            ));
        }
        Ok(m)
    }
}

/// One packed sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedSequence {
    pub input_ids: Vec<u32>,
    pub doc_starts: Vec<u32>,
}

fn schema() -> Arc<Schema> {
    let list = |n: &str| {
        Field::new(
            n,
            DataType::List(Arc::new(Field::new("item", DataType::Int32, false))),
            false,
        )
    };
    Arc::new(Schema::new(vec![list("input_ids"), list("doc_starts")]))
}

/// Buffers sequences and writes them as shards `{prefix}-{k:05}.parquet` (atomically).
pub struct ShardWriter {
    dir: PathBuf,
    prefix: String,
    rows_per_shard: usize,
    row_group_rows: usize,
    meta: Vec<(String, String)>,
    buffer: Vec<PackedSequence>,
    pub info: SplitInfo,
}

impl ShardWriter {
    pub fn new(
        dir: &Path,
        prefix: &str,
        rows_per_shard: usize,
        meta: Vec<(String, String)>,
    ) -> Self {
        Self {
            dir: dir.to_path_buf(),
            prefix: prefix.to_string(),
            rows_per_shard: rows_per_shard.max(1),
            row_group_rows: 256.min(rows_per_shard.max(1)),
            meta,
            buffer: Vec::new(),
            info: SplitInfo::default(),
        }
    }

    pub fn push(&mut self, seq: PackedSequence) -> Result<()> {
        self.info.sequences += 1;
        self.info.tokens += seq.input_ids.len() as u64;
        self.buffer.push(seq);
        if self.buffer.len() >= self.rows_per_shard {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let name = format!("{}-{:05}.parquet", self.prefix, self.info.files.len());
        let path = self.dir.join(&name);
        let rows = std::mem::take(&mut self.buffer);
        write_shard(&path, &rows, self.row_group_rows, &self.meta)?;
        self.info.files.push(name);
        Ok(())
    }

    pub fn finish(mut self) -> Result<SplitInfo> {
        self.flush()?;
        Ok(self.info)
    }
}

fn write_shard(
    path: &Path,
    rows: &[PackedSequence],
    rg_rows: usize,
    meta: &[(String, String)],
) -> Result<()> {
    let col = |f: &dyn Fn(&PackedSequence) -> &Vec<u32>| -> ArrayRef {
        let mut b = ListBuilder::new(Int32Builder::new()).with_field(Arc::new(Field::new(
            "item",
            DataType::Int32,
            false,
        )));
        for r in rows {
            b.values()
                .append_slice(&f(r).iter().map(|&x| x as i32).collect::<Vec<_>>());
            b.append(true);
        }
        Arc::new(b.finish())
    };
    let batch = RecordBatch::try_new(
        schema(),
        vec![col(&|r| &r.input_ids), col(&|r| &r.doc_starts)],
    )
    .map_err(|e| Error::file(path, e.to_string()))?;
    let mut kv: Vec<KeyValue> = meta
        .iter()
        .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
        .collect();
    kv.push(KeyValue::new(
        "colossal.num_sequences".into(),
        rows.len().to_string(),
    ));
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(rg_rows))
        .set_key_value_metadata(Some(kv))
        .build();
    let tmp = path.with_extension("parquet.tmp");
    let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut w = ArrowWriter::try_new(file, schema(), Some(props))
        .map_err(|e| Error::file(&tmp, e.to_string()))?;
    w.write(&batch)
        .map_err(|e| Error::file(&tmp, e.to_string()))?;
    w.close().map_err(|e| Error::file(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
