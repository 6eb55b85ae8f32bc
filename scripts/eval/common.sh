# Shared by the eval wrappers: build llama-pretrain once and run `eval` with the shared data.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
SHARED="${SHARED:-../shared}"
if [ $# -lt 1 ]; then
  echo "usage: $0 MODEL_DIR [extra llama-pretrain eval flags, e.g. --limit 20 --tokenizer DIR]" >&2
  exit 2
fi
MODEL="$1"
shift
cargo build --release -q -p llama-pretrain
run_eval() { # TASKS OUT_NAME [flags…]
  local tasks="$1" name="$2"
  shift 2
  ./target/release/llama-pretrain eval --model "$MODEL" --data "$SHARED/data/eval" \
    --tasks "$tasks" --out "$MODEL/eval_$name.json" "$@"
}
