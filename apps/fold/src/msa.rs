//! Sequences and alignments in: FASTA, A3M (HHblits: lowercase letters are insertions relative
//! to the query, dropped from the alignment and counted as deletions before the next column)
//! and Stockholm (jackhmmer: columns where the query has a gap are insertions). Each MSA comes
//! out aligned to its query — every row as long as the query, upper case or `-` — with each
//! position's deletion count, as AlphaFold's parsers give them. Gzip files (`.gz`) are read too.

use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

/// Named sequences from FASTA text, in file order.
pub fn parse_fasta(text: &str, path: &Path) -> Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if let Some(name) = line.strip_prefix('>') {
            out.push((name.trim().to_string(), String::new()));
        } else if !line.is_empty() {
            let Some(last) = out.last_mut() else {
                return Err(Error::at_line(
                    path,
                    i + 1,
                    "sequence before the first `>` header",
                ));
            };
            last.1.push_str(line.trim());
        }
    }
    if out.is_empty() {
        return Err(Error::file(path, "no `>` record"));
    }
    Ok(out)
}

/// An alignment to a query: `rows[0]` is the query.
#[derive(Clone, Debug, PartialEq)]
pub struct Msa {
    pub names: Vec<String>,
    /// Aligned rows, each as long as the query: upper-case residues and `-`.
    pub rows: Vec<String>,
    /// Per row and column: residues the row has between this column and the previous one
    /// (insertions relative to the query).
    pub deletions: Vec<Vec<u32>>,
}

impl Msa {
    pub fn query(&self) -> &str {
        &self.rows[0]
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    fn check(self, path: &Path) -> Result<Self> {
        let width = self.rows.first().map_or(0, |r| r.len());
        if let Some(i) = self.rows.iter().position(|r| r.len() != width) {
            return Err(Error::file(
                path,
                format!(
                    "row {} (`{}`) has {} aligned columns, the query {width}",
                    i + 1,
                    self.names[i],
                    self.rows[i].len()
                ),
            ));
        }
        Ok(self)
    }
}

/// Reads a file as text, un-gzipping `.gz`.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, e))?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut s = String::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_string(&mut s)
            .map_err(|e| Error::file(path, format!("not gzip text: {e}")))?;
        return Ok(s);
    }
    String::from_utf8(bytes).map_err(|e| Error::file(path, e))
}

/// Reads `.a3m`, `.sto`, or a FASTA file's first sequence (optionally `.gz`), by extension.
pub fn read(path: &Path) -> Result<Msa> {
    let text = read_text(path)?;
    let name = path.to_string_lossy();
    let name = name.trim_end_matches(".gz");
    if name.ends_with(".a3m") {
        parse_a3m(&text, path)
    } else if name.ends_with(".sto") || name.ends_with(".stockholm") {
        parse_stockholm(&text, path)
    } else if [".fasta", ".fa", ".faa"].iter().any(|e| name.ends_with(e)) {
        single_sequence(&text, path)
    } else {
        Err(Error::file(
            path,
            "not a sequence or MSA file: .fasta/.fa, .a3m or .sto (optionally .gz)",
        ))
    }
}

/// A FASTA file's first sequence as an alignment of one row (prediction without an MSA).
pub fn single_sequence(text: &str, path: &Path) -> Result<Msa> {
    let (name, seq) = parse_fasta(text, path)?.remove(0);
    let seq = seq.to_ascii_uppercase();
    if let Some(c) = seq.chars().find(|c| !c.is_ascii_alphabetic()) {
        return Err(Error::file(
            path,
            format!("`{name}`: `{c}` is not a residue letter"),
        ));
    }
    let deletions = vec![vec![0; seq.len()]];
    Msa {
        names: vec![name],
        rows: vec![seq],
        deletions,
    }
    .check(path)
}

/// A3M: lowercase letters (and `.`) are insertions.
pub fn parse_a3m(text: &str, path: &Path) -> Result<Msa> {
    let mut msa = Msa {
        names: Vec::new(),
        rows: Vec::new(),
        deletions: Vec::new(),
    };
    for (name, seq) in parse_fasta(text, path)? {
        let (mut row, mut dels, mut count) = (String::new(), Vec::new(), 0u32);
        for c in seq.chars() {
            if c.is_ascii_lowercase() || c == '.' {
                count += u32::from(c != '.');
            } else {
                row.push(c);
                dels.push(count);
                count = 0;
            }
        }
        msa.names.push(name);
        msa.rows.push(row);
        msa.deletions.push(dels);
    }
    msa.check(path)
}

/// Stockholm: sequence lines `name aligned-chunk` (blocks may repeat names); `#` lines and
/// `//` are annotation and the end. The first sequence is the query; its gap columns (`-` or
/// `.`) are insertions of the others.
pub fn parse_stockholm(text: &str, path: &Path) -> Result<Msa> {
    let mut names: Vec<String> = Vec::new();
    let mut seqs: Vec<String> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line == "//" {
            break;
        }
        let mut parts = line.split_whitespace();
        let (Some(name), Some(chunk), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(Error::at_line(
                path,
                i + 1,
                "a sequence line is `name aligned-sequence`",
            ));
        };
        match names.iter().position(|n| n == name) {
            Some(k) => seqs[k].push_str(chunk),
            None => {
                names.push(name.to_string());
                seqs.push(chunk.to_string());
            }
        }
    }
    let Some(query) = seqs.first().cloned() else {
        return Err(Error::file(path, "no sequence lines"));
    };
    let gap = |c: char| c == '-' || c == '.';
    let query: Vec<char> = query.chars().collect();
    let mut msa = Msa {
        names,
        rows: Vec::new(),
        deletions: Vec::new(),
    };
    for (k, seq) in seqs.iter().enumerate() {
        let seq: Vec<char> = seq.chars().collect();
        if seq.len() != query.len() {
            return Err(Error::file(
                path,
                format!(
                    "`{}` has {} columns, the query {}",
                    msa.names[k],
                    seq.len(),
                    query.len()
                ),
            ));
        }
        let (mut row, mut dels, mut count) = (String::new(), Vec::new(), 0u32);
        for (&s, &q) in seq.iter().zip(&query) {
            match (gap(q), gap(s)) {
                (true, false) => count += 1,
                (true, true) => {}
                (false, _) => {
                    row.push(if gap(s) { '-' } else { s.to_ascii_uppercase() });
                    dels.push(count);
                    count = 0;
                }
            }
        }
        msa.rows.push(row);
        msa.deletions.push(dels);
    }
    msa.check(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insertions_become_deletion_counts() {
        let p = Path::new("x.a3m");
        let m = parse_a3m(">q\nACDE\n>s\nAcdCD-\n>t\n-ACxyzDE\n", p);
        // `-ACxyzDE` has 5 aligned columns: an error naming the row.
        let err = m.unwrap_err().to_string();
        assert!(err.contains("row 3") && err.contains("x.a3m"), "{err}");
        let m = parse_a3m(">q\nACDE\n>s\nAcdCD-\n>t\nACxyzDE\n", p).unwrap();
        assert_eq!(m.rows, ["ACDE", "ACD-", "ACDE"]);
        assert_eq!(
            m.deletions,
            [vec![0, 0, 0, 0], vec![0, 2, 0, 0], vec![0, 0, 3, 0]]
        );
        let s = "# STOCKHOLM 1.0\nq  AC--DE\ns  AcgtD-\nq  K\ns  R\n//\n";
        let m = parse_stockholm(s, Path::new("x.sto")).unwrap();
        assert_eq!(m.rows, ["ACDEK", "ACD-R"]);
        assert_eq!(m.deletions[1], vec![0, 0, 2, 0, 0]);
    }
}
