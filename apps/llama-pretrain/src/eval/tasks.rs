//! Multiple-choice benchmarks as (subject, questions, few-shot pool): MMLU (English; dev
//! exemplars, test questions from the release tarball), AGIEval Gaokao and CMMLU (Chinese; shots
//! from the same subject, the question itself left out), and their prompts.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};

pub const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

#[derive(Clone, Debug)]
pub struct Question {
    pub question: String,
    pub choices: Vec<String>,
    /// Indices of the correct choices (AGIEval physics has multi-answer questions).
    pub answers: Vec<usize>,
}

pub struct Subject {
    pub name: String,
    pub questions: Vec<Question>,
    /// Exemplars for k-shot prompts (for MMLU the dev set; otherwise `questions` itself).
    pub pool: Vec<Question>,
    /// True when `pool` is `questions`: a question is never its own exemplar.
    pub pool_is_questions: bool,
}

/// Minimal RFC 4180 CSV: quoted fields with "" escapes and embedded newlines.
pub fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let (mut rows, mut row, mut field) = (Vec::new(), Vec::new(), String::new());
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => field.push(c),
        }
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    rows
}

fn letter(s: &str, path: &Path) -> Result<usize> {
    LETTERS
        .iter()
        .position(|l| *l == s.trim())
        .with_context(|| format!("{}: answer `{s}` is not A–D", path.display()))
}

/// Rows `question, A, B, C, D, answer` (MMLU) or `index, question, A, B, C, D, answer`.
fn csv_questions(text: &str, path: &Path, skip_cols: usize, header: bool) -> Result<Vec<Question>> {
    parse_csv(text)
        .into_iter()
        .skip(usize::from(header))
        .filter(|r| r.iter().any(|f| !f.is_empty()))
        .map(|r| {
            if r.len() != skip_cols + 6 {
                bail!(
                    "{}: a row has {} fields, expected {}",
                    path.display(),
                    r.len(),
                    skip_cols + 6
                );
            }
            let r = &r[skip_cols..];
            Ok(Question {
                question: r[0].clone(),
                choices: r[1..5].to_vec(),
                answers: vec![letter(&r[5], path)?],
            })
        })
        .collect()
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))
}

/// `name_dev.csv` → `name`, for every CSV in `dir` ending with `suffix`, sorted.
fn subjects_in(dir: &Path, suffix: &str) -> Result<Vec<(String, std::path::PathBuf)>> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.strip_suffix(suffix).map(|s| (s.to_string(), e.path()))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The files of a .tar.gz: (path, contents).
fn tar_gz(path: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(file)
        .read_to_end(&mut bytes)
        .with_context(|| format!("{}: not gzip", path.display()))?;
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + 512 <= bytes.len() {
        let h = &bytes[pos..pos + 512];
        if h.iter().all(|&b| b == 0) {
            break;
        }
        let name = String::from_utf8_lossy(&h[..100])
            .trim_end_matches('\0')
            .to_string();
        let size_field = String::from_utf8_lossy(&h[124..136]);
        let size =
            usize::from_str_radix(size_field.trim_matches(|c: char| c == '\0' || c == ' '), 8)
                .with_context(|| format!("{}: bad tar header for {name}", path.display()))?;
        let data = pos + 512;
        if matches!(h[156], b'0' | 0) {
            out.push((name, bytes[data..data + size].to_vec()));
        }
        pos = data + size.div_ceil(512) * 512;
    }
    Ok(out)
}

/// MMLU from `root` (dev/*_dev.csv, mmlu_test_57subjects.tar.gz); `test = false` evaluates the
/// dev questions themselves (leave-one-out shots).
pub fn mmlu(root: &Path, test: bool) -> Result<Vec<Subject>> {
    let mut subjects = Vec::new();
    let tests = if test {
        tar_gz(&root.join("mmlu_test_57subjects.tar.gz"))?
    } else {
        Vec::new()
    };
    for (name, path) in subjects_in(&root.join("dev"), "_dev.csv")? {
        let dev = csv_questions(&read(&path)?, &path, 0, false)?;
        let (questions, pool_is_questions) = if test {
            let suffix = format!("/{name}_test.csv");
            let (tname, data) = tests
                .iter()
                .find(|(n, _)| n.ends_with(&suffix))
                .with_context(|| {
                    format!("{}: no {name}_test.csv in the tarball", root.display())
                })?;
            let text = String::from_utf8(data.clone()).context("test CSV is not UTF-8")?;
            (csv_questions(&text, Path::new(tname), 0, false)?, false)
        } else {
            (dev.clone(), true)
        };
        subjects.push(Subject {
            name,
            questions,
            pool: dev,
            pool_is_questions,
        });
    }
    Ok(subjects)
}

/// CMMLU dev (`,Question,A,B,C,D,Answer` with a header).
pub fn cmmlu(root: &Path) -> Result<Vec<Subject>> {
    subjects_in(root, ".csv")?
        .into_iter()
        .map(|(name, path)| {
            let qs = csv_questions(&read(&path)?, &path, 1, true)?;
            Ok(Subject {
                name,
                pool: qs.clone(),
                questions: qs,
                pool_is_questions: true,
            })
        })
        .collect()
}

/// AGIEval Gaokao JSONL (`question`, `options` "(A)…", `label` "A" or ["A","C"]).
pub fn agieval(root: &Path) -> Result<Vec<Subject>> {
    let mut out = Vec::new();
    for (name, path) in subjects_in(root, ".jsonl")? {
        let mut qs = Vec::new();
        for (i, line) in read(&path)?
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}: line {} is not JSON", path.display(), i + 1))?;
            let passage = v["passage"].as_str().unwrap_or("");
            let choices = v["options"]
                .as_array()
                .with_context(|| format!("{}: line {}: no options", path.display(), i + 1))?
                .iter()
                .map(|o| {
                    let o = o.as_str().unwrap_or("");
                    // "(A)text" → "text"
                    o.get(3..)
                        .filter(|_| o.starts_with('('))
                        .unwrap_or(o)
                        .to_string()
                })
                .collect();
            let answers = match &v["label"] {
                serde_json::Value::String(s) => vec![letter(s, &path)?],
                serde_json::Value::Array(a) => a
                    .iter()
                    .map(|s| letter(s.as_str().unwrap_or(""), &path))
                    .collect::<Result<_>>()?,
                other => bail!("{}: line {}: label {other}", path.display(), i + 1),
            };
            qs.push(Question {
                question: format!("{passage}{}", v["question"].as_str().unwrap_or("")),
                choices,
                answers,
            });
        }
        out.push(Subject {
            name: name.trim_start_matches("gaokao-").to_string(),
            pool: qs.clone(),
            questions: qs,
            pool_is_questions: true,
        });
    }
    Ok(out)
}

fn block(q: &Question, chinese: bool, answer: bool) -> String {
    let mut s = if chinese {
        format!("问题：{}\n", q.question)
    } else {
        format!("{}\n", q.question)
    };
    for (l, c) in LETTERS.iter().zip(&q.choices) {
        s.push_str(&format!("{l}. {c}\n"));
    }
    s.push_str(if chinese { "答案：" } else { "Answer:" });
    if answer {
        let l = LETTERS[q.answers[0]];
        s.push_str(&if chinese {
            format!("{l}\n\n")
        } else {
            format!(" {l}\n\n")
        });
    }
    s
}

/// The k-shot prompt for question `i` of `s`, ending where the answer letter goes.
pub fn prompt(s: &Subject, i: usize, k: usize, chinese: bool) -> String {
    let subject = s.name.replace('_', " ");
    let mut p = if chinese {
        format!("以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n")
    } else {
        format!("The following are multiple choice questions (with answers) about {subject}.\n\n")
    };
    let shots = s
        .pool
        .iter()
        .enumerate()
        .filter(|(j, _)| !(s.pool_is_questions && *j == i))
        .take(k);
    for (_, q) in shots {
        p.push_str(&block(q, chinese, true));
    }
    p.push_str(&block(&s.questions[i], chinese, false));
    p
}
