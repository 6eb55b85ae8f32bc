#!/usr/bin/env bash
# AGIEval Gaokao (Chinese multiple choice), 0-shot by default as in AGIEval's own zero-shot table.
source "$(dirname "$0")/common.sh"
run_eval agieval agieval --shots 0 "$@"
