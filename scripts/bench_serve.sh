#!/usr/bin/env bash
# Serving benchmark on the quickstart model: starts `colossal serve`, runs `colossal bench-serve`
# at 1, 8 and 32 concurrent clients (runs/bench-serve.json), and, if $PYTHON has torch and
# transformers, transformers' generate on the same prompts (runs/bench-serve-hf.json); prints both.
#   scripts/bench_serve.sh [MODEL_DIR]     (env: PYTHON, MAX_TOKENS, REQUESTS, PORT)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${SHARED:-../shared}"
MODEL="${1:-$(ls -d runs/quickstart/checkpoints/step-* | tail -n1)}"
TOK="$SHARED/data/tokenizers/llama2_32k"
PORT="${PORT:-8124}"; MAX_TOKENS="${MAX_TOKENS:-32}"; REQUESTS="${REQUESTS:-4}"
cargo build --release -q -p colossal-cli
./target/release/colossal serve --model "$MODEL" --tokenizer "$TOK" --name bench --port "$PORT" &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.2; done
./target/release/colossal bench-serve --url "127.0.0.1:$PORT" --clients 1,8,32 \
  --requests-per-client "$REQUESTS" --max-tokens "$MAX_TOKENS" --prompts scripts/bench_prompts.txt \
  --out runs/bench-serve.json >/dev/null
kill -TERM $SERVER; wait $SERVER 2>/dev/null || true; trap - EXIT
if [ -n "${PYTHON:-}" ] && "$PYTHON" -c 'import torch, transformers' 2>/dev/null; then
  "$PYTHON" scripts/check/hf_generate_bench.py "$MODEL" "$TOK" --clients 1,8,32 \
    --requests-per-client "$REQUESTS" --max-tokens "$MAX_TOKENS" > runs/bench-serve-hf.json
fi
python3 - <<'PY'
import json, os
ours = {r["clients"]: r for r in json.load(open("runs/bench-serve.json"))["runs"]}
hf = {}
if os.path.exists("runs/bench-serve-hf.json"):
    hf = {r["clients"]: r for r in json.load(open("runs/bench-serve-hf.json"))["transformers_generate"]}
print(f"{'clients':>7} {'colossal tok/s':>15} {'req/s':>7} {'TTFT p50 ms':>12} {'TPOT p50 ms':>12} {'HF generate tok/s':>18}")
for c, r in sorted(ours.items()):
    h = hf.get(c, {}).get("output_tokens_per_s")
    print(f"{c:>7} {r['output_tokens_per_s']:>15.1f} {r['requests_per_s']:>7.2f} {r['ttft_ms']['p50']:>12.1f} "
          f"{r['tpot_ms']['p50']:>12.2f} {('%.1f' % h) if h else '-':>18}")
PY
