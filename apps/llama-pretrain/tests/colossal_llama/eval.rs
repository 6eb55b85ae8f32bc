//! `llama-pretrain eval`: the letter-likelihood scoring is checked with a hand-made model that
//! always answers one letter; a tiny random model scores about chance on AGIEval Gaokao and
//! MMLU with every question counted; perplexity is finite.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor, Var};
use colossal_core::checkpoint::llama::save_llama;
use colossal_core::models::llama::{init_params, Llama, LlamaConfig};
use colossal_core::params::Params;
use colossal_data::tokenizer::LoadedTokenizer;

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

fn llama2_tokenizer() -> PathBuf {
    shared().join("data/tokenizers/llama2_32k/tokenizer.model")
}

fn config(hidden: usize) -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 32000, "hidden_size": hidden, "intermediate_size": 2 * hidden,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
        "tie_word_embeddings": false, "initializer_range": 0.3, "bos_token_id": 1,
        "max_position_embeddings": 2048
    }))
    .unwrap()
}

fn save(dir: &Path, model: &Llama, params: &Params) {
    save_llama(dir, model, params, 1 << 30).unwrap();
    std::fs::copy(llama2_tokenizer(), dir.join("tokenizer.model")).unwrap();
}

/// A model whose every prediction is `token`: embeddings all ones, the layer adds nothing,
/// and only `token`'s LM-head row is non-zero.
fn always(dir: &Path, token: u32) {
    let model = Llama::new(config(8)).unwrap();
    let init = init_params(&model, 1, &Device::Cpu).unwrap();
    let mut params = Params::new();
    for (name, var) in init.iter() {
        let dims = var.as_tensor().dims().to_vec();
        let t = if name == Llama::EMBED || name.ends_with("norm.weight") {
            Tensor::ones(dims, candle_core::DType::F32, &Device::Cpu).unwrap()
        } else if name == "lm_head.weight" {
            let mut w = vec![0f32; dims[0] * dims[1]];
            w[token as usize * dims[1]..(token as usize + 1) * dims[1]].fill(1.0);
            Tensor::from_vec(w, dims, &Device::Cpu).unwrap()
        } else if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
            Tensor::zeros(dims, candle_core::DType::F32, &Device::Cpu).unwrap()
        } else {
            var.as_tensor().clone()
        };
        params.insert(name, Var::from_tensor(&t).unwrap());
    }
    save(dir, &model, &params);
}

fn eval(model: &Path, data: &Path, tasks: &str, extra: &[&str]) -> serde_json::Value {
    let out = model.join("eval.json");
    let res = Command::new(env!("CARGO_BIN_EXE_llama-pretrain"))
        .arg("eval")
        .arg("--model")
        .arg(model)
        .arg("--data")
        .arg(data)
        .args(["--tasks", tasks])
        .arg("--out")
        .arg(&out)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    println!("{}", String::from_utf8_lossy(&res.stdout));
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

#[test]
fn scoring_picks_the_letter_the_model_prefers() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("mmlu/dev")).unwrap();
    std::fs::write(
        data.join("mmlu/dev/toy_dev.csv"),
        "\"1+1=?\",1,3,2,4,C\nWhich is red?,sky,grass,blood,snow,C\nFirst letter?,a,b,c,d,A\n\"Say \"\"hi\"\"\",hi,ho,ha,he,B\n",
    )
    .unwrap();
    let tok = LoadedTokenizer::load(&llama2_tokenizer()).unwrap();
    let letter = |l: &str| *tok.encode(&format!("Answer: {l}")).unwrap().last().unwrap();
    for (l, want) in [("C", 0.5), ("A", 0.25), ("D", 0.0)] {
        let dir = tmp.path().join(format!("always-{l}"));
        always(&dir, letter(l));
        let r = eval(&dir, &data, "mmlu-dev", &["--shots", "2", "--batch", "3"]);
        assert_eq!(r["tasks"]["mmlu-dev"]["questions"], 4);
        assert_eq!(
            r["tasks"]["mmlu-dev"]["accuracy"].as_f64().unwrap(),
            want,
            "always {l}"
        );
    }
}

#[test]
fn a_tiny_model_is_near_chance_and_every_question_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    let model = Llama::new(config(16)).unwrap();
    save(&dir, &model, &init_params(&model, 3, &Device::Cpu).unwrap());
    let data = shared().join("data/eval");
    let r = eval(
        &dir,
        &data,
        "agieval,mmlu-dev",
        &["--shots", "0", "--batch", "16"],
    );
    let agieval = &r["tasks"]["agieval"];
    let counts: Vec<(String, u64)> = agieval["subjects"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v["questions"].as_u64().unwrap()))
        .collect();
    let want = [
        ("biology", 210),
        ("chemistry", 207),
        ("geography", 199),
        ("history", 235),
        ("physics", 200),
    ];
    assert_eq!(counts, want.map(|(k, n)| (k.to_string(), n)).to_vec());
    let mmlu = &r["tasks"]["mmlu-dev"];
    assert_eq!(mmlu["questions"], 285);
    assert!(mmlu["subjects"]
        .as_object()
        .unwrap()
        .values()
        .all(|s| s["questions"] == 5));
    for task in [agieval, mmlu] {
        let acc = task["accuracy"].as_f64().unwrap();
        assert!((0.15..0.40).contains(&acc), "about chance (0.25): {acc}");
    }
    // Perplexity on a short text: finite and above 1 (a random model is no better than
    // guessing among the 32k tokens).
    let text = tmp.path().join("t.txt");
    std::fs::write(
        &text,
        "The quick brown fox jumps over the lazy dog. ".repeat(20),
    )
    .unwrap();
    let r = eval(
        &dir,
        &data,
        "ppl",
        &["--ppl-file", text.to_str().unwrap(), "--max-len", "64"],
    );
    let ppl = r["tasks"]["ppl"]["perplexity"].as_f64().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0 && ppl < 1e5, "{ppl}");
}
