#!/usr/bin/env bash
# Colossal-LLaMA's recipe, tiny: expand LLaMA-2's vocabulary with the Chinese SentencePiece
# model, resize the quickstart model to it (new rows = means of their pieces), prepare English +
# Chinese data with the merged tokenizer (sentencepiece-exact), train the embeddings (stage 1),
# then everything with NEFTune (stage 2), and print the perplexity on held-out Chinese text
# (cmrc2018 Wikipedia contexts, not in the training data) after each stage.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${SHARED:-../shared}"
OUT=runs/colossal_llama
TOK="$SHARED/data/tokenizers"
TEXT="$SHARED/data/pretrain_text"
cargo build --release -p colossal-data -p llama-pretrain
BASE="${BASE:-$(ls -d runs/quickstart/checkpoints/step-* 2>/dev/null | tail -n1 || true)}"
if [ -z "$BASE" ]; then
  ./scripts/quickstart.sh
  BASE=$(ls -d runs/quickstart/checkpoints/step-* | tail -n1)
fi
mkdir -p "$OUT"
./target/release/colossal-data expand-vocab --base "$TOK/llama2_32k/tokenizer.model" \
  --add "$TOK/chinese_llama_alpaca/chinese_sp.model" --out "$OUT/tokenizer"
./target/release/llama-pretrain init-model --base "$BASE" --base-tokenizer "$TOK/llama2_32k" \
  --tokenizer "$OUT/tokenizer" --out "$OUT/init"
./target/release/colossal-data pretrain --input "$TEXT/tinyshakespeare.txt" \
  --input "$TEXT/gutenberg_1342_pride_and_prejudice.txt" \
  --input "$TEXT/zh_hongloumeng_dream_of_the_red_chamber.txt" \
  --tokenizer "$OUT/tokenizer" --out "$OUT/data" --seq-len 128 --val-fraction 0.02
head -n 150 "$TEXT/zh_wikipedia_cmrc2018_contexts.txt" > "$OUT/zh_heldout.txt"
ppl() {
  ./target/release/llama-pretrain eval --model "$1" --tokenizer "$OUT/tokenizer" --tasks ppl \
    --ppl-file "$OUT/zh_heldout.txt" --max-len 128 --batch 8 --out "$1/zh_ppl.json" | tail -n1
}
echo "held-out Chinese perplexity, initialised model: $(ppl "$OUT/init")"
./target/release/llama-pretrain train --config configs/colossal_llama/stage1_embeddings.toml \
  --set "model.hf_dir=\"$OUT/init\"" "$@"
STAGE1=$(ls -d $OUT/stage1/checkpoints/step-* | tail -n1)
echo "held-out Chinese perplexity, after stage 1 (embeddings): $(ppl "$STAGE1")"
./target/release/llama-pretrain train --config configs/colossal_llama/stage2_full.toml \
  --set "model.hf_dir=\"$STAGE1\"" "$@"
STAGE2=$(ls -d $OUT/stage2/checkpoints/step-* | tail -n1)
echo "held-out Chinese perplexity, after stage 2 (full, NEFTune): $(ppl "$STAGE2")"
