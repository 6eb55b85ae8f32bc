//! Weights of a diffusers/transformers folder: one safetensors file or a sharded set with its
//! `.index.json`, checked against the model's parameter list (a missing tensor, a wrong shape
//! or an unknown tensor is an error naming it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use colossal_core::params::Params;

use crate::{Error, Result};

/// Buffers some checkpoints carry that are not parameters.
fn is_buffer(name: &str) -> bool {
    name.ends_with("position_ids")
}

/// The files holding a model whose single-file name is `path` (or its sharded index).
fn files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.exists() {
        return Ok(vec![path.to_path_buf()]);
    }
    let index = PathBuf::from(format!("{}.index.json", path.display()));
    let text = std::fs::read_to_string(&index)
        .map_err(|_| Error::file(path, "not found (nor its sharded .index.json)"))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::file(&index, e))?;
    let map = v["weight_map"]
        .as_object()
        .ok_or_else(|| Error::file(&index, "no weight_map"))?;
    let mut out: Vec<PathBuf> = map
        .values()
        .filter_map(|f| f.as_str())
        .map(|f| path.with_file_name(f))
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// Every parameter of `expected` (name, shape) from `path`, as trainable variables in
/// `expected`'s order, converted to `dtype` on `device`.
pub fn load(
    path: &Path,
    expected: &[(String, Vec<usize>)],
    dtype: DType,
    device: &Device,
) -> Result<Params> {
    let mut found: HashMap<String, (Tensor, PathBuf)> = HashMap::new();
    for f in files(path)? {
        let tensors = candle_core::safetensors::load(&f, device).map_err(|e| Error::file(&f, e))?;
        for (name, t) in tensors {
            found.insert(name, (t, f.clone()));
        }
    }
    let mut params = Params::new();
    for (name, shape) in expected {
        let (t, f) = found
            .remove(name)
            .ok_or_else(|| Error::file(path, format!("tensor `{name}` is missing")))?;
        if t.dims() != shape.as_slice() {
            return Err(Error::file(
                &f,
                format!(
                    "`{name}` has shape {:?}, the config needs {shape:?}",
                    t.dims()
                ),
            ));
        }
        params.insert(name.clone(), Var::from_tensor(&t.to_dtype(dtype)?)?);
    }
    if let Some(extra) = found.keys().filter(|n| !is_buffer(n)).min() {
        return Err(Error::file(
            path,
            format!("tensor `{extra}` is not a parameter of the model as configured"),
        ));
    }
    Ok(params)
}

/// A model from its folder: `read` builds it from `dir/config.json`, then every parameter
/// `shapes` lists is read from `dir/file` (or its shards).
pub fn load_folder<M>(
    dir: &Path,
    file: &str,
    read: impl FnOnce(&Path) -> Result<M>,
    shapes: impl FnOnce(&M) -> Vec<(String, Vec<usize>)>,
    dtype: DType,
    device: &Device,
) -> Result<(M, Params)> {
    let model = read(&dir.join("config.json"))?;
    let params = load(&dir.join(file), &shapes(&model), dtype, device)?;
    Ok((model, params))
}
