#!/usr/bin/env bash
# Perplexity on the WikiText-2 (raw) test set; results in MODEL/eval_wikitext2.json.
source "$(dirname "$0")/common.sh"
run_eval ppl wikitext2 --ppl-file "$SHARED/data/pretrain_text/wikitext-2-raw_wiki.test.raw" "$@"
