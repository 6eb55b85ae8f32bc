#!/usr/bin/env bash
# Same config, same machine, same run: `llama-pretrain bench` with the fused and the reference
# kernels and scripts/bench/torch_llama.py, alternating, N rounds; prints each run and the
# medians (tokens/s) and writes bench-compare.json.
#
#   python3 -m venv .venv && .venv/bin/pip install torch     # once (not needed by the tests)
#   scripts/bench/compare.sh [ROUNDS] [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-5}
py=${2:-.venv/bin/python}
cargo build --release -p llama-pretrain >/dev/null
tmp=$(mktemp -d)
for i in $(seq "$rounds"); do
  for k in fused reference; do
    ./target/release/llama-pretrain bench --kernels "$k" --out "$tmp/$k-$i.json" >/dev/null
  done
  if [ -x "$py" ] || command -v "$py" >/dev/null; then
    "$py" scripts/bench/torch_llama.py --out "$tmp/torch-$i.json" >/dev/null
  fi
done
python3 - "$tmp" "$rounds" <<'PY'
import json, os, statistics, sys
tmp, rounds = sys.argv[1], int(sys.argv[2])
out = {}
for name in ["fused", "reference", "torch"]:
    runs = []
    for i in range(1, rounds + 1):
        p = os.path.join(tmp, f"{name}-{i}.json")
        if os.path.exists(p):
            runs.append(json.load(open(p))["tokens_per_s"])
    if runs:
        out[name] = {"tokens_per_s": [round(r) for r in runs], "median": round(statistics.median(runs))}
        print(f"{name:>9}: median {out[name]['median']} tokens/s  runs {out[name]['tokens_per_s']}")
if "torch" in out:
    for k in ["fused", "reference"]:
        out[f"{k}_vs_torch"] = round(out[k]["median"] / out["torch"]["median"], 3)
        print(f"{k} / torch = {out[f'{k}_vs_torch']}")
json.dump(out, open("bench-compare.json", "w"), indent=2)
PY
