//! Distributed checkpoints: every rank writes the slices it owns to its own file, and an index
//! records, for each piece, which box of which global tensor it is. A run with any other
//! layout then reads back exactly the boxes it needs, from whichever pieces overlap them
//! (as torch's DCP and DeepSpeed's universal checkpoints do).
//!
//! Layout under a checkpoint directory:
//!
//! ```text
//! dist/index.json            global shapes and every piece: file, tensor, start, len
//! dist/rank-00003.safetensors  the pieces rank 3 owns, keyed by tensor name
//! dist/rank-00003.json         the same pieces' metadata (merged into index.json)
//! ```
//!
//! Tensor names are those of the whole checkpoint (`model.layers.0.mlp.up_proj.weight`,
//! `exp_avg.<param>`, `exp_avg_sq.<param>`), so conversion to and from HF is a renaming-free
//! copy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use super::{atomic, hf};
use crate::{Error, Result};

pub const DIST: &str = "dist";
pub const INDEX: &str = "index.json";
pub const FORMAT: &str = "colossal-dist/1";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Piece {
    pub tensor: String,
    pub file: String,
    pub start: Vec<usize>,
    pub len: Vec<usize>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Index {
    pub format: String,
    /// Global shape of every tensor.
    pub tensors: BTreeMap<String, Vec<usize>>,
    pub pieces: Vec<Piece>,
}

/// A box of a global tensor held by this rank.
pub struct Owned {
    pub tensor: String,
    pub global: Vec<usize>,
    pub start: Vec<usize>,
    pub data: Tensor,
}

pub fn is_distributed(dir: &Path) -> bool {
    dir.join(DIST).join(INDEX).is_file()
}

fn rank_stem(rank: usize) -> String {
    format!("rank-{rank:05}")
}

/// Writes this rank's pieces (`dist/rank-NNNNN.safetensors` and `.json`) under `dir`.
pub fn write_rank(dir: &Path, rank: usize, owned: &[Owned]) -> Result<()> {
    let dist = dir.join(DIST);
    std::fs::create_dir_all(&dist).map_err(|e| Error::io(&dist, e))?;
    let file = format!("{}.safetensors", rank_stem(rank));
    let tensors: Vec<(String, Tensor)> = owned
        .iter()
        .map(|o| (o.tensor.clone(), o.data.clone()))
        .collect();
    hf::save_file(&dist.join(&file), &tensors)?;
    let meta = Index {
        format: FORMAT.into(),
        tensors: owned
            .iter()
            .map(|o| (o.tensor.clone(), o.global.clone()))
            .collect(),
        pieces: owned
            .iter()
            .map(|o| Piece {
                tensor: o.tensor.clone(),
                file: file.clone(),
                start: o.start.clone(),
                len: o.data.dims().to_vec(),
            })
            .collect(),
    };
    let json = serde_json::to_string(&meta).expect("json");
    atomic::write_file(
        &dist.join(format!("{}.json", rank_stem(rank))),
        json.as_bytes(),
    )
}

/// Merges every rank's metadata into `dist/index.json` (after all ranks wrote), checking
/// that the pieces of each tensor cover it exactly once.
pub fn write_index(dir: &Path) -> Result<Index> {
    let dist = dir.join(DIST);
    let mut metas: Vec<PathBuf> = std::fs::read_dir(&dist)
        .map_err(|e| Error::io(&dist, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with("rank-") && name.ends_with(".json")
        })
        .collect();
    metas.sort();
    let mut index = Index {
        format: FORMAT.into(),
        ..Default::default()
    };
    for path in metas {
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let meta: Index =
            serde_json::from_str(&text).map_err(|e| Error::file(&path, e.to_string()))?;
        index.tensors.extend(meta.tensors);
        index.pieces.extend(meta.pieces);
    }
    for (name, shape) in &index.tensors {
        let covered: usize = index
            .pieces
            .iter()
            .filter(|p| &p.tensor == name)
            .map(|p| p.len.iter().product::<usize>())
            .sum();
        if covered != shape.iter().product::<usize>() {
            return Err(Error::file(
                &dist,
                format!("pieces of `{name}` cover {covered} of its {shape:?} elements"),
            ));
        }
    }
    let json = serde_json::to_string_pretty(&index).expect("json");
    atomic::write_file(&dist.join(INDEX), json.as_bytes())?;
    Ok(index)
}

pub fn read_index(dir: &Path) -> Result<Index> {
    let path = dir.join(DIST).join(INDEX);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let index: Index =
        serde_json::from_str(&text).map_err(|e| Error::file(&path, e.to_string()))?;
    if index.format != FORMAT {
        return Err(Error::file(
            &path,
            format!("format `{}`, expected `{FORMAT}`", index.format),
        ));
    }
    Ok(index)
}

/// Reads pieces on demand, keeping each file mapped once.
pub struct Reader {
    dir: PathBuf,
    pub index: Index,
    maps: BTreeMap<String, memmap2::Mmap>,
}

impl Reader {
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(Self {
            dir: dir.join(DIST),
            index: read_index(dir)?,
            maps: BTreeMap::new(),
        })
    }

    pub fn shape(&self, tensor: &str) -> Option<&[usize]> {
        self.index.tensors.get(tensor).map(Vec::as_slice)
    }

    /// The box `start..start+len` of global tensor `tensor`, assembled from the pieces that
    /// overlap it.
    pub fn read(&mut self, tensor: &str, start: &[usize], len: &[usize]) -> Result<Tensor> {
        let Some(shape) = self.index.tensors.get(tensor).cloned() else {
            return Err(Error::MissingTensor {
                path: self.dir.clone(),
                name: tensor.to_string(),
            });
        };
        if start.len() != shape.len()
            || start
                .iter()
                .zip(len)
                .zip(&shape)
                .any(|((s, l), d)| s + l > *d)
        {
            return Err(crate::msg!(
                "box {start:?}+{len:?} outside `{tensor}` of shape {shape:?}"
            ));
        }
        let mut out = Tensor::zeros(len, DType::F32, &Device::Cpu)?;
        let pieces: Vec<Piece> = self
            .index
            .pieces
            .iter()
            .filter(|p| p.tensor == tensor)
            .cloned()
            .collect();
        for p in pieces {
            // Overlap of the wanted box and the piece, per dimension.
            let lo: Vec<usize> = start.iter().zip(&p.start).map(|(a, b)| *a.max(b)).collect();
            let hi: Vec<usize> = (0..shape.len())
                .map(|d| (start[d] + len[d]).min(p.start[d] + p.len[d]))
                .collect();
            if lo.iter().zip(&hi).any(|(l, h)| l >= h) {
                continue;
            }
            let mut part = self.piece(&p)?;
            let mut ranges = Vec::with_capacity(shape.len());
            for d in 0..shape.len() {
                part = part.narrow(d, lo[d] - p.start[d], hi[d] - lo[d])?;
                ranges.push(lo[d] - start[d]..hi[d] - start[d]);
            }
            out = out.slice_assign(&ranges, &part.contiguous()?)?;
        }
        Ok(out)
    }

    fn piece(&mut self, p: &Piece) -> Result<Tensor> {
        let path = self.dir.join(&p.file);
        if !self.maps.contains_key(&p.file) {
            let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: read-only mapping of a checkpoint file nobody writes while we read.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            self.maps.insert(p.file.clone(), map);
        }
        let st = SafeTensors::deserialize(&self.maps[&p.file])
            .map_err(|e| Error::file(&path, format!("not a safetensors file: {e}")))?;
        let view = st
            .tensor(&p.tensor)
            .map_err(|e| Error::file(&path, format!("tensor `{}`: {e}", p.tensor)))?;
        let t = hf::view_tensor(&view)?;
        Ok(t.to_dtype(DType::F32)?)
    }
}
