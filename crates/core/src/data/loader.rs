//! Reads a prepared split in a deterministic, seeded, resumable order.
//!
//! The order of epoch `e` is drawn from `(seed, e)`: row groups are shuffled, taken in windows
//! of [`WINDOW_GROUPS`], and the rows of each window shuffled together, so a batch mixes many
//! places of the corpus while reads stay within a bounded set of decoded row groups. Position in
//! the stream is one number, the count of sequences consumed: the whole data cursor a checkpoint
//! needs.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, Int32Array, ListArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::reader::{FileReader, SerializedFileReader};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::format::{Manifest, PackedSequence};
use crate::{Error, Result};

/// Row groups whose rows are shuffled together.
pub const WINDOW_GROUPS: usize = 32;

struct RowGroup {
    file: usize,
    index: usize,
    rows: usize,
}

pub struct PackedDataset {
    pub manifest: Manifest,
    files: Vec<PathBuf>,
    groups: Vec<RowGroup>,
    total: usize,
    seed: u64,
    order_key: Option<(u64, bool)>,
    order: Vec<(u32, u32)>,
    cache: HashMap<usize, Vec<PackedSequence>>,
    cache_order: VecDeque<usize>,
}

/// A batch of sequences, row-major.
pub struct Batch {
    pub seqs: Vec<PackedSequence>,
}

impl PackedDataset {
    /// Opens `split` ("train" or "validation") of the dataset at `dir`.
    pub fn open(dir: &Path, split: &str, seed: u64) -> Result<Self> {
        let manifest = Manifest::read(dir)?;
        let info = match split {
            "train" => &manifest.train,
            "validation" => &manifest.validation,
            other => return Err(crate::msg!("unknown split `{other}`")),
        };
        let mut files = Vec::new();
        let mut groups = Vec::new();
        for (fi, name) in info.files.iter().enumerate() {
            let path = dir.join(name);
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            let reader = SerializedFileReader::new(file)
                .map_err(|e| Error::file(&path, format!("corrupt Parquet: {e}")))?;
            for (gi, rg) in reader.metadata().row_groups().iter().enumerate() {
                groups.push(RowGroup {
                    file: fi,
                    index: gi,
                    rows: rg.num_rows() as usize,
                });
            }
            files.push(path);
        }
        let total = groups.iter().map(|g| g.rows).sum();
        Ok(Self {
            manifest,
            files,
            groups,
            total,
            seed,
            order_key: None,
            order: vec![],
            cache: HashMap::new(),
            cache_order: VecDeque::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    fn ensure_order(&mut self, epoch: u64, shuffle: bool) {
        if self.order_key == Some((epoch, shuffle)) {
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let mut gs: Vec<usize> = (0..self.groups.len()).collect();
        if shuffle {
            gs.shuffle(&mut rng);
        }
        self.order.clear();
        for window in gs.chunks(WINDOW_GROUPS) {
            let mut rows: Vec<(u32, u32)> = window
                .iter()
                .flat_map(|&g| (0..self.groups[g].rows as u32).map(move |r| (g as u32, r)))
                .collect();
            if shuffle {
                rows.shuffle(&mut rng);
            }
            self.order.extend(rows);
        }
        self.order_key = Some((epoch, shuffle));
    }

    /// The sequence at stream position `cursor` (epochs wrap around).
    pub fn get(&mut self, cursor: u64, shuffle: bool) -> Result<PackedSequence> {
        if self.total == 0 {
            return Err(crate::msg!("dataset split is empty"));
        }
        let epoch = cursor / self.total as u64;
        self.ensure_order(epoch, shuffle);
        let (g, r) = self.order[(cursor % self.total as u64) as usize];
        let g = g as usize;
        if !self.cache.contains_key(&g) {
            let rows = self.read_group(g)?;
            // Two windows of decoded groups bound memory and cover a window boundary.
            if self.cache_order.len() >= 2 * WINDOW_GROUPS {
                if let Some(old) = self.cache_order.pop_front() {
                    self.cache.remove(&old);
                }
            }
            self.cache.insert(g, rows);
            self.cache_order.push_back(g);
        }
        Ok(self.cache[&g][r as usize].clone())
    }

    /// `n` sequences starting at `cursor`.
    pub fn batch(&mut self, cursor: u64, n: usize, shuffle: bool) -> Result<Batch> {
        let seqs = (0..n as u64)
            .map(|i| self.get(cursor + i, shuffle))
            .collect::<Result<_>>()?;
        Ok(Batch { seqs })
    }

    fn read_group(&self, g: usize) -> Result<Vec<PackedSequence>> {
        let rg = &self.groups[g];
        let path = &self.files[rg.file];
        let corrupt =
            |e: &dyn std::fmt::Display| Error::file(path, format!("corrupt Parquet: {e}"));
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| corrupt(&e))?
            .with_row_groups(vec![rg.index])
            .build()
            .map_err(|e| corrupt(&e))?;
        let mut out = Vec::with_capacity(rg.rows);
        for batch in reader {
            let batch = batch.map_err(|e| corrupt(&e))?;
            let col = |name: &str| -> Result<ListArray> {
                batch
                    .column_by_name(name)
                    .and_then(|c| c.as_any().downcast_ref::<ListArray>().cloned())
                    .ok_or_else(|| {
                        Error::file(path, format!("column `{name}` missing or not list<int32>"))
                    })
            };
            let ids = col("input_ids")?;
            let starts = col("doc_starts")?;
            for i in 0..batch.num_rows() {
                let to_vec = |l: &ListArray| -> Result<Vec<u32>> {
                    let v = l.value(i);
                    let a = v
                        .as_any()
                        .downcast_ref::<Int32Array>()
                        .ok_or_else(|| Error::file(path, "list items are not int32"))?;
                    Ok(a.values().iter().map(|&x| x as u32).collect())
                };
                out.push(PackedSequence {
                    input_ids: to_vec(&ids)?,
                    doc_starts: to_vec(&starts)?,
                });
            }
        }
        if out.len() != rg.rows {
            return Err(corrupt(&format!(
                "row group {} has {} rows, metadata says {}",
                rg.index,
                out.len(),
                rg.rows
            )));
        }
        Ok(out)
    }
}
