//! Hugging Face safetensors checkpoints: `model.safetensors` or
//! `model.safetensors.index.json` + shards (transformers' names), or the same under the stem
//! `diffusion_pytorch_model` (diffusers' names), read and written with HF names and shapes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, TensorView};
use safetensors::SafeTensors;

use crate::checkpoint::atomic;
use crate::{Error, Result};

pub const SINGLE: &str = "model.safetensors";
pub const INDEX: &str = "model.safetensors.index.json";
/// The file stems transformers (`model`) and diffusers (`diffusion_pytorch_model`) write.
pub const STEMS: [&str; 2] = ["model", "diffusion_pytorch_model"];

/// Files holding the weights of the HF model directory `dir`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    for stem in STEMS {
        if let Some(files) = weight_files_named(dir, stem)? {
            return Ok(files);
        }
    }
    Err(Error::file(
        dir,
        format!("no {SINGLE} or {INDEX} (nor diffusers' diffusion_pytorch_model.safetensors) in the model directory"),
    ))
}

/// The weight files of `dir` under the stem `stem` (`{stem}.safetensors` or its index).
fn weight_files_named(dir: &Path, stem: &str) -> Result<Option<Vec<PathBuf>>> {
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::file(&index, e.to_string()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::file(&index, "field `weight_map` missing"))?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|f| f.as_str().map(String::from))
            .collect();
        files.sort();
        files.dedup();
        return Ok(Some(files.into_iter().map(|f| dir.join(f)).collect()));
    }
    let single = dir.join(format!("{stem}.safetensors"));
    Ok(single.exists().then(|| vec![single]))
}

/// Reads every tensor of the given safetensors files, converted to `dtype`.
pub fn read_tensors(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, (Tensor, PathBuf)>> {
    let mut out = HashMap::new();
    for path in files {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is opened read-only and not modified while mapped.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let st = SafeTensors::deserialize(&mmap)
            .map_err(|e| Error::file(path, format!("not a safetensors file: {e}")))?;
        for (name, view) in st.tensors() {
            let t = view_to_tensor(&view, device)
                .map_err(|e| Error::file(path, format!("tensor `{name}`: {e}")))?;
            out.insert(name, (t.to_dtype(dtype)?, path.clone()));
        }
    }
    Ok(out)
}

/// A (host) tensor copied out of a safetensors view.
pub fn view_tensor(view: &TensorView<'_>) -> Result<Tensor> {
    view_to_tensor(view, &Device::Cpu)
}

fn view_to_tensor(view: &TensorView<'_>, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_raw_buffer(
        view.data(),
        candle_dtype(view)?,
        view.shape(),
        device,
    )?)
}

/// Copies only the bytes of `s` out of the (mapped) view.
fn view_slice_to_tensor(view: &TensorView<'_>, s: Slice, device: &Device) -> Result<Tensor> {
    let dtype = candle_dtype(view)?;
    let shape = view.shape();
    if s.dim >= shape.len() || s.start + s.len > shape[s.dim] {
        return Err(crate::msg!(
            "slice {}..{} of dimension {} is outside shape {shape:?}",
            s.start,
            s.start + s.len,
            s.dim
        ));
    }
    let outer: usize = shape[..s.dim].iter().product();
    let inner = shape[s.dim + 1..].iter().product::<usize>() * dtype.size_in_bytes();
    let data = view.data();
    let mut bytes = Vec::with_capacity(outer * s.len * inner);
    for o in 0..outer {
        let from = (o * shape[s.dim] + s.start) * inner;
        bytes.extend_from_slice(&data[from..from + s.len * inner]);
    }
    let mut dims = shape.to_vec();
    dims[s.dim] = s.len;
    Ok(Tensor::from_raw_buffer(&bytes, dtype, &dims, device)?)
}

fn candle_dtype(view: &TensorView<'_>) -> Result<DType> {
    Ok(match view.dtype() {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::F64 => DType::F64,
        StDtype::I64 => DType::I64,
        StDtype::U32 => DType::U32,
        StDtype::U8 => DType::U8,
        other => return Err(crate::msg!("unsupported dtype {other:?}")),
    })
}

/// Loads exactly the tensors named in `expected` (name → shape) from an HF directory,
/// with an error naming the file, tensor and both shapes on mismatch.
pub fn load_expected(
    dir: &Path,
    expected: &[(String, Vec<usize>)],
    dtype: DType,
    device: &Device,
) -> Result<BTreeMap<String, Tensor>> {
    let wanted: Vec<_> = expected
        .iter()
        .map(|(n, s)| (n.clone(), s.clone(), None))
        .collect();
    load_sliced(dir, &wanted, dtype, device)
}

/// The part `[start, start + len)` of dimension `dim` of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slice {
    pub dim: usize,
    pub start: usize,
    pub len: usize,
}

/// Like [`load_expected`], but each tensor may be only a slice of the stored one (tensor
/// parallel loading): only that slice's bytes are read from the mapped file.
pub fn load_sliced(
    dir: &Path,
    expected: &[(String, Vec<usize>, Option<Slice>)],
    dtype: DType,
    device: &Device,
) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for path in weight_files(dir)? {
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the file is opened read-only and not modified while mapped.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let st = SafeTensors::deserialize(&mmap)
            .map_err(|e| Error::file(&path, format!("not a safetensors file: {e}")))?;
        for (name, shape, slice) in expected {
            let Ok(view) = st.tensor(name) else { continue };
            if view.shape() != shape.as_slice() {
                return Err(Error::ShapeMismatch {
                    path: path.clone(),
                    name: name.clone(),
                    found: view.shape().to_vec(),
                    expected: shape.clone(),
                });
            }
            let t = match slice {
                Some(s) => view_slice_to_tensor(&view, *s, device),
                None => view_to_tensor(&view, device),
            }
            .map_err(|e| Error::file(&path, format!("tensor `{name}`: {e}")))?;
            out.insert(name.clone(), t.to_dtype(dtype)?);
        }
    }
    for (name, _, _) in expected {
        if !out.contains_key(name) {
            return Err(Error::MissingTensor {
                path: dir.to_path_buf(),
                name: name.clone(),
            });
        }
    }
    Ok(out)
}

struct Raw {
    dtype: StDtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &Raw {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn to_raw(t: &Tensor) -> Result<Raw> {
    let t = t.contiguous()?;
    let (dtype, data): (StDtype, Vec<u8>) = match t.dtype() {
        DType::F32 => (StDtype::F32, bytes_of(&t.flatten_all()?.to_vec1::<f32>()?)),
        DType::F64 => (StDtype::F64, bytes_of(&t.flatten_all()?.to_vec1::<f64>()?)),
        DType::BF16 => (
            StDtype::BF16,
            bytes_of(&t.flatten_all()?.to_vec1::<half::bf16>()?),
        ),
        DType::F16 => (
            StDtype::F16,
            bytes_of(&t.flatten_all()?.to_vec1::<half::f16>()?),
        ),
        DType::I64 => (StDtype::I64, bytes_of(&t.flatten_all()?.to_vec1::<i64>()?)),
        DType::U32 => (StDtype::U32, bytes_of(&t.flatten_all()?.to_vec1::<u32>()?)),
        DType::U8 => (StDtype::U8, t.flatten_all()?.to_vec1::<u8>()?),
        other => return Err(crate::msg!("cannot save dtype {other:?}")),
    };
    Ok(Raw {
        dtype,
        shape: t.dims().to_vec(),
        data,
    })
}

fn bytes_of<T: Copy>(v: &[T]) -> Vec<u8> {
    let n = std::mem::size_of_val(v);
    // SAFETY: plain-old-data numeric slices, read as bytes (little-endian host).
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, n) }.to_vec()
}

/// Serialises tensors to safetensors bytes with HF's `{"format": "pt"}` metadata.
pub fn to_safetensors_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    to_safetensors_bytes_with(tensors, &[])
}

/// [`to_safetensors_bytes`] with more header metadata entries (key, value) beside `format`.
pub fn to_safetensors_bytes_with(
    tensors: &[(String, Tensor)],
    metadata: &[(&str, String)],
) -> Result<Vec<u8>> {
    let raws: Vec<(String, Raw)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), to_raw(t)?)))
        .collect::<Result<_>>()?;
    let views: Vec<(&str, &Raw)> = raws.iter().map(|(n, r)| (n.as_str(), r)).collect();
    let mut meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    meta.extend(metadata.iter().map(|(k, v)| (k.to_string(), v.clone())));
    safetensors::tensor::serialize(views, Some(meta))
        .map_err(|e| crate::msg!("safetensors serialisation: {e}"))
}

/// Writes tensors atomically as one safetensors file.
pub fn save_file(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    atomic::write_file(path, &to_safetensors_bytes(tensors)?)
}

/// Writes tensors in HF layout into `dir`: one `model.safetensors`, or, when the total exceeds
/// `max_shard_bytes`, `model-0000k-of-0000n.safetensors` shards and the index.
pub fn save_model(dir: &Path, tensors: &[(String, Tensor)], max_shard_bytes: usize) -> Result<()> {
    save_model_named(dir, "model", tensors, max_shard_bytes)
}

/// [`save_model`] under the file stem `stem` (`diffusion_pytorch_model` for diffusers).
pub fn save_model_named(
    dir: &Path,
    stem: &str,
    tensors: &[(String, Tensor)],
    max_shard_bytes: usize,
) -> Result<()> {
    let size = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
    let total: usize = tensors.iter().map(|(_, t)| size(t)).sum();
    if total <= max_shard_bytes {
        return save_file(&dir.join(format!("{stem}.safetensors")), tensors);
    }
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![vec![]];
    let mut current = 0usize;
    for (n, t) in tensors {
        if current > 0 && current + size(t) > max_shard_bytes {
            shards.push(vec![]);
            current = 0;
        }
        current += size(t);
        shards.last_mut().unwrap().push((n.clone(), t.clone()));
    }
    let count = shards.len();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("{stem}-{:05}-of-{:05}.safetensors", i + 1, count);
        for (n, _) in shard {
            weight_map.insert(n.clone(), file.clone());
        }
        save_file(&dir.join(&file), shard)?;
    }
    let index = serde_json::json!({
        "metadata": {"total_size": total},
        "weight_map": weight_map,
    });
    let text = serde_json::to_string_pretty(&index).expect("json");
    atomic::write_file(
        &dir.join(format!("{stem}.safetensors.index.json")),
        text.as_bytes(),
    )
}
