//! The 20 standard amino acids: three-letter codes as PDB files write them, one-letter codes as
//! sequences do, in AlphaFold's residue order.

/// (three-letter, one-letter), AlphaFold's `restypes` order.
pub const STANDARD: [(&str, char); 20] = [
    ("ALA", 'A'),
    ("ARG", 'R'),
    ("ASN", 'N'),
    ("ASP", 'D'),
    ("CYS", 'C'),
    ("GLN", 'Q'),
    ("GLU", 'E'),
    ("GLY", 'G'),
    ("HIS", 'H'),
    ("ILE", 'I'),
    ("LEU", 'L'),
    ("LYS", 'K'),
    ("MET", 'M'),
    ("PHE", 'F'),
    ("PRO", 'P'),
    ("SER", 'S'),
    ("THR", 'T'),
    ("TRP", 'W'),
    ("TYR", 'Y'),
    ("VAL", 'V'),
];

/// The one-letter code of a standard residue's three-letter name.
pub fn one_letter(three: &str) -> Option<char> {
    STANDARD.iter().find(|(t, _)| *t == three).map(|(_, o)| *o)
}

/// The three-letter name of a one-letter code.
pub fn three_letter(one: char) -> Option<&'static str> {
    STANDARD.iter().find(|(_, o)| *o == one).map(|(t, _)| *t)
}

/// DNA and RNA residues: other polymers in a complex, skipped by the protein readers.
pub fn is_nucleotide(name: &str) -> bool {
    matches!(
        name,
        "DA" | "DC" | "DG" | "DT" | "DU" | "DI" | "A" | "C" | "G" | "U" | "I" | "N"
    )
}
