#![allow(dead_code)]
use std::path::{Path, PathBuf};

use colossal_core::config::parse_config;
use colossal_core::train::TrainConfig;
use colossal_data::pretrain::{run, PretrainArgs};
use colossal_data::sources::DocSplit;

pub fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

/// A small packed dataset from the first lines of tinyshakespeare.
pub fn prepare(dir: &Path) -> PathBuf {
    let text: String =
        std::fs::read_to_string(shared().join("data/pretrain_text/tinyshakespeare.txt"))
            .unwrap()
            .lines()
            .take(300)
            .map(|l| format!("{l}\n"))
            .collect();
    let input = dir.join("corpus.txt");
    std::fs::write(&input, text).unwrap();
    let out = dir.join("data");
    run(&PretrainArgs {
        inputs: vec![input],
        tokenizer: shared().join("data/tokenizers/llama2_32k/tokenizer.json"),
        out: out.clone(),
        seq_len: 16,
        field: "text".into(),
        doc_split: DocSplit::Paragraph,
        val_fraction: 0.1,
        rows_per_shard: 64,
        bos: true,
        eos: true,
    })
    .unwrap();
    out
}

pub fn config_text(data: &Path, out: &Path, vocab: usize) -> String {
    format!(
        r#"
[model]
init_seed = 1
[model.config]
vocab_size = {vocab}
hidden_size = 16
intermediate_size = 32
num_hidden_layers = 2
num_attention_heads = 2
num_key_value_heads = 1
tie_word_embeddings = true
initializer_range = 0.05
[data]
path = "{}"
[train]
out_dir = "{}"
batch_size = 4
micro_batch_size = 2
max_steps = 6
lr = 1e-2
min_lr = 1e-3
warmup_steps = 2
weight_decay = 0.1
grad_clip = 1.0
eval_every = 2
eval_batches = 2
save_every = 2
keep_last = 2
"#,
        data.display(),
        out.display()
    )
}

pub fn config(data: &Path, out: &Path, overrides: &[&str]) -> TrainConfig {
    let ov: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    parse_config(&config_text(data, out, 32000), "test.toml", &ov).unwrap()
}
