#!/usr/bin/env bash
# Every benchmark the Colossal-LLaMA report lists that we have data for, one after another.
set -euo pipefail
here="$(dirname "$0")"
for s in ppl_wikitext2 mmlu agieval cmmlu; do
  "$here/$s.sh" "$@"
done
