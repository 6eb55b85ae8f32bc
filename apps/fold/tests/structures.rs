//! Structures and alignments from the real files in `../shared/data/proteins`: a full-atom PDB
//! file gives the backbone biotite read for `fold_metrics` (N, CA, C, O of every residue); the
//! OpenFold test mmCIFs give chain A with the sequence their MSAs were built for; a written PDB
//! reads back to the same coordinates; bad input is an error naming file and line.

use std::path::PathBuf;

use candle_core::Device;
use fold::{mmcif, msa, pdb};

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

#[test]
fn a_full_atom_pdb_file_gives_the_backbone_biotite_reads() {
    let chains = pdb::read(&shared().join("data/proteins/pdb_fullatom/1aki.pdb.gz")).unwrap();
    let a = chains.iter().find(|c| c.id == "A").unwrap();
    let t = candle_core::safetensors::load(
        shared().join("fixtures/fold_metrics/coords.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let want: Vec<Vec<Vec<f32>>> = t["1aki_A.backbone"].to_vec3().unwrap();
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(shared().join("fixtures/fold_metrics/metrics.json")).unwrap(),
    )
    .unwrap();
    let seq = v["chains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["key"] == "1aki_A")
        .unwrap()["sequence"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(a.sequence(), seq);
    assert_eq!(a.residues.len(), want.len());
    let mut worst = 0f64;
    for (res, w) in a.residues.iter().zip(&want) {
        for (k, name) in ["N", "CA", "C", "O"].iter().enumerate() {
            let xyz = res.atom(name).unwrap().xyz;
            for d in 0..3 {
                worst = worst.max((xyz[d] - w[k][d] as f64).abs());
            }
        }
    }
    println!(
        "1aki chain A: {} residues, backbone vs biotite {worst:e} Å",
        a.residues.len()
    );
    assert!(worst < 1e-5);

    // Written and read back: the same chain to the file's precision.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("1aki_A.pdb");
    pdb::write(&out, std::slice::from_ref(a)).unwrap();
    let back = pdb::read(&out).unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].sequence(), a.sequence());
    for (r, s) in back[0].residues.iter().zip(&a.residues) {
        assert_eq!((r.number, r.atoms.len()), (s.number, s.atoms.len()));
        for (x, y) in r.atoms.iter().zip(&s.atoms) {
            assert_eq!(x.name, y.name);
            for d in 0..3 {
                assert!((x.xyz[d] - y.xyz[d]).abs() < 5e-4);
            }
            assert!((x.b_factor - y.b_factor).abs() < 5e-3);
        }
    }
}

#[test]
fn openfold_test_mmcifs_give_the_chains_their_msas_align() {
    let dir = shared().join("data/proteins/openfold_test");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir.join("mmcif")).unwrap() {
        let path = entry.unwrap().path();
        let id = path
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .split('.')
            .next()
            .unwrap()
            .to_string();
        let chains = mmcif::read(&path).unwrap();
        let a = chains.iter().find(|c| c.id == "A").unwrap();
        let msa_dir = dir.join(format!("msas/{id}_A"));
        let a3m = msa::read(&msa_dir.join("bfd_uniclust_hits.a3m")).unwrap();
        let sto = msa::read(&msa_dir.join("uniref90_hits.sto.gz")).unwrap();
        assert_eq!(a3m.query(), sto.query(), "{id}: the two MSAs' queries");
        if id == "1psm" {
            // A FASTA file is a one-row alignment of its first sequence.
            let single = msa::read(&dir.join("short.fasta")).unwrap();
            assert_eq!(single.len(), 1);
            assert!(single.query().starts_with("MAAHKGAEHHH") && single.query().len() == 73);
        }
        // The modelled residues are the query's, in order (gaps are unmodelled residues).
        let seq = a.sequence();
        let query = a3m.query();
        let mut rest = query.chars();
        let found = seq.chars().all(|c| rest.any(|q| q == c));
        println!(
            "{id}: chain A {} residues modelled of {} in the MSA query; a3m {} rows, sto {} rows",
            seq.len(),
            query.len(),
            a3m.len(),
            sto.len()
        );
        assert!(found, "{id}: {seq} does not sit in {query}");
        checked += 1;
    }
    assert_eq!(checked, 8);
}

#[test]
fn bad_input_names_the_file_and_line() {
    let p = std::path::Path::new("bad.pdb");
    let text = "ATOM      1  CA  ALA A   1      11.104  13.207   2.100  1.00  0.00           C\n\
                ATOM      2  CA  XYZ A   2      11.104  13.207   2.100  1.00  0.00           C\n";
    let err = pdb::parse(text, p).unwrap_err().to_string();
    assert!(
        err.starts_with("bad.pdb:2:") && err.contains("XYZ"),
        "{err}"
    );
    let text = "ATOM      1  CA  ALA A   1      11.104  1x.207   2.100  1.00  0.00           C\n";
    let err = pdb::parse(text, p).unwrap_err().to_string();
    assert!(
        err.starts_with("bad.pdb:1:") && err.contains("y `1x.207`"),
        "{err}"
    );
    let cif = "data_x\nloop_\n_atom_site.group_PDB\n_atom_site.auth_atom_id\n_atom_site.auth_comp_id\n\
               _atom_site.auth_asym_id\n_atom_site.auth_seq_id\n_atom_site.Cartn_x\n_atom_site.Cartn_y\n\
               _atom_site.Cartn_z\nATOM CA ALA A 1 1.0 2.0 3.0\nATOM CA GLY A 2 1.0 2.0 abc\n";
    let err = mmcif::parse(cif, std::path::Path::new("bad.cif"))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("bad.cif:12:") && err.contains("Cartn_z"),
        "{err}"
    );
}
