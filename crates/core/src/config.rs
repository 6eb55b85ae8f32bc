//! One TOML config, every key overridable with `--set section.key=value`, deserialised into
//! typed structs that reject unknown keys. Errors name the file and the key path.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// Parses `text` (from `origin`), applies `overrides` and deserialises into `T`.
pub fn parse_config<T: DeserializeOwned>(
    text: &str,
    origin: &str,
    overrides: &[String],
) -> Result<T> {
    let mut root: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| Error::Config(format!("{origin}: {e}")))?;
    for ov in overrides {
        apply_override(&mut root, ov)?;
    }
    let value = toml::Value::Table(root);
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        Error::Config(format!("{origin}: key `{path}`: {inner}"))
    })
}

/// Reads a TOML config file; see [`parse_config`].
pub fn load_config<T: DeserializeOwned>(path: &Path, overrides: &[String]) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_config(&text, &path.display().to_string(), overrides)
}

/// `a.b.c=value`: the value is read as a TOML value (number, bool, array, quoted string),
/// else taken as a bare string.
pub fn apply_override(root: &mut toml::Table, ov: &str) -> Result<()> {
    let (key, raw) = ov
        .split_once('=')
        .ok_or_else(|| Error::Config(format!("--set `{ov}`: expected section.key=value")))?;
    let key = key.trim();
    let value = parse_value(raw.trim());
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(Error::Config(format!("--set `{ov}`: empty key segment")));
    }
    let mut table = root;
    for part in &parts[..parts.len() - 1] {
        let entry = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| Error::Config(format!("--set `{ov}`: `{part}` is not a section")))?;
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

fn parse_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Train {
        lr: f64,
        steps: usize,
        #[serde(default)]
        name: String,
    }
    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        train: Train,
    }

    #[test]
    fn overrides_apply_with_types() {
        let c: Cfg = parse_config(
            "[train]\nlr = 0.1\nsteps = 3\n",
            "t.toml",
            &[
                "train.lr=3e-4".into(),
                "train.name=run1".into(),
                "train.steps=7".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.train.lr, 3e-4);
        assert_eq!(c.train.steps, 7);
        assert_eq!(c.train.name, "run1");
    }

    #[test]
    fn unknown_and_missing_keys_are_named() {
        let e = parse_config::<Cfg>("[train]\nlr = 0.1\nsteps = 3\nlrr = 2\n", "t.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("t.toml") && e.contains("lrr"), "{e}");
        let e = parse_config::<Cfg>("[train]\nlr = 0.1\n", "t.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("train") && e.contains("steps"), "{e}");
        let e = parse_config::<Cfg>(
            "[train]\nlr = 0.1\nsteps=1\n",
            "t.toml",
            &["train.bogus=1".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("bogus"), "{e}");
    }
}
