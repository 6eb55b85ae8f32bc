//! `fold train` and `fold predict` end to end on one real chain: the run resumes exactly from a
//! checkpoint, leaves its curves, and the predicted structure written as PDB parses back to the
//! coordinates the model gave, with pLDDT in the B-factors and a contact-map PNG beside it.

use std::path::{Path, PathBuf};
use std::process::Command;

use colossal_core::models::ModelFamily;

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/proteins/openfold_test")
}

fn config(dir: &Path) -> PathBuf {
    let text = format!(
        r#"
[model]
preset = "tiny"
[data]
max_msa_seqs = 8
[[data.examples]]
structure = "{}"
chain = "A"
msa = "{}"
[train]
out_dir = "{}"
batch_size = 2
micro_batch_size = 1
max_steps = 4
lr = 1e-3
schedule = "constant"
eval_every = 2
save_every = 2
"#,
        shared().join("mmcif/1psm.cif.gz").display(),
        shared().join("msas/1psm_A/bfd_uniclust_hits.a3m").display(),
        dir.join("out").display()
    );
    let path = dir.join("fold.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn fold(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fold"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fold {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["loss"].as_f64())
        .collect()
}

#[test]
fn train_resume_and_predict() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let c = cfg.to_str().unwrap();
    let printed = fold(&["train", "--config", c]);
    println!("{printed}");
    let out = tmp.path().join("out");
    let whole = losses(&out);
    assert_eq!(whole.len(), 4);
    for f in ["loss.png", "structure.png", "metrics.jsonl"] {
        assert!(out.join(f).exists(), "{f}");
    }
    // Again from the step-2 checkpoint, into a fresh folder: the same last two losses.
    let again = tmp.path().join("again");
    std::fs::create_dir_all(&again).unwrap();
    let cfg2 = config(&again);
    let ckpt = out.join("checkpoints/step-0000002");
    fold(&[
        "train",
        "--config",
        cfg2.to_str().unwrap(),
        "--resume",
        ckpt.to_str().unwrap(),
    ]);
    let rest = losses(&again.join("out"));
    println!("losses {whole:?}; resumed {rest:?}");
    assert_eq!(rest, whole[2..].to_vec());

    let model = out.join("checkpoints/step-0000004");
    let msa = shared().join("msas/1psm_A/bfd_uniclust_hits.a3m");
    let pdb = tmp.path().join("pred.pdb");
    let said = fold(&[
        "predict",
        "--model",
        model.to_str().unwrap(),
        "--msa",
        msa.to_str().unwrap(),
        "--out",
        pdb.to_str().unwrap(),
        "--max-msa-seqs",
        "8",
    ]);
    println!("{said}");
    assert!(pdb.with_extension("contacts.png").exists());
    let (m, p) =
        fold::model::FoldModel::load(&model, candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
    let rows = fold::msa::read(&msa).unwrap();
    let pred = fold::predict::predict(&m, &p, &rows, 8, 3).unwrap();
    let back = fold::pdb::read(&pdb).unwrap();
    assert_eq!(back[0].sequence(), rows.query());
    let mut worst = 0f64;
    for (res, (atoms, plddt)) in back[0]
        .residues
        .iter()
        .zip(pred.backbone.iter().zip(&pred.plddt))
    {
        for (a, xyz) in res.atoms.iter().zip(atoms) {
            for (got, want) in a.xyz.iter().zip(xyz) {
                worst = worst.max((got - want).abs());
            }
            assert!((a.b_factor - plddt).abs() < 5e-3);
        }
    }
    println!("the PDB file reads back within {worst:e} Å of the prediction");
    assert!(worst <= 5e-4);
    let report = fold(&[
        "eval",
        "--pred",
        pdb.to_str().unwrap(),
        "--ref",
        shared().join("mmcif/1psm.cif.gz").to_str().unwrap(),
    ]);
    println!("fold eval: {report}");
    assert!(report.contains("\"rmsd\""));
}
