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

/// Whole parameters as flat vectors, by name.
pub type Flat = Vec<(String, Vec<f32>)>;

pub fn flat(params: &colossal_core::params::Params) -> Flat {
    params
        .iter()
        .map(|(n, v)| {
            let t = v.as_tensor().flatten_all().unwrap();
            (n.to_string(), t.to_vec1::<f32>().unwrap())
        })
        .collect()
}

/// What an equivalence test compares: per-step losses and pre-clip gradient norms, and the
/// final whole parameters.
#[derive(Clone, Debug, Default)]
pub struct Run {
    pub losses: Vec<f32>,
    pub norms: Vec<f64>,
    pub params: Flat,
}

impl Run {
    /// Records one `Trainer::train_step` result (loss, grad norm, lr).
    pub fn step(&mut self, (loss, norm, _): (f32, f64, f64)) {
        self.losses.push(loss);
        self.norms.push(norm);
    }
}

/// ‖a − b‖ / ‖b‖.
pub fn rel_norm(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let n = |v: &mut dyn Iterator<Item = f32>| v.map(|x| x as f64 * x as f64).sum::<f64>().sqrt();
    (n(&mut a.iter().zip(b).map(|(x, y)| x - y)) / n(&mut b.iter().copied()).max(1e-30)) as f32
}

/// `got` equals `want` within `tol` (relative): every step's loss and pre-clip gradient norm,
/// and every parameter — the same names, each with as many elements.
pub fn assert_same_run(what: &str, got: &Run, want: &Run, tol: f32) {
    assert_eq!(got.losses.len(), want.losses.len(), "{what}: steps");
    assert_eq!(got.norms.len(), want.norms.len(), "{what}: grad norms");
    for (s, (a, b)) in got.losses.iter().zip(&want.losses).enumerate() {
        let d = (a - b).abs() / b.abs().max(1e-12);
        assert!(d <= tol, "{what}: loss at step {s}: {a} vs {b} ({d:e})");
    }
    for (s, (a, b)) in got.norms.iter().zip(&want.norms).enumerate() {
        let d = ((a - b).abs() / b.abs().max(1e-12)) as f32;
        assert!(
            d <= tol,
            "{what}: pre-clip grad norm at step {s}: {a} vs {b} ({d:e})"
        );
    }
    let mut names: Vec<&str> = got.params.iter().map(|(n, _)| n.as_str()).collect();
    let mut expected: Vec<&str> = want.params.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    expected.sort_unstable();
    assert_eq!(names, expected, "{what}: parameter names");
    let mut worst = 0f32;
    for (name, b) in &want.params {
        let a = &got
            .params
            .iter()
            .find(|(n, _)| n == name)
            .expect("listed")
            .1;
        assert_eq!(a.len(), b.len(), "{what}: {name} length");
        let d = rel_norm(a, b);
        assert!(d <= tol, "{what}: {name} differs by {d:e}");
        worst = worst.max(d);
    }
    println!(
        "{what}: losses {:?}, grad norms {:?}, {} parameters, worst relative difference {worst:.1e}",
        got.losses,
        got.norms.iter().map(|n| (n * 1e6).round() / 1e6).collect::<Vec<_>>(),
        want.params.len()
    );
}

/// The error a job of `nproc` local ranks with `cfg` stops with while it assembles (a setting
/// it refuses), as text.
pub fn assembly_error(cfg: &TrainConfig, nproc: usize) -> String {
    use colossal_core::dist::{run_local, Communicator};
    run_local(nproc, std::time::Duration::from_secs(60), |comm| {
        let comm: Box<dyn Communicator> = Box::new(comm);
        let cpu = candle_core::Device::Cpu;
        colossal_core::train::Trainer::new_rank(cfg.clone(), None, cpu, Some(comm)).map(|_| ())
    })
    .expect_err("the job should be refused")
    .to_string()
}
