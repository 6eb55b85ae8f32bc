//! mmCIF files: the `_atom_site` table of the first model, read into the same chains as a PDB
//! file gives (author chain ids and residue numbers, insertion codes, first alternative
//! location, `MSE` as `MET`, water and ligands skipped). The tokenizer follows CIF 1.1: bare
//! words, quoted strings (a quote closes only before white space), `;` text fields, `loop_`
//! tables, `#` comments. Errors name the file and line.

use std::path::Path;

use crate::pdb::{AtomRecord, Chain, ChainBuilder};
use crate::{Error, Result};

/// (token, line, whether it was quoted: a quoted `loop_` or `_x` is a value).
type Token<'a> = (&'a str, usize, bool);

fn tokens<'a>(text: &'a str, path: &Path) -> Result<Vec<Token<'a>>> {
    let mut out = Vec::new();
    let mut lines = text.lines().enumerate().peekable();
    while let Some((i, line)) = lines.next() {
        let n = i + 1;
        if line.starts_with(';') {
            // A text field: up to the next line that starts with `;`; one value (its text is
            // never needed here).
            loop {
                match lines.next() {
                    Some((_, l)) if l.starts_with(';') => break,
                    Some(_) => {}
                    None => return Err(Error::at_line(path, n, "a `;` text field never closes")),
                }
            }
            out.push(("", n, true));
            continue;
        }
        let b = line.as_bytes();
        let mut k = 0;
        while k < b.len() {
            match b[k] {
                b' ' | b'\t' => k += 1,
                b'#' => break,
                q @ (b'\'' | b'"') => {
                    let start = k + 1;
                    let mut e = start;
                    while e < b.len()
                        && !(b[e] == q && (e + 1 == b.len() || b[e + 1].is_ascii_whitespace()))
                    {
                        e += 1;
                    }
                    if e >= b.len() {
                        return Err(Error::at_line(path, n, "a quoted value never closes"));
                    }
                    out.push((&line[start..e], n, true));
                    k = e + 1;
                }
                _ => {
                    let start = k;
                    while k < b.len() && !b[k].is_ascii_whitespace() {
                        k += 1;
                    }
                    out.push((&line[start..k], n, false));
                }
            }
        }
    }
    Ok(out)
}

/// The columns and rows of the `loop_` whose tags start with `category.` (e.g. `_atom_site.`).
fn table<'a>(toks: &[Token<'a>], category: &str) -> Option<(Vec<&'a str>, Vec<Token<'a>>)> {
    let mut i = 0;
    while i < toks.len() {
        if toks[i].0.eq_ignore_ascii_case("loop_") && !toks[i].2 {
            let mut tags = Vec::new();
            let mut j = i + 1;
            while j < toks.len() && toks[j].0.starts_with('_') && !toks[j].2 {
                tags.push(toks[j].0);
                j += 1;
            }
            let mut values = Vec::new();
            while j < toks.len() {
                let (t, _, quoted) = toks[j];
                if !quoted
                    && (t.starts_with('_')
                        || t.eq_ignore_ascii_case("loop_")
                        || t.starts_with("data_"))
                {
                    break;
                }
                values.push(toks[j]);
                j += 1;
            }
            if tags.first().is_some_and(|t| t.starts_with(category)) {
                let cols = tags.iter().map(|t| &t[category.len()..]).collect();
                return Some((cols, values));
            }
            i = j;
        } else {
            i += 1;
        }
    }
    None
}

/// Reads a `.cif` file (gzip-compressed when it ends in `.gz`).
pub fn read(path: &Path) -> Result<Vec<Chain>> {
    parse(&crate::msa::read_text(path)?, path)
}

/// Parses mmCIF text (`path` names it in errors).
pub fn parse(text: &str, path: &Path) -> Result<Vec<Chain>> {
    let toks = tokens(text, path)?;
    let (cols, values) =
        table(&toks, "_atom_site.").ok_or_else(|| Error::file(path, "no `_atom_site` loop"))?;
    let col = |name: &str| -> Result<usize> {
        cols.iter()
            .position(|c| *c == name)
            .ok_or_else(|| Error::file(path, format!("`_atom_site.{name}` is missing")))
    };
    let opt = |name: &str| cols.iter().position(|c| *c == name);
    let group = col("group_PDB")?;
    let atom_col = opt("auth_atom_id").map_or_else(|| col("label_atom_id"), Ok)?;
    let comp = opt("auth_comp_id").map_or_else(|| col("label_comp_id"), Ok)?;
    let chain_col = opt("auth_asym_id").map_or_else(|| col("label_asym_id"), Ok)?;
    let seq = opt("auth_seq_id").map_or_else(|| col("label_seq_id"), Ok)?;
    let (x, y, z) = (col("Cartn_x")?, col("Cartn_y")?, col("Cartn_z")?);
    let (alt, ins, bfac, model) = (
        opt("label_alt_id"),
        opt("pdbx_PDB_ins_code"),
        opt("B_iso_or_equiv"),
        opt("pdbx_PDB_model_num"),
    );
    let w = cols.len();
    if values.len() % w != 0 {
        let line = values.last().map_or(0, |t| t.1);
        return Err(Error::at_line(
            path,
            line,
            format!(
                "`_atom_site` has {} values, not a multiple of its {w} columns",
                values.len()
            ),
        ));
    }
    let mut chains = ChainBuilder::default();
    let mut first_model = None;
    for row in values.chunks(w) {
        let n = row[0].1;
        let get = |c: usize| row[c].0;
        let num = |c: usize, what: &str| -> Result<f64> {
            get(c).parse().map_err(|_| {
                Error::at_line(path, n, format!("{what} `{}` is not a number", get(c)))
            })
        };
        if let Some(m) = model {
            match first_model {
                None => first_model = Some(get(m)),
                Some(f) if f != get(m) => break,
                _ => {}
            }
        }
        let number: i32 = get(seq).parse().map_err(|_| {
            Error::at_line(
                path,
                n,
                format!("residue number `{}` is not an integer", get(seq)),
            )
        })?;
        let insertion = ins
            .map(get)
            .filter(|s| *s != "?" && *s != ".")
            .and_then(|s| s.chars().next())
            .unwrap_or(' ');
        let b_factor = match bfac.map(get) {
            None | Some("?") | Some(".") => 0.0,
            Some(_) => num(bfac.expect("present"), "B_iso_or_equiv")?,
        };
        let rec = AtomRecord {
            hetatm: get(group) == "HETATM",
            res_name: get(comp),
            atom_name: get(atom_col),
            chain: get(chain_col),
            number,
            insertion,
            alternative: alt.map(get).is_some_and(|s| s != "." && s != "?"),
            xyz: [num(x, "Cartn_x")?, num(y, "Cartn_y")?, num(z, "Cartn_z")?],
            b_factor,
        };
        chains.add(rec, path, n)?;
    }
    chains.finish(path, "no protein atoms in `_atom_site`")
}

/// mmCIF text for `chains`: one `_atom_site` loop (author and label ids alike, model 1), with
/// coordinates to 1e-6 Å — beyond a PDB file's 1e-3.
pub fn format(chains: &[Chain], name: &str) -> String {
    let mut out = format!("data_{name}\nloop_\n");
    for col in [
        "group_PDB",
        "id",
        "type_symbol",
        "label_atom_id",
        "label_alt_id",
        "label_comp_id",
        "label_asym_id",
        "label_seq_id",
        "pdbx_PDB_ins_code",
        "Cartn_x",
        "Cartn_y",
        "Cartn_z",
        "occupancy",
        "B_iso_or_equiv",
        "auth_seq_id",
        "auth_comp_id",
        "auth_asym_id",
        "auth_atom_id",
        "pdbx_PDB_model_num",
    ] {
        out.push_str(&format!("_atom_site.{col}\n"));
    }
    let mut serial = 1;
    for chain in chains {
        for (k, res) in chain.residues.iter().enumerate() {
            let ins = match res.insertion {
                ' ' => "?".to_string(),
                c => c.to_string(),
            };
            for atom in &res.atoms {
                let element = atom.name.chars().next().unwrap_or('C');
                out.push_str(&format!(
                    "ATOM {serial} {element} {name} . {res_name} {chain} {seq} {ins} {x:.6} {y:.6} {z:.6} 1.00 {b:.4} {num} {res_name} {chain} {name} 1\n",
                    name = atom.name,
                    res_name = res.name,
                    chain = chain.id,
                    seq = k + 1,
                    x = atom.xyz[0],
                    y = atom.xyz[1],
                    z = atom.xyz[2],
                    b = atom.b_factor,
                    num = res.number,
                ));
                serial += 1;
            }
        }
    }
    out.push_str("#\n");
    out
}

/// Writes `chains` to `path` atomically (beside it, then renamed).
pub fn write(path: &Path, chains: &[Chain]) -> Result<()> {
    let name = path.file_stem().map_or("structure".into(), |s| {
        s.to_string_lossy().replace(['.', ' '], "_")
    });
    let tmp = path.with_extension("cif.tmp");
    std::fs::write(&tmp, format(chains, &name)).map_err(|e| Error::file(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::file(path, e))
}
