#!/usr/bin/env bash
# ColossalChat's pipeline, tiny: base (the quickstart model) → SFT (Dolly open_qa) → reward
# model (hh-rlhf harmless pairs) → PPO (OpenAssistant prompts) and DPO (the same pairs) →
# evaluation of PPO against SFT with the reward model on held-out prompts. Prints each stage's
# metrics; every stage writes metrics.jsonl and PNG curves under runs/rlhf/.
# Extra arguments (e.g. --set parallel.nproc=2 --set parallel.zero_stage=2) go to every trainer.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${SHARED:-../shared}"
OUT=runs/rlhf
TOK="$SHARED/data/tokenizers/llama2_32k"
TEMPLATE=datasets/templates/llama2.jinja
cargo build --release -q -p colossal-data -p llama-pretrain -p chat-rlhf
BASE="${BASE:-$(ls -d runs/quickstart/checkpoints/step-* 2>/dev/null | tail -n1 || true)}"
if [ -z "$BASE" ]; then
  ./scripts/quickstart.sh
  BASE=$(ls -d runs/quickstart/checkpoints/step-* | tail -n1)
fi
latest() { ls -d "$1"/checkpoints/step-* | tail -n1; }
SECONDS=0
stage() { echo "== [${SECONDS}s] $*"; }
prep() { # KIND FORMAT INPUT OUT MAX_LEN
  ./target/release/colossal-data "$1" --format "$2" --input "$3" --tokenizer "$TOK" \
    --chat-template "$TEMPLATE" --max-len "$5" --val-fraction 0.08 --out "$OUT/data/$4"
}
stage "data (LLaMA-2 chat template; rows not kept are listed in each report.json)"
prep sft dolly "$SHARED/data/sft/dolly15k_open_qa_3742.jsonl" sft 128
prep preference hh-rlhf "$SHARED/data/preference/hh-rlhf_harmless-base_test.jsonl.gz" pref 128
prep prompt prompt-lines "$SHARED/data/sft/oasst_prompt_lottery_en_250.jsonl" prompts 96
CHAT=./target/release/chat-rlhf
stage "SFT from $BASE"
$CHAT sft --config configs/rlhf/sft.toml --set "model.hf_dir=\"$BASE\"" "$@"
SFT=$(latest $OUT/sft)
python3 - "$OUT/sft/metrics.jsonl" <<'PY' 2>/dev/null || true
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if "val_loss" in l]
print("  SFT validation loss by step:", " ".join(f"{r['step']}:{r['val_loss']:.4f}" for r in rows))
PY
stage "reward model from $SFT"
$CHAT rm --config configs/rlhf/rm.toml --set "model.hf_dir=\"$SFT\"" "$@"
RM=$(latest $OUT/rm)
python3 - "$OUT/rm/metrics.jsonl" <<'PY' 2>/dev/null || true
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if "val_accuracy" in l]
print("  RM held-out accuracy by step:", " ".join(f"{r['step']}:{r['val_accuracy']:.3f} ({int(r['val_pairs'])} pairs)" for r in rows))
PY
stage "PPO: actor $SFT, reward and critic $RM"
$CHAT ppo --config configs/rlhf/ppo.toml --set "model.hf_dir=\"$SFT\"" \
  --set "ppo.reward_model=\"$RM\"" "$@"
PPO=$(latest $OUT/ppo)
python3 - "$OUT/ppo/metrics.jsonl" <<'PY' 2>/dev/null || true
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("  PPO reward_mean by step:", " ".join(f"{r['reward_mean']:.3f}" for r in rows))
print("  PPO kl by step:         ", " ".join(f"{r['kl']:.4f}" for r in rows))
PY
stage "DPO from $SFT"
$CHAT dpo --config configs/rlhf/dpo.toml --set "model.hf_dir=\"$SFT\"" "$@"
python3 - "$OUT/dpo/metrics.jsonl" <<'PY' 2>/dev/null || true
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if "val_reward_margin" in l]
print("  DPO held-out chosen-vs-rejected margin by step:",
      " ".join(f"{r['step']}:{r['val_reward_margin']:.4f}" for r in rows))
PY
stage "evaluation on held-out prompts (reward model $RM)"
$CHAT eval --model "$PPO" --baseline "$SFT" --reward-model "$RM" --prompts "$OUT/data/prompts" \
  --tokenizer "$TOK" --max-new-tokens 24 --out "$OUT/eval_ppo_vs_sft.json"
echo "demo done in ${SECONDS}s: metrics and curves under $OUT/{sft,rm,ppo,dpo}/"
