#!/usr/bin/env bash
# Peak RSS of one ZeRO-3 training step on one rank with the model state in memory vs on disk.
# Default model: dim 1024, 8 layers, vocab 32000 (168M params, fp32 state 16·Ψ ≈ 2.7 GB).
# Usage: scripts/bench/offload_rss.sh [extra bench-parallel flags, e.g. --dim 2048]
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -p llama-pretrain >/dev/null
for off in none disk; do
  log=$(mktemp)
  MIMALLOC_PURGE_DELAY=0 /usr/bin/time -v ./target/release/llama-pretrain bench-parallel \
    --nproc 1 --stages 3 --dim 1024 --layers 8 --vocab 32000 --seq 64 --batch 1 --steps 1 \
    --offload "$off" --out "bench_offload_$off.json" "$@" >"$log" 2>&1
  rss_kb=$(grep "Maximum resident" "$log" | awk '{print $NF}')
  step=$(awk '$1 == 1 && $2 == 3 {print $3}' "$log")
  disk=$(grep -o '"offloaded_bytes": [0-9]*' "bench_offload_$off.json" | awk '{print $2}')
  echo "offload=$off step_s=$step peak_rss_MB=$((rss_kb / 1024)) on_disk_MB=$((disk / 1048576))"
  rm -f "$log"
done
