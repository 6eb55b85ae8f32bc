//! The one check every diffusers `config.json` gets: the class is the one implemented, every
//! key is known, and a key that switches on something not implemented holds the one value we
//! accept (or null). Errors name the key.

use serde_json::{Map, Value};

/// JSON equality with numbers compared by value (`1` = `1.0`).
fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// The parsed object of `text`, checked: `_class_name` (when present) is `class`; each key is
/// in `known` or `fixed`; each `fixed` key holds its value (JSON) or null.
pub fn checked(
    text: &str,
    class: &str,
    known: &[&str],
    fixed: &[(&str, &str)],
) -> Result<Map<String, Value>, String> {
    let v: Map<String, Value> = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if let Some(c) = v.get("_class_name").and_then(Value::as_str) {
        if c != class {
            return Err(format!("_class_name `{c}` is not implemented ({class})"));
        }
    }
    for (key, value) in &v {
        if let Some((_, ok)) = fixed.iter().find(|(k, _)| k == key) {
            let ok_v: Value = serde_json::from_str(ok).expect("a JSON literal");
            if !same(value, &ok_v) && !value.is_null() {
                return Err(format!("`{key} = {value}` is not implemented (only {ok})"));
            }
        } else if !known.contains(&key.as_str()) && !key.starts_with('_') {
            return Err(format!("`{key}` is not a {class} setting we know"));
        }
    }
    Ok(v)
}

/// Reads `path` and parses it with `parse`; errors name the file.
pub fn read<T>(
    path: &std::path::Path,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> crate::Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| crate::Error::file(path, e))?;
    parse(&text).map_err(|e| crate::Error::file(path, e))
}

/// serde defaults diffusers' configs share (their `__init__` defaults).
pub mod defaults {
    pub fn one() -> usize {
        1
    }
    pub fn groups() -> usize {
        32
    }
    pub fn silu() -> String {
        "silu".into()
    }
    pub fn yes() -> bool {
        true
    }
}
