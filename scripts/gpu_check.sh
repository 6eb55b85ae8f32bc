#!/usr/bin/env bash
# The checks that need a GPU, as one short script (run it where a GPU is lent):
#   1. build colossal and llama-pretrain with `--features cuda` (real nvcc: CUDA toolkit on PATH)
#   2. parity on the GPU: `colossal --device cuda generate` on shared/fixtures/llama_tiny and
#      llama_tf5 must give transformers' greedy ids exactly
#   3. the quickstart for 20 steps with train.device = "cuda": prints tokens/s and MFU
#      (6·params·tokens/s over PEAK_TFLOPS, default 989 = H100/H200 dense bf16; the quickstart
#      trains in fp32, so expect a small MFU on a 4-layer 128-wide model)
#   4. the kernels crate's CUDA kernels (NVRTC at run time) against its CPU kernels, f32 and bf16
#   5. ZeRO-1/2 with their gradient shards and moments on the GPU (tensor-op update) equal one
#      rank (cargo test … zero_state with COLOSSAL_TEST_DEVICE=cuda)
#   6. with two GPUs or more: the same 20 steps on 2 NCCL ranks, losses equal to the one-GPU run
#
#   scripts/gpu_check.sh            run it (fails at once without nvidia-smi or nvcc)
#   scripts/gpu_check.sh --plan     print the one line of what it would run, and exit
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${SHARED:-../shared}"
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
plan="build --release --features colossal-core/cuda; colossal --device cuda generate on llama_tiny + llama_tf5 (greedy ids = transformers); llama-pretrain quickstart 20 steps on cuda → tokens/s, MFU vs ${PEAK_TFLOPS} TFLOP/s; CUDA kernels = CPU kernels (f32, bf16, AdamW); ZeRO-1/2 state on the GPU = one rank; with 2+ GPUs, the 20 steps on 2 NCCL ranks = the one-GPU losses"
echo "gpu_check: $plan"
[ "${1:-}" = --plan ] && exit 0
command -v nvidia-smi >/dev/null || { echo "gpu_check: no nvidia-smi: this machine has no NVIDIA GPU" >&2; exit 1; }
command -v nvcc >/dev/null || { echo "gpu_check: no nvcc on PATH: candle's CUDA kernels need the CUDA toolkit" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
cargo build --release --features colossal-core/cuda -p colossal-cli -p llama-pretrain -p colossal-data

ids() { python3 -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))$2))" "$1"; }
greedy() { # MODEL_DIR PROMPT_IDS WANT_JSON
  got=$(./target/release/colossal --device cuda generate --model "$1" --prompt-ids "$2" --max-new-tokens 10 |
    python3 -c "import json,sys; print(json.dumps(json.load(sys.stdin)['ids']))")
  if [ "$got" = "$3" ]; then echo "parity $1: greedy ids $got = transformers"; else
    echo "parity $1: greedy ids $got, transformers $3" >&2; exit 1; fi
}
tiny="$SHARED/fixtures/llama_tiny"
greedy "$tiny/model" "$(ids "$tiny/reference.json" "['generation']['prompt_ids']" | tr -d '[] ')" \
  "$(ids "$tiny/reference.json" "['generation']['new_token_ids']")"
tf5="$SHARED/fixtures/llama_tf5"
greedy "$tf5/model" "$(ids "$tf5/reference.json" "['prompt_ids']" | tr -d '[] ')" \
  "$(ids "$tf5/reference.json" "['greedy_ids']")"

out=runs/gpu_check
rm -rf "$out"
./target/release/colossal-data pretrain --input "$SHARED/data/pretrain_text" \
  --tokenizer "$SHARED/data/tokenizers/llama2_32k/tokenizer.json" \
  --out "$out/data" --seq-len 128 --val-fraction 0.02 >/dev/null
./target/release/llama-pretrain train --config configs/quickstart.toml --max-steps 20 \
  --set "train.device=\"cuda\"" --set "train.out_dir=\"$out\"" --set "data.path=\"$out/data\"" \
  --set "sample.tokenizer=\"$SHARED/data/tokenizers/llama2_32k/tokenizer.json\""
python3 - "$out" "$PEAK_TFLOPS" <<'EOF'
import json, sys, pathlib
out, peak = pathlib.Path(sys.argv[1]), float(sys.argv[2])
rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"tokens_per_s"' in l]
cfg = json.loads(next(out.glob("checkpoints/*/config.json")).read_text())
h, i, l, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
kv = cfg["num_key_value_heads"] * cfg["head_dim"]
params = v * h + l * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h
tps = sorted(r["tokens_per_s"] for r in rows[len(rows) // 2:])[len(rows[len(rows) // 2:]) // 2]
print(f"quickstart on cuda: {len(rows)} steps, median tokens/s {tps:.0f}, "
      f"MFU {6 * params * tps / (peak * 1e12):.2e} ({params} params, peak {peak} TFLOP/s)")
EOF

cargo test --release -p colossal-kernels --features cuda --test cuda -- --nocapture |
  grep -E "relative difference|max difference|test result"
COLOSSAL_TEST_DEVICE=cuda cargo test --release --features colossal-core/cuda -p colossal-core \
  --test model_parallel zero_state -- --nocapture | grep -E "worst|test result"

# Two GPU ranks over NCCL (needs a second GPU): their losses must equal the one-GPU run's.
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  ./target/release/llama-pretrain train --config configs/quickstart.toml --max-steps 20 \
    --set "train.device=\"cuda\"" --set "train.out_dir=\"$out/nccl\"" --set "data.path=\"$out/data\"" \
    --set "parallel.nproc=2" --set "parallel.backend=\"nccl\"" \
    --set "sample.tokenizer=\"$SHARED/data/tokenizers/llama2_32k/tokenizer.json\""
  python3 - "$out" <<'EOF2'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
loss = lambda p: [json.loads(l)["loss"] for l in p.read_text().splitlines() if '"loss"' in l]
one, two = loss(out / "metrics.jsonl"), loss(out / "nccl" / "metrics.jsonl")
print(f"nccl 2 ranks: losses {two} vs one GPU {one}")
assert all(abs(a - b) < 1e-3 * abs(b) for a, b in zip(two, one)), "nccl run differs from one GPU"
EOF2
else
  echo "gpu_check: one GPU: the two-rank NCCL run is skipped"
fi
