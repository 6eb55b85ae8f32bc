#!/usr/bin/env bash
# CMMLU dev (non-commercial licence: CC BY-NC-SA 4.0; the JSON output says so too), 5-shot.
source "$(dirname "$0")/common.sh"
run_eval cmmlu cmmlu --shots 5 "$@"
