//! `llama-pretrain init-model` on the expanded tokenizer fixture: old rows unchanged, each new
//! row the mean of the base rows of its pieces (checked by an explicit sum), input and output
//! embeddings both, tied embeddings too.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device};
use colossal_core::checkpoint::llama::{load_llama, save_llama};
use colossal_core::models::llama::{init_params, Llama, LlamaConfig};
use colossal_data::spm::{ModelProto, SpmBpe};

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

fn base_model(dir: &Path, tie: bool) {
    let cfg: LlamaConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 32000, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "tie_word_embeddings": tie,
        "initializer_range": 0.5
    }))
    .unwrap();
    let model = Llama::new(cfg).unwrap();
    let params = init_params(&model, 7, &Device::Cpu).unwrap();
    save_llama(dir, &model, &params, 1 << 30).unwrap();
    std::fs::copy(
        shared().join("data/tokenizers/llama2_32k/tokenizer.model"),
        dir.join("tokenizer.model"),
    )
    .unwrap();
}

fn rows(t: &candle_core::Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

#[test]
fn new_rows_are_the_mean_of_their_pieces_rows() {
    let merged = shared().join("fixtures/tokenizer_expansion/merged");
    let base_sp = SpmBpe::new(
        &ModelProto::load(&shared().join("data/tokenizers/llama2_32k/tokenizer.model")).unwrap(),
    )
    .unwrap();
    let pieces = ModelProto::load(&merged.join("tokenizer.model"))
        .unwrap()
        .pieces;
    for tie in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let (base, out) = (tmp.path().join("base"), tmp.path().join("out"));
        base_model(&base, tie);
        let res = Command::new(env!("CARGO_BIN_EXE_llama-pretrain"))
            .arg("init-model")
            .arg("--base")
            .arg(&base)
            .arg("--tokenizer")
            .arg(&merged)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            res.status.success(),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
        println!("{}", String::from_utf8_lossy(&res.stdout));
        let (_, before) = load_llama(&base, DType::F32, &Device::Cpu).unwrap();
        let (model, after) = load_llama(&out, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(model.cfg.vocab_size, 49_953);
        assert!(out.join("tokenizer.model").is_file() && out.join("tokenizer.json").is_file());
        let names: &[&str] = if tie {
            &[Llama::EMBED]
        } else {
            &[Llama::EMBED, "lm_head.weight"]
        };
        assert_eq!(after.contains("lm_head.weight"), !tie);
        for name in names {
            let (old, new) = (
                rows(before.get(name).unwrap()),
                rows(after.get(name).unwrap()),
            );
            assert_eq!(&new[..32000], &old[..], "{name}: base rows unchanged");
            // First added pieces (single characters), a long one, and the last.
            for id in [32000usize, 32001, 32002, 40000, 49952] {
                let text = &pieces[id].piece;
                let ids = base_sp.encode(text);
                assert!(!ids.is_empty());
                for (h, got) in new[id].iter().enumerate() {
                    let sum: f64 = ids.iter().map(|&i| old[i as usize][h] as f64).sum();
                    let want = sum / ids.len() as f64;
                    assert!(
                        (*got as f64 - want).abs() < 1e-6,
                        "{name} row {id} ({text} → {ids:?}) col {h}"
                    );
                }
            }
        }
    }
}
