#!/usr/bin/env bash
# The chat page in a real headless browser: starts `colossal serve` on MODEL, types two
# messages into the page at / in Debian's Chromium (driven by playwright-core), checks the
# streamed replies and the tokens/s line appear, and writes a screenshot.
#   scripts/check/chat_page.sh [MODEL_DIR] [SCREENSHOT]
# Needs: apt-get install chromium; npm (playwright-core is installed into a temp folder).
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED="${SHARED:-../shared}"
MODEL="${1:-$(ls -d runs/quickstart/checkpoints/step-* | tail -n1)}"
SHOT="${2:-runs/chat_page.png}"
PORT="${PORT:-8123}"
[ -x /usr/bin/chromium ] || { echo "needs Chromium: apt-get install -y chromium" >&2; exit 1; }
PW="${PW_DIR:-/tmp/colossal-pw}"
if [ ! -d "$PW/node_modules/playwright-core" ]; then
  mkdir -p "$PW" && (cd "$PW" && npm init -y >/dev/null && npm install --silent playwright-core@1)
fi
cargo build --release -q -p colossal-cli
mkdir -p "$(dirname "$SHOT")"
./target/release/colossal serve --model "$MODEL" --tokenizer "$SHARED/data/tokenizers/llama2_32k" \
  --chat-template datasets/templates/llama2.jinja --name quickstart --port "$PORT" &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.2; done
cp scripts/check/chat_page.mjs "$PW/chat_page.mjs"
node "$PW/chat_page.mjs" "http://127.0.0.1:$PORT/" "$(realpath -m "$SHOT")"
