//! `colossal-data sft | preference | prompt`: input files (any schema or raw format) →
//! `train.parquet`, `validation.parquet`, `manifest.json` and `report.json`. Every row not
//! kept is counted and listed by file:line with the reason; nothing is dropped silently.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use arrow::array::{
    Array, ArrayRef, Int32Array, Int32Builder, ListArray, ListBuilder, StringArray,
};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::encode::{ChatEncoder, Encoded};
use super::raw::{to_trl, Kind, RawFormat};
use super::{schema, Problem};

/// One prepared row: named integer lists, optional text fields, and where it came from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Record {
    pub lists: BTreeMap<String, Vec<i32>>,
    pub texts: BTreeMap<String, Option<String>>,
    pub source: String,
}

impl Record {
    pub fn ids(&self, name: &str) -> Vec<u32> {
        self.lists
            .get(name)
            .map_or_else(Vec::new, |v| v.iter().map(|&x| x as u32).collect())
    }

    pub fn labels(&self, name: &str) -> Vec<i64> {
        self.lists
            .get(name)
            .map_or_else(Vec::new, |v| v.iter().map(|&x| x as i64).collect())
    }

    fn put(&mut self, name: &str, e: &Encoded) {
        self.lists.insert(
            format!("{name}input_ids"),
            e.ids.iter().map(|&x| x as i32).collect(),
        );
        self.lists.insert(
            format!("{name}labels"),
            e.labels.iter().map(|&x| x as i32).collect(),
        );
    }
}

pub struct PrepArgs {
    pub kind: Kind,
    pub inputs: Vec<PathBuf>,
    pub format: RawFormat,
    pub max_len: usize,
    pub val_fraction: f64,
    pub out: PathBuf,
}

/// Counts of one input file.
#[derive(Default, serde::Serialize)]
pub struct FileReport {
    pub lines: usize,
    pub rows: usize,
    pub written: usize,
    pub truncated: usize,
    pub problems: BTreeMap<String, usize>,
    /// "file:line: reason" for every row not kept.
    pub dropped: Vec<String>,
}

fn open(path: &Path) -> Result<Box<dyn BufRead>> {
    let f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let r: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::GzDecoder::new(f))
    } else {
        Box::new(f)
    };
    Ok(Box::new(BufReader::new(r)))
}

fn encode_row(
    enc: &ChatEncoder,
    kind: Kind,
    row: &Value,
    max_len: usize,
) -> Result<(Record, bool), Problem> {
    let mut r = Record::default();
    let truncated = match kind {
        Kind::Sft => {
            let e = enc.conversation(&schema::sft(row)?.messages, max_len)?;
            r.put("", &e);
            e.truncated
        }
        Kind::Preference => {
            let p = schema::preference(row)?;
            let c = enc.continuation(&p.prompt, &p.chosen, max_len)?;
            let x = enc.continuation(&p.prompt, &p.rejected, max_len)?;
            r.put("chosen_", &c);
            r.put("rejected_", &x);
            c.truncated || x.truncated
        }
        Kind::Prompt => {
            let p = schema::prompt(row)?;
            let ids = enc.prompt(&p.prompt, max_len)?;
            r.lists
                .insert("input_ids".into(), ids.iter().map(|&x| x as i32).collect());
            r.texts.insert("answer".into(), p.answer);
            false
        }
    };
    Ok((r, truncated))
}

/// Deterministic split by the input line's hash.
fn is_validation(line: &str, fraction: f64) -> bool {
    let h = Sha256::digest(line.as_bytes());
    let x = u64::from_le_bytes(h[..8].try_into().expect("8 bytes")) as f64 / u64::MAX as f64;
    x < fraction
}

pub fn run(args: &PrepArgs, enc: &ChatEncoder) -> Result<Value> {
    let (mut train, mut val) = (Vec::new(), Vec::new());
    let mut reports: BTreeMap<String, FileReport> = BTreeMap::new();
    for path in &args.inputs {
        let name = path.display().to_string();
        let rep = reports.entry(name.clone()).or_default();
        for (n, line) in open(path)?.lines().enumerate() {
            let line = line.with_context(|| format!("{name}:{}: cannot read", n + 1))?;
            if line.trim().is_empty() {
                continue;
            }
            rep.lines += 1;
            let at = format!("{name}:{}", n + 1);
            let drop = |rep: &mut FileReport, p: Problem| {
                *rep.problems.entry(p.kind().to_string()).or_default() += 1;
                rep.dropped.push(format!("{at}: {p}"));
            };
            let rows = serde_json::from_str::<Value>(&line)
                .map_err(|e| Problem::Malformed(format!("not JSON: {e}")))
                .and_then(|v| to_trl(args.format, args.kind, &v));
            let rows = match rows {
                Ok(r) => r,
                Err(p) => {
                    drop(rep, p);
                    continue;
                }
            };
            let to_val = is_validation(&line, args.val_fraction);
            for row in rows {
                rep.rows += 1;
                match encode_row(enc, args.kind, &row, args.max_len) {
                    Ok((mut rec, truncated)) => {
                        rec.source = at.clone();
                        rep.written += 1;
                        rep.truncated += truncated as usize;
                        if to_val { &mut val } else { &mut train }.push(rec);
                    }
                    Err(p) => drop(rep, p),
                }
            }
        }
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("{}: cannot create", args.out.display()))?;
    write_records(&args.out.join("train.parquet"), &train)?;
    write_records(&args.out.join("validation.parquet"), &val)?;
    let manifest = json!({
        "format": "colossal-chat-v1",
        "kind": format!("{:?}", args.kind).to_lowercase(),
        "tokenizer": enc.tok.path.display().to_string(),
        "tokenizer_sha256": enc.tok.sha256,
        "chat_template": enc.template.source,
        "bos_token": enc.template.bos_token,
        "eos_token": enc.template.eos_token,
        "eos_id": enc.eos_id(),
        "max_len": args.max_len,
        "train_rows": train.len(),
        "validation_rows": val.len(),
    });
    let report = json!({ "files": reports });
    colossal_core::checkpoint::atomic::write_file(
        &args.out.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    colossal_core::checkpoint::atomic::write_file(
        &args.out.join("report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    Ok(json!({"manifest": manifest, "report": report}))
}

fn write_records(path: &Path, rows: &[Record]) -> Result<()> {
    let first = rows.first().cloned().unwrap_or_default();
    let mut fields = Vec::new();
    let mut cols: Vec<ArrayRef> = Vec::new();
    for name in first.lists.keys() {
        let mut b = ListBuilder::new(Int32Builder::new());
        for r in rows {
            b.values()
                .append_slice(r.lists.get(name).map_or(&[][..], |v| v.as_slice()));
            b.append(true);
        }
        fields.push(Field::new(
            name,
            DataType::List(Arc::new(Field::new("item", DataType::Int32, true))),
            false,
        ));
        cols.push(Arc::new(b.finish()));
    }
    for name in first.texts.keys() {
        let v: Vec<Option<&str>> = rows
            .iter()
            .map(|r| r.texts.get(name).and_then(|t| t.as_deref()))
            .collect();
        fields.push(Field::new(name, DataType::Utf8, true));
        cols.push(Arc::new(StringArray::from(v)));
    }
    fields.push(Field::new("source", DataType::Utf8, false));
    cols.push(Arc::new(StringArray::from(
        rows.iter().map(|r| r.source.as_str()).collect::<Vec<_>>(),
    )));
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(schema.clone(), cols)?;
    let mut bytes = Vec::new();
    let mut w = ArrowWriter::try_new(&mut bytes, schema, None)?;
    w.write(&batch)?;
    w.close()?;
    colossal_core::checkpoint::atomic::write_file(path, &bytes)?;
    Ok(())
}

/// Reads a split written by [`run`].
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(f)
        .with_context(|| format!("{}: not Parquet", path.display()))?
        .build()?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch?;
        let schema = batch.schema();
        let n = batch.num_rows();
        let start = out.len();
        out.extend((0..n).map(|_| Record::default()));
        for (f, col) in schema.fields().iter().zip(batch.columns()) {
            match f.data_type() {
                DataType::List(_) => {
                    let l = col
                        .as_any()
                        .downcast_ref::<ListArray>()
                        .ok_or_else(|| anyhow!("{}: column {}", path.display(), f.name()))?;
                    for i in 0..n {
                        let v = l.value(i);
                        let v = v.as_any().downcast_ref::<Int32Array>().ok_or_else(|| {
                            anyhow!("{}: column {} is not int32", path.display(), f.name())
                        })?;
                        out[start + i]
                            .lists
                            .insert(f.name().clone(), v.values().to_vec());
                    }
                }
                DataType::Utf8 => {
                    let s = col.as_any().downcast_ref::<StringArray>().expect("utf8");
                    for i in 0..n {
                        let v = (!s.is_null(i)).then(|| s.value(i).to_string());
                        if f.name() == "source" {
                            out[start + i].source = v.unwrap_or_default();
                        } else {
                            out[start + i].texts.insert(f.name().clone(), v);
                        }
                    }
                }
                other => bail!(
                    "{}: column {} has unexpected type {other}",
                    path.display(),
                    f.name()
                ),
            }
        }
    }
    Ok(out)
}
