#!/usr/bin/env bash
# MMLU: 5-shot (dev shots), test questions; per-subject and overall accuracy in MODEL/eval_mmlu.json.
source "$(dirname "$0")/common.sh"
run_eval mmlu mmlu --shots 5 "$@"
