//! Streaming documents out of text and jsonl files or folders, one at a time.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// How a plain-text file is cut into documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DocSplit {
    /// Paragraphs if the file's first 64 KiB hold a blank line, else lines (a file of one
    /// paragraph per line, like WikiText or CMRC contexts, must not become one giant document).
    Auto,
    /// Paragraphs separated by blank lines.
    Paragraph,
    /// Every non-empty line.
    Line,
    /// The whole file.
    File,
}

/// Input files in a deterministic order (folders walked recursively, sorted).
pub fn collect_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in inputs {
        if !p.exists() {
            bail!("{}: input not found", p.display());
        }
        walk(p, &mut out)?;
    }
    Ok(out)
}

fn walk(p: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if p.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
            .with_context(|| format!("{}: cannot list", p.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for e in entries {
            walk(&e, out)?;
        }
    } else {
        out.push(p.to_path_buf());
    }
    Ok(())
}

/// Calls `f(doc)` for each document of `path`. `.jsonl`/`.json` files: one JSON object per line,
/// text in `field`; anything else is plain text cut by `split`. Returns bytes read.
pub fn for_each_document(
    path: &Path,
    field: &str,
    split: DocSplit,
    f: &mut dyn FnMut(String) -> Result<()>,
) -> Result<u64> {
    let split = match split {
        DocSplit::Auto => detect_split(path)?,
        s => s,
    };
    let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let reader = BufReader::new(file);
    let is_jsonl = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("jsonl" | "json")
    );
    let mut bytes = 0u64;
    let mut para = String::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.with_context(|| {
            format!("{}:{}: unreadable line (not UTF-8?)", path.display(), i + 1)
        })?;
        bytes += line.len() as u64 + 1;
        if is_jsonl {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| {
                anyhow::anyhow!("{}:{}: malformed JSON: {e}", path.display(), i + 1)
            })?;
            let text = v.get(field).and_then(|t| t.as_str()).ok_or_else(|| {
                anyhow::anyhow!("{}:{}: no string field `{field}`", path.display(), i + 1)
            })?;
            if !text.trim().is_empty() {
                f(text.to_string())?;
            }
            continue;
        }
        match split {
            DocSplit::Line => {
                if !line.trim().is_empty() {
                    f(line)?;
                }
            }
            DocSplit::Paragraph => {
                if line.trim().is_empty() {
                    if !para.trim().is_empty() {
                        f(std::mem::take(&mut para))?;
                    }
                    para.clear();
                } else {
                    if !para.is_empty() {
                        para.push('\n');
                    }
                    para.push_str(&line);
                }
            }
            DocSplit::File | DocSplit::Auto => {
                if !para.is_empty() {
                    para.push('\n');
                }
                para.push_str(&line);
            }
        }
    }
    if !para.trim().is_empty() {
        f(para)?;
    }
    Ok(bytes)
}

fn detect_split(path: &Path) -> Result<DocSplit> {
    use std::io::Read;
    let mut head = Vec::with_capacity(1 << 16);
    File::open(path)
        .with_context(|| format!("{}: cannot open", path.display()))?
        .take(1 << 16)
        .read_to_end(&mut head)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let text = String::from_utf8_lossy(&head);
    let has_blank = text.lines().skip(1).any(|l| l.trim().is_empty());
    Ok(if has_blank {
        DocSplit::Paragraph
    } else {
        DocSplit::Line
    })
}
