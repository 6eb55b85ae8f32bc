#!/usr/bin/env bash
# Prepares ../shared/data/pretrain_text with the LLaMA-2 tokenizer and trains a tiny LLaMA from
# scratch (configs/quickstart.toml): loss falling, a loss-curve PNG and a sample at the end.
# Extra arguments go to `llama-pretrain train` (e.g. --set train.max_steps=50).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${SHARED:-../shared}"
for p in "$SHARED/data/pretrain_text" "$SHARED/data/tokenizers/llama2_32k/tokenizer.json"; do
  [ -e "$p" ] || { echo "missing $p (set SHARED=/path/to/shared)" >&2; exit 1; }
done
cargo build --release -p colossal-data -p llama-pretrain -p colossal-cli
./target/release/colossal-data pretrain \
  --input "$SHARED/data/pretrain_text" \
  --tokenizer "$SHARED/data/tokenizers/llama2_32k/tokenizer.json" \
  --out runs/quickstart/data --seq-len 128 --val-fraction 0.02
./target/release/llama-pretrain train --config configs/quickstart.toml \
  --set "sample.tokenizer=\"$SHARED/data/tokenizers/llama2_32k/tokenizer.json\"" "$@"
