//! `colossal merge-lora` on `shared/fixtures/lora_tiny`: the merged directory equals PEFT's
//! `merge_and_unload()` weight for weight and generates its greedy ids.
#[path = "../../core/tests/common/mod.rs"]
mod common;

use std::process::Command;

use common::*;

#[test]
fn merge_lora_writes_peft_merged_model() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let printed = run_ok(
        Command::new(env!("CARGO_BIN_EXE_colossal"))
            .args(["merge-lora", "--base"])
            .arg(fixture("llama_tiny/model"))
            .arg("--adapter")
            .arg(fixture("lora_tiny/adapter"))
            .arg("--out")
            .arg(&out),
    );
    let v: serde_json::Value = serde_json::from_slice(&printed.stdout).unwrap();
    assert_eq!(v["merged_modules"], 14);
    let ours = load_tensors(&out.join("model.safetensors"));
    let peft = load_tensors(&fixture("lora_tiny/merged/model.safetensors"));
    assert_eq!(ours.len(), peft.len(), "same tensor count");
    let mut worst = 0f32;
    for (name, want) in &peft {
        let got = ours.get(name).unwrap_or_else(|| panic!("{name} missing"));
        worst = worst.max(max_diff(got, want));
    }
    println!(
        "{} tensors, largest difference from PEFT's merge {worst:e}",
        peft.len()
    );
    assert!(worst <= 1e-6, "{worst:e}");

    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("lora_tiny/reference.json")).unwrap(),
    )
    .unwrap();
    let prompt: Vec<String> = reference["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.to_string())
        .collect();
    let generated = run_ok(
        Command::new(env!("CARGO_BIN_EXE_colossal"))
            .args(["generate", "--model"])
            .arg(&out)
            .args(["--prompt-ids", &prompt.join(","), "--max-new-tokens", "10"]),
    );
    let g: serde_json::Value = serde_json::from_slice(&generated.stdout).unwrap();
    assert_eq!(g["ids"], reference["merged_greedy_ids"]);

    // A missing adapter is named.
    let bad = Command::new(env!("CARGO_BIN_EXE_colossal"))
        .args(["merge-lora", "--base"])
        .arg(fixture("llama_tiny/model"))
        .arg("--adapter")
        .arg(tmp.path().join("nope"))
        .arg("--out")
        .arg(tmp.path().join("x"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("--adapter"), "{err}");
}
