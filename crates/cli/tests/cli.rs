//! The `colossal` binary on the transformers-written fixture.
#[path = "../../core/tests/common/mod.rs"]
mod common;

use std::process::Command;

use common::*;

#[test]
fn forward_writes_reference_logits() {
    check_forward("llama_tiny", "model_sharded");
}

#[test]
fn forward_and_generate_on_mixtral() {
    check_forward("mixtral_tiny", "model");
    let dir = fixture("mixtral_tiny");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let ids: Vec<String> = reference["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.to_string())
        .collect();
    let out = run_ok(
        Command::new(env!("CARGO_BIN_EXE_colossal"))
            .args(["generate", "--model"])
            .arg(dir.join("model"))
            .args(["--prompt-ids", &ids.join(","), "--max-new-tokens", "10"]),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("colossal generate on mixtral_tiny: {}", v["ids"]);
    assert_eq!(v["ids"], reference["greedy_ids"]);
}

/// `colossal forward` on `fixture/model` reproduces the fixture's logits (row 0, unpadded).
fn check_forward(fixture_dir: &str, model: &str) {
    let dir = fixture(fixture_dir);
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("ids.json");
    let body = serde_json::json!({"input_ids": reference["input_ids"], "attention_mask": reference["attention_mask"]});
    std::fs::write(&input, body.to_string()).unwrap();
    let out = tmp.path().join("logits.safetensors");
    let status = Command::new(env!("CARGO_BIN_EXE_colossal"))
        .args(["forward", "--model"])
        .arg(dir.join(model))
        .arg("--input")
        .arg(&input)
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let ours = load_tensors(&out);
    let theirs = load_tensors(&dir.join("reference.safetensors"));
    // Row 0 is unpadded: compare it whole.
    let a = ours["logits"].get(0).unwrap();
    let b = theirs["logits"].get(0).unwrap();
    assert_close("logits row 0", &a, &b, 1e-4);
}

#[test]
fn generate_prints_greedy_ids() {
    let out = run_ok(
        Command::new(env!("CARGO_BIN_EXE_colossal"))
            .args(["generate", "--model"])
            .arg(fixture("llama_tiny/model"))
            .args([
                "--prompt-ids",
                "1,261,340,286,257",
                "--max-new-tokens",
                "10",
            ]),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["ids"],
        serde_json::json!([77, 133, 315, 71, 179, 328, 263, 361, 322, 67])
    );
}

#[test]
fn bad_model_dir_and_input_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("ids.json");
    std::fs::write(&input, r#"{"input_ids": [[1, 2], [3]]}"#).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_colossal"))
        .args(["forward", "--model"])
        .arg(fixture("llama_tiny/model"))
        .arg("--input")
        .arg(&input)
        .args(["--out", "/dev/null"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ids.json") && err.contains("input_ids"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_colossal"))
        .args(["generate", "--model", "/no/such/model", "--prompt-ids", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/model"));
    let out = Command::new(env!("CARGO_BIN_EXE_colossal"))
        .args(["generate", "--model"])
        .arg(fixture("llama_tiny/model"))
        .args(["--prompt-ids", "1,9999"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--prompt-ids") && err.contains("9999") && err.contains("512"),
        "{err}"
    );
}

#[test]
fn convert_round_trips_through_a_distributed_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dist = tmp.path().join("dist");
    let back = tmp.path().join("hf");
    let convert = |from: &std::path::Path, to: &std::path::Path, format: &str| {
        run_ok(
            Command::new(env!("CARGO_BIN_EXE_colossal"))
                .arg("convert")
                .arg("--from")
                .arg(from)
                .arg("--to")
                .arg(to)
                .args(["--format", format]),
        );
    };
    convert(&fixture("llama_tiny/model"), &dist, "distributed");
    assert!(dist.join("dist/index.json").is_file());
    convert(&dist, &back, "hf");
    // Converting the wrong way round is a clear error.
    let out = Command::new(env!("CARGO_BIN_EXE_colossal"))
        .args(["convert", "--format", "distributed", "--from"])
        .arg(&dist)
        .arg("--to")
        .arg(tmp.path().join("x"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already distributed"));
    let input = tmp.path().join("ids.json");
    std::fs::write(&input, r#"{"input_ids": [[1, 261, 340, 286, 257]]}"#).unwrap();
    let forward = |model: &std::path::Path, out: &std::path::Path| {
        let status = Command::new(env!("CARGO_BIN_EXE_colossal"))
            .args(["forward", "--model"])
            .arg(model)
            .arg("--input")
            .arg(&input)
            .arg("--out")
            .arg(out)
            .status()
            .unwrap();
        assert!(status.success());
        load_tensors(out)["logits"].clone()
    };
    let original = forward(
        &fixture("llama_tiny/model"),
        &tmp.path().join("a.safetensors"),
    );
    let converted = forward(&back, &tmp.path().join("b.safetensors"));
    assert_close(
        "logits after hf → distributed → hf",
        &converted,
        &original,
        0.0,
    );
}

fn tf5_reference() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture("llama_tf5/reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn cli_forward_and_generate_on_a_transformers5_checkpoint() {
    let r = tf5_reference();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("ids.json");
    let body =
        serde_json::json!({"input_ids": r["input_ids"], "attention_mask": r["attention_mask"]});
    std::fs::write(&input, body.to_string()).unwrap();
    let out = tmp.path().join("logits.safetensors");
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_colossal"))
            .args(["forward", "--model"])
            .arg(fixture("llama_tf5/model"))
            .arg("--input")
            .arg(&input)
            .arg("--out")
            .arg(&out),
    );
    let mask = mask_of(&r["attention_mask"]);
    let ours = load_tensors(&out);
    let theirs = load_tensors(&fixture("llama_tf5/reference.safetensors"));
    let e = assert_close(
        "cli logits",
        &masked(&ours["logits"], &mask),
        &masked(&theirs["logits"], &mask),
        1e-4,
    );
    println!("colossal forward on llama_tf5: relative error {e:e}");

    let prompt: Vec<String> = serde_json::from_value::<Vec<u32>>(r["prompt_ids"].clone())
        .unwrap()
        .iter()
        .map(|i| i.to_string())
        .collect();
    let run = run_ok(
        Command::new(env!("CARGO_BIN_EXE_colossal"))
            .args(["generate", "--model"])
            .arg(fixture("llama_tf5/model"))
            .args(["--prompt-ids", &prompt.join(","), "--max-new-tokens", "10"]),
    );
    let v: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    println!("colossal generate on llama_tf5: {}", v["ids"]);
    assert_eq!(v["ids"], r["greedy_ids"]);
}
