//! Shared by the trainer tests: a tiny random LLaMA with LLaMA-2's vocabulary, small slices of
//! the shared data prepared with the LLaMA-2 chat template, and configs.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use candle_core::Device;
use chat_rlhf::config::ChatConfig;
use colossal_core::checkpoint::llama::save_llama;
use colossal_core::models::llama::{init_params, Llama, LlamaConfig};
use colossal_data::chat::encode::ChatEncoder;
use colossal_data::chat::prep::{self, PrepArgs};
use colossal_data::chat::raw::{Kind, RawFormat};
use colossal_data::chat::template::ChatTemplate;
use colossal_data::tokenizer::LoadedTokenizer;

pub fn shared(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared")
        .join(p)
}

pub fn tokenizer_dir() -> PathBuf {
    shared("data/tokenizers/llama2_32k")
}

pub fn template_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/templates/llama2.jinja")
}

/// A from-scratch tiny LLaMA (hidden 32, 2 layers, LLaMA-2's 32,000-token vocabulary).
pub fn tiny_model(dir: &Path, seed: u64) -> PathBuf {
    let cfg: LlamaConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 32000, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": false,
        "initializer_range": 0.02
    }))
    .unwrap();
    let model = Llama::new(cfg).unwrap();
    let params = init_params(&model, seed, &Device::Cpu).unwrap();
    save_llama(dir, &model, &params, usize::MAX).unwrap();
    dir.to_path_buf()
}

/// The first `lines` lines of a shared file (gzip read through), prepared as `kind`.
pub fn prepared(
    kind: Kind,
    format: RawFormat,
    file: &str,
    lines: usize,
    max_len: usize,
    out: &Path,
) -> PathBuf {
    let src = shared(file);
    let f = std::fs::File::open(&src).unwrap();
    let reader: Box<dyn BufRead> = if file.ends_with(".gz") {
        Box::new(BufReader::new(flate2::read::GzDecoder::new(f)))
    } else {
        Box::new(BufReader::new(f))
    };
    std::fs::create_dir_all(out).unwrap();
    let slice = out.join("input.jsonl");
    let mut w = std::fs::File::create(&slice).unwrap();
    for l in reader.lines().take(lines) {
        writeln!(w, "{}", l.unwrap()).unwrap();
    }
    let tok = LoadedTokenizer::load(&tokenizer_dir()).unwrap();
    let enc = ChatEncoder::new(tok, ChatTemplate::load(&template_path()).unwrap());
    let args = PrepArgs {
        kind,
        inputs: vec![slice],
        format,
        max_len,
        val_fraction: 0.1,
        out: out.join("data"),
    };
    prep::run(&args, &enc).unwrap();
    out.join("data")
}

/// The first `lines` Dolly open_qa rows as SFT data (at most `max_len` tokens) under `out`.
pub fn dolly_sft(out: &Path, lines: usize, max_len: usize) -> PathBuf {
    let file = "data/sft/dolly15k_open_qa_3742.jsonl";
    prepared(Kind::Sft, RawFormat::Dolly, file, lines, max_len, out)
}

/// The first `lines` hh-rlhf harmless pairs as preference data under `out`.
pub fn hh_pairs(out: &Path, lines: usize, max_len: usize) -> PathBuf {
    let file = "data/preference/hh-rlhf_harmless-base_test.jsonl.gz";
    prepared(
        Kind::Preference,
        RawFormat::HhRlhf,
        file,
        lines,
        max_len,
        out,
    )
}

/// The TOML of a config for `model` on `data` (extra TOML appended, e.g. a `[dpo]` section).
pub fn config_text(model: &Path, data: &Path, out: &Path, extra: &str) -> String {
    format!(
        r#"
[model]
hf_dir = "{}"
[data]
path = "{}"
[train]
out_dir = "{}"
batch_size = 4
micro_batch_size = 1
max_steps = 2
lr = 1e-3
warmup_steps = 0
schedule = "constant"
seed = 3
{extra}
"#,
        model.display(),
        data.display(),
        out.display()
    )
}

/// A config for `model` on `data` (extra TOML appended, e.g. a `[dpo]` section).
pub fn config(model: &Path, data: &Path, out: &Path, extra: &str) -> ChatConfig {
    let text = config_text(model, data, out, extra);
    colossal_core::config::parse_config(&text, "test config", &[]).unwrap()
}

/// The same run at nproc = 2 with ZeRO-2.
pub fn zero2(cfg: &ChatConfig, out: &Path) -> ChatConfig {
    on_two_ranks(cfg, out, 2)
}

pub fn zero3(cfg: &ChatConfig, out: &Path) -> ChatConfig {
    on_two_ranks(cfg, out, 3)
}

/// `cfg` on two data-parallel ranks with ZeRO stage `stage`, writing to `out`.
fn on_two_ranks(cfg: &ChatConfig, out: &Path, stage: u8) -> ChatConfig {
    let mut c = cfg.clone();
    c.parallel.nproc = 2;
    c.parallel.zero_stage = stage;
    c.train.out_dir = out.to_path_buf();
    c
}

pub fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-8)
}

/// The RL trainers' set-up in `dir`: a tiny base model (`seed`), a reward model (a score head
/// on it), PPO on OASST prompts (k3 KL, 2 PPO epochs; `ppo_extra` appended to `[ppo]`) and
/// GRPO on GSM8K questions (groups of 2, the reward model's reward); short sampled answers.
pub struct RlSetup {
    pub ppo: ChatConfig,
    pub grpo: ChatConfig,
}

pub fn rl_setup(dir: &Path, seed: u64, ppo_extra: &str) -> RlSetup {
    let model = tiny_model(&dir.join("base"), seed);
    let rm = chat_rlhf::rm::with_score_head(&model, &dir.join("rm"), 5).unwrap();
    let prompts = prepared(
        Kind::Prompt,
        RawFormat::PromptLines,
        "data/sft/oasst_prompt_lottery_en_250.jsonl",
        24,
        64,
        &dir.join("prompts"),
    );
    let gsm = prepared(
        Kind::Prompt,
        RawFormat::Gsm8k,
        "data/sft/gsm8k_test.jsonl",
        16,
        200,
        &dir.join("gsm"),
    );
    let gen = "[generation]\nmax_new_tokens = 6\ntemperature = 1.0\n";
    let ppo = format!(
        "[ppo]\nreward_model = \"{}\"\nkl_coef = 0.1\nkl_estimator = \"k3\"\nentropy_coef = 0.01\nppo_epochs = 2\n{ppo_extra}\n{gen}",
        rm.display()
    );
    let grpo = format!(
        "[grpo]\ngroup_size = 2\nreward = \"model\"\nreward_model = \"{}\"\n{gen}",
        rm.display()
    );
    RlSetup {
        ppo: config(&model, &prompts, &dir.join("ppo"), &ppo),
        grpo: config(&model, &gsm, &dir.join("grpo"), &grpo),
    }
}
