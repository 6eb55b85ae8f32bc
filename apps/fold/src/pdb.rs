//! PDB files: read the first model's protein chains (standard residues; selenomethionine
//! `MSE` read as `MET`, as AlphaFold's parser does; water, ligands, DNA and RNA skipped; any
//! other residue an error; for an atom with
//! alternative locations the first one listed), and write chains back with a per-atom
//! B-factor (pLDDT for predictions). Errors name the file and line.

use std::path::Path;

use crate::residues;
use crate::superpose::Vec3;
use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct Atom {
    pub name: String,
    pub xyz: Vec3,
    pub b_factor: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Residue {
    /// Three-letter name (`MSE` is stored as `MET`).
    pub name: String,
    pub number: i32,
    pub insertion: char,
    pub atoms: Vec<Atom>,
}

impl Residue {
    pub fn atom(&self, name: &str) -> Option<&Atom> {
        self.atoms.iter().find(|a| a.name == name)
    }

    /// One-letter code.
    pub fn code(&self) -> char {
        residues::one_letter(&self.name).unwrap_or('X')
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Chain {
    pub id: String,
    pub residues: Vec<Residue>,
}

impl Chain {
    pub fn sequence(&self) -> String {
        self.residues.iter().map(Residue::code).collect()
    }
}

/// Reads a `.pdb` file (gzip-compressed when it ends in `.gz`).
pub fn read(path: &Path) -> Result<Vec<Chain>> {
    parse(&crate::msa::read_text(path)?, path)
}

fn field(line: &str, from: usize, to: usize) -> &str {
    line.get(from..to.min(line.len())).unwrap_or("").trim()
}

fn number<T: std::str::FromStr>(
    line: &str,
    from: usize,
    to: usize,
    what: &str,
    path: &Path,
    n: usize,
) -> Result<T> {
    let f = field(line, from, to);
    f.parse()
        .map_err(|_| Error::at_line(path, n, format!("{what} `{f}` is not a number")))
}

/// Parses PDB text (`path` names it in errors).
pub fn parse(text: &str, path: &Path) -> Result<Vec<Chain>> {
    let mut chains = ChainBuilder::default();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.starts_with("ENDMDL") {
            break;
        }
        let record = field(line, 0, 6);
        if record != "ATOM" && record != "HETATM" {
            continue;
        }
        if line.len() < 54 {
            return Err(Error::at_line(
                path,
                n,
                "an ATOM record shorter than its coordinates",
            ));
        }
        let b_factor = match field(line, 60, 66) {
            "" => 0.0,
            _ => self::number(line, 60, 66, "B-factor", path, n)?,
        };
        let rec = AtomRecord {
            hetatm: record == "HETATM",
            res_name: field(line, 17, 20),
            atom_name: field(line, 12, 16),
            chain: &(line.as_bytes()[21] as char).to_string(),
            number: number(line, 22, 26, "residue number", path, n)?,
            insertion: line.as_bytes().get(26).map_or(' ', |&b| b as char),
            alternative: line.as_bytes()[16] != b' ',
            xyz: [
                self::number(line, 30, 38, "x", path, n)?,
                self::number(line, 38, 46, "y", path, n)?,
                self::number(line, 46, 54, "z", path, n)?,
            ],
            b_factor,
        };
        chains.add(rec, path, n)?;
    }
    chains.finish(path, "no protein ATOM records")
}

/// One atom as a PDB or mmCIF file lists it.
pub(crate) struct AtomRecord<'a> {
    pub hetatm: bool,
    pub res_name: &'a str,
    pub atom_name: &'a str,
    pub chain: &'a str,
    pub number: i32,
    pub insertion: char,
    /// Listed with an alternative-location label.
    pub alternative: bool,
    pub xyz: Vec3,
    pub b_factor: f64,
}

/// Chains from atom records in file order: selenomethionine read as methionine, water,
/// ligands, DNA and RNA skipped, any other residue an error; for an atom with alternative
/// locations the first listed (and for a residue given two identities, the first).
#[derive(Default)]
pub(crate) struct ChainBuilder {
    chains: Vec<Chain>,
}

impl ChainBuilder {
    pub fn add(&mut self, rec: AtomRecord, path: &Path, n: usize) -> Result<()> {
        let res_name = match (rec.res_name, rec.hetatm) {
            ("MSE", _) => "MET",
            (_, true) => return Ok(()),
            (name, false) => name,
        };
        if residues::is_nucleotide(res_name) {
            return Ok(());
        }
        if residues::one_letter(res_name).is_none() {
            return Err(Error::at_line(
                path,
                n,
                format!("residue `{res_name}` is not one of the 20 standard amino acids"),
            ));
        }
        let name = match (res_name, rec.atom_name) {
            ("MET", "SE") => "SD",
            (_, name) => name,
        };
        if self.chains.last().is_none_or(|c| c.id != rec.chain) {
            if self.chains.iter().any(|c| c.id == rec.chain) {
                return Err(Error::at_line(
                    path,
                    n,
                    format!("chain {} resumes after another chain", rec.chain),
                ));
            }
            self.chains.push(Chain {
                id: rec.chain.to_string(),
                residues: Vec::new(),
            });
        }
        let chain = self.chains.last_mut().expect("pushed");
        let same = |r: &Residue| r.number == rec.number && r.insertion == rec.insertion;
        if !chain.residues.last().is_some_and(same) {
            chain.residues.push(Residue {
                name: res_name.to_string(),
                number: rec.number,
                insertion: rec.insertion,
                atoms: Vec::new(),
            });
        }
        let res = chain.residues.last_mut().expect("pushed");
        if res.name != res_name {
            // A point mutation given as alternative locations: keep the first residue.
            if rec.alternative {
                return Ok(());
            }
            return Err(Error::at_line(
                path,
                n,
                format!("residue {} is both {} and {res_name}", rec.number, res.name),
            ));
        }
        if res.atom(name).is_none() {
            res.atoms.push(Atom {
                name: name.to_string(),
                xyz: rec.xyz,
                b_factor: rec.b_factor,
            });
        }
        Ok(())
    }

    pub fn finish(self, path: &Path, empty: &str) -> Result<Vec<Chain>> {
        match self.chains.is_empty() {
            true => Err(Error::file(path, empty)),
            false => Ok(self.chains),
        }
    }
}

/// PDB text for `chains` (ATOM records, TER after each chain, END). A PDB chain id is one
/// character.
pub fn format(chains: &[Chain]) -> Result<String> {
    let mut out = String::new();
    let mut serial = 1;
    for chain in chains {
        if chain.id.chars().count() != 1 {
            return Err(Error::Invalid(format!(
                "chain id `{}`: a PDB file has one character for it (write mmCIF)",
                chain.id
            )));
        }
        let mut last = None;
        for res in &chain.residues {
            for atom in &res.atoms {
                // Atom names of up to 3 characters start in column 14, as PDB files align them.
                let name = match atom.name.len() {
                    4 => atom.name.clone(),
                    _ => format!(" {:<3}", atom.name),
                };
                let element = atom.name.chars().next().unwrap_or('C');
                out.push_str(&format!(
                    "ATOM  {:>5} {} {:>3} {}{:>4}{}   {:>8.3}{:>8.3}{:>8.3}{:>6.2}{:>6.2}          {:>2}\n",
                    serial % 100_000,
                    name,
                    res.name,
                    chain.id,
                    res.number,
                    res.insertion,
                    atom.xyz[0],
                    atom.xyz[1],
                    atom.xyz[2],
                    1.0,
                    atom.b_factor,
                    element
                ));
                serial += 1;
            }
            last = Some(res);
        }
        if let Some(res) = last {
            out.push_str(&format!(
                "TER   {:>5}      {:>3} {}{:>4}{}\n",
                serial % 100_000,
                res.name,
                chain.id,
                res.number,
                res.insertion
            ));
            serial += 1;
        }
    }
    out.push_str("END\n");
    Ok(out)
}

/// Writes `chains` to `path` atomically (beside it, then renamed).
pub fn write(path: &Path, chains: &[Chain]) -> Result<()> {
    let tmp = path.with_extension("pdb.tmp");
    std::fs::write(&tmp, format(chains)?).map_err(|e| Error::file(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::file(path, e))
}

/// A chain of Cα atoms for `sequence` (one-letter codes) at `ca`, numbered from 1, with
/// per-residue B-factors (pLDDT) when given.
pub fn ca_chain(id: &str, sequence: &str, ca: &[Vec3], b: Option<&[f64]>) -> Result<Chain> {
    if sequence.chars().count() != ca.len() {
        return Err(Error::Invalid(format!(
            "{} residues in the sequence, {} Cα positions",
            sequence.chars().count(),
            ca.len()
        )));
    }
    let residues = sequence
        .chars()
        .zip(ca)
        .enumerate()
        .map(|(i, (c, xyz))| {
            let name = residues::three_letter(c)
                .ok_or_else(|| Error::Invalid(format!("`{c}` is not a standard residue code")))?;
            Ok(Residue {
                name: name.into(),
                number: i as i32 + 1,
                insertion: ' ',
                atoms: vec![Atom {
                    name: "CA".into(),
                    xyz: *xyz,
                    b_factor: b.map_or(0.0, |b| b[i]),
                }],
            })
        })
        .collect::<Result<_>>()?;
    Ok(Chain {
        id: id.to_string(),
        residues,
    })
}
